"""The LoRA-linear op: ``y = x W^T + b + s * dropout(x) A^T B^T``.

Shapes: ``x`` is ``[..., K]``; ``weight`` is ``[N, K]`` (out, in; pass ``W.T`` for GPT-2's
Conv1D); ``bias`` is ``[N]`` or None; ``lora_A`` is ``[r, K]``; ``lora_B`` is ``[N, r]``.
``weight`` and ``bias`` are frozen in LoRA, but gradients flow to them if they require it.

Two backends behind one entry point, :func:`lora_linear`:

* ``reference`` - :class:`LoraLinearReference`, a pure-PyTorch autograd Function. It is
  the oracle in tests and the CPU path. Its dropout draws the mask exactly as
  ``torch.nn.functional.dropout`` does on CPU (``bernoulli_(1 - p)``), so with the same
  seed it reproduces Hugging Face peft's outputs.
* ``triton`` - :class:`LoraLinearTriton`, on the kernels of ``fastpeft.kernels.lora_linear``
  (their module docstring argues the split between cuBLAS and Triton); chosen by
  :func:`fastpeft.ops.backend.choose_backend`. Its dropout mask comes from Philox on
  ``(seed, m, k)`` (see ``_keep_tile`` there), so it differs from the reference's draw; tests compare the two with
  the kernel's own mask (``dropout_mask``).

The merged-weights inference path is :func:`lora_merge` (``W += s B A`` in place) followed by
a plain linear.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext as _nullcontext
from typing import Optional

import torch

from fastpeft.ops.backend import choose_backend
from fastpeft.ops.dropout import reference_dropout_mask as _dropout_mask
from fastpeft.ops.settings import LORA_IMPLS as IMPLS, Settings, get_settings

__all__ = ["lora_linear", "lora_delta", "lora_merge", "lora_impl", "LoraLinearReference", "LoraLinearTriton", "check_lora_shapes"]


def check_lora_shapes(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Raise a ``ValueError`` that names the mismatch when the four operands do not fit."""
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"lora_linear: weight has shape {tuple(weight.shape)}, expected [out_features, {K}] for input [..., {K}]")
    N = weight.shape[0]
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_linear: lora_A has shape {tuple(lora_A.shape)}, expected [r, {K}]")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_linear: lora_B has shape {tuple(lora_B.shape)}, expected [{N}, {r}] (out_features, r)")


