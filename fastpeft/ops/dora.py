"""The DoRA op: weight-decomposed LoRA, ``y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b``.

DoRA (https://arxiv.org/abs/2402.09353) splits the adapted weight into a learned magnitude
``m`` (one entry per output feature) and a direction ``W + s B A`` normalised per output row
(the "column norm" of the paper, whose weights are stored in-by-out). Following the paper
(section 4.3) and Hugging Face peft, the norm is treated as a constant: it is detached, so
gradients reach ``m``, ``A``, ``B`` (and ``x``) only through the numerator.

Shapes: ``x`` ``[..., K]``; ``weight`` ``[N, K]`` (pass ``W.T`` for GPT-2's Conv1D);
``bias`` ``[N]`` or None; ``lora_A`` ``[r, K]``; ``lora_B`` ``[N, r]``; ``magnitude`` ``[N]``.

Backends (see :mod:`fastpeft.ops.backend`):

* the weight norm: ``reference`` forms ``W + s B A`` in fp32 (the oracle); ``triton`` runs
  :func:`fastpeft.kernels.dora.dora_weight_norm`, which streams ``W`` once and never writes the
  merged ``[N, K]`` weight.
* the matmuls run through :func:`fastpeft.ops.lora_linear.lora_linear` (``x W^T + s x A^T B^T``
  in one op), so DoRA inherits the fused LoRA-linear kernel where it exists.

With dropout active (training, ``p > 0``) the output is peft's:
``x W^T + b + (m/n - 1) * (dx W^T) + m/n * s * dx A^T B^T`` with ``dx = dropout(x)`` (the same
mask as peft's ``nn.Dropout`` for the same seed), computed as
``(x - dx) W^T + b + m/n * lora_linear(dx)`` (two products with ``W``, like peft).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft.ops.backend import choose_backend
from fastpeft.ops.lora_linear import check_lora_shapes, lora_linear
from fastpeft.ops.settings import Settings, get_settings

__all__ = ["dora_weight_norm", "dora_weight_norm_reference", "dora_linear", "dora_delta", "ScaleColumns"]


def dora_weight_norm_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 ``[N]``: ``||weight + scaling * lora_B @ lora_A||`` per row (materialises the sum; the oracle)."""
    merged = weight.float() + float(scaling) * (lora_B.float() @ lora_A.float())
    return torch.linalg.norm(merged, dim=1)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, backend: Optional[str] = None) -> torch.Tensor:
    """Detached fp32 ``[N]`` row norms of ``weight + scaling * lora_B @ lora_A``.

    ``backend`` (default: the current settings') forces ``"reference"`` or ``"triton"``; by default CUDA
    tensors use the fused Triton kernel and CPU tensors the reference.
    """
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("dora_weight_norm: weight, lora_A and lora_B must be 2-D ([N, K], [r, K], [N, r])")
    N, K = weight.shape
    if lora_A.shape[1] != K or lora_B.shape != (N, lora_A.shape[0]):
        raise ValueError(
            f"dora_weight_norm: shapes do not fit: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)} "
            f"(expected [r, {K}]), lora_B {tuple(lora_B.shape)} (expected [{N}, r])"
        )
    with torch.no_grad():
        if choose_backend(weight, lora_A, lora_B, backend=backend) == "triton":
            from fastpeft.kernels.dora import dora_weight_norm as _triton_norm

            return _triton_norm(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling))
        return dora_weight_norm_reference(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)


