"""Shared-prefix attention: the Triton kernels (under TRITON_INTERPRET=1) and the ``sdpa``
implementation (concatenation + PyTorch SDPA, autograd-native) against the reference.

Forward and all five gradients (q, k, v, prefix_k, prefix_v) over ragged lengths (not
multiples of the 16-wide interpreter tiles), key padding, causal and non-causal, GQA/MQA,
decoding (T < S), T > S, non-contiguous inputs, fp32/fp16/bf16. The reference itself is
checked against torch's scaled_dot_product_attention on the explicit concatenation.
"""

import os

# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA (before triton is imported);
# on a CUDA machine the kernels run compiled and the interpreter-only tests skip.

import math

import pytest
import torch

from fastpeft.ops.prefix_attention import (
    check_prefix_attention_args,
    choose_prefix_impl,
    prefix_attention,
    prefix_attention_reference,
)
from fastpeft.ops.prefix_attention_sdpa import prefix_attention_sdpa

# Tolerances per dtype, written once. Low-precision inputs are compared with the fp32
# reference run on the same (rounded) inputs; the interpreter truncates fp32->bf16 stores.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels are tested under TRITON_INTERPRET=1")


def _inputs(B, H, KVH, T, S, P, D, dtype, pad, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # the layout transformers produces: [B, T, H, D].transpose(1, 2)
        q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, S, KVH, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, S, KVH, D, generator=g).to(dtype).transpose(1, 2)
        pk = torch.randn(P, KVH, D, generator=g).to(dtype).transpose(0, 1)
        pv = torch.randn(P, KVH, D, generator=g).to(dtype).transpose(0, 1)
    else:
        q = torch.randn(B, H, T, D, generator=g).to(dtype)
        k = torch.randn(B, KVH, S, D, generator=g).to(dtype)
        v = torch.randn(B, KVH, S, D, generator=g).to(dtype)
        pk = torch.randn(KVH, P, D, generator=g).to(dtype)
        pv = torch.randn(KVH, P, D, generator=g).to(dtype)
    kpm = None
    if pad:  # ragged lengths: left padding on row 0, right padding on the last row
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[0, : min(3, S - 1)] = False
        if B > 1:
            kpm[-1, S - min(4, S - 1):] = False
    do = torch.randn(B, H, T, D, generator=g).to(dtype)
    return q, k, v, pk, pv, kpm, do


def _fwd_bwd(fn, tensors, do, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    return out.detach(), grads


def _assert_matches_reference(out, grads, inputs, do, causal, kpm):
    """The output and the five gradients against the fp32 reference on the same values, at the
    input dtype's tolerance."""
    q = inputs[0]
    dtype = q.dtype
    ref_out, ref_grads = _fwd_bwd(prefix_attention_reference, [t.float() for t in inputs], do.float(),
                                  causal=causal, key_padding_mask=kpm)
    assert out.dtype == dtype and out.shape == q.shape[:3] + (inputs[2].shape[-1],)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, g, r, t in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads, inputs):
        assert g.shape == t.shape and g.dtype == dtype, name
        torch.testing.assert_close(g.float(), r, **tol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    # B, H, KVH, T, S, P, D, causal, pad, dtype, noncontig
    (2, 4, 2, 19, 23, 5, 16, True, True, torch.float32, False),      # GQA, ragged, padding
    (2, 4, 2, 19, 23, 5, 24, False, True, torch.float32, False),     # non-causal, ragged head dim
    (2, 4, 4, 7, 29, 17, 16, True, False, torch.float32, False),     # MHA, T < S (cached decode), 2 prefix blocks
    (3, 4, 1, 33, 20, 3, 16, True, True, torch.float32, False),      # MQA, T > S, batch split of 2 (uneven)
    (2, 2, 1, 1, 18, 4, 16, True, True, torch.float32, False),       # single-token decoding step
    (2, 4, 2, 17, 17, 6, 32, True, True, torch.float32, True),       # non-contiguous (transformers layout)
    (2, 4, 2, 19, 23, 5, 16, True, True, torch.bfloat16, False),
    (2, 4, 2, 21, 21, 9, 16, False, True, torch.bfloat16, False),
    (2, 4, 2, 19, 23, 5, 16, True, True, torch.float16, False),
]


