"""Triton kernel for DoRA's weight norm: ``||W + s * B @ A||`` per output row, fused.

DoRA rescales each output channel ``i`` by ``m_i / ||W_i + s (B A)_i||`` (``W`` is
``[N, K]``, out x in). Computing the norm naively materialises the merged ``[N, K]`` weight
every forward. This kernel streams ``W`` once: each program owns ``BLOCK_N`` rows, rebuilds a
``[BLOCK_N, BLOCK_K]`` tile of ``W + s * B A`` in registers (``B`` tile ``[BLOCK_N, r]`` times
``A`` tile ``[r, BLOCK_K]``, in chunks of ``BLOCK_R`` ranks) and accumulates the squared row
sums in fp32. Nothing of size ``N x K`` is written.

Launcher only (no autograd): the norm is detached in DoRA (paper, section 4.3), so it has no
backward. ``fastpeft.ops.dora`` owns the autograd and the reference path.
Valid for triton >= 3.0. ``B A`` tiles: 16-bit factors use the tensor cores with fp32
accumulation; fp32 factors use exact (``ieee``) dots unless ``torch.backends.cuda.matmul.allow_tf32``
is set; under the CPU interpreter every tile is upcast to fp32 (its bf16 dot is unusable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting as _interpreting

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
    UPCAST: tl.constexpr,  # cast B, A tiles to fp32 before the dot (interpreter, fp32 factors)
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (only read for fp32 tiles)
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
            )
            a = tl.load(
                A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            )
            if UPCAST:
                ba = tl.dot(b.to(tl.float32), a.to(tl.float32), ba, input_precision=PRECISION)
            else:  # 16-bit factors on a GPU: tensor cores, fp32 accumulation
                ba = tl.dot(b, a, ba)
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
    if lora_A.dtype != lora_B.dtype:
        lora_B = lora_B.to(lora_A.dtype)
    # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast there (its fp16 dot is fine,
    # so fp16 tests cover the tensor-core branch). fp32 factors: exact dots unless torch allows tf32.
    upcast = lora_A.dtype not in (torch.float16, torch.bfloat16) or (_interpreting() and lora_A.dtype == torch.bfloat16)
    precision = "tf32" if (lora_A.dtype == torch.float32 and lora_A.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    grid = (triton.cdiv(N, block_n),)
    _dora_row_norm_kernel[grid](
        weight, lora_A, lora_B, out,
        N, K, R,
        weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        float(scaling),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, UPCAST=upcast, PRECISION=precision,
    )
    return out
