"""LoRA against Hugging Face peft (the oracle): same outputs, same checkpoints, both directions."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
    "llama-all-linear": (tiny_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.1)),
    "llama-regex-rslora": (tiny_llama, dict(target_modules=r".*\.(q_proj|o_proj)", use_rslora=True, task_type="CAUSAL_LM")),
    "llama-patterns": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "up_proj"], rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 32}, layers_to_transform=[1], task_type="CAUSAL_LM")),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "gpt2-default-targets": (tiny_gpt2, dict(task_type="CAUSAL_LM", bias="lora_only")),
    "bert-seqcls": (tiny_bert, dict(target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")),
}


def _pair(case, **extra):
    make, kw = CASES[case]
    kw = dict(kw, r=4, lora_alpha=8, init_lora_weights=False, **extra)
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(make(), fastpeft.LoraConfig(**copy.deepcopy(kw)))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(kw)))
    # same adapter weights in both: copy ours into peft's model through peft's own loader
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    return ours.eval(), theirs.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_and_params_as_peft(case, ids):
    ours, theirs = _pair(case)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad
    )
    # the base-model output really changed: the adapter is not a no-op
    with ours.disable_adapter():
        base = _logits(ours, ids)
    assert (base - _logits(ours, ids)).abs().max() > 1e-4


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d", "bert-seqcls", "llama-patterns"])
def test_fastpeft_checkpoint_loads_in_peft(case, ids, tmp_path):
    ours, _ = _pair(case)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    make = CASES[case][0]
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d", "bert-seqcls", "llama-patterns"])
def test_peft_checkpoint_loads_in_fastpeft(case, ids, tmp_path):
    _, theirs = _pair(case)
    theirs.save_pretrained(tmp_path)
    make = CASES[case][0]
    loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    assert isinstance(loaded, fastpeft.PeftModel)
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d", "bert-seqcls"])
def test_checkpoint_files_match_peft(case, tmp_path):
    ours, theirs = _pair(case)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_rslora",
                "init_lora_weights", "layers_to_transform", "rank_pattern", "alpha_pattern", "inference_mode", "modules_to_save"):
        assert ca[key] == cb[key], key
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    # every field we write is one peft knows
    assert set(ca) <= set(cb) | {"peft_version"}


def test_config_roundtrip_and_peft_config_loads(tmp_path):
    cfg = fastpeft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM")
    cfg.save_pretrained(tmp_path)
    back = fastpeft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, fastpeft.LoraConfig)
    assert back.to_dict() == cfg.to_dict()
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert theirs.r == 16 and theirs.lora_alpha == 32 and set(theirs.target_modules) == {"q_proj", "v_proj"}
    peft.LoraConfig(r=4, target_modules=["c_attn"]).save_pretrained(tmp_path / "p")
    mine = fastpeft.PeftConfig.from_pretrained(tmp_path / "p")
    assert mine.r == 4 and mine.target_modules == {"c_attn"}


def test_two_adapters_switch_like_peft(ids, tmp_path):
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    kw2 = dict(kw, r=2, target_modules=["k_proj", "up_proj"])
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw))
    ours.add_adapter("other", fastpeft.LoraConfig(**kw2))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    theirs.add_adapter("other", peft.LoraConfig(**kw2))
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict(name), adapter_name=name)
    outs = {}
    for name in ("other", "default", "other"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert ours.active_adapter == name
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
        trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert trainable and all(f".{name}." in n for n in trainable)
        outs[name] = _logits(ours, ids)
    assert (outs["default"] - outs["other"]).abs().max() > 1e-4
    # non-default adapters are saved in a subfolder, as peft does; peft reads both
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(_logits(loaded, ids), outs["other"], atol=FP32_ATOL, rtol=0)
    # and fastpeft's load_adapter reads them back
    mine = fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    mine.load_adapter(tmp_path / "other", adapter_name="other")
    mine.set_adapter("other")
    torch.testing.assert_close(_logits(mine, ids), outs["other"], atol=FP32_ATOL, rtol=0)
    # delete
    ours.delete_adapter("other")
    assert list(ours.peft_config) == ["default"]
    assert not any(".other." in n for n, _ in ours.named_parameters())


def test_seq2seq_t5_default_targets_match_peft(tmp_path):
    from conftest import tiny_t5

    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    ours = fastpeft.get_peft_model(tiny_t5(), fastpeft.LoraConfig(**kw)).eval()
    assert isinstance(ours, fastpeft.PeftModelForSeq2SeqLM)
    assert ours.peft_config["default"].target_modules == {"q", "v"}
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    src = torch.randint(1, 128, (2, 7))
    labels = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        a = ours(input_ids=src, labels=labels)
        b = theirs(input_ids=src, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=FP32_ATOL, rtol=0)
    ga = ours.generate(input_ids=src, max_new_tokens=5, do_sample=False)
    gb = theirs.generate(input_ids=src, max_new_tokens=5, do_sample=False)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("task", ["TOKEN_CLS", "FEATURE_EXTRACTION"])
def test_bert_token_cls_and_feature_extraction_match_peft(task, ids, tmp_path):
    from conftest import tiny_bert_tokens

    def make():
        if task == "TOKEN_CLS":
            return tiny_bert_tokens()
        from transformers import BertModel

        return BertModel(tiny_bert_tokens().config).eval()

    torch.manual_seed(0)
    base_ours, base_theirs = make(), None
    base_theirs = copy.deepcopy(base_ours)
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["query", "key", "dense"], task_type=task)
    ours = fastpeft.get_peft_model(base_ours, fastpeft.LoraConfig(**kw)).eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_theirs, tmp_path).eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids), theirs(input_ids=ids)
    key = "logits" if task == "TOKEN_CLS" else "last_hidden_state"
    torch.testing.assert_close(a[key], b[key], atol=FP32_ATOL, rtol=0)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    # TOKEN_CLS trains and saves the classifier head in full, as peft does
    assert ("base_model.model.classifier.weight" in saved) == (task == "TOKEN_CLS")


@pytest.mark.parametrize("case", ["llama", "llama-regex-rslora"])
def test_set_scale_and_scale_layer_match_peft(case, ids):
    """peft's scaling API (used by e.g. diffusers' LoRA weight scale): set_scale resets to
    ``scale *`` the initial scaling (``alpha/sqrt(r)`` under rsLoRA), scale_layer multiplies,
    unscale_layer(None) restores; logits follow peft's at each step."""
    ours, theirs = _pair(case)

    def lora_layers(model):
        return {n: m for n, m in model.named_modules() if hasattr(m, "set_scale") and hasattr(m, "lora_A")}

    for step in (lambda m: m.set_scale("default", 0.5), lambda m: m.scale_layer(3.0),
                 lambda m: m.unscale_layer(2.0), lambda m: m.unscale_layer(None)):
        for model in (ours, theirs):
            for layer in lora_layers(model).values():
                step(layer)
        ours_scaling = {n: m.scaling["default"] for n, m in lora_layers(ours).items()}
        theirs_scaling = {n: m.scaling["default"] for n, m in lora_layers(theirs).items()}
        assert ours_scaling.keys() == theirs_scaling.keys() and ours_scaling
        for name, value in theirs_scaling.items():
            assert ours_scaling[name] == pytest.approx(value, rel=1e-12), name
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
