"""fastpeft.patch on 4-bit (bitsandbytes) models: peft's and fastpeft's LoRA layers on
``Linear4bit`` and frozen ``Linear4bit`` layers go through the QLoRA op.

Oracle: the same model unpatched (bitsandbytes + peft), compared in train mode (bitsandbytes
repacks weights for a different CPU kernel in eval mode, with an input that needs no grad). The reference backend
on a 2-layer tiny Llama; the Triton kernels under the interpreter on a 1-layer one.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, backend_of, count_calls, lora_train_step
from qlora_helpers import load_4bit, save_tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
patch_mod = sys.modules["fastpeft.patch"]

N_LINEAR = 7  # q k v o gate up down per block


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {n: save_tiny_llama(tmp_path_factory.mktemp(f"llama{n}"), layers=n) for n in (1, 2)}


@pytest.fixture
def op_calls(monkeypatch):
    """(has a LoRA branch, backend) of every QLoRA op call from patched layers."""
    return count_calls(monkeypatch, patch_mod, "bnb_linear4bit",
                       record=lambda a, k: (a[5] is not None if len(a) > 5 else False, backend_of(k)))


def peft_4bit(path, dropout=0.0):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                          lora_dropout=dropout, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    return peft.get_peft_model(load_4bit(path), cfg)


def assert_same(a, b, atol=FP32_ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_peft_qlora_llama_same_logits_and_grads(dirs, ids, op_calls, settings):
    settings(backend="reference")
    model = peft_4bit(dirs[2], dropout=0.1)
    logits0, grads0 = lora_train_step(model, ids)
    with model.disable_adapter():
        model.train()
        with torch.no_grad():
            base0 = model(input_ids=ids).logits
    report = fastpeft.patch(model)
    assert len(report.patched) == 2 * N_LINEAR and not report.skipped, str(report)
    assert all("peft lora.Linear4bit on Linear4bit" == p.kind and "QLoRA op" in p.note for p in report.patched)
    logits1, grads1 = lora_train_step(model, ids)
    assert len(op_calls) == 2 * N_LINEAR and all(has_lora for has_lora, _ in op_calls)
    assert_same(logits1, logits0)
    assert grads1.keys() == grads0.keys()
    for k in grads0:
        assert_same(grads1[k], grads0[k])
    # disabled adapters: the layers' own forward (bitsandbytes alone)
    with model.disable_adapter():
        with torch.no_grad():
            assert_same(model(input_ids=ids).logits, base0)
    assert len(fastpeft.unpatch(model)) == 2 * N_LINEAR
    assert_same(lora_train_step(model, ids)[0], logits0)


def test_fastpeft_qlora_layers_native_or_rerouted(dirs, ids, op_calls):
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = fastpeft.get_peft_model(load_4bit(dirs[1]), cfg)
    report = fastpeft.patch(model)
    assert len(report.native) == N_LINEAR and not report.patched and not report.skipped
    assert all(n.note == "runs the QLoRA op already" for n in report.native)
    logits0, grads0 = lora_train_step(model, ids)
    assert not op_calls  # native layers call the op themselves
    report = fastpeft.patch(model, backend="reference")
    assert len(report.patched) == N_LINEAR and {p.kind for p in report.patched} == {"fastpeft lora.Linear4bit on Linear4bit"}
    logits1, grads1 = lora_train_step(model, ids)
    assert op_calls == [(True, "reference")] * N_LINEAR
    assert_same(logits1, logits0)
    for k in grads0:
        assert_same(grads1[k], grads0[k])


def test_frozen_linear4bit_without_adapter(dirs, ids, op_calls):
    """A plain 4-bit model: every Linear4bit goes through the op (no LoRA branch); same logits
    as bitsandbytes' training path, and in eval mode the weights are never repacked."""
    model = load_4bit(dirs[2])
    model.train()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    report = fastpeft.patch(model)
    assert len(report.patched) == 2 * N_LINEAR and not report.skipped, str(report)
    assert {p.kind for p in report.patched} == {"bitsandbytes Linear4bit (no adapter)"}
    assert "model.layers.0.self_attn.q_proj" in report.patched_names
    assert "(no adapter)" in str(report)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert len(op_calls) == 2 * N_LINEAR and not any(has_lora for has_lora, _ in op_calls)
    assert_same(got, want)
    q = model.model.layers[0].self_attn.q_proj
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert fastpeft.unpatch(model)


def test_frozen_linear4bit_in_a_peft_model_only_outside_adapters(dirs):
    """With LoRA on the attention only, the MLP's Linear4bit layers are frozen ones; the
    attention's base layers are reached through their LoRA layer, not patched twice."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(load_4bit(dirs[1]), cfg)
    report = fastpeft.patch(model)
    kinds = {}
    for p in report.patched:
        kinds.setdefault(p.kind, []).append(p.name)
    assert len(kinds["peft lora.Linear4bit on Linear4bit"]) == 2
    frozen = kinds["bitsandbytes Linear4bit (no adapter)"]
    assert len(frozen) == N_LINEAR - 2 and not any("q_proj" in n or "v_proj" in n for n in frozen)


def test_triton_interpreter_one_layer(dirs, ids, monkeypatch):
    """The Triton kernels (fused dequant-GEMM forward, input-gradient GEMM) on a 1-layer peft
    QLoRA Llama under TRITON_INTERPRET=1: same logits and LoRA gradients as unpatched."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the interpreter test is for CPU machines")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = peft_4bit(dirs[1])
    logits0, grads0 = lora_train_step(model, ids)
    report = fastpeft.patch(model, backend="triton")
    assert report.backend == "triton" and len(report.patched) == N_LINEAR
    import fastpeft.kernels.nf4 as K

    launched = []
    real = K.matmul
    monkeypatch.setattr(K, "matmul", lambda *a, **k: launched.append(1) or real(*a, **k))
    logits1, grads1 = lora_train_step(model, ids)
    # forward of each layer + the input gradient where the input needs one (not q/k/v: their input
    # comes from frozen embeddings and norm)
    assert len(launched) == N_LINEAR + 4
    assert_same(logits1, logits0, atol=FP32_ATOL)
    for k in grads0:
        assert_same(grads1[k], grads0[k], atol=FP32_ATOL)


def test_patch_refuses_triton_on_cpu_without_interpreter(dirs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = load_4bit(dirs[1])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastpeft.patch(model, backend="triton")


def test_dora_on_4bit_is_left_to_its_own_forward(dirs, ids):
    """peft's DoRA on a 4-bit base: the QLoRA op has no magnitude vector, so patch skips those
    layers (with the reason) and the model computes exactly what it did."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    model = peft.get_peft_model(load_4bit(dirs[1]), cfg)
    logits0, grads0 = lora_train_step(model, ids)
    report = fastpeft.patch(model)
    dora = [s for s in report.skipped if s.kind == "peft lora.Linear4bit on Linear4bit"]
    assert len(dora) == 2 and all("DoRA" in s.reason for s in dora), str(report)
    logits1, grads1 = lora_train_step(model, ids)
    assert_same(logits1, logits0)
    for k in grads0:
        assert_same(grads1[k], grads0[k])


def test_fastpeft_dora_on_4bit_is_refused(dirs):
    with pytest.raises(ValueError, match="use_dora=True is not supported for Linear4bit"):
        fastpeft.get_peft_model(load_4bit(dirs[1]), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