@needs_interpreter
@pytest.mark.parametrize("B,H,KVH,T,S,P,D,causal,pad,dtype,noncontig", CASES)
def test_triton_matches_reference(B, H, KVH, T, S, P, D, causal, pad, dtype, noncontig):
    q, k, v, pk, pv, kpm, do = _inputs(B, H, KVH, T, S, P, D, dtype, pad, noncontig=noncontig)
    out, grads = _fwd_bwd(prefix_attention, (q, k, v, pk, pv), do,
                          causal=causal, key_padding_mask=kpm, backend="triton")
    _assert_matches_reference(out, grads, (q, k, v, pk, pv), do, causal, kpm)


@needs_interpreter
def test_triton_only_prefix_requires_grad_and_custom_scale():
    """Prefix Tuning with a frozen model: only the prefix needs gradients; a custom scale."""
    q, k, v, pk, pv, kpm, do = _inputs(2, 4, 2, 18, 18, 7, 16, torch.float32, pad=True, seed=3)
    pk1, pv1 = pk.clone().requires_grad_(True), pv.clone().requires_grad_(True)
    out = prefix_attention(q, k, v, pk1, pv1, key_padding_mask=kpm, scale=0.3, backend="triton")
    gk, gv = torch.autograd.grad(out, (pk1, pv1), do)
    pk2, pv2 = pk.clone().requires_grad_(True), pv.clone().requires_grad_(True)
    ref = prefix_attention_reference(q, k, v, pk2, pv2, key_padding_mask=kpm, scale=0.3)
    rk, rv = torch.autograd.grad(ref, (pk2, pv2), do)
    tol = TOL[torch.float32]
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gk, rk, **tol)
    torch.testing.assert_close(gv, rv, **tol)


@needs_interpreter
def test_triton_forward_saves_no_concatenation():
    """The autograd graph holds q, k, v, the prefix, out and a [B, H, T] lse: nothing of size P + S."""
    B, H, KVH, T, S, P, D = 2, 4, 2, 16, 16, 8, 16
    q, k, v, pk, pv, _, _ = _inputs(B, H, KVH, T, S, P, D, torch.float32, pad=False)
    leaves = [t.requires_grad_(True) for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, backend="triton")
    saved = out.grad_fn.saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved if t is not None)
    expected = sorted([(B, H, T, D), (B, KVH, S, D), (B, KVH, S, D), (KVH, P, D), (KVH, P, D),
                       (B, H, T, D), (B, H, T)])  # q, k, v, prefix_k, prefix_v, out, lse
    assert shapes == expected


def test_reference_matches_sdpa_on_concatenation():
    """The oracle equals torch SDPA on the explicitly expanded and concatenated keys (what peft does)."""
    B, H, KVH, T, S, P, D = 3, 4, 2, 9, 12, 5, 8
    q, k, v, pk, pv, kpm, _ = _inputs(B, H, KVH, T, S, P, D, torch.float64, pad=True)
    for causal in (True, False):
        out = prefix_attention_reference(q, k, v, pk, pv, causal=causal, key_padding_mask=kpm)
        kc = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // KVH, 1)
        vc = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(H // KVH, 1)
        mask = torch.ones(B, 1, T, P + S, dtype=torch.bool)
        if causal:
            mask[..., P:] = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        mask[..., P:] &= kpm[:, None, None, :]
        ref = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-10, rtol=1e-10)


