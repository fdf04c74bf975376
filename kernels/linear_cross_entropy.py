"""Triton kernel for the cross-entropy half of the fused linear cross-entropy: one chunk of logits
in, per-row losses out, and the logits' gradient written over the logits in place.

``fastpeft.ops.linear_cross_entropy`` computes one chunk of logits ``h_c W^T (+ b)`` with a
library matmul, then calls :func:`cross_entropy_rows_` on it. One program owns one row (token):

* pass 1 streams the row in blocks of ``BLOCK_V`` and keeps an online max and sum of
  ``exp`` (the numerically safe log-sum-exp), in fp32, over ``z = softcap * tanh(scale * x /
  softcap)`` (or ``scale * x`` without softcapping), and picks out the target's ``z``;
* the row's loss ``lse - z[target]`` is stored in fp32 (0 for ``ignore_index`` rows);
* pass 2 (``COMPUTE_GRAD``) streams the row again and overwrites ``x`` with
  ``dloss/dx = grad_scale * (softmax(z) - onehot(target)) * dz/dx`` in ``x``'s dtype, where
  ``dz/dx = scale * (1 - tanh^2)`` (``scale`` without softcapping); ignored rows get zeros.

``grad_scale`` is read from a one-element fp32 tensor on the device (``1 / n_valid`` for a
mean), so the caller never syncs with the host to learn the number of valid tokens.
The kernel holds no more than ``BLOCK_V`` elements of a row at once and writes nothing of
its own beyond ``[rows]`` losses: the chunk's logits buffer is reused for the gradient.

Launcher only (no autograd). Valid for triton >= 3.0; it uses no ``tl.dot``, so the CPU
interpreter runs it in fp32 and fp16 (bf16 stores truncate there instead of rounding). Compiled
for sm_90 without a GPU (``triton.compile`` of an ``ASTSource``, triton 3.9: bf16 and fp32 logits,
with and without softcapping); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cross_entropy_rows_"]


@triton.jit
def _tanh(x):
    # tanh from exp, stable at both ends (tl has no portable tanh across triton 3.x and the
    # interpreter): sign(x) * (1 - e^{-2|x|}) / (1 + e^{-2|x|})
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _transform(x, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z from raw logits x (fp32), and tanh (only meaningful with softcapping)."""
    z = x * scale
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        return softcap * t, t
    return z, z


@triton.jit
def _cross_entropy_rows_kernel(
    X, stride_x,
    TARGETS, LOSS, GRAD_SCALE,
    V,
    ignore_index,
    scale, softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    target = tl.load(TARGETS + row).to(tl.int32)
    valid = target != ignore_index

    # pass 1: online log-sum-exp and the target's z
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_target = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        z, _ = _transform(x, scale, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_target += tl.sum(tl.where(offs == target, z, 0.0), axis=0)
    lse = m + tl.log(s)
    tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))

    if COMPUTE_GRAD:
        g_scale = tl.load(GRAD_SCALE).to(tl.float32)
        g_scale = tl.where(valid, g_scale, 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            z, t = _transform(x, scale, softcap, HAS_SOFTCAP)
            g = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = g * (scale * g_scale)
            tl.store(x_row + offs, g.to(X.dtype.element_ty), mask=mask)


def cross_entropy_rows_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: torch.Tensor | None,
    scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    block_v: int | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy of a ``[rows, V]`` chunk of logits; with ``grad_scale`` also the gradient.

    Args:
        logits: ``[rows, V]`` raw logits (before ``scale`` and softcapping), last dim contiguous.
            With ``grad_scale`` given it is overwritten with ``d(loss_total)/d(logits)``, where
            ``loss_total = grad_scale * sum(losses)``.
        targets: ``[rows]`` integer class ids; ``ignore_index`` rows count 0 and get no gradient.
        grad_scale: one-element fp32 tensor on ``logits``' device, or None for losses only.
        scale, softcap: ``z = softcap * tanh(scale * logits / softcap)`` (``scale * logits`` when
            ``softcap`` is None).
        block_v: vocabulary block per iteration (default: up to 2048; tests pass small ones).

    Returns:
        ``[rows]`` fp32 losses.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows_: logits must be 2-D with a contiguous last dim, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"cross_entropy_rows_: targets {tuple(targets.shape)} do not match logits rows {rows}")
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return losses
    block = block_v or min(2048, triton.next_power_of_2(vocab))
    compute_grad = grad_scale is not None
    if compute_grad and (grad_scale.numel() != 1 or grad_scale.device != logits.device):
        raise ValueError("cross_entropy_rows_: grad_scale must be a one-element tensor on the logits' device")
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0),
        targets.contiguous(), losses,
        grad_scale.to(torch.float32) if compute_grad else losses,  # unread without COMPUTE_GRAD
        vocab,
        int(ignore_index),
        float(scale), float(softcap) if softcap else 1.0,
        HAS_SOFTCAP=bool(softcap),
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return losses
