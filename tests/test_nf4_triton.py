"""NF4 Triton kernels under the CPU interpreter against the reference (forward and every
gradient), on ragged shapes, nested and plain absmax, odd in_features and blocks that straddle
rows. No bitsandbytes needed: weights are quantised by fastpeft's reference quantiser."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before fastpeft.kernels.nf4 is imported (kernels are built at import)

import contextlib  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fastpeft.ops import nf4  # noqa: E402

# Tolerances per dtype (fp32 accumulation; fp16 inputs/outputs), written once.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _quantized(N, K, blocksize=64, nested=True, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.1
    return nf4.quantize_nf4(w, blocksize, compress_statistics=nested, quant_type=quant_type)


@pytest.fixture(autouse=True)
def _interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("N,K,blocksize,nested", [(33, 70, 64, True), (40, 64, 128, False), (7, 33, 32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_kernel_bit_exact(N, K, blocksize, nested, dtype):
    from fastpeft.kernels import nf4 as K_

    packed, st = _quantized(N, K, blocksize, nested)
    got = K_.dequantize(packed.reshape(-1), st, dtype)
    assert torch.equal(got, nf4.dequantize_nf4_reference(packed, st, dtype))
    assert torch.equal(nf4.dequantize_nf4(packed, st, dtype, backend="triton"), got)


@contextlib.contextmanager
def _kernel_dropout(p, x0, A0, seed):
    """With dropout and an adapter in x's dtype, the Triton path draws its mask in the LoRA
    kernels from ``seed``; the reference then uses that same mask (``dropout_mask``), so the two
    compute the same function. Otherwise (no dropout, or an adapter in another dtype: the eager
    branch, torch's bernoulli draw on both sides) nothing changes."""
    if not _kernel_mask_case(p, x0, A0):
        yield
        return
    from fastpeft.kernels import lora_linear as LK

    def kernel_mask(xl, p_):
        return LK.dropout_mask(seed, p_, xl.shape[0], xl.shape[1], dtype=xl.dtype)

    with mock.patch.object(nf4, "_dropout_mask", kernel_mask):
        yield


def _kernel_mask_case(p, x0, A0) -> bool:
    return p > 0 and A0 is not None and A0.dtype == x0.dtype


def _run(backend, x0, packed, st, bias0, A0, B0, s, p, dy, seed=11):
    x = x0.clone().requires_grad_(True)
    bias = None if bias0 is None else bias0.clone().requires_grad_(True)
    A = None if A0 is None else A0.clone().requires_grad_(True)
    B = None if B0 is None else B0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with _kernel_dropout(p, x0, A0, seed):
        y = nf4.qlora_linear(x, packed, st, bias, A, B, s, p, training=p > 0, backend=backend, seed=seed)
    y.backward(dy)
    grads = [x.grad] + [t.grad for t in (bias, A, B) if t is not None]
    return y, grads


@pytest.mark.parametrize("M,N,K,blocksize,nested,quant_type", [
    (37, 48, 100, 64, True, "nf4"),   # blocks straddle rows, ragged tiles
    (20, 33, 64, 128, False, "nf4"),  # a block spans two rows
    (18, 17, 31, 32, True, "fp4"),    # odd in_features: bytes straddle rows
    (21, 40, 128, 64, True, "nf4"),   # K a multiple of the blocksize: one scale per row and K tile
    (9, 70, 96, 32, False, "nf4"),    # the same with blocksize 32, plain absmax
])
# fp16 with dropout at p = 0.5: the LoRA kernels scale fp32 sums of x * keep by 1 / (1 - p), the
# 16-bit reference rounds x * mask first; with a power-of-two scale both are exact, so the 16-bit
# comparison checks the masks and the plumbing, not that rounding order (the LoRA-linear op tests
# compare 16-bit kernels with any p to an fp32 oracle).
@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.0), (torch.float32, 0.3),
                                             (torch.float16, 0.0), (torch.float16, 0.5)])