def test_reference_per_batch_prefix_equals_shared():
    B, H, KVH, T, S, P, D = 2, 4, 2, 6, 6, 3, 8
    q, k, v, pk, pv, kpm, _ = _inputs(B, H, KVH, T, S, P, D, torch.float32, pad=True)
    shared = prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, backend="reference")
    per_batch = prefix_attention(q, k, v, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1),
                                 key_padding_mask=kpm)  # automatic choice: reference
    torch.testing.assert_close(per_batch, shared, atol=0, rtol=0)
    # and the prefix really matters: a different prefix changes the output
    other = prefix_attention(q, k, v, pk + 1, pv, key_padding_mask=kpm, backend="reference")
    assert (other - shared).abs().max() > 1e-3


def test_cpu_automatic_backend_is_reference(settings):
    settings(backend="auto")
    q, k, v, pk, pv, kpm, _ = _inputs(1, 2, 1, 5, 5, 2, 8, torch.float32, pad=False)
    out = prefix_attention(q.requires_grad_(True), k, v, pk, pv)
    assert "PrefixAttentionFunction" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, prefix_attention_reference(q, k, v, pk, pv), atol=0, rtol=0)


# --------------------------------------------------------------------------------------
# the sdpa implementation (concatenation + SDPA)
# --------------------------------------------------------------------------------------

SDPA_CASES = CASES + [
    # unpadded: the paths that hand SDPA no mask tensor
    (2, 4, 2, 19, 19, 5, 16, True, False, torch.float32, False),     # T == S: P zero query rows, square causal
    (2, 4, 2, 19, 19, 5, 16, True, False, torch.bfloat16, True),     # the same, bf16, transformers layout
    (2, 4, 2, 7, 23, 5, 16, True, False, torch.float32, False),      # T < S: lower-right causal bias
    (2, 2, 1, 1, 18, 4, 16, True, False, torch.float32, False),      # one decoding step, MQA
    (2, 4, 1, 25, 20, 3, 16, True, False, torch.float32, False),     # T > S: first rows see the prefix only
    (2, 4, 2, 19, 23, 5, 16, False, False, torch.float32, False),    # non-causal: no mask at all
]


@pytest.mark.parametrize("B,H,KVH,T,S,P,D,causal,pad,dtype,noncontig", SDPA_CASES)
def test_sdpa_impl_matches_reference(B, H, KVH, T, S, P, D, causal, pad, dtype, noncontig):
    """impl="sdpa" (here on CPU, where it needs no Triton): forward and all five gradients."""
    q, k, v, pk, pv, kpm, do = _inputs(B, H, KVH, T, S, P, D, dtype, pad, noncontig=noncontig)
    out, grads = _fwd_bwd(prefix_attention, (q, k, v, pk, pv), do, causal=causal, key_padding_mask=kpm, impl="sdpa")
    _assert_matches_reference(out, grads, (q, k, v, pk, pv), do, causal, kpm)


def test_sdpa_impl_hands_sdpa_no_mask_without_padding(monkeypatch):
    """Unpadded causal training (T == S) reaches SDPA as the square is_causal problem, no mask tensor."""
    import fastpeft.ops.prefix_attention_sdpa as mod

    seen = []
    real = mod.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(mod.F, "scaled_dot_product_attention", spy)
    B, H, KVH, T, P, D = 2, 4, 2, 9, 3, 8
    q, k, v, pk, pv, _, _ = _inputs(B, H, KVH, T, T, P, D, torch.float32, pad=False)
    prefix_attention_sdpa(q, k, v, pk, pv, causal=True, scale=D ** -0.5)
    assert seen == [((B, H, P + T, D), (B, KVH, P + T, D), None, True)]


