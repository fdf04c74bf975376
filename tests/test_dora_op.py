"""The DoRA op and its fused weight-norm kernel against the reference, under the Triton CPU interpreter.

``dora_weight_norm`` (Triton) computes ``||W + s B A||`` per output row without forming the
merged weight; ``dora_linear`` composes it with the LoRA-linear op. Both are compared with
independent autograd oracles that materialise ``W + s B A`` (forward and every gradient:
x, lora_A, lora_B, magnitude), on small ragged shapes, strided weights (GPT-2 Conv1D's W.T),
fp32 and half inputs.
"""

import pytest
import torch
import torch.nn.functional as F

import fastpeft.ops.dora as dora_ops
from fastpeft.ops.dora import dora_linear, dora_weight_norm, dora_weight_norm_reference

K_ = pytest.importorskip("fastpeft.kernels.dora")
from fastpeft.kernels.lora_linear import interpreting  # noqa: E402

interp = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py, CPU only)")

# Tolerances, written once: (atol, rtol) against an fp32 oracle on the same (rounded) inputs,
# for tensors normalised by their largest reference entry (gradients summed over many rows are
# O(10) here; half rounding errors grow with that scale, not with each entry).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def _close(got, want, dtype, name=""):
    atol, rtol = TOL[dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")

NORM_SHAPES = [  # (N, K, r): not multiples of the blocks (32, 64, 16), r=1, r > BLOCK_R, N=1
    (37, 53, 3),
    (1, 130, 1),
    (70, 65, 20),
]


def _factors(N, K, r, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    W = torch.randn(N, K, generator=g) / K**0.5
    A = torch.randn(r, K, generator=g) / K**0.5
    B = torch.randn(N, r, generator=g) / r**0.5
    m = torch.rand(N, generator=g) + 0.5
    return W, A, B, m


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_norm_kernel_matches_reference(shape, dtype):
    N, K, r = shape
    W, A, B = (t.to(dtype) for t in _factors(N, K, r)[:3])
    got = dora_weight_norm(W, A, B, 0.7, backend="triton")
    want = torch.linalg.norm(W.double() + 0.7 * (B.double() @ A.double()), dim=1)
    assert got.dtype == torch.float32 and got.shape == (N,)
    _close(got.double(), want, dtype, "norm")
    _close(dora_weight_norm_reference(W, A, B, 0.7).double(), want, dtype, "reference norm")


@interp
def test_weight_norm_kernel_on_strided_conv1d_weight():
    """GPT-2's Conv1D stores W as [in, out]; the kernel reads the transposed view in place."""
    W, A, B, _ = _factors(29, 41, 5)
    w_t = W.t().contiguous().t()  # same values, strides (1, 29)
    assert not w_t.is_contiguous()
    torch.testing.assert_close(dora_weight_norm(w_t, A, B, 2.0, backend="triton"), dora_weight_norm_reference(W, A, B, 2.0), atol=1e-5, rtol=1e-5)


@interp
def test_triton_path_does_not_materialise_the_merged_weight(monkeypatch):
    """With backend='triton' the norm comes from the kernel alone: the reference (which forms
    W + s B A) must not run, for the norm nor inside dora_linear."""

    def boom(*a, **k):
        raise AssertionError("reference weight norm called on the triton path")

    W, A, B, m = _factors(20, 24, 4)
    want = dora_weight_norm_reference(W, A, B, 1.5)
    monkeypatch.setattr(dora_ops, "dora_weight_norm_reference", boom)
    torch.testing.assert_close(dora_weight_norm(W, A, B, 1.5, backend="triton"), want, atol=1e-5, rtol=1e-5)
    dora_linear(torch.randn(3, 24), W, None, A, B, m, 1.5, backend="triton")
    with pytest.raises(AssertionError, match="reference weight norm"):
        dora_weight_norm(W, A, B, 1.5, backend="reference")


def _oracle(x, W, b, A, B, m, s, mask=None):
    """peft's DoRA formula with a materialised, detached norm (and an explicit dropout mask)."""
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    scale = m / n
    dx = x if mask is None else x * mask
    y = F.linear(x, W, b) + (scale - 1) * F.linear(dx, W) + scale * s * (dx @ A.t() @ B.t())
    return y


LINEAR_CASES = [  # (lead dims of x, K, N, r, bias)
    ((2, 7), 45, 29, 5, True),
    ((1,), 33, 17, 1, False),
    ((3, 11), 70, 40, 17, True),
]


def _leaf(t, grad=True):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _run(lead, K, N, r, bias, dtype, p, impl, settings, conv1d=False):
    settings(lora_impl=impl)
    W, A, B, m = _factors(N, K, r, gen_seed=K)
    g = torch.Generator().manual_seed(N)
    x = torch.randn(*lead, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    vals = [t.to(dtype) if t is not None else None for t in (x, W, b, A, B, m)]
    tri = [_leaf(t, grad=(i in (0, 3, 4, 5))) for i, t in enumerate(vals)]
    ref = [_leaf(t.float() if t is not None else None, grad=(i in (0, 3, 4, 5))) for i, t in enumerate(vals)]
    w_tri = tri[1].t().contiguous().t() if conv1d else tri[1]
    torch.manual_seed(11)
    y = dora_linear(tri[0], w_tri, tri[2], tri[3], tri[4], tri[5], 0.6, dropout_p=p, training=True, backend="triton")
    mask = None
    if p > 0:
        torch.manual_seed(11)  # the op draws its mask like F.dropout
        mask = F.dropout(torch.ones(*lead, K), p, training=True)
    yr = _oracle(*ref, 0.6, mask)
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(dy)
    yr.backward(dy.float())
    assert y.dtype == dtype
    _close(y, yr, dtype, "y")
    for name, i in (("dx", 0), ("dA", 3), ("dB", 4), ("dm", 5)):
        assert tri[i].grad is not None and tri[i].grad.dtype == dtype, name
        _close(tri[i].grad, ref[i].grad, dtype, name)


@interp
@pytest.mark.parametrize("impl", ["split", "fused"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_dora_linear_triton_fwd_bwd_fp32(case, impl, settings):
    _run(*case, torch.float32, 0.0, impl, settings)


@interp
@pytest.mark.parametrize("impl", ["kernels", "fused"])
def test_dora_linear_triton_dropout_and_conv1d_weight(impl, settings):
    _run((4, 5), 37, 23, 6, True, torch.float32, 0.3, impl, settings, conv1d=True)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dora_linear_triton_half(dtype, settings):
    _run((2, 9), 48, 40, 8, True, dtype, 0.0, "fused", settings)


def test_reference_backend_matches_oracle_with_mixed_dtypes():
    """fp32 adapters and magnitude on a half base (how peft and fastpeft store them): the op
    casts to x's dtype and the fp32 leaves receive fp32 gradients."""
    W, A, B, m = _factors(19, 26, 4)
    x = torch.randn(5, 26)
    tri = [_leaf(x.half()), W.half(), _leaf(A), _leaf(B), _leaf(m)]
    y = dora_linear(tri[0], tri[1], None, tri[2], tri[3], tri[4], 2.0, backend="reference")
    ref = [_leaf(x.half().float()), W.half().float(), _leaf(A), _leaf(B), _leaf(m)]
    yr = _oracle(ref[0], ref[1], None, ref[2], ref[3], ref[4], 2.0)
    assert y.dtype == torch.float16
    _close(y, yr, torch.float16, "y")
    y.float().sum().backward()
    yr.sum().backward()
    for name, i in (("dA", 2), ("dB", 3), ("dm", 4)):
        assert tri[i].grad.dtype == torch.float32
        _close(tri[i].grad, ref[i].grad, torch.float16, name)


def test_norm_is_detached_and_scale_starts_at_one():
    """m initialised to the norm gives the plain LoRA output; the norm carries no gradient."""
    W, A, B, _ = _factors(12, 16, 3)
    m = _leaf(dora_weight_norm(W, A, B, 1.0))
    x = torch.randn(4, 16)
    A_, B_ = _leaf(A), _leaf(B)
    y = dora_linear(x, W, None, A_, B_, m, 1.0)
    torch.testing.assert_close(y, x @ W.t() + (x @ A.t()) @ B.t(), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    # with a detached norm, dL/dB = (m/n) * s * g^T (x A^T) = g^T (x A^T) at init
    torch.testing.assert_close(B_.grad, torch.ones(4, 12).t() @ (x @ A.t()), atol=1e-5, rtol=1e-5)


def test_bad_shapes_give_clear_errors():
    W, A, B, m = _factors(8, 10, 2)
    with pytest.raises(ValueError, match=r"magnitude has shape \(7,\), expected \[8\]"):
        dora_linear(torch.randn(2, 10), W, None, A, B, m[:7], 1.0)
    with pytest.raises(ValueError, match=r"lora_B \(2, 8\) \(expected \[8, r\]\)"):
        dora_weight_norm(W, A, B.t(), 1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        dora_weight_norm(W[None], A, B, 1.0)


def test_benchmark_script_runs_on_cpu():
    """benchmarks/dora.py (the GPU comparison with eager peft-style DoRA) runs its CPU config."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "dora.py")
    spec = importlib.util.spec_from_file_location("fastpeft_bench_dora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(quick=True)
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"] * 2
    for row in rows:
        assert list(row) == list(rows[0])
        assert all(row[k] > 0 for k in ("base ms", "eager ms", "fastpeft ms", "norm fused ms", "norm eager ms"))
        assert abs(row["eager/fastpeft"] - row["eager ms"] / row["fastpeft ms"]) < 1e-9
    # the benchmarked op is the real one: its output equals the eager formula
    g = torch.Generator().manual_seed(0)
    W, A, B, m = (torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), torch.rand(6, generator=g))
    x, b = torch.randn(3, 5, generator=g), torch.randn(6, generator=g)
    torch.testing.assert_close(mod._eager(x, W, b, A, B, m), dora_linear(x, W, b, A, B, m, mod.SCALING), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs a CUDA device (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_norm_kernel_and_dora_linear_match_fp32_reference(dtype):
    """Compiled on a GPU: Llama-like ragged shapes, bf16 included (checked only here)."""
    dev = torch.device("cuda")
    for N, K, r in ((4099, 1027, 16), (515, 4096, 64), (33, 17, 1)):
        W, A, B, m = (t.to(dev, dtype) for t in _factors(N, K, r))
        want = dora_weight_norm_reference(W.float(), A.float(), B.float(), 0.7)
        _close(dora_weight_norm(W, A, B, 0.7, backend="triton"), want, torch.float32 if dtype == torch.float32 else dtype, "norm")
        x = torch.randn(37, K, device=dev, dtype=dtype, requires_grad=True)
        Ag, Bg, mg = (t.clone().requires_grad_() for t in (A, B, m))
        y = dora_linear(x, W, None, Ag, Bg, mg, 0.7, backend="triton")
        ref = [t.detach().float().requires_grad_() for t in (x, Ag, Bg, mg)]
        yr = _oracle(ref[0], W.float(), None, ref[1], ref[2], ref[3], 0.7)
        dy = torch.randn_like(yr)
        y.backward(dy.to(dtype))
        yr.backward(dy)
        _close(y, yr, dtype, "y")
        for name, got, r_ in zip(("dx", "dA", "dB", "dm"), (x, Ag, Bg, mg), ref):
            _close(got.grad, r_.grad, dtype, name)


def test_base_dtype_mismatch_outside_autocast_is_an_error():
    W, A, B, m = _factors(8, 10, 2)
    with pytest.raises(ValueError, match="must share one dtype outside autocast"):
        dora_linear(torch.randn(2, 10), W.half(), None, A, B, m, 1.0)
    with pytest.raises(ValueError, match="bias=torch.float16"):
        dora_linear(torch.randn(2, 10), W, torch.zeros(8, dtype=torch.float16), A, B, m, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dora_linear(torch.randn(2, 10), W, torch.zeros(8), A, B, m, 1.0)
    assert y.dtype == torch.bfloat16


def test_small_magnitude_changes_survive_bf16():
    """m/n = 1 + 3e-3 is not representable in bf16 (steps of 2^-7 near 1; it would round to 1):
    the op rescales in fp32 and rounds once, so the bf16 output still follows the magnitude on
    average (each entry moves when 0.3% crosses its rounding boundary)."""
    W, A, B, _ = _factors(64, 48, 4)
    Wb, Ab, Bb = W.bfloat16(), A.bfloat16(), B.bfloat16()
    n = dora_weight_norm(Wb, Ab, Bb, 1.0)
    x = torch.randn(32, 48).bfloat16()
    plain = dora_linear(x, Wb, None, Ab, Bb, n, 1.0)  # scale exactly 1
    nudged = dora_linear(x, Wb, None, Ab, Bb, n * (1 + 3e-3), 1.0)
    assert torch.tensor(1 + 3e-3).bfloat16().item() == 1.0
    assert (nudged != plain).float().mean() > 0.2
    ratio = (nudged.double() / plain.double())[plain.abs() > 0.1]
    assert abs(ratio.mean().item() - (1 + 3e-3)) < 1e-3


def test_scale_columns_gradients():
    y = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dora_ops.ScaleColumns.apply, (y, s))
    yb = torch.randn(6, 5).bfloat16().requires_grad_()
    sf = torch.rand(5, requires_grad=True)
    out = dora_ops.ScaleColumns.apply(yb, sf)
    assert out.dtype == torch.bfloat16
    out.backward(torch.ones_like(out))
    assert yb.grad.dtype == torch.bfloat16 and sf.grad.dtype == torch.float32
    torch.testing.assert_close(sf.grad, yb.detach().float().sum(0))