def test_fused_matmul_forward_backward(M, N, K, blocksize, nested, quant_type, dtype, dropout_p):
    packed, st = _quantized(N, K, blocksize, nested, quant_type)
    g = torch.Generator().manual_seed(1)
    r, s = 5, 1.5
    x0 = (torch.randn(M, K, generator=g)).to(dtype)
    bias0 = (torch.randn(N, generator=g) * 0.1).to(dtype)
    A0 = (torch.randn(r, K, generator=g) * 0.1).to(dtype)
    B0 = (torch.randn(N, r, generator=g) * 0.1).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    y_ref, g_ref = _run("reference", x0, packed, st, bias0, A0, B0, s, dropout_p, dy)
    y_tri, g_tri = _run("triton", x0, packed, st, bias0, A0, B0, s, dropout_p, dy)
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_then_matmul_plan(monkeypatch, dtype, settings):
    """nf4_impl="dequant" (FASTPEFT_NF4_IMPL): the Triton dequantisation kernel then a torch matmul, forward
    and every gradient equal to the reference."""
    settings(nf4_impl="dequant")
    from fastpeft.kernels import nf4 as K_

    calls = []
    real_deq, real_mm = K_.dequantize, K_.matmul
    monkeypatch.setattr(K_, "dequantize", lambda *a, **k: calls.append("dequantize") or real_deq(*a, **k))
    monkeypatch.setattr(K_, "matmul", lambda *a, **k: calls.append("matmul") or real_mm(*a, **k))
    packed, st = _quantized(33, 100, 64, True)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(19, 100, generator=g).to(dtype)
    bias0 = (torch.randn(33, generator=g) * 0.1).to(dtype)
    A0, B0 = (torch.randn(3, 100, generator=g) * 0.1).to(dtype), (torch.randn(33, 3, generator=g) * 0.1).to(dtype)
    dy = torch.randn(19, 33, generator=g).to(dtype)
    p = 0.2 if dtype == torch.float32 else 0.5  # fp16: a power-of-two keep scale (see test_fused_matmul_forward_backward)
    y_ref, g_ref = _run("reference", x0, packed, st, bias0, A0, B0, 1.5, p, dy)
    y_tri, g_tri = _run("triton", x0, packed, st, bias0, A0, B0, 1.5, p, dy)
    assert calls == ["dequantize", "dequantize"]  # forward and input gradient, no fused GEMM
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    with pytest.raises(ValueError, match="FASTPEFT_NF4_IMPL.*'magic'"):
        settings(nf4_impl="magic")
    with pytest.raises(ValueError, match="nf4_impl='magic'"):
        nf4.qlora_linear(x0, packed, st, backend="triton", impl="magic")


