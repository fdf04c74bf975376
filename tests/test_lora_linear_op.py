"""The Triton LoRA-linear backend against the reference, under the Triton CPU interpreter.

Every kernel (down projection, dx add, dA, single-kernel fused forward) runs here through
``lora_linear(..., backend="triton", impl=...)`` and is compared with the reference for the
output and every gradient (x, A, B, and bias/weight where they require grad). With dropout,
the oracle is plain PyTorch autograd using the mask the kernels used
(``dropout_mask(seed, ...)``): the gradients only match if forward and backward regenerate
the same mask. Shapes are small and ragged (the interpreter is slow).
"""

import os

import pytest
import torch

from fastpeft.ops.lora_linear import LoraLinearReference, lora_impl, lora_linear, lora_merge

K_ = pytest.importorskip("fastpeft.kernels.lora_linear")

interp = pytest.mark.skipif(not K_.interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py, CPU only)")

# Tolerances, written once: (atol, rtol) against an fp32 oracle on O(1) data.
# fp16/bf16 inputs are compared with the fp32 reference computed on the same (rounded) inputs;
# the gap is the rounding of u, y, dx, g to the storage dtype (the interpreter also truncates
# fp32->bf16 stores instead of rounding).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}

SEED = 1234


def _operands(M, K, N, r, dtype=torch.float32, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(r, K, generator=g) / K**0.5
    B = torch.randn(N, r, generator=g) / r**0.5
    return [t.to(dtype) if t is not None else None for t in (x, W, b, A, B)]


def _oracle(x, W, b, A, B, s, mask):
    """fp32 autograd oracle with an explicit mask (None: no dropout)."""
    xd = x if mask is None else x * mask
    y = x @ W.t() + s * (xd @ A.t()) @ B.t()
    return y + b if b is not None else y


def _leaf(t, grad=True):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _run_both(x, W, b, A, B, s, p, impl, dtype, lead=None, x_transform=None, grads=(True, False, False, True, True)):
    """Triton on dtype inputs vs the fp32 oracle on the same values; returns pairs to compare."""
    tri = [_leaf(t, gr) for t, gr in zip((x, W, b, A, B), grads)]
    ref = [_leaf(t.float() if t is not None else None, gr) for t, gr in zip((x, W, b, A, B), grads)]
    xt = x_transform(tri[0]) if x_transform else tri[0]
    xr = x_transform(ref[0]) if x_transform else ref[0]
    y = lora_linear(xt, tri[1], tri[2], tri[3], tri[4], s, p, True, backend="triton", impl=impl, seed=SEED)
    K = xt.shape[-1]
    Mflat = xt.numel() // K
    mask = K_.dropout_mask(SEED, p, Mflat, K) if p > 0 else None
    xr2 = xr.reshape(-1, K)
    yr = _oracle(xr2, ref[1], ref[2], ref[3], ref[4], s, mask).reshape(*xr.shape[:-1], -1)
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(7)).to(dtype).float()
    y.backward(dy.to(dtype))
    yr.backward(dy)
    pairs = [("y", y, yr)]
    for name, a, r_ in zip(("dx", "dW", "db", "dA", "dB"), tri, ref):
        if a is not None and a.requires_grad:
            pairs.append((name, a.grad, r_.grad))
    return pairs


def _assert_close(pairs, dtype):
    atol, rtol = TOL[dtype]
    for name, got, want in pairs:
        assert got is not None, f"{name} missing"
        assert got.dtype == dtype, f"{name} dtype {got.dtype}"
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


SHAPES = [  # (M, K, N, r): ragged, r=1, rank not a power of two, M=1
    (37, 45, 29, 5),
    (1, 33, 17, 1),
    (70, 96, 80, 16),
]


