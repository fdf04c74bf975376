"""The fused linear cross-entropy op against the unfused computation (logits, fp32 upcast, F.cross_entropy).

Reference backend in fp32 to 1e-5; the Triton kernel under TRITON_INTERPRET=1 (fp32 and fp16: the
interpreter cannot do bf16), forward and backward, on token counts and vocabularies that are not
multiples of the chunk or block sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FP32_ATOL

from fastpeft.ops.backend import interpreting
from fastpeft.ops.linear_cross_entropy import (causal_targets, default_chunk_tokens, linear_cross_entropy,
                                               linear_cross_entropy_reference)

interp = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py, CPU only)")

# (softcap, logit_scale, reduction, num_items_in_batch, bias)
CASES = [
    (None, 1.0, "mean", None, False),
    (None, 1.0, "sum", None, True),
    (4.0, 1.0, "mean", None, False),      # Gemma-2 softcapping
    (None, 0.0625, "mean", None, True),   # Cohere logit_scale / Granite 1/logits_scaling
    (3.0, 2.0, "sum", None, False),
    (None, 1.0, "mean", 23, False),       # Trainer's num_items_in_batch
]
CASE_IDS = ["plain-mean", "bias-sum", "softcap", "scale-bias", "softcap-scale-sum", "num_items"]


def _inputs(B=2, T=37, H=24, V=101, bias=False, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :7] = -100
    labels[1, 20:23] = -100
    return hidden, weight, b, labels


def _loss_and_grads(fn, hidden, weight, bias, labels, grad_out=1.7, **kw):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    loss = fn(hidden, weight, labels, bias, **kw)
    grads = torch.autograd.grad(loss * grad_out, leaves)
    return loss.detach(), grads


def _assert_close(got, want, atol, rtol, what):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _compare(case, backend, dtype=torch.float32, atol=FP32_ATOL, rtol=1e-5, chunk_tokens=16, V=101):
    softcap, scale, reduction, num_items, bias = case
    hidden, weight, b, labels = _inputs(bias=bias, dtype=dtype, V=V)
    kw = dict(shift=True, reduction=reduction, num_items_in_batch=num_items, logit_scale=scale, softcap=softcap)
    ref_inputs = [t.detach().float().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    want_loss, want = _loss_and_grads(linear_cross_entropy_reference, *ref_inputs, labels, **kw)
    got_loss, got = _loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, chunk_tokens=chunk_tokens,
                                    backend=backend, **kw)
    assert got_loss.dtype == torch.float32
    _assert_close(got_loss, want_loss, atol, rtol, "loss")
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype
        _assert_close(g, w, atol, rtol, f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("chunk_tokens", [16, 1000], ids=["chunks-of-16", "one-chunk"])
def test_reference_backend_matches_unfused(case, chunk_tokens):
    _compare(case, "reference", chunk_tokens=chunk_tokens)


@interp
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_kernel_matches_unfused_fp32(case, monkeypatch):
    # V=101 is no multiple of the kernel's vocabulary block; 74 tokens no multiple of the chunk
    _compare(case, "triton")


@interp
def test_triton_kernel_small_vocab_blocks_and_fp16(monkeypatch):
    from fastpeft.kernels import linear_cross_entropy as K

    calls = []
    original = K.cross_entropy_rows_

    def small_blocks(*a, **k):  # several vocabulary blocks per row, and a ragged last one
        calls.append(1)
        return original(*a, **k, block_v=32)

    monkeypatch.setattr(K, "cross_entropy_rows_", small_blocks)
    _compare(CASES[2], "triton")
    _compare(CASES[1], "triton")
    assert calls
    # fp16: logits and their gradient rounded to fp16 once, statistics in fp32
    _compare(CASES[0], "triton", dtype=torch.float16, atol=2e-3, rtol=2e-3)


@interp
def test_kernel_losses_and_gradient_rows_directly():
    from fastpeft.kernels.linear_cross_entropy import cross_entropy_rows_

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 77, generator=gen) * 3
    targets = torch.randint(0, 77, (9,), generator=gen)
    targets[4] = -100
    z = logits.clone().requires_grad_()
    want = F.cross_entropy(z, targets, reduction="none", ignore_index=-100)
    (want.sum() * 0.25).backward()
    buf = logits.clone()
    got = cross_entropy_rows_(buf, targets, torch.tensor([0.25]), block_v=16)
    torch.testing.assert_close(got, want.detach(), atol=FP32_ATOL, rtol=1e-5)
    torch.testing.assert_close(buf, z.grad, atol=FP32_ATOL, rtol=1e-5)
    assert torch.all(buf[4] == 0)
    only = logits.clone()
    torch.testing.assert_close(cross_entropy_rows_(only, targets, None), want.detach(), atol=FP32_ATOL, rtol=1e-5)
    assert torch.equal(only, logits)  # losses only: the logits are left alone


def test_tied_weight_gets_both_gradients():
    """A tied LM head (the embedding's weight): gradients of the lookup and of the loss add up."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(50, 16, generator=gen).requires_grad_()
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    grads = []
    for fn, kw in ((linear_cross_entropy_reference, {}), (linear_cross_entropy, {"chunk_tokens": 5})):
        hidden = torch.tanh(F.embedding(ids, emb))
        loss = fn(hidden, emb, ids, shift=True, **kw)
        grads.append(torch.autograd.grad(loss, emb)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=FP32_ATOL, rtol=1e-5)


def test_frozen_weight_gets_no_gradient_buffer(monkeypatch):
    hidden, weight, _, labels = _inputs()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, shift=True)
    (g,) = torch.autograd.grad(loss, [hidden])
    want = torch.autograd.grad(linear_cross_entropy_reference(hidden, weight, labels, shift=True), [hidden])[0]
    torch.testing.assert_close(g, want, atol=FP32_ATOL, rtol=1e-5)


def test_no_grad_gives_the_loss_only():
    hidden, weight, _, labels = _inputs()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, shift=True, chunk_tokens=8)
        want = linear_cross_entropy_reference(hidden, weight, labels, shift=True)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=1e-5)


def test_only_one_chunk_of_logits_is_formed(monkeypatch):
    """The matmul producing logits never sees more than ``chunk_tokens`` rows."""
    import fastpeft.ops.linear_cross_entropy as op

    rows = []
    real = op._chunk_losses

    def spy(x, *a, **k):
        rows.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(op, "_chunk_losses", spy)
    hidden, weight, _, labels = _inputs()
    linear_cross_entropy(hidden, weight, labels, shift=True, chunk_tokens=16).backward()
    assert rows == [16, 16, 16, 16, 10]


def test_causal_shift_and_default_chunk():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert causal_targets(labels).tolist() == [[2, 3, -100], [-100, 6, -100]]
    assert default_chunk_tokens(49152) == 160 and default_chunk_tokens(128256) == 64 and default_chunk_tokens(10**9) == 16


def test_all_ignored_mean_is_nan_like_torch():
    hidden, weight, _, labels = _inputs()
    labels.fill_(-100)
    got = linear_cross_entropy(hidden, weight, labels)
    assert torch.isnan(got) and torch.isnan(linear_cross_entropy_reference(hidden, weight, labels))


def test_errors_name_the_problem():
    hidden, weight, _, labels = _inputs()
    with pytest.raises(ValueError, match="targets must be in"):
        linear_cross_entropy(hidden, weight, torch.full_like(labels, 101))
    with pytest.raises(ValueError, match="do not match hidden"):
        linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        linear_cross_entropy(hidden, weight, labels, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="share"):
        linear_cross_entropy(hidden.double(), weight, labels)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
