"""Triton kernel for DoRA's weight norm: ``||W + s * B @ A||`` per output row, fused.

DoRA rescales each output channel ``i`` by ``m_i / ||W_i + s (B A)_i||`` (``W`` is
``[N, K]``, out x in). Computing the norm naively materialises the merged ``[N, K]`` weight
every forward. This kernel streams ``W`` once: each program owns ``BLOCK_N`` rows, rebuilds a
``[BLOCK_N, BLOCK_K]`` tile of ``W + s * B A`` in registers (``B`` tile ``[BLOCK_N, r]`` times
``A`` tile ``[r, BLOCK_K]``, in chunks of ``BLOCK_R`` ranks) and accumulates the squared row
sums in fp32. Nothing of size ``N x K`` is written.

Launcher only (no autograd): the norm is detached in DoRA (paper, section 4.3), so it has no
backward. ``fastpeft.ops.dora`` owns the autograd and the reference path.
Valid for triton >= 3.0 (``tl.dot(..., input_precision="ieee")`` keeps fp32 products exact
instead of TF32 on GPUs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dora_weight_norm"]


@triton.jit
def _dora_row_norm_kernel(
    W, A, B, OUT,
    N, K, R,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    scaling,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(
            W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            b = tl.load(
                B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :],
                other=0.0,
            ).to(tl.float32)
            a = tl.load(
                A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            ).to(tl.float32)
            ba = tl.dot(b, a, ba, input_precision="ieee")
        m = w + scaling * ba
        acc += tl.sum(m * m, axis=1)
    tl.store(OUT + offs_n, tl.sqrt(acc), mask=mask_n)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     block_n: int = 32, block_k: int = 64, block_r: int = 16) -> torch.Tensor:
    """fp32 ``[N]`` row norms of ``weight + scaling * lora_B @ lora_A`` without forming the sum.

    ``weight`` is ``[N, K]`` with any strides (a transposed view of a Conv1D weight works);
    ``lora_A`` is ``[r, K]``, ``lora_B`` is ``[N, r]``. Block sizes are powers of two >= 16.
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    out = torch.empty(N, device=weight.device, dtype=torch.float32)
    if N == 0:
        return out
    grid = (triton.cdiv(N, block_n),)
    _dora_row_norm_kernel[grid](
        weight, lora_A, lora_B, out,
        N, K, R,
        weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        float(scaling),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
    )
    return out
