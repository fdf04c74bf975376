"""The ``impl="epilogue"`` LoRA-linear plan under the Triton CPU interpreter.

Its two new kernels against torch: the GEMM with the LoRA product in its epilogue
(``lora_epilogue_gemm``: the forward's ``x W^T + b + (s u) B^T`` and the backward's
``dy W + mask * (g A)``, transposes given by strides) and the one-pass-over-dy kernel
(``lora_grad_dy``: ``g = s dy B`` and ``dB = s dy^T u``, atomic and deterministic). Then the whole
op with ``impl="epilogue"`` against an fp32 autograd oracle (with dropout: the kernels' own
mask, ``dropout_mask``), forward and every gradient, with bias, a Conv1D-style non-contiguous
weight, and frozen operands. Shapes are small and odd (the interpreter is slow).
"""

import pytest
import torch

from fastpeft.ops.lora_linear import lora_linear

K_ = pytest.importorskip("fastpeft.kernels.lora_linear")

pytestmark = pytest.mark.skipif(not K_.interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py, CPU only)")

# Tolerances, written once: (atol, rtol) against an fp32 oracle computed on the same (rounded)
# inputs, O(1) data. bf16: the rounding of u, s u, g and the outputs to bf16 (the interpreter
# also truncates fp32 -> bf16 stores instead of rounding).
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float32, torch.bfloat16]

SEED = 4321
P = 0.25
SHAPES = [(37, 48, 40), (300, 16, 40)]  # odd sizes; 300 rows: 10 row blocks, more than one GROUP_M group


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _conv1d_weight(N, K, seed):
    """W [N, K] as GPT-2's Conv1D passes it: the transpose of a contiguous [K, N] tensor."""
    W = _randn(K, N, seed=seed, scale=K**-0.5).t()
    assert not W.is_contiguous()
    return W