class LoraLinearReference(torch.autograd.Function):
    """Pure-PyTorch forward and backward of the LoRA linear (2-D ``x``: ``[M, K]``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
        use_dropout = training and dropout_p > 0.0
        mask = _dropout_mask(x, dropout_p) if use_dropout else None
        xd = x * mask if mask is not None else x
        u = xd @ lora_A.t()  # [M, r], reused by backward
        y = x @ weight.t()
        if bias is not None:
            y = y + bias
        y = y + (u @ lora_B.t()) * scaling
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, mask)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u, mask = ctx.saved_tensors
        s = ctx.scaling
        dx = dW = db = dA = dB = None
        g = (dy @ lora_B) * s  # [M, r]
        if ctx.needs_input_grad[0]:
            dxd = g @ lora_A
            if mask is not None:
                dxd = dxd * mask
            dx = dy @ weight + dxd
        if ctx.needs_input_grad[1]:
            dW = dy.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        if ctx.needs_input_grad[3]:
            xd = x * mask if mask is not None else x
            dA = g.t() @ xd
        if ctx.needs_input_grad[4]:
            dB = (dy.t() @ u) * s
        return dx, dW, db, dA, dB, None, None, None


def lora_impl(impl: Optional[str] = None) -> str:
    """The Triton implementation plan: argument, else the current settings' ``lora_impl``
    (``FASTPEFT_LORA_IMPL`` at import; default ``"split"``).

    * ``split`` - cuBLAS for the base GEMM and every dropout-free LoRA product (LoRA branch
      accumulated into the base output with beta = 1), Triton kernels where the dropout mask
      must be regenerated (``u``, ``dx``, ``dA``).
    * ``kernels`` - as ``split`` but the Triton down/dx/dA kernels even without dropout.
    * ``epilogue`` - the LoRA products inside Triton GEMM epilogues: forward ``y = x W^T + b +
      (s u) B^T`` in one GEMM (``u`` from the one-pass down kernel), backward ``g`` and ``dB`` from
      one pass over ``dy``, then ``dx = dy W + mask * (g A)`` in one GEMM (mask regenerated in its
      epilogue) and ``dA`` as in ``split``. It removes split's extra passes over y, dy and dx but
      puts the two big GEMMs in Triton instead of cuBLAS (predictions: benchmarks/roofline.py).
    * ``fused`` - one Triton kernel for the whole forward (r <= 64; larger r, and dropout > 0 in
      training, use ``split``: the latter with a warning, as the fused kernel would regenerate the
      mask per output column block).
    """
    value = (impl if impl is not None else get_settings().lora_impl).strip().lower() or "split"
    if value not in IMPLS:
        raise ValueError(f"Unknown LoRA-linear implementation {value!r}; use one of {IMPLS} (lora_impl, FASTPEFT_LORA_IMPL).")
    return value


def _new_seed() -> int:
    # Drawn from torch's default CPU generator: torch.manual_seed reproduces it, and activation
    # checkpointing (which restores RNG state) recomputes the same mask.
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def _route_fused_dropout() -> str:
    # The fused forward regenerates the dropout mask in every column block of the output (N / BN
    # times per element of x); the static model (benchmarks/roofline.py) predicts it ~1.2x
    # slower than the split plan, which draws the mask once per forward. Say so and run split.
    warnings.warn("lora_linear: impl='fused' with dropout > 0 would regenerate the dropout mask once per "
                  "output column block (predicted ~1.2x slower on an H100 at 4096^3, benchmarks/roofline.py); running the "
                  "'split' plan instead. Use dropout 0 for the fused forward.", RuntimeWarning, stacklevel=4)
    return "split"


class LoraLinearTriton(torch.autograd.Function):
    """Fused LoRA linear on the Triton kernels of ``fastpeft.kernels.lora_linear`` (2-D ``x``).

    Saves ``x``, ``u = dropout(x) A^T`` and an integer seed: no mask and no dropped copy of x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool,
                impl: str, seed: Optional[int]):
        from fastpeft.kernels import lora_linear as K

        p = float(dropout_p) if training else 0.0
        if p > 0.0 and seed is None:
            seed = _new_seed()
        seed = int(seed or 0)
        r = lora_A.shape[0]
        if impl == "fused" and p > 0.0:
            impl = _route_fused_dropout()
        if impl == "fused" and r <= K.MAX_FUSED_RANK:
            y, u = K.lora_fused_forward(x, weight, bias, lora_A, lora_B, scaling, seed, p)
        elif impl == "epilogue":
            u = K.lora_down(x, lora_A, seed, p) if p > 0.0 else torch.mm(x, lora_A.t())
            y = K.lora_epilogue_gemm(x, weight.t(), bias, u, lora_B.t(), scaling)  # s folded into u's rounding
        else:
            if p > 0.0 or impl != "split":
                u = K.lora_down(x, lora_A, seed, p)
            else:
                u = torch.mm(x, lora_A.t())
            y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
            y.addmm_(u, lora_B.t(), alpha=scaling)  # beta = 1: LoRA branch accumulated in the epilogue
        need = ctx.needs_input_grad
        # x only for dA / dW, u only for dB: frozen adapters (or inference) keep less alive
        ctx.save_for_backward(x if (need[1] or need[3]) else None, weight, lora_A, lora_B, u if need[4] else None)
        ctx.scaling, ctx.p, ctx.seed, ctx.impl = scaling, p, seed, impl
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from fastpeft.kernels import lora_linear as K

        if ctx.impl == "epilogue":
            return LoraLinearTriton._backward_epilogue(ctx, dy)
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        use_kernels = p > 0.0 or ctx.impl != "split"
        dx = dW = db = dA = dB = None
        need_x, need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        g = torch.mm(dy, lora_B).mul_(s) if (need_x or need_A) else None  # [M, r]
        if need_x:
            dx = torch.mm(dy, weight)
            if use_kernels:
                K.lora_dx_add(dx, g, lora_A, seed, p)
            else:
                dx.addmm_(g, lora_A)
        if ctx.needs_input_grad[1]:
            dW = torch.mm(dy.t(), x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        if need_A:
            dA = K.lora_grad_a(g, x, seed, p) if use_kernels else torch.mm(g.t(), x)
        if ctx.needs_input_grad[4]:
            dB = torch.mm(dy.t(), u).mul_(s)
        return dx, dW, db, dA, dB, None, None, None, None, None

    @staticmethod
    def _backward_epilogue(ctx, dy):
        """``impl="epilogue"``: g and dB from one pass over dy (when both are needed), dx in one
        GEMM with the masked ``g A`` in its epilogue, dA as the split plan computes it."""
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dW = db = dA = None
        g, dB = epilogue_g_db(dy, u, lora_B, ctx.scaling, need_g=need[0] or need[3], need_B=need[4])
        if need[0]:
            dx = epilogue_dx(dy, weight, g, lora_A, ctx.seed, ctx.p)
        if need[1]:
            dW = torch.mm(dy.t(), x)
        if ctx.has_bias and need[2]:
            db = dy.sum(0)
        if need[3]:
            dA = epilogue_da(g, x, lora_A, ctx.seed, ctx.p)
        return dx, dW, db, dA, dB, None, None, None, None, None


def epilogue_g_db(dy, u, lora_B, s: float, *, need_g: bool, need_B: bool):
    """``(g, dB)`` of the ``epilogue`` plan's backward (the 16-bit op's and the 4-bit one's):
    ``g = s dy B`` and ``dB = s dy^T u`` from one pass over dy when both are needed (g fp32),
    else the one asked for by a GEMM; None where not needed (g is needed for dx or dA)."""
    from fastpeft.kernels import lora_linear as K

    g = dB = None
    if need_g and need_B:
        g, dB = K.lora_grad_dy(dy, lora_B, u, s)
        dB = dB.to(lora_B.dtype)
    elif need_g:  # frozen B: g alone (one GEMM, as split)
        g = torch.mm(dy, lora_B).mul_(s)
    elif need_B:  # frozen A and x: dB alone
        dB = torch.mm(dy.t(), u).mul_(s)
    return g, dB


def epilogue_da(g, x, lora_A, seed: int, p: float) -> torch.Tensor:
    """``dA = g^T (x * mask)``: the mask regenerated from ``seed`` with dropout, else a GEMM."""
    from fastpeft.kernels import lora_linear as K

    gx = g.to(x.dtype)
    return K.lora_grad_a(gx, x, seed, p, out_dtype=lora_A.dtype) if p > 0.0 else torch.mm(gx.t(), x)


def epilogue_dx(dy, weight, g, lora_A, seed: int, p: float) -> torch.Tensor:
    """``dx = dy W + mask * (g A)`` in one Triton GEMM (``weight`` ``[N, K]``), the mask
    regenerated in its epilogue and ``1 / (1 - p)`` carried by the LoRA product's scale."""
    from fastpeft.kernels import lora_linear as K

    _, _, keep_scale = K._dropout_args(p)
    return K.lora_epilogue_gemm(dy, weight, None, g, lora_A, keep_scale if p > 0.0 else 1.0, seed, p)


def _triton_lora_linear(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training, impl=None, seed=None):
    # lora_linear has already cast every operand to one compute dtype (autocast's or x's) and
    # turned autocast off; this checks what the kernels themselves cannot take.
    dt = x2.dtype
    if any(t is not None and t.dtype != dt for t in (weight, bias, lora_A, lora_B)):  # pragma: no cover - guarded by lora_linear
        raise ValueError("lora_linear (triton): x, weight, bias, lora_A and lora_B must share one dtype; cast them.")
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lora_linear (triton): dtype {dt} is not supported by the Triton kernels "
                         "(float32, float16, bfloat16); cast the input or use backend='reference'.")
    from fastpeft.kernels.lora_linear import MAX_RANK

    if lora_A.shape[0] > MAX_RANK:
        raise ValueError(f"lora_linear (triton): rank {lora_A.shape[0]} > {MAX_RANK}; use backend='reference'.")
    return LoraLinearTriton.apply(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training,
                                  lora_impl(impl), seed)


