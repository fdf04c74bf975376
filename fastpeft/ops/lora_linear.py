"""The LoRA-linear op: ``y = x W^T + b + s * dropout(x) A^T B^T``.

Shapes: ``x`` is ``[..., K]``; ``weight`` is ``[N, K]`` (out, in; pass ``W.T`` for GPT-2's
Conv1D); ``bias`` is ``[N]`` or None; ``lora_A`` is ``[r, K]``; ``lora_B`` is ``[N, r]``.
``weight`` and ``bias`` are frozen in LoRA, but gradients flow to them if they require it.

Two backends behind one entry point, :func:`lora_linear`:

* ``reference`` - :class:`LoraLinearReference`, a pure-PyTorch autograd Function. It is
  the oracle in tests and the CPU path. Its dropout draws the mask exactly as
  ``torch.nn.functional.dropout`` does on CPU (``bernoulli_(1 - p)``), so with the same
  seed it reproduces Hugging Face peft's outputs.
* ``triton`` - fused kernels from ``fastpeft.kernels.lora_linear`` (added by the fused
  LoRA-linear work); chosen by :func:`fastpeft.ops.backend.choose_backend`.
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext
from typing import Optional

import torch

from fastpeft.ops.backend import choose_backend

__all__ = ["lora_linear", "lora_delta", "LoraLinearReference", "check_lora_shapes"]


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


def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    # Same draw as torch.nn.functional.dropout on CPU: empty_like(x).bernoulli_(1 - p) / (1 - p)
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)


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


def _triton_lora_linear(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
    # Replaced by the fused Triton autograd Function (fastpeft.kernels.lora_linear).
    raise NotImplementedError("the Triton LoRA-linear backend is not built yet; use FASTPEFT_BACKEND=reference")


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
) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` for ``x`` of shape ``[..., K]``.

    ``backend`` (or ``FASTPEFT_BACKEND``) forces ``"reference"`` or ``"triton"``; by default
    CUDA tensors use Triton and CPU tensors the reference path.
    """
    check_lora_shapes(x, weight, lora_A, lora_B)
    # One compute dtype for every operand: the autocast dtype inside autocast, else x's dtype.
    # Casts are differentiable, so fp32 adapter weights on a bf16 base still get fp32 grads;
    # the Function then runs with autocast off, so its backward sees the same dtypes.
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
    x, weight, lora_A, lora_B = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight, lora_A, lora_B))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    which = choose_backend(x, weight, backend=backend)
    fn = _triton_lora_linear if which == "triton" else LoraLinearReference.apply
    with torch.autocast(device_type, enabled=False) if autocast_on else _nullcontext():
        y = fn(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), bool(training))
    return y.reshape(*lead, weight.shape[0])


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