class ScaleColumns(torch.autograd.Function):
    """``y * scale`` over the last dim with an fp32 ``scale`` (``[N]``), output in ``y``'s dtype.

    DoRA's ``m / ||W + s B A||`` sits close to 1; rounded to bf16 (steps of 2^-7 near 1) the
    learned magnitude would move in 0.8% jumps. Here the product is formed in fp32 and rounded
    once; backward gives ``dy * scale`` (in ``y``'s dtype) and ``sum(dy * y)`` (fp32). Saves ``y``.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, scale)
        acc = torch.promote_types(y.dtype, torch.float32)
        return (y.to(acc) * scale.to(acc)).to(y.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, scale = ctx.saved_tensors
        acc = torch.promote_types(torch.promote_types(y.dtype, scale.dtype), torch.float32)
        grad_y = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad.to(acc) * scale.to(acc)).to(y.dtype)
        if ctx.needs_input_grad[1]:
            grad_scale = (grad.to(acc) * y.to(acc)).reshape(-1, y.shape[-1]).sum(0).to(scale.dtype)
        return grad_y, grad_scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    norm_backend: Optional[str] = None,
    weight_norm: Optional[torch.Tensor] = None,
    settings: Optional[Settings] = None,
) -> torch.Tensor:
    """DoRA linear output for ``x`` ``[..., K]`` (peft's ``lora.Linear`` with ``use_dora=True``).

    ``y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b`` without dropout; with dropout
    (``training`` and ``dropout_p > 0``, ``dx = dropout(x)``, mask drawn like
    ``torch.nn.functional.dropout``) ``y = (x - dx) W^T + b + m/n * (dx W^T + s dx A^T B^T)``,
    which is peft's ``x W^T + b + (m/n - 1) dx W^T + m/n s dx A^T B^T``.

    The product runs through :func:`fastpeft.ops.lora_linear.lora_linear` (``backend`` picks its
    backend), the norm through :func:`dora_weight_norm` (``norm_backend``, default ``backend``),
    ``settings`` (default :func:`fastpeft.get_settings`) supplying ``backend`` and the LoRA plan, unless ``weight_norm`` (``[N]``, e.g. cached by the caller while the weights are unchanged)
    is given. ``weight`` and ``bias`` must have ``x``'s dtype (as in ``nn.Linear``); the adapter factors and
    the magnitude may differ (fp32 on a half base, as peft and fastpeft store them) and are cast,
    differentiably. Inside ``torch.autocast`` everything computes in the autocast dtype. The output
    has the compute dtype.
    """
    check_lora_shapes(x, weight, lora_A, lora_B)
    if magnitude.shape != (weight.shape[0],):
        raise ValueError(f"dora_linear: magnitude has shape {tuple(magnitude.shape)}, expected [{weight.shape[0]}] (out_features)")
    settings = settings if settings is not None else get_settings()
    backend = backend if backend is not None else settings.backend
    if weight_norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling, backend=norm_backend if norm_backend is not None else backend)
    elif weight_norm.shape != (weight.shape[0],):
        raise ValueError(f"dora_linear: weight_norm has shape {tuple(weight_norm.shape)}, expected [{weight.shape[0]}] (out_features)")
    else:
        norm = weight_norm.detach().float()
    dtype = _compute_dtype(x)
    if not torch.is_autocast_enabled(x.device.type) and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)):
        # the LoRA-linear op's rule (and nn.Linear's): no per-call copy of a frozen base in another dtype
        raise ValueError(
            f"dora_linear: x, weight and bias must share one dtype outside autocast, got x={x.dtype}, "
            f"weight={weight.dtype}{', bias=' + str(bias.dtype) if bias is not None else ''}; cast the input "
            "(or the model) or run under torch.autocast."
        )
    scale = magnitude.float() / norm  # fp32; the gradient reaches m only (the norm is detached)
    if training and dropout_p > 0.0:
        dx = F.dropout(x, dropout_p, training=True)
        y = ScaleColumns.apply(lora_linear(dx, weight, None, lora_A, lora_B, scaling, backend=backend, settings=settings), scale)
        rest = x - dx
        w = weight if weight.dtype == dtype else weight.to(dtype)
        b = None if bias is None else (bias if bias.dtype == dtype else bias.to(dtype))
        return y + F.linear(rest if rest.dtype == dtype else rest.to(dtype), w, b)
    y = ScaleColumns.apply(lora_linear(x, weight, None, lora_A, lora_B, scaling, backend=backend, settings=settings), scale)
    if bias is not None:
        y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
    return y


def dora_delta(x: torch.Tensor, base_no_bias: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor, scaling: float) -> torch.Tensor:
    """What DoRA adds on top of a base output: ``(scale - 1) * base_no_bias + scale * s * x A^T B^T``.

    ``scale`` is ``magnitude / weight_norm`` (``[N]``); ``base_no_bias`` is ``x W^T`` for the
    same ``x`` (peft's formula; with several active adapters it is the running output).
    Plain PyTorch autograd; matmuls in ``lora_A``'s dtype, the rescaling in fp32 (``scale - 1`` is
    small), the result in ``lora_A``'s dtype.
    """
    dt = lora_A.dtype
    lora = (x.to(dt) @ lora_A.t()) @ lora_B.to(dt).t()
    scale = scale.float()
    return ((scale - 1) * base_no_bias.float() + scale * lora.float() * scaling).to(dt)