def lora_merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
               sign: float = 1.0) -> torch.Tensor:
    """Merged-weights inference path: ``weight += sign * scaling * B A`` in place (one GEMM with
    beta = 1, no ``[N, K]`` temporary); works on non-contiguous views such as Conv1D's ``W.T``.
    ``sign=-1`` unmerges. Returns ``weight``."""
    if tuple(weight.shape) != (lora_B.shape[0], lora_A.shape[1]) or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(
            f"lora_merge: weight {tuple(weight.shape)} does not match lora_B {tuple(lora_B.shape)} @ "
            f"lora_A {tuple(lora_A.shape)} (expected weight [N, K], B [N, r], A [r, K])."
        )
    with torch.no_grad():
        weight.addmm_(lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=sign * float(scaling))
    return weight


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    *,
    impl: Optional[str] = None,
    seed: Optional[int] = None,
    settings: Optional[Settings] = None,
) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` for ``x`` of shape ``[..., K]``.

    ``backend`` forces ``"reference"`` or ``"triton"``; by default CUDA tensors use Triton and
    CPU tensors the reference path. ``settings`` (default :func:`fastpeft.get_settings`) supplies
    ``backend`` and ``impl`` when they are not given. Triton-only keywords:
    ``impl`` picks the kernel plan (see :func:`lora_impl`), ``seed`` fixes the dropout mask
    (``fastpeft.kernels.lora_linear.dropout_mask(seed, p, M, K)`` materialises it; by default
    a seed is drawn from torch's CPU generator).

    Compute dtype: the autocast dtype inside ``torch.autocast``, else ``x``'s dtype. Operands
    stored in another dtype (fp32 LoRA factors on a bf16 base, as peft and fastpeft create them)
    are cast to it differentiably, so their gradients arrive in their own dtype; the kernels
    accumulate in fp32. The Triton backend takes float32, float16 and bfloat16. Under autocast the
    reference backend is peft's own sequence of autocast ops (:func:`_autocast_reference`: dropout
    on ``x`` cast to ``lora_A``'s dtype, bias inside the base linear), so a patched peft model
    computes what the unpatched one does.
    """
    check_lora_shapes(x, weight, lora_A, lora_B)
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    s = settings if settings is not None else get_settings()
    which = choose_backend(x, weight, backend=backend if backend is not None else s.backend)
    if autocast_on and which == "reference":
        return _autocast_reference(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), bool(training))
    # One compute dtype for every operand: the autocast dtype inside autocast, else x's dtype.
    # Casts are differentiable, so fp32 adapter weights on a bf16 base still get fp32 grads;
    # the Function then runs with autocast off, so its backward sees the same dtypes.
    dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
    if not autocast_on and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)):
        # Like nn.Linear: a frozen base in another dtype than x is a caller bug, not something to
        # paper over with a per-call copy of W.
        raise ValueError(
            f"lora_linear: x, weight and bias must share one dtype outside autocast, got x={x.dtype}, "
            f"weight={weight.dtype}{', bias=' + str(bias.dtype) if bias is not None else ''}; cast the input "
            "(or the model) or run under torch.autocast."
        )
    x, weight, lora_A, lora_B = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight, lora_A, lora_B))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(device_type, enabled=False) if autocast_on else _nullcontext():
        if which == "triton":
            y = _triton_lora_linear(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                    bool(training), impl if impl is not None else s.lora_impl, seed)
        else:
            y = LoraLinearReference.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                          bool(training))
    return y.reshape(*lead, weight.shape[0])


def _autocast_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
    """The reference path under ``torch.autocast``: Hugging Face peft's LoRA ``Linear.forward``,
    op for op, in plain autograd, so every product, cast and rounding (forward and backward)
    happens in the same dtype at the same point as in an unpatched peft model:

    ``base(x)`` (one autocast linear with the bias), ``x`` cast to ``lora_A``'s dtype, dropout
    there (``F.dropout``: nn.Dropout's mask and RNG draw on every device), two autocast linears,
    ``* scaling`` and ``+`` in the autocast dtype, then the base output's dtype.
    """
    F = torch.nn.functional
    y = F.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    if training and dropout_p > 0.0:
        xa = F.dropout(xa, dropout_p, training=True)
    return (y + F.linear(F.linear(xa, lora_A), lora_B) * scaling).to(y.dtype)


def lora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """The LoRA branch alone, ``scaling * B(A(dropout(x)))``, for extra active adapters or
    bases that are not plain linear weights. Plain PyTorch autograd."""
    xd = dropout(x) if dropout is not None else x
    return (xd @ lora_A.t()) @ lora_B.t() * scaling