@interp
@pytest.mark.parametrize("impl", ["split", "kernels", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_output_and_grads_match_reference(impl, shape, p):
    M, K, N, r = shape
    x, W, b, A, B = _operands(M, K, N, r, bias=(M % 2 == 1))
    if impl == "fused" and p > 0:  # routed to split (mask drawn once), with a warning
        with pytest.warns(RuntimeWarning, match="fused.*split"):
            pairs = _run_both(x, W, b, A, B, 0.75, p, impl, torch.float32)
    else:
        pairs = _run_both(x, W, b, A, B, 0.75, p, impl, torch.float32)
    _assert_close(pairs, torch.float32)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_kernel_with_dropout_matches_its_mask(dtype):
    """The fused forward kernel keeps its dropout path (the op no longer routes dropout to it):
    y and u against the oracle with the kernels' mask, ragged shape."""
    M, K, N, r = 37, 45, 29, 5
    x, W, b, A, B = _operands(M, K, N, r, dtype=dtype)
    y, u = K_.lora_fused_forward(x, W, b, A, B, 0.75, SEED, 0.25)
    mask = K_.dropout_mask(SEED, 0.25, M, K)
    xf, Af = x.float(), A.float()
    u_ref = (xf * mask) @ Af.t()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(u.float(), u_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(y.float(), _oracle(xf, W.float(), b.float(), Af, B.float(), 0.75, mask),
                               atol=atol, rtol=rtol)


@interp
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 1e-7])
def test_dropout_threshold_is_16_bit_and_scale_unbiased(p):
    thresh, p_eff = K_.dropout_threshold(p)
    assert thresh == max(1, round(p * 65536)) and p_eff == thresh / 65536
    # within half a step of p; a p below that still drops (one step), never silently not at all
    assert abs(p_eff - p) <= 2**-17 if p >= 2**-17 else p_eff == 2**-16
    mask = K_.dropout_mask(SEED, p, 128, 256)
    kept = mask > 0
    assert torch.allclose(mask[kept], torch.tensor(1.0 / (1.0 - p_eff)))
    if p >= 0.05:  # 32768 draws: the drop rate within 5 standard deviations
        sd = (p_eff * (1 - p_eff) / kept.numel()) ** 0.5
        assert abs((~kept).float().mean().item() - p_eff) < 5 * sd


@interp
@pytest.mark.parametrize("impl", ["split", "kernels"])
def test_p0_matches_reference_function(impl):
    """Without dropout the Triton op equals LoraLinearReference (the shipped oracle) itself."""
    x, W, b, A, B = _operands(23, 40, 31, 7)
    tri = [_leaf(t) for t in (x, W, b, A, B)]
    ref = [_leaf(t) for t in (x, W, b, A, B)]
    y = lora_linear(*tri, 2.0, 0.0, True, backend="triton", impl=impl)
    yr = LoraLinearReference.apply(*ref, 2.0, 0.0, True)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    _assert_close([("y", y, yr)] + [(n, a.grad, c.grad) for n, a, c in zip("xWbAB", tri, ref)], torch.float32)


@interp
def test_rank_256():
    x, W, b, A, B = _operands(20, 40, 24, 256)
    _assert_close(_run_both(x, W, b, A, B, 0.5, 0.1, "kernels", torch.float32), torch.float32)


@interp
def test_fused_falls_back_to_split_above_rank_64():
    x, W, b, A, B = _operands(9, 24, 12, 65)
    _assert_close(_run_both(x, W, b, A, B, 0.5, 0.0, "fused", torch.float32), torch.float32)


@interp
@pytest.mark.parametrize("impl", ["kernels", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_against_fp32_reference(impl, dtype):
    x, W, b, A, B = _operands(33, 48, 40, 8, dtype=dtype)
    _assert_close(_run_both(x, W, b, A, B, 0.5, 0.2, impl, dtype), dtype)


@interp
@pytest.mark.parametrize("impl", ["split", "kernels", "epilogue", "fused"])
def test_noncontiguous_3d_input_and_conv1d_weight(impl):
    """x is a strided 3-D view (every other feature of a wider tensor), W is Conv1D's W.T."""
    M, K, N, r = 30, 36, 26, 6
    _, _, b, A, B = _operands(M, K, N, r)
    wide = torch.randn(3, 10, 2 * K)
    conv_w = torch.randn(K, N) / K**0.5  # GPT-2 Conv1D stores [in, out]
    W = conv_w.t()
    assert not W.is_contiguous()
    pairs = _run_both(wide, W, b, A, B, 1.5, 0.3, impl, torch.float32,
                      x_transform=lambda t: t[..., ::2])
    _assert_close(pairs, torch.float32)
    assert pairs[0][1].shape == (3, 10, N)


@interp
def test_transposed_2d_input():
    x, W, b, A, B = _operands(40, 28, 22, 4)
    xt = x.t().contiguous()  # [K, M]; x = xt.t() has strides (1, M)
    pairs = _run_both(xt, W, b, A, B, 1.0, 0.5, "kernels", torch.float32, x_transform=lambda t: t.t())
    _assert_close(pairs, torch.float32)


@interp
def test_weight_and_bias_grads_when_they_require_it():
    x, W, b, A, B = _operands(17, 20, 15, 3)
    pairs = _run_both(x, W, b, A, B, 0.5, 0.2, "kernels", torch.float32, grads=(True, True, True, True, True))
    assert {n for n, *_ in pairs} == {"y", "dx", "dW", "db", "dA", "dB"}
    _assert_close(pairs, torch.float32)


@interp
@pytest.mark.parametrize("impl", ["split", "fused"])
def test_saves_no_mask_and_no_dropped_copy(impl):
    """With dropout, backward keeps x itself, u [M, r] and the weights: nothing else of size M x K."""
    x, W, b, A, B = _operands(40, 48, 36, 4)
    A_, B_ = _leaf(A), _leaf(B)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, W, b, A_, B_, 1.0, 0.5, True, backend="triton", impl=impl)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    assert any(tuple(t.shape) == (40, 4) for t in saved)  # u
    y.sum().backward()
    assert A_.grad is not None and B_.grad is not None


@interp
@pytest.mark.parametrize("impl", ["split", "kernels", "epilogue", "fused"])
def test_empty_batch(impl):
    """M = 0 tokens (an empty 3-D batch): empty output, zero LoRA gradients, no kernel launch."""
    _, W, b, A, B = _operands(1, 16, 8, 2)
    x = torch.randn(2, 0, 16, requires_grad=True)
    A_, B_ = _leaf(A), _leaf(B)
    y = lora_linear(x, W, b, A_, B_, 1.0, 0.3, True, backend="triton", impl=impl)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(A_.grad, torch.zeros_like(A)) and torch.equal(B_.grad, torch.zeros_like(B))


def test_h100_config_pruning(monkeypatch):
    """The H100 autotune lists (built as on a GPU) are pruned to a non-empty set for every kernel,
    rank and M; decode-sized M keeps only the smallest row blocks; configs that spilled when
    compiled for sm_90 with triton 3.6 (benchmarks/NOTES-lora-linear.md) are dropped."""
    monkeypatch.setattr(K_, "_INTERPRET", False)
    lists = {"down": K_._down_configs(), "dx": K_._dx_configs(), "da": K_._da_configs(), "fused": K_._fused_configs(),
             "epi": K_._epi_configs(), "dy": K_._dy_configs()}
    assert all(len(v) > 1 for v in lists.values())
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N"), c.kwargs["BLOCK_K"], c.num_warps)  # noqa: E731
    for kind, configs in lists.items():
        for r in (1, 16, 64, 256):
            if kind == "fused" and r > K_.MAX_FUSED_RANK:
                continue
            rp = K_._pad_rank(r)
            for M in (1, 16, 4096):
                for drop in (False, True):
                    kept = K_._prune(kind)(configs, dict(R_PAD=rp, M=M, HAS_DROPOUT=drop, BLOCK_R=min(rp, 128),
                                                         DETERMINISTIC=drop and kind == "dy"))
                    assert kept, (kind, r, M, drop)
                    if kind == "dy" and drop:  # deterministic: the row block the launcher sized the planes for
                        assert {c.kwargs["BLOCK_M"] for c in kept} == {K_._dy_det_block_m(M)}
                        continue
                    if M <= 16:
                        assert {c.kwargs["BLOCK_M"] for c in kept} == {min(c.kwargs["BLOCK_M"] for c in configs)}
    down256 = {shape(c) for c in K_._prune("down")(lists["down"], dict(R_PAD=256, M=4096, HAS_DROPOUT=True))}
    assert down256 and not down256 & {(16, None, 64, 4), (16, None, 128, 8), (32, None, 64, 4), (64, None, 64, 8)}
    # the epilogue GEMM: the 128 x 256 tile without the dropout epilogue only (two [BM, BN] tiles
    # and the mask draws with it), the 128 x 128 8-warp tile either way (sm_90, triton 3.9: 240 and
    # 234 registers, no spills; benchmarks/NOTES-sm90-compile.md)
    epi = {d: {shape(c) for c in K_._prune("epi")(lists["epi"], dict(R_PAD=16, M=4096, HAS_DROPOUT=d))}
           for d in (False, True)}
    assert (128, 256, 64, 8) in epi[False] and (128, 256, 64, 8) not in epi[True]
    assert (128, 128, 64, 8) in epi[True]
    da64 = {shape(c) for c in K_._prune("da")(lists["da"], dict(R_PAD=64, M=4096, HAS_DROPOUT=True, BLOCK_R=64))}
    assert da64 and not da64 & {(64, None, 64, 4), (64, None, 128, 8), (128, None, 64, 8)}
    # fp32 ("ieee" FMA dots): every 64/128-row block and the [64, 128] accumulator spilled on sm_90
    da32 = {shape(c) for r in (16, 64) for c in K_._prune("da")(
        lists["da"], dict(R_PAD=r, M=4096, HAS_DROPOUT=True, BLOCK_R=r, ELEM_BYTES=4))}
    assert da32 and all(bm <= 32 for bm, *_ in da32) and (32, None, 128, 8) in da32


@interp
def test_mask_properties():
    m1 = K_.dropout_mask(SEED, 0.3, 64, 96)
    assert torch.equal(m1, K_.dropout_mask(SEED, 0.3, 64, 96))
    assert not torch.equal(m1, K_.dropout_mask(SEED + 1, 0.3, 64, 96))
    vals = m1.unique()
    p_eff = K_.dropout_threshold(0.3)[1]  # 0.3 on the 16-bit grid
    assert len(vals) == 2 and vals[0].item() == 0.0 and vals[1].item() == pytest.approx(1 / (1 - p_eff))
    kept = (m1 > 0).float().mean().item()
    assert 0.65 < kept < 0.75
    assert torch.equal(K_.dropout_mask(SEED, 1.0, 4, 4), torch.zeros(4, 4))


@interp
def test_mask_bits_look_independent_across_rows_columns_and_philox_words():
    """The Philox counter is (column group, row): rows, column groups and the 8 draws of one call
    must not repeat or correlate. At p = 0.5 on 256 x 512: the kept fraction within 4 sigma of 1/2,
    no two rows or column groups equal, and every lag-1..8 correlation (along rows: the draws of
    one Philox call and its neighbours; along columns) within 4 sigma of 0."""
    keep = (K_.dropout_mask(SEED, 0.5, 256, 512) > 0).double()
    n = keep.numel()
    assert abs(keep.mean().item() - 0.5) < 4 * 0.5 / n**0.5
    assert len({tuple(r.tolist()) for r in keep}) == 256
    groups = keep.reshape(256, 64, 8).permute(1, 0, 2).reshape(64, -1)
    assert len({tuple(g.tolist()) for g in groups}) == 64
    z = keep * 2 - 1
    for lag in range(1, 9):
        for a, b in ((z[:, :-lag], z[:, lag:]), (z[:-lag], z[lag:])):
            rho = (a * b).mean().item()
            assert abs(rho) < 4 / a.numel() ** 0.5, (lag, rho)


@interp
def test_seed_drawn_from_torch_rng_and_eval_mode_has_no_dropout():
    x, W, b, A, B = _operands(12, 16, 8, 2)
    torch.manual_seed(3)
    y1 = lora_linear(x, W, b, A, B, 1.0, 0.5, True, backend="triton")
    torch.manual_seed(3)
    y2 = lora_linear(x, W, b, A, B, 1.0, 0.5, True, backend="triton")
    y3 = lora_linear(x, W, b, A, B, 1.0, 0.5, True, backend="triton")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y_eval = lora_linear(x, W, b, A, B, 1.0, 0.5, False, backend="triton")
    torch.testing.assert_close(y_eval, lora_linear(x, W, b, A, B, 1.0, 0.5, False, backend="reference"))


@interp
def test_activation_checkpointing_recomputes_the_same_mask():
    """torch.utils.checkpoint restores the RNG state, so the recomputed forward draws the same
    seed: gradients equal the non-checkpointed run's."""
    from torch.utils.checkpoint import checkpoint

    x, W, b, A, B = _operands(19, 24, 20, 3)
    grads = []
    for use_ckpt in (False, True):
        A_, B_, x_ = _leaf(A), _leaf(B), _leaf(x)
        f = lambda xx: lora_linear(xx, W, b, A_, B_, 1.0, 0.4, True, backend="triton", impl="kernels")  # noqa: E731
        torch.manual_seed(11)
        y = checkpoint(f, x_, use_reentrant=False) if use_ckpt else f(x_)
        y.pow(2).sum().backward()
        grads.append((y.detach(), x_.grad, A_.grad, B_.grad))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, atol=0, rtol=0)


@interp
def test_no_grad_inference():
    x, W, b, A, B = _operands(5, 16, 8, 2)
    with torch.no_grad():
        y = lora_linear(x, W, b, A, B, 1.0, 0.1, False, backend="triton", impl="fused")
    torch.testing.assert_close(y, _oracle(x, W, b, A, B, 1.0, None), atol=1e-4, rtol=1e-4)


@interp
def test_settings_force_backend_and_plan(settings, monkeypatch):
    x, W, b, A, B = _operands(5, 16, 8, 2)
    settings(backend="triton", lora_impl="fused")
    assert lora_impl() == "fused"
    from fastpeft.kernels import lora_linear as K

    fused = []
    real = K.lora_fused_forward
    monkeypatch.setattr(K, "lora_fused_forward", lambda *a, **k: fused.append(1) or real(*a, **k))
    y = lora_linear(x, W, b, A, B, 1.0)
    assert fused  # the settings' plan ran, with no argument naming it
    torch.testing.assert_close(y, _oracle(x, W, b, A, B, 1.0, None), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="FASTPEFT_LORA_IMPL"):
        settings(lora_impl="bogus")
    with pytest.raises(ValueError, match="Unknown LoRA-linear implementation 'bogus'"):
        lora_linear(x, W, b, A, B, 1.0, impl="bogus")


@interp
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp32_adapters_on_half_base_compute_in_base_dtype(backend):
    """fp32 LoRA factors on an fp16 base (peft's default layout): cast to fp16 differentiably;
    their gradients come back in fp32."""
    x, W, b, A, B = _operands(11, 32, 24, 4)
    xh, Wh, bh = x.half(), W.half(), b.half()
    A_, B_ = _leaf(A), _leaf(B)
    y = lora_linear(xh, Wh, bh, A_, B_, 0.5, 0.0, True, backend=backend, impl="kernels")
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert A_.grad.dtype == torch.float32 and B_.grad.dtype == torch.float32
    A2, B2 = _leaf(A.half().float()), _leaf(B.half().float())
    yr = _oracle(xh.float(), Wh.float(), bh.float(), A2, B2, 0.5, None)
    yr.sum().backward()
    _assert_close([("y", y, yr)], torch.float16)
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(A_.grad, A2.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(B_.grad, B2.grad, atol=atol, rtol=rtol)


@interp
def test_autocast_dtype_wins_on_both_backends():
    """Inside torch.autocast every operand is cast to the autocast dtype (fp32 model, fp16
    compute); Triton and reference agree with the fp32 oracle on the rounded values."""
    x, W, b, A, B = _operands(13, 24, 20, 3)
    want = _oracle(*(t.half().float() for t in (x, W, b, A, B)), 0.5, None)
    for backend in ("reference", "triton"):
        with torch.autocast("cpu", dtype=torch.float16):
            y = lora_linear(x, W, b, A, B, 0.5, backend=backend, impl="kernels")
        assert y.dtype == torch.float16, backend
        _assert_close([(f"y[{backend}]", y, want)], torch.float16)


def test_auto_backend_is_triton_for_cuda_tensors_reference_on_cpu(settings):
    """The automatic choice (what fastpeft's LoRA layers use): Triton for CUDA tensors, the
    reference path for CPU ones; the settings' backend overrides it."""
    from fastpeft.ops import backend as bk

    class FakeCuda:
        is_cuda = True

    settings(backend="auto")
    cpu = torch.zeros(1)
    assert bk.choose_backend(cpu, cpu) == "reference"
    assert bk.choose_backend(FakeCuda(), cpu) == ("triton" if bk.triton_available() else "reference")
    settings(backend="reference")
    assert bk.choose_backend(FakeCuda()) == "reference"


def test_merge_matches_unmerged_and_unmerge_restores():
    x, W, b, A, B = _operands(9, 24, 12, 4)
    conv_w = W.t().contiguous()  # Conv1D layout: merge through the W.T view
    W_view = conv_w.t()
    orig = conv_w.clone()
    lora_merge(W_view, A, B, 0.5)
    torch.testing.assert_close(x @ W_view.t() + b, lora_linear(x, W, b, A, B, 0.5, backend="reference"),
                               atol=1e-5, rtol=1e-5)
    lora_merge(W_view, A, B, 0.5, sign=-1.0)
    torch.testing.assert_close(conv_w, orig, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="lora_merge"):
        lora_merge(W, A.t(), B, 0.5)


@interp
def test_bad_inputs_raise_clear_errors():
    x, W, b, A, B = _operands(6, 16, 8, 2)
    with pytest.raises(ValueError, match="lora_A has shape"):
        lora_linear(x, W, b, A[:, :5], B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="lora_B has shape"):
        lora_linear(x, W, b, A, B[:, :1], 1.0, backend="triton")
    with pytest.raises(ValueError, match="weight has shape"):
        lora_linear(x, W[:, :3], b, A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="share one dtype"):
        lora_linear(x.half(), W, b, A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="share one dtype"):
        lora_linear(x, W, b.half(), A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="float64 is not supported"):
        lora_linear(*(t.double() for t in (x, W, b, A, B)), 1.0, backend="triton")
    with pytest.raises(ValueError, match="dropout probability"):
        lora_linear(x, W, b, A, B, 1.0, 1.5, True, backend="triton")
    big_A, big_B = torch.zeros(257, 16), torch.zeros(8, 257)
    with pytest.raises(ValueError, match="rank 257"):
        lora_linear(x, W, b, big_A, big_B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="Unknown fastpeft backend"):
        lora_linear(x, W, b, A, B, 1.0, backend="cuda-magic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or K_.interpreting(), reason="needs a CUDA device (compiled kernels)")
@pytest.mark.parametrize("impl", ["split", "kernels", "epilogue", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_kernels_match_fp32_reference(impl, dtype, p):
    """Compiled kernels on a GPU: relative error of y and every grad vs an fp32 oracle."""
    M, K, N, r = 300, 520, 388, 16
    dev = torch.device("cuda")
    ops = [t.to(dev) if t is not None else None for t in _operands(M, K, N, r, dtype=dtype)]
    tri = [_leaf(t) for t in ops]
    ref = [_leaf(t.float()) for t in ops]
    y = lora_linear(*tri, 0.5, p, True, backend="triton", impl=impl, seed=SEED)
    mask = K_.dropout_mask(SEED, p, M, K, device=dev) if p > 0 else None
    yr = _oracle(*ref, 0.5, mask)
    dy = torch.randn(M, N, device=dev).to(dtype)
    y.backward(dy)
    yr.backward(dy.float())
    bound = 1e-4 if dtype == torch.float32 else 1e-2  # relative Frobenius error (METHOD.md ranges)
    for name, got, want in [("y", y, yr)] + [(n, a.grad, c.grad) for n, a, c in zip("xWbAB", tri, ref)]:
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < bound, f"{name}: relative error {rel:.2e} >= {bound:.0e}"


def test_fallback_reason_agrees_with_automatic_choice():
    """The reason patch() reports must describe what choose_backend actually does."""
    from fastpeft.ops.backend import choose_backend, fallback_reason

    x = torch.randn(2, 3)
    assert choose_backend(x) == "reference"
    assert fallback_reason(x) is not None and "CPU" in fallback_reason(x)


@interp
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_deterministic_grad_a_matches_reference(p, monkeypatch):
    """dA with per-slice planes summed in order (``deterministic=True``, or torch's
    deterministic mode) equals the oracle; M spans several slices (split > 1 on the CPU's
    4 nominal SMs)."""
    M, K, r = 300, 40, 3
    g_ = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g_)
    g = torch.randn(M, r, generator=g_)
    mask = K_.dropout_mask(SEED, p, M, K) if p > 0 else torch.ones(M, K)
    want = g.t() @ (x * mask)
    got = K_.lora_grad_a(g, x, SEED, p, deterministic=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(K_.lora_grad_a(g, x, SEED, p, deterministic=False), want, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert torch.equal(K_.lora_grad_a(g, x, SEED, p), got)
