"""A patched Hugging Face peft model under ``torch.autocast(bfloat16)`` (TRL's default, CPU too)
computes what the unpatched one computes: the same dtypes at the same points (base linear with its
bias in bf16, dropout on x cast to lora_A's dtype, bf16 LoRA products), the same dropout mask,
so the same logits and LoRA gradients.

Oracle: the same peft model before patching, same seed. The tolerance is written once, below.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fastpeft
from conftest import count_calls, lora_train_step, tiny_llama

peft = pytest.importorskip("peft")
patch_mod = sys.modules["fastpeft.patch"]

# Relative error ||got - want|| / ||want|| allowed between patched and unpatched peft under bf16
# autocast, per (device, backend). One bf16 rounding step is 2**-8 (0.39%); before the op followed
# peft's order of operations the gradients differed by 1.1% (4.2% with dropout 0.05).
BF16_REL_TOL = {
    ("cpu", "reference"): 2**-8,  # measured: bitwise equal (the same autocast ops as peft's)
    ("cuda", "triton"): 2**-6,  # fp32-accumulating kernels, one rounding per GEMM (not yet run on a GPU)
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_llama(dropout: float, device: str = "cpu", **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS,
                          lora_dropout=dropout, task_type="CAUSAL_LM", **kw)
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_llama(), cfg).to(device)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _bf16_step(model, ids, device: str):
    with torch.autocast(device, dtype=torch.bfloat16):
        return lora_train_step(model, ids)


def _assert_parity(model, ids, device: str, backend: str, monkeypatch):
    logits0, grads0 = _bf16_step(model, ids, device)
    assert logits0.dtype == torch.bfloat16
    report = fastpeft.patch(model, backend=backend)
    assert len(report.patched) == 2 * len(TARGETS) and not report.skipped, str(report)
    calls = count_calls(monkeypatch, patch_mod, "lora_linear")
    logits1, grads1 = _bf16_step(model, ids, device)
    assert len(calls) == len(report.patched)  # every patched layer ran the op (o_proj/down_proj get bf16 x)
    tol = BF16_REL_TOL[(device, backend)]
    assert logits1.dtype == logits0.dtype and _rel(logits1, logits0) <= tol
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        assert grads1[name].dtype == grads0[name].dtype == torch.float32, name
        err = _rel(grads1[name], grads0[name])
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.2e}"
    return logits0, logits1, grads0, grads1


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_patched_peft_under_cpu_bf16_autocast_equals_unpatched(ids, monkeypatch, dropout):
    logits0, logits1, grads0, grads1 = _assert_parity(_peft_llama(dropout), ids, "cpu", "reference", monkeypatch)
    # the reference path runs peft's own autocast ops, so on CPU nothing differs at all
    assert torch.equal(logits1, logits0)
    assert all(torch.equal(grads1[n], grads0[n]) for n in grads0)


def test_dora_layers_keep_peft_forward_under_autocast(ids, monkeypatch):
    """The DoRA op does not round as peft's autocast sequence does (7-10% apart in gradients), so
    patched DoRA layers take peft's own forward under autocast: results equal, op not called."""
    model = _peft_llama(0.05, use_dora=True)
    logits0, grads0 = _bf16_step(model, ids, "cpu")
    assert len(fastpeft.patch(model, backend="reference").patched) == 2 * len(TARGETS)
    calls = count_calls(monkeypatch, patch_mod, "dora_linear")
    logits1, grads1 = _bf16_step(model, ids, "cpu")
    assert not calls and torch.equal(logits1, logits0) and all(torch.equal(grads1[n], grads0[n]) for n in grads0)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_adalora_layers_keep_peft_forward_under_autocast(ids, monkeypatch, fused_loss):
    """AdaLoRA's fused form folds scaling/ranknum into the down-projection before the bf16 product,
    which peft applies after it: under autocast the patched SVDLinear takes peft's forward."""
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_dropout=0.05, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n or "lora_B" in n:
                p.normal_()  # AdaLoRA starts with E = 0: make the branch count
    logits0, grads0 = _bf16_step(model, ids, "cpu")
    # with and without the fused LM-head loss: it sums the same fp32 per-token losses in another
    # order, which here (dropout on, bf16 autocast) leaves the loss and every gradient bitwise equal
    assert len(fastpeft.patch(model, backend="reference", fused_loss=fused_loss).patched) == 2 * len(TARGETS)
    calls = count_calls(monkeypatch, patch_mod, "lora_linear")
    logits1, grads1 = _bf16_step(model, ids, "cpu")
    assert not calls and torch.equal(logits1, logits0) and all(torch.equal(grads1[n], grads0[n]) for n in grads0)


# The fused LM-head loss sums its per-token losses in another order than transformers' cross_entropy:
# the same fp32 loss up to a few ulps (2**-20 relative), so with it the trajectory is compared at that.
FUSED_LOSS_REL_TOL = 2**-20


def _three_bf16_steps(ids, patched: bool, fused_loss: bool):
    model = _peft_llama(0.05)
    if patched:
        fastpeft.patch(model, backend="reference", fused_loss=fused_loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(3)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_losses_stay_together_over_steps_under_bf16_autocast(ids):
    """Three AdamW steps with dropout under autocast: patched LoRA layers take peft's exact path."""
    assert _three_bf16_steps(ids, True, fused_loss=False) == _three_bf16_steps(ids, False, fused_loss=False)


def test_losses_stay_together_over_steps_with_the_fused_loss_under_bf16_autocast(ids):
    """The same with the fused LM-head loss (patch's default): equal up to its summation order."""
    ours, theirs = _three_bf16_steps(ids, True, fused_loss=True), _three_bf16_steps(ids, False, fused_loss=True)
    assert ours == pytest.approx(theirs, rel=FUSED_LOSS_REL_TOL, abs=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels)")
def test_patched_peft_under_cuda_bf16_autocast_matches_unpatched(ids, monkeypatch):
    """Triton kernels on CUDA: their dropout mask is their own (Philox), so without dropout."""
    _assert_parity(_peft_llama(0.0, "cuda"), ids.cuda(), "cuda", "triton", monkeypatch)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_patched_peft_qlora_under_cpu_bf16_autocast_equals_unpatched(tmp_path, ids, monkeypatch, dropout):
    """QLoRA (a bitsandbytes 4-bit base): the QLoRA op's reference path under autocast runs
    bitsandbytes' Linear4bit then peft's 4-bit adapter branch op for op (before, its gradients
    were 1.4% apart, 2.2% with dropout 0.05), so on CPU logits and gradients are bitwise peft's."""
    from qlora_helpers import load_4bit, save_tiny_llama

    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS,
                          lora_dropout=dropout, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(load_4bit(save_tiny_llama(tmp_path / "base")), cfg)
    ids = ids % model.config.vocab_size
    logits0, grads0 = _bf16_step(model, ids, "cpu")
    report = fastpeft.patch(model, backend="reference")
    assert len(report.patched) == 2 * len(TARGETS) and not report.skipped, str(report)
    calls = count_calls(monkeypatch, patch_mod, "bnb_linear4bit")
    logits1, grads1 = _bf16_step(model, ids, "cpu")
    assert len(calls) == len(report.patched)
    assert torch.equal(logits1, logits0)
    assert grads1.keys() == grads0.keys() and all(torch.equal(grads1[n], grads0[n]) for n in grads0)
