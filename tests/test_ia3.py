"""(IA)^3 against Hugging Face peft (the oracle): outputs, gradients, checkpoints, merging, bad configs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

CASES = {
    "llama": (tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.(q_proj|up_proj)", feedforward_modules=r".*up_proj", task_type="CAUSAL_LM")),
    "gpt2-defaults": (tiny_gpt2, dict(task_type="CAUSAL_LM")),  # Conv1D, default targets incl. feed-forward mlp.c_proj
    "bert-seqcls": (tiny_bert, dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], task_type="SEQ_CLS")),
    "t5": (tiny_t5, dict(task_type="SEQ_2_SEQ_LM")),  # default targets k, v, wo (wo feed-forward)
}


def _pair(case):
    make, kw = CASES[case]
    kw = dict(kw, init_ia3_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.get_peft_model(make(), fastpeft.IA3Config(**copy.deepcopy(kw)))
        theirs = peft.get_peft_model(make(), peft.IA3Config(**copy.deepcopy(kw)))
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    return ours.eval(), theirs.eval()


def _inputs(model, ids):
    if getattr(model.config, "is_encoder_decoder", False):
        return dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    return dict(input_ids=ids)


def _logits(model, ids):
    with torch.no_grad():
        return model(**_inputs(model, ids)).logits


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_and_trainable_params_as_peft(case, ids, capsys):
    ours, theirs = _pair(case)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad
    )
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    print(case, lines[0])
    with ours.disable_adapter():
        base = _logits(ours, ids)
    assert (base - _logits(ours, ids)).abs().max() > 1e-4  # the random vectors really act


def test_default_init_is_identity(ids):
    base = tiny_llama()
    ref = _logits(base, ids)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)
    shapes = {n.rsplit(".", 3)[-3]: tuple(p.shape) for n, p in model.named_parameters() if "ia3_l" in n}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}  # GQA: k/v out = 2 heads * 8


@pytest.mark.parametrize("case", ["llama", "gpt2-defaults"])
def test_gradients_match_peft(case, ids):
    ours, theirs = _pair(case)
    for m in (ours, theirs):  # eval mode: GPT-2's own dropout stays off, gradients still flow
        m(input_ids=ids, labels=ids).loss.backward()
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama", "gpt2-defaults", "bert-seqcls"])
def test_checkpoints_round_trip_both_ways(case, ids, tmp_path):
    ours, theirs = _pair(case)
    make = CASES[case][0]
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "fan_in_fan_out", "init_ia3_weights", "inference_mode", "modules_to_save"):
        assert ca[key] == cb[key], key
    for key in ("target_modules", "feedforward_modules"):
        assert (sorted(ca[key]) if isinstance(ca[key], list) else ca[key]) == (sorted(cb[key]) if isinstance(cb[key], list) else cb[key])
    assert set(ca) <= set(cb) | {"peft_version"}
    # fastpeft's adapter in peft, peft's adapter in fastpeft
    theirs_loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)
    ours_loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    assert isinstance(ours_loaded.base_model, fastpeft.IA3Model)
    torch.testing.assert_close(_logits(ours_loaded, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2-defaults", "bert-seqcls"])
def test_merge_unmerge_restores_weights(case, ids):
    ours, theirs = _pair(case)
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "ia3_l" not in k}
    expected = _logits(ours, ids)
    ours.base_model.merge_adapter()
    torch.testing.assert_close(_logits(ours, ids), expected, atol=FP32_ATOL, rtol=0)
    changed = [k for k, v in ours.get_base_model().state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed  # merging really rewrote base weights (and biases of output-scaled layers)
    with pytest.warns(UserWarning):  # unmerge divides; warns only when nothing is merged
        ours.base_model.unmerge_adapter()
        ours.base_model.unmerge_adapter()
    after = ours.get_base_model().state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=1e-5)
    # merged weights equal peft's merged weights
    merged = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert not any("ia3" in n for n, _ in merged.named_parameters())
    sd_o, sd_t = merged.state_dict(), merged_theirs.state_dict()
    assert sd_o.keys() == sd_t.keys()
    for k in sd_o:
        torch.testing.assert_close(sd_o[k], sd_t[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(merged, ids), expected, atol=FP32_ATOL, rtol=0)


def test_unload_returns_original_model(ids):
    ref = _logits(tiny_llama(), ids)
    ours, _ = _pair("llama")
    plain = ours.unload()
    assert not any("ia3" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), ref, atol=0, rtol=0)


def test_two_adapters_multiply_like_peft(ids):
    kw = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    kw2 = dict(kw, target_modules=["v_proj", "down_proj"])
    ours = fastpeft.get_peft_model(tiny_llama(), fastpeft.IA3Config(**kw))
    ours.add_adapter("other", fastpeft.IA3Config(**kw2))
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(**kw))
    theirs.add_adapter("other", peft.IA3Config(**kw2))
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict(name), adapter_name=name)
    for name in ("other", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
        trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert trainable and all(f".{name}" in n for n in trainable)
    # both active at once: vectors multiply (peft's rule)
    ours.base_model.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="feedforward_modules .*subset of target_modules"):
        fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(TypeError, match="target_modules"):
        fastpeft.IA3Config(target_modules=3)
    with pytest.raises(ValueError, match="No default \\(IA\\)\\^3 target modules .*set target_modules"):
        fastpeft.get_peft_model(_Toy(), fastpeft.IA3Config())
    with pytest.raises(ValueError, match="No default \\(IA\\)\\^3 feedforward modules .*set feedforward_modules"):
        fastpeft.get_peft_model(_Toy(), fastpeft.IA3Config(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="embed_tokens.*does not support"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="not found in the base model"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.IA3Config(target_modules=["qq_proj"], feedforward_modules=[]))


class _Toy(torch.nn.Module):
    """A model of no known type (no transformers config): peft has no default targets for it."""

    def __init__(self):
        super().__init__()
        self.k_proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.k_proj(x)