def test_fused_forward_without_the_byte_pair_path(settings):
    """nf4_pair=False (FASTPEFT_NF4_PAIR=0): the forward GEMM's per-element path with one scale per row."""
    settings(nf4_pair=False)
    packed, st = _quantized(40, 128, 64, True)
    g = torch.Generator().manual_seed(5)
    x0, dy = torch.randn(21, 128, generator=g), torch.randn(21, 40, generator=g)
    A0, B0 = torch.randn(4, 128, generator=g) * 0.1, torch.randn(40, 4, generator=g) * 0.1
    y_ref, g_ref = _run("reference", x0, packed, st, None, A0, B0, 2.0, 0.0, dy)
    y_tri, g_tri = _run("triton", x0, packed, st, None, A0, B0, 2.0, 0.0, dy)
    torch.testing.assert_close(y_tri, y_ref, **TOL[torch.float32])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_fused_matmul_noncontiguous_input_and_no_adapter():
    packed, st = _quantized(24, 64, 64, True)
    x_big = torch.randn(40, 128)
    x0 = x_big[::2, ::2]  # non-contiguous [20, 64]
    dy = torch.randn(20, 24)
    y_ref, g_ref = _run("reference", x0, packed, st, None, None, None, 1.0, 0.0, dy)
    y_tri, g_tri = _run("triton", x0, packed, st, None, None, None, 1.0, 0.0, dy)
    torch.testing.assert_close(y_tri, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(g_tri[0], g_ref[0], **TOL[torch.float32])


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_decode(M, dtype):
    packed, st = _quantized(70, 200, 64, True)
    x = torch.randn(M, 200).to(dtype)
    bias = torch.randn(70).to(dtype)
    A, B = (torch.randn(4, 200) * 0.1).to(dtype), (torch.randn(70, 4) * 0.1).to(dtype)
    with torch.no_grad():
        ref = nf4.qlora_linear(x, packed, st, bias, A, B, 2.0, backend="reference")
        got = nf4.qlora_linear(x, packed, st, bias, A, B, 2.0, backend="triton")
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("N,K,blocksize,nested", [
    (40, 300, 64, False),  # K not a multiple of the blocksize: a scale per element
    (40, 256, 64, True),   # one scale per weight row and K tile
    (24, 96, 32, False),
])
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_split_k_matches(N, K, blocksize, nested, M):
    from fastpeft.kernels import nf4 as K_

    packed, st = _quantized(N, K, blocksize, nested)
    x = torch.randn(M, K)
    ref = x @ nf4.dequantize_nf4_reference(packed, st, torch.float32).t()
    for split in (1, 3, 10):
        torch.testing.assert_close(K_.gemv(x, packed.reshape(-1), st, split_k=split), ref, **TOL[torch.float32])


def test_cpu_tensors_never_reach_gpu_kernels(monkeypatch, settings):
    from fastpeft.kernels import nf4 as K_

    packed, st = _quantized(16, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nf4.qlora_linear(torch.randn(2, 64), packed, st, backend="triton")
    with pytest.raises(RuntimeError, match="CPU tensor outside the Triton interpreter"):
        K_.matmul(torch.randn(2, 64), packed.reshape(-1), st, trans_w=True)
    # automatic choice on CPU is the reference path
    settings(backend="auto")
    y = nf4.qlora_linear(torch.randn(2, 64), packed, st)
    assert y.shape == (2, 16)


@pytest.mark.parametrize("impl", ["fused", "dequant"])
def test_lora_branch_saves_no_mask_and_no_dropped_copy(monkeypatch, impl, settings):
    """With dropout and an adapter in x's dtype the 4-bit layer's LoRA branch runs the 16-bit
    layer's kernels: forward saves x (the input itself), u and the packed weight, nothing of
    x's size besides x; backward regenerates the mask in lora_dx_add and lora_grad_a."""
    from fastpeft.kernels import lora_linear as LK

    settings(nf4_impl=impl)
    calls = []
    for name in ("lora_down", "lora_dx_add", "lora_grad_a"):
        real = getattr(LK, name)
        monkeypatch.setattr(LK, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    packed, st = _quantized(24, 64, 64, True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(19, 64, generator=g).requires_grad_(True)
    A = (torch.randn(3, 64, generator=g) * 0.1).requires_grad_(True)
    B = (torch.randn(24, 3, generator=g) * 0.1).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4.qlora_linear(x, packed, st, None, A, B, 2.0, 0.25, training=True, backend="triton", seed=5)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    assert not big, [tuple(t.shape) for t in big]
    y.sum().backward()
    assert calls == ["lora_down", "lora_grad_a", "lora_dx_add"]


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_row_gemv_matches_reference(quant_type, nested, dtype):
    """M = 1 with K a multiple of the blocksize takes the one-row GEMV (byte-pair code table,
    split-K); odd N, through the op against the reference."""
    from fastpeft.kernels import nf4 as K_

    packed, st = _quantized(37, 256, 64, nested, quant_type)
    assert K_.gemv1_config(256, 37, 64) is not None
    x = torch.randn(1, 256).to(dtype)
    with torch.no_grad():
        ref = nf4.qlora_linear(x, packed, st, backend="reference")
        got = nf4.qlora_linear(x, packed, st, backend="triton")
    torch.testing.assert_close(got, ref, **TOL[dtype])


def test_code_pairs_table():
    from fastpeft.kernels import nf4 as K_

    code = torch.linspace(-1, 1, 16)
    t = K_.code_pairs(code)
    assert t is K_.code_pairs(code)  # cached
    hi = (t >> 32).to(torch.int32).view(torch.float32)
    lo = (t & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    b = torch.arange(256)
    assert torch.equal(hi, code[b >> 4]) and torch.equal(lo, code[b & 15])
    code.mul_(2)  # an in-place edit rebuilds the table
    assert torch.equal((K_.code_pairs(code) & 0xFFFFFFFF).to(torch.int32).view(torch.float32), code[b & 15])


@pytest.mark.parametrize("choice,lut", [("triton", True), ("triton_l1", False)])
def test_gemv_table_setting_reaches_the_launcher(monkeypatch, settings, choice, lut):
    """Settings.nf4_gemv picks the one-row GEMV's code table: "triton" asks for the register
    (prmt) table, "triton_l1" for the L1 table; both give the reference's numbers here."""
    from fastpeft.kernels import nf4 as K_

    settings(nf4_gemv=choice)
    seen = []
    real = K_.gemv
    monkeypatch.setattr(K_, "gemv", lambda *a, **k: seen.append(k.get("lut")) or real(*a, **k))
    packed, st = _quantized(24, 128, 64, True)
    x = torch.randn(1, 128)
    with torch.no_grad():
        got = nf4.qlora_linear(x, packed, st, backend="triton")
        ref = nf4.qlora_linear(x, packed, st, backend="reference")
    assert seen == [lut]
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


# ----------------------------------------------------------------------------- lora_impl="epilogue"
_EPI_KERNELS = ("lora_epilogue_gemm", "lora_grad_dy", "lora_down", "lora_grad_a", "lora_dx_add")


def _count_lora_kernels(monkeypatch):
    """Record every call of the LoRA-linear launchers the 4-bit layer may use (names, in order)."""
    from fastpeft.kernels import lora_linear as LK

    calls = []
    for name in _EPI_KERNELS:
        real = getattr(LK, name)
        monkeypatch.setattr(LK, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    return calls


def _epilogue_operands(dtype, M=23, N=37, K=70, r=5, seed=6):
    packed, st = _quantized(N, K, 64, True)  # K = 70: blocks straddle rows, ragged tiles
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(M, K, generator=g).to(dtype)
    bias0 = (torch.randn(N, generator=g) * 0.1).to(dtype)
    A0 = (torch.randn(r, K, generator=g) * 0.1).to(dtype)
    B0 = (torch.randn(N, r, generator=g) * 0.1).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    return packed, st, x0, bias0, A0, B0, dy


# fp16: s = 2 and p in {0, 0.5} make the scale the epilogue folds into u's (g's) rounding a power of
# two, so its one rounding equals the reference's (see test_fused_matmul_forward_backward)
@pytest.mark.parametrize("dtype,dropout_p,s", [(torch.float32, 0.0, 1.5), (torch.float32, 0.3, 1.5),
                                               (torch.float16, 0.0, 2.0), (torch.float16, 0.5, 2.0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dequant_plan_with_lora_epilogue(monkeypatch, settings, dtype, dropout_p, s, with_bias):
    """lora_impl="epilogue" on the dequant plan, adapter in x's dtype: forward and every gradient
    equal the reference's (with the kernels' dropout mask), through the LoRA epilogue GEMMs and
    the one-pass dy kernel; no fused dequant-GEMM, two dequantisations."""
    from fastpeft.kernels import nf4 as K_

    settings(nf4_impl="dequant", lora_impl="epilogue")
    packed, st, x0, bias0, A0, B0, dy = _epilogue_operands(dtype)
    bias0 = bias0 if with_bias else None
    y_ref, g_ref = _run("reference", x0, packed, st, bias0, A0, B0, s, dropout_p, dy)
    calls = _count_lora_kernels(monkeypatch)
    deq = []
    real_deq = K_.dequantize
    monkeypatch.setattr(K_, "dequantize", lambda *a, **k: deq.append(1) or real_deq(*a, **k))
    monkeypatch.setattr(K_, "matmul", lambda *a, **k: pytest.fail("the fused dequant-GEMM ran"))
    y_tri, g_tri = _run("triton", x0, packed, st, bias0, A0, B0, s, dropout_p, dy)
    down = ["lora_down"] if dropout_p > 0 else []
    grad_a = ["lora_grad_a"] if dropout_p > 0 else []
    assert calls == down + ["lora_epilogue_gemm", "lora_grad_dy", "lora_epilogue_gemm"] + grad_a
    assert len(deq) == 2
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    assert len(g_tri) == len(g_ref)
    for a, b in zip(g_tri, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


def _run_partial(backend, x0, packed, st, bias0, A0, B0, s, p, dy, wants, seed=11):
    """As :func:`_run` with only the operands named in ``wants`` (of x, bias, A, B) requiring grad;
    returns ``(y, {name: grad or None})``."""
    ops = dict(x=x0, bias=bias0, A=A0, B=B0)
    leaves = {k: v.clone().requires_grad_(k in wants) for k, v in ops.items()}
    torch.manual_seed(seed)
    with _kernel_dropout(p, x0, A0, seed):
        y = nf4.qlora_linear(leaves["x"], packed, st, leaves["bias"], leaves["A"], leaves["B"], s, p,
                             training=p > 0, backend=backend, seed=seed)
    y.backward(dy)
    return y, {k: t.grad for k, t in leaves.items()}


@pytest.mark.parametrize("wants,expect", [
    (("x",), ["lora_epilogue_gemm"]),                  # frozen adapter: g by a matmul, dx in the GEMM
    (("A",), ["lora_grad_a"]),                          # frozen B and x: g by a matmul, no dx GEMM
    (("B",), []),                                       # dB alone: one matmul over dy
    (("x", "B"), ["lora_grad_dy", "lora_epilogue_gemm"]),
    (("bias", "A", "B"), ["lora_grad_dy", "lora_grad_a"]),
])
def test_lora_epilogue_partial_grads(monkeypatch, settings, wants, expect):
    """Only the gradients asked for are computed (and the kernels for them run), each equal to the
    reference's; with dropout, fp32."""
    settings(nf4_impl="dequant", lora_impl="epilogue")
    packed, st, x0, bias0, A0, B0, dy = _epilogue_operands(torch.float32, M=19, N=33, K=64, r=3)
    y_ref, g_ref = _run_partial("reference", x0, packed, st, bias0, A0, B0, 1.5, 0.2, dy, wants)
    calls = _count_lora_kernels(monkeypatch)
    y_tri, g_tri = _run_partial("triton", x0, packed, st, bias0, A0, B0, 1.5, 0.2, dy, wants)
    assert calls == ["lora_down", "lora_epilogue_gemm"] + expect
    torch.testing.assert_close(y_tri, y_ref, **TOL[torch.float32])
    for name in ("x", "bias", "A", "B"):
        assert (g_tri[name] is None) == (name not in wants), name
        if name in wants:
            torch.testing.assert_close(g_tri[name], g_ref[name], **TOL[torch.float32])


@pytest.mark.parametrize("case", ["fused plan", "adapter in fp32 on fp16 x", "no adapter", "gemv"])
def test_lora_epilogue_leaves_other_cases_alone(monkeypatch, settings, case):
    """lora_impl="epilogue" changes only the dequant plan with an adapter in x's dtype: the fused
    plan, an adapter in another dtype, a frozen linear and the M <= 16 GEMV run as before (no
    LoRA epilogue GEMM, no dy kernel) and still equal the reference."""
    from fastpeft.kernels import nf4 as K_

    settings(nf4_impl="fused" if case == "fused plan" else "dequant", lora_impl="epilogue")
    dtype = torch.float16 if case == "adapter in fp32 on fp16 x" else torch.float32
    packed, st, x0, bias0, A0, B0, dy = _epilogue_operands(dtype)
    if case == "adapter in fp32 on fp16 x":
        A0, B0 = A0.float(), B0.float()
    if case == "no adapter":
        A0 = B0 = None
    calls = _count_lora_kernels(monkeypatch)
    if case == "gemv":
        gemv = []
        real = K_.gemv
        monkeypatch.setattr(K_, "gemv", lambda *a, **k: gemv.append(1) or real(*a, **k))
        with torch.no_grad():
            got = nf4.qlora_linear(x0[:5], packed, st, bias0, A0, B0, 1.5, backend="triton")
            ref = nf4.qlora_linear(x0[:5], packed, st, bias0, A0, B0, 1.5, backend="reference")
        assert gemv == [1] and not calls
        torch.testing.assert_close(got, ref, **TOL[dtype])
        return
    y_ref, g_ref = _run("reference", x0, packed, st, bias0, A0, B0, 1.5, 0.0, dy)
    y_tri, g_tri = _run("triton", x0, packed, st, bias0, A0, B0, 1.5, 0.0, dy)
    assert "lora_epilogue_gemm" not in calls and "lora_grad_dy" not in calls
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    for a, b in zip(g_tri, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])