def test_prefix_impl_choice(settings):
    """Forced names win; auto keeps the kernel off CUDA (here: CPU, the interpreter); bad names fail."""
    q, k, v, pk, pv = _ok()
    kpm = torch.ones(2, 6, dtype=torch.bool)
    assert choose_prefix_impl(q, k, pk, None, "auto") == "kernel"  # CPU tensors
    assert choose_prefix_impl(q, k, pk, kpm, "sdpa") == "sdpa" and choose_prefix_impl(q, k, pk, None, "kernel") == "kernel"
    settings(prefix_impl="sdpa")
    assert choose_prefix_impl(q, k, pk, None) == "sdpa"  # None: the settings' value
    with pytest.raises(ValueError, match="FASTPEFT_PREFIX_IMPL"):
        prefix_attention(q, k, v, pk, pv, impl="flash")
    # the settings' sdpa reaches the op; a forced reference backend still wins
    torch.testing.assert_close(prefix_attention(q, k, v, pk, pv),
                               prefix_attention_sdpa(q, k, v, pk, pv, scale=q.shape[-1] ** -0.5), atol=0, rtol=0)
    leaf = q.clone().requires_grad_(True)
    out = prefix_attention(leaf, k, v, pk, pv, backend="reference")
    torch.testing.assert_close(out, prefix_attention_reference(q, k, v, pk, pv), atol=0, rtol=0)


@needs_interpreter
def test_forced_triton_backend_runs_the_kernel_whatever_the_impl(settings):
    settings(prefix_impl="sdpa")
    q, k, v, pk, pv = _ok()
    out = prefix_attention(q.requires_grad_(True), k, v, pk, pv, backend="triton")
    assert "PrefixAttentionFunction" in type(out.grad_fn).__name__


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def _ok(dtype=torch.float32):
    return _inputs(2, 4, 2, 5, 6, 3, 8, dtype, pad=False)[:5]


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "q has shape"),
        (lambda a: (a[0], a[1][:, :, :, :4], *a[2:]), ValueError, "k has shape"),
        (lambda a: (a[0], a[1], a[2][:, :, :3], *a[3:]), ValueError, "v has shape"),
        (lambda a: (a[0][:, :3], *a[1:]), ValueError, "multiple"),
        (lambda a: (*a[:3], a[3][:1], a[4][:1]), ValueError, r"prefix_k has shape .*shared"),
        (lambda a: (*a[:3], a[3], a[4][:, :2]), ValueError, "prefix_v has shape"),
        (lambda a: (*a[:3], a[3][:, :0], a[4][:, :0]), ValueError, "prefix is empty"),
        (lambda a: (*a[:3], a[3].double(), a[4].double()), TypeError, "share one dtype"),
        (lambda a: tuple(t.to(torch.int32) for t in a), TypeError, "not supported"),
        (lambda a: (*a[:3], a[3][0], a[4][0]), ValueError, "prefix_k has shape"),
    ],
)
def test_bad_shapes_and_dtypes(mutate, exc, match):
    with pytest.raises(exc, match=match):
        prefix_attention(*mutate(_ok()))


def test_bad_key_padding_mask():
    a = _ok()
    with pytest.raises(ValueError, match=r"key_padding_mask has shape .*\[2, 6\]"):
        prefix_attention(*a, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="not an additive float mask"):
        prefix_attention(*a, key_padding_mask=torch.zeros(2, 6))


@needs_interpreter
def test_triton_refuses_per_batch_prefix():
    q, k, v, pk, pv = _ok()
    with pytest.raises(ValueError, match="shared by the batch"):
        prefix_attention(q, k, v, pk.expand(2, -1, -1, -1), pv.expand(2, -1, -1, -1), backend="triton")


@needs_interpreter
def test_triton_refuses_float64_and_large_head_dim():
    q, k, v, pk, pv = (t.double() for t in _ok())
    with pytest.raises(ValueError, match="float64"):
        prefix_attention(q, k, v, pk, pv, backend="triton")
    q, k, v, pk, pv = (t.float().repeat_interleave(17, -1) for t in (q, k, v, pk, pv))  # D = 136
    with pytest.raises(ValueError, match="head_dim 136"):
        prefix_attention(q, k, v, pk, pv, backend="triton")