# ----------------------------------------------------------------------------- the GEMM
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("conv1d", [False, True], ids=["W", "conv1d_W"])
def test_epilogue_gemm_forward_matches_torch(dtype, r, shape, conv1d):
    M, K, N = shape
    x = _randn(M, K, seed=1).to(dtype)
    W = (_conv1d_weight(N, K, 2) if conv1d else _randn(N, K, seed=2, scale=K**-0.5)).to(dtype)
    b = _randn(N, seed=3).to(dtype)
    u = _randn(M, r, seed=4).to(dtype)
    B = _randn(N, r, seed=5, scale=r**-0.5).to(dtype)
    y = K_.lora_epilogue_gemm(x, W.t(), b, u, B.t(), 0.75)
    assert y.dtype == dtype and y.shape == (M, N)
    su = (u.float() * 0.75).to(dtype).float()  # s folded into u before its rounding, like the kernel
    want = x.float() @ W.float().t() + b.float() + su @ B.float().t()
    _close(y, want, dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("p", [0.0, P])
def test_epilogue_gemm_dx_masks_only_the_lora_product(dtype, r, p):
    """``dx = dy W + mask * (g A)``: W read untransposed ([N, K], reduction over N), g in fp32,
    the mask over (row, output column) = x's (m, k), as ``dropout_mask`` materialises it."""
    M, K, N = 37, 48, 40
    dy = _randn(M, N, seed=6).to(dtype)
    W = _randn(N, K, seed=7, scale=K**-0.5).to(dtype)
    g = _randn(M, r, seed=8)
    A = _randn(r, K, seed=9, scale=K**-0.5).to(dtype)
    _, p_eff = K_.dropout_threshold(p)
    keep_scale = 1.0 / (1.0 - p_eff)
    dx = K_.lora_epilogue_gemm(dy, W, None, g, A, keep_scale, SEED, p)
    mask = K_.dropout_mask(SEED, p, M, K)  # 0 or 1 / (1 - p): the scale is folded into g's rounding below
    gs = (g * keep_scale).to(dtype).float()
    want = dy.float() @ W.float() + (gs @ A.float()) * (mask > 0)
    _close(dx, want, dtype, "dx")
    if p > 0:  # the mask really drops: the unmasked product is far from the result somewhere
        unmasked = dy.float() @ W.float() + gs @ A.float()
        assert (dx.float() - unmasked).abs().max() > 10 * TOL[dtype][0]


def test_epilogue_gemm_rejects_mismatched_operands():
    x, W = torch.randn(5, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="do not fit"):
        K_.lora_epilogue_gemm(x, W.t(), None, torch.randn(5, 2), torch.randn(3, 6), 1.0)


# ----------------------------------------------------------------------------- the dy kernel
def _dy_operands(M, N, r, dtype):
    return (_randn(M, N, seed=10).to(dtype), _randn(N, r, seed=11, scale=r**-0.5).to(dtype),
            _randn(M, r, seed=12).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", [(37, 40), (100, 200)], ids=lambda s: "x".join(map(str, s)))
def test_grad_dy_matches_torch(dtype, r, deterministic, shape):
    """(100, 200): four row blocks (four dB planes when deterministic) and four column slices
    (four g planes) on the interpreter's 4 nominal SMs."""
    M, N = shape
    dy, B, u = _dy_operands(M, N, r, dtype)
    g, dB = K_.lora_grad_dy(dy, B, u, 0.5, deterministic=deterministic)
    assert g.dtype == dB.dtype == torch.float32 and g.shape == (M, r) and dB.shape == (N, r)
    _close(g, 0.5 * dy.float() @ B.float(), dtype, "g")
    _close(dB, 0.5 * dy.float().t() @ u.float(), dtype, "dB")


def test_grad_dy_slices_without_columns_still_write_their_g_plane(monkeypatch):
    """More column slices than column blocks: the empty slices' g planes (never zero-filled)
    must be stored as zeros, or the in-order sum would add garbage."""
    monkeypatch.setattr(K_, "_dy_split", lambda M, N, device: 8)
    dy, B, u = _dy_operands(37, 40, 4, torch.float32)
    g, dB = K_.lora_grad_dy(dy, B, u, 1.5)
    _close(g, 1.5 * dy @ B, torch.float32, "g")
    _close(dB, 1.5 * dy.t() @ u, torch.float32, "dB")


def test_grad_dy_deterministic_is_bitwise_repeatable(monkeypatch):
    dy, B, u = _dy_operands(100, 200, 16, torch.float32)
    first = K_.lora_grad_dy(dy, B, u, 0.5, deterministic=True)
    for _ in range(2):
        again = K_.lora_grad_dy(dy, B, u, 0.5, deterministic=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    # the default follows torch's deterministic mode
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert torch.equal(K_.lora_grad_dy(dy, B, u, 0.5)[1], first[1])


# ----------------------------------------------------------------------------- the op
def _oracle(x, W, b, A, B, s, mask):
    xd = x if mask is None else x * mask
    y = x @ W.t() + s * (xd @ A.t()) @ B.t()
    return y + b if b is not None else y


def _leaf(t, grad):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _op_pairs(M, K, N, r, dtype, p, bias=True, conv1d=False, grads=(True, False, False, True, True), s=0.75):
    x = _randn(M, K, seed=20)
    W = _conv1d_weight(N, K, 21) if conv1d else _randn(N, K, seed=21, scale=K**-0.5)
    b = _randn(N, seed=22) if bias else None
    A = _randn(r, K, seed=23, scale=K**-0.5)
    B = _randn(N, r, seed=24, scale=r**-0.5)
    ops = [t.to(dtype) if t is not None else None for t in (x, W, b, A, B)]
    tri = [_leaf(t, gr) for t, gr in zip(ops, grads)]
    ref = [_leaf(t.float() if t is not None else None, gr) for t, gr in zip(ops, grads)]
    y = lora_linear(*tri, s, p, True, backend="triton", impl="epilogue", seed=SEED)
    yr = _oracle(*ref, s, K_.dropout_mask(SEED, p, M, K) if p > 0 else None)
    dy = _randn(M, N, seed=25, scale=M**-0.5).to(dtype)  # O(1) gradients: dA and dB sum over M rows
    y.backward(dy)
    yr.backward(dy.float())
    pairs = [("y", y, yr)]
    for name, a, c in zip(("dx", "dW", "db", "dA", "dB"), tri, ref):
        if a is not None and a.requires_grad:
            pairs.append((name, a.grad, c.grad))
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("p", [0.0, P])
def test_op_forward_and_backward_match_reference(dtype, r, p):
    pairs = _op_pairs(37, 48, 40, r, dtype, p)
    assert [n for n, *_ in pairs] == ["y", "dx", "dA", "dB"]
    for name, got, want in pairs:
        assert got.dtype == dtype, name
        _close(got, want, dtype, name)


@pytest.mark.parametrize("p", [0.0, P])
def test_op_with_conv1d_weight_no_bias_and_base_grads(p):
    """GPT-2's Conv1D weight (W.t() of [K, N]), no bias, and W / b requiring grad."""
    pairs = _op_pairs(37, 48, 40, 4, torch.float32, p, bias=False, conv1d=True, grads=(True, True, False, True, True))
    assert [n for n, *_ in pairs] == ["y", "dx", "dW", "dA", "dB"]
    for name, got, want in pairs:
        _close(got, want, torch.float32, name)
    pairs = _op_pairs(37, 48, 40, 4, torch.float32, p, grads=(True, True, True, True, True))
    assert [n for n, *_ in pairs] == ["y", "dx", "dW", "db", "dA", "dB"]
    for name, got, want in pairs:
        _close(got, want, torch.float32, name)


@pytest.mark.parametrize("grads", [(True, False, False, False, False), (False, False, False, True, True),
                                   (True, False, False, True, False), (True, False, False, False, True),
                                   (False, False, False, False, True)],
                         ids=["x_only", "adapters_only", "frozen_B", "frozen_A", "B_only"])
def test_op_partial_grads(grads):
    """Frozen adapters / inputs: the plan computes what is asked (g without dB, dB without g, ...)
    and each gradient still matches."""
    pairs = _op_pairs(37, 48, 40, 4, torch.float32, P, grads=grads)
    assert len(pairs) == 1 + sum(grads)
    for name, got, want in pairs:
        _close(got, want, torch.float32, name)


def test_op_empty_batch():
    W, b, A, B = _randn(8, 16, seed=1), _randn(8, seed=2), _randn(2, 16, seed=3), _randn(8, 2, seed=4)
    x = torch.randn(2, 0, 16, requires_grad=True)
    A_, B_ = _leaf(A, True), _leaf(B, True)
    y = lora_linear(x, W, b, A_, B_, 1.0, 0.3, True, backend="triton", impl="epilogue")
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(A_.grad, torch.zeros_like(A)) and torch.equal(B_.grad, torch.zeros_like(B))


def test_epilogue_is_a_plan_choice_but_not_the_default(settings):
    from fastpeft.ops.lora_linear import lora_impl
    from fastpeft.ops.settings import LORA_IMPLS, Settings

    assert "epilogue" in LORA_IMPLS and Settings().lora_impl == "split"
    settings(lora_impl="epilogue")
    assert lora_impl() == "epilogue"
