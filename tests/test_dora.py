"""DoRA (``LoraConfig(use_dora=True)``) and rsLoRA against Hugging Face peft (the oracle).

Same weights in both libraries (fastpeft's adapter loaded into peft, magnitudes moved off their
initial value so they matter): outputs, gradients, trainable-parameter counts, checkpoints both
ways, merge/unmerge, several adapters, bad configs.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
    "llama-rslora-patterns": (
        tiny_llama,
        dict(target_modules=["q_proj", "o_proj", "up_proj"], use_rslora=True, rank_pattern={"o_proj": 2},
             alpha_pattern={"up_proj": 3.0}, task_type="CAUSAL_LM"),
    ),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bert-seqcls": (tiny_bert, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def _pair(case, **extra):
    make, kw = CASES[case]
    kw = dict(kw, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.get_peft_model(make(), fastpeft.LoraConfig(**copy.deepcopy(kw)))
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(kw)))
    g = torch.Generator().manual_seed(5)
    sd = {k: (v * (0.5 + torch.rand(v.shape, generator=g)) if k.endswith("lora_magnitude_vector") else v)
          for k, v in ours.get_adapter_state_dict("default").items()}
    fastpeft.set_peft_model_state_dict(ours, sd)
    peft.set_peft_model_state_dict(theirs, sd)
    return ours.eval(), theirs.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_scaling_and_trainable_params_as_peft(case, ids, capsys):
    ours, theirs = _pair(case)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    mods_o = {n: m for n, m in ours.named_modules() if isinstance(m, fastpeft.tuners.lora.LoraLayer)}
    mods_t = {n: m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert mods_o.keys() == mods_t.keys()
    for n in mods_o:  # rsLoRA (alpha / sqrt(r)) and the rank/alpha patterns give peft's scaling
        assert mods_o[n].scaling["default"] == pytest.approx(mods_t[n].scaling["default"], rel=1e-12), n
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad
    )
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    # the magnitudes really act: without them (plain LoRA on the same A, B) outputs differ
    for m in mods_o.values():
        m.use_dora["default"] = False
    ref = _logits(theirs, ids)
    assert (_logits(ours, ids) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_default_init_is_identity_and_magnitude_is_weight_norm(ids):
    ref = _logits(tiny_llama(), ids)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj", "down_proj"], use_dora=True))
    torch.testing.assert_close(_logits(model, ids), ref, atol=FP32_ATOL, rtol=0)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1), atol=1e-6, rtol=1e-6)


def test_rslora_scaling_value():
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=16, lora_alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 8 / 4.0


@pytest.mark.parametrize("case,dropout", [("llama", 0.2), ("gpt2-conv1d", 0.0)])
def test_gradients_match_peft(case, dropout, ids):
    ours, theirs = _pair(case, lora_dropout=dropout)
    losses = []
    for m in (ours, theirs):
        m.train() if dropout else m.eval()  # train: same seed, same dropout masks in both libraries
        torch.manual_seed(123)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=FP32_ATOL, rtol=0)
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert g_ours.keys() == g_theirs.keys() and any("lora_magnitude_vector" in n for n in g_ours)
    for n in g_ours:
        assert g_ours[n] is not None, n
        torch.testing.assert_close(g_ours[n], g_theirs[n], atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d", "bert-seqcls"])
def test_checkpoints_round_trip_both_ways(case, ids, tmp_path):
    ours, theirs = _pair(case)
    make = CASES[case][0]
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and any(k.endswith("lora_magnitude_vector") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ca["use_dora"] is True
    theirs_loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)
    ours_loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path / "theirs").eval()
    assert all(m.use_dora["default"] for m in ours_loaded.modules() if isinstance(m, fastpeft.tuners.lora.LoraLayer))
    torch.testing.assert_close(_logits(ours_loaded, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d"])
def test_merge_unmerge_restores_weights(case, ids):
    ours, theirs = _pair(case)
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k}
    expected = _logits(ours, ids)
    ours.base_model.merge_adapter()
    torch.testing.assert_close(_logits(ours, ids), expected, atol=FP32_ATOL, rtol=0)
    changed = [k for k, v in ours.get_base_model().state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed
    ours.base_model.unmerge_adapter()
    after = ours.get_base_model().state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=FP32_ATOL, rtol=0)
    merged, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    sd_o, sd_t = merged.state_dict(), merged_theirs.state_dict()
    assert sd_o.keys() == sd_t.keys()
    for k in sd_o:
        torch.testing.assert_close(sd_o[k], sd_t[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_logits(merged, ids), expected, atol=FP32_ATOL, rtol=0)


def test_dora_and_lora_adapters_together_like_peft(ids):
    kw = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    ours = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(use_dora=True, **kw))
    ours.add_adapter("plain", fastpeft.LoraConfig(**dict(kw, r=2)))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(use_dora=True, **kw))
    theirs.add_adapter("plain", peft.LoraConfig(**dict(kw, r=2)))
    for name in ("default", "plain"):
        peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict(name), adapter_name=name)
    ours.eval(), theirs.eval()
    for names in (["plain", "default"], ["default", "plain"]):  # DoRA rescales the running output
        ours.base_model.set_adapter(names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


def test_half_base_with_fp32_adapters_matches_peft_and_trains(ids):
    """bf16 base, fp32 DoRA parameters (peft's default upcast): the fused op casts, outputs agree
    with peft's to bf16 precision, and the fp32 parameters get fp32 gradients."""
    kw = dict(target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    ours = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16), fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    a, b = _logits(ours, ids).float(), _logits(theirs, ids).float()
    assert (a - b).abs().max() <= 3e-2 * b.abs().max()  # bf16 tolerance, relative to the logits' scale
    ours(input_ids=ids, labels=ids).loss.backward()
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        grad = getattr(layer, name)["default"].weight.grad
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="AdaLoRA does not support DoRA"):
        fastpeft.AdaLoraConfig(use_dora=True, total_step=10)
    with pytest.raises(ValueError, match="embed_tokens.*not supported|not support.*embed_tokens|Embedding"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["embed_tokens"], use_dora=True))