def test_reference_gradcheck_float64():
    q, k, v, pk, pv, kpm, _ = _inputs(2, 2, 1, 4, 5, 2, 4, torch.float64, pad=True)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v, pk, pv))
    assert torch.autograd.gradcheck(
        lambda *a: prefix_attention(*a, key_padding_mask=kpm, backend="reference"), leaves)


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown fastpeft backend"):
        prefix_attention(*_ok(), backend="cuda-magic")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, pk, pv = _ok()
    a = prefix_attention(q, k, v, pk, pv, backend="reference")
    b = prefix_attention(q, k, v, pk, pv, scale=1 / math.sqrt(q.shape[-1]), backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------
# compiled kernels on a CUDA device (skipped on CPU machines)
# --------------------------------------------------------------------------------------

GPU_CASES = [
    # B, H, KVH, T, S, P, D, causal, pad
    (2, 8, 2, 300, 300, 40, 128, True, True),   # GQA, ragged, several key blocks, prefix < one block
    (2, 8, 8, 257, 333, 130, 64, False, True),  # non-causal, prefix over 3 blocks, T < S
    (3, 4, 1, 1, 200, 32, 128, True, True),     # one decoding step, MQA
]


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA device (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,KVH,T,S,P,D,causal,pad", GPU_CASES)
def test_cuda_kernels_match_reference(B, H, KVH, T, S, P, D, causal, pad, dtype):
    """Compiled kernels vs the fp32 reference. Criterion (as FlashAttention's tests): the kernel's error
    is at most twice the error of torch's own SDPA in the same dtype on the concatenation, plus 1e-4
    (fp32 runs use the fixed fp32 tolerance)."""
    dev = torch.device("cuda")
    q, k, v, pk, pv, kpm, do = (None if t is None else t.to(dev)
                                for t in _inputs(B, H, KVH, T, S, P, D, dtype, pad, seed=11))
    out, grads = _fwd_bwd(prefix_attention, (q, k, v, pk, pv), do, causal=causal, key_padding_mask=kpm,
                          backend="triton")
    ref_out, ref_grads = _fwd_bwd(prefix_attention_reference, [t.float() for t in (q, k, v, pk, pv)], do.float(),
                                  causal=causal, key_padding_mask=kpm)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, **TOL[dtype])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, **TOL[dtype])
        return

    def sdpa(q, k, v, pk, pv):  # torch's attention in the low precision on the explicit concatenation
        kc = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // KVH, 1)
        vc = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(H // KVH, 1)
        mask = torch.ones(B, 1, T, P + S, dtype=torch.bool, device=dev)
        if causal:
            mask[..., P:] = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T)
        mask[..., P:] &= kpm[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)

    base_out, base_grads = _fwd_bwd(sdpa, (q, k, v, pk, pv), do)
    names = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
    for name, got, base, ref in zip(names, (out, *grads), (base_out, *base_grads), (ref_out, *ref_grads)):
        err = (got.float() - ref).abs().max().item()
        base_err = (base.float() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-4, f"{name}: kernel error {err:.3g} vs torch {dtype} SDPA error {base_err:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad", [False, True])
def test_cuda_auto_impl_matches_reference(dtype, pad, settings):
    """On CUDA, auto takes sdpa exactly when there is no padding and cuDNN takes the problem; either
    way forward and gradients match the fp32 reference within the dtype's tolerance."""
    from fastpeft.ops.prefix_attention_sdpa import cudnn_takes

    settings(backend="auto", prefix_impl="auto")
    dev = torch.device("cuda")
    q, k, v, pk, pv, kpm, do = (None if t is None else t.to(dev)
                                for t in _inputs(2, 8, 2, 256, 256, 32, 128, dtype, pad))
    want = "sdpa" if (not pad and cudnn_takes(q, k, 32)) else "kernel"
    assert choose_prefix_impl(q, k, pk, kpm) == want
    out, grads = _fwd_bwd(prefix_attention, (q, k, v, pk, pv), do, key_padding_mask=kpm)
    ref_out, ref_grads = _fwd_bwd(prefix_attention_reference, [t.float() for t in (q, k, v, pk, pv)], do.float(),
                                  key_padding_mask=kpm)
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, **TOL[dtype])