def test_weight_norm_cache_in_eval_follows_weight_updates(ids, monkeypatch):
    """ENABLE_DORA_CACHING (off by default, as in peft): eval forwards reuse the norm while W, A,
    B are unchanged; an in-place update (optimizer step, load_state_dict) invalidates it."""
    lora_mod = fastpeft.tuners.lora
    calls = []
    real = lora_mod.dora_weight_norm
    monkeypatch.setattr(lora_mod, "dora_weight_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, _ = _pair("llama")
    n_layers = sum(1 for m in ours.modules() if isinstance(m, lora_mod.LoraLayer))
    calls.clear()  # (creating the adapters computed the initial magnitudes)
    first = _logits(ours, ids)
    _logits(ours, ids)
    assert len(calls) == 2 * n_layers  # default: no cache
    monkeypatch.setattr(lora_mod, "ENABLE_DORA_CACHING", True)
    calls.clear()
    torch.testing.assert_close(_logits(ours, ids), first, atol=0, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), first, atol=0, rtol=0)
    assert len(calls) == n_layers  # second forward: every norm from the cache
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3.0)  # in place, like an optimizer step
    calls.clear()
    cached = _logits(ours, ids)
    assert len(calls) == 1  # only the changed layer recomputed
    monkeypatch.setattr(lora_mod, "ENABLE_DORA_CACHING", False)
    torch.testing.assert_close(cached, _logits(ours, ids), atol=0, rtol=0)
    assert (cached - first).abs().max() > 1e-4
    monkeypatch.setattr(lora_mod, "ENABLE_DORA_CACHING", True)
    ours.train()
    calls.clear()
    ours(input_ids=ids)
    assert len(calls) == n_layers and not layer._dora_norm_cache  # training never uses the cache


def test_triton_backend_matches_reference(ids, settings):
    """fastpeft's DoRA layer under TRITON_INTERPRET=1 (norm kernel + LoRA kernels) vs its reference path."""
    kmod = pytest.importorskip("fastpeft.kernels.lora_linear")
    if not kmod.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    model = fastpeft.get_peft_model(tiny_llama(layers=1), fastpeft.LoraConfig(
        target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False))
    results = []
    for backend in ("reference", "triton"):
        settings(backend=backend, lora_impl="fused")
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert any("lora_magnitude_vector" in n for n in g0)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-4, msg=lambda s: f"{n}: {s}")
