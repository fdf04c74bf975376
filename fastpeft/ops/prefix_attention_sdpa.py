"""Shared-prefix attention by concatenation + PyTorch's ``scaled_dot_product_attention`` (the
``"sdpa"`` implementation of :func:`fastpeft.ops.prefix_attention.prefix_attention`).

The prefix ``[KVH, P, D]`` is expanded over the batch and concatenated before the sequence
keys/values, as peft's KV-cache prefix does, but the causal mask is not handed to SDPA as a
tensor (a tensor mask sends SDPA to its memory-efficient kernel with a materialised float bias
and no skipping of the masked triangle). Causal attention of ``T`` queries over ``P + S`` keys
needs *lower-right* alignment (query ``t`` sees the prefix and sequence keys ``s <= t + S - T``):

* training (``T == S``): ``P`` zero query rows are put before ``q`` so the problem becomes the
  square ``is_causal=True`` every SDPA backend takes (FlashAttention, cuDNN, memory-efficient);
  the output drops those rows again. The zero rows cost one copy of ``q`` and ``P / T`` extra
  work; their output rows are discarded, so no gradient flows from them.
* decoding (``T < S``): ``torch.nn.attention.bias.causal_lower_right`` (FlashAttention, else the
  memory-efficient kernel with its lower-right mask type), never ``P + S - T`` zero rows.

Non-causal attention without padding needs no mask at all. With a key padding mask (or
``T > S``) the concatenation gets a boolean mask (prefix columns visible), which is what peft
runs; the automatic choice keeps the Triton kernel there. GQA goes to SDPA as ``enable_gqa`` where the
PyTorch version has it. Everything is autograd-native: the prefix gradient is the sum over the
batch of the expanded copy's gradient. Backend preference on CUDA: cuDNN, then FlashAttention,
memory-efficient and math, where this PyTorch lets a priority be set (see :func:`backend_order`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["prefix_attention_sdpa", "backend_order", "cudnn_takes"]


@functools.lru_cache(maxsize=None)
def _sdpa_has_gqa() -> bool:
    """Whether SDPA takes ``enable_gqa`` (PyTorch >= 2.5); its signature is not inspectable."""
    x = torch.zeros(1, 2, 1, 8)
    try:
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
    except TypeError:  # pragma: no cover - older PyTorch
        return False
    return True


@functools.lru_cache(maxsize=None)
def _priority_supported() -> bool:
    try:
        from torch.nn.attention import sdpa_kernel

        return "set_priority" in inspect.signature(sdpa_kernel).parameters
    except Exception:  # pragma: no cover - older PyTorch
        return False


def backend_order():
    """A context in which SDPA prefers cuDNN, then FlashAttention, memory-efficient, math (a
    no-op off CUDA and where ``sdpa_kernel(..., set_priority=True)`` does not exist: SDPA's own
    order then applies, which puts FlashAttention first)."""
    if not _priority_supported():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def cudnn_takes(q: torch.Tensor, k: torch.Tensor, P: int) -> bool:
    """Whether cuDNN's SDPA kernel accepts the square causal problem this module builds for
    ``q [B, H, T, D]`` over ``P + S`` keys (False off CUDA or where PyTorch cannot say). Asked
    once per shape, dtype and device: the automatic choice calls it in every attention layer of
    every forward."""
    if not q.is_cuda:
        return False
    return _cudnn_takes(tuple(q.shape), k.shape[1], k.shape[2], P, q.dtype, q.device)


@functools.lru_cache(maxsize=256)
def _cudnn_takes(q_shape: tuple, kv_heads: int, S: int, P: int, dtype: torch.dtype, device: torch.device) -> bool:
    try:
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention
    except ImportError:  # pragma: no cover - PyTorch without cuDNN attention
        return False
    B, H, T, D = q_shape
    qq = torch.empty((B, H, T + P, D), dtype=dtype, device=device)
    kk = torch.empty((B, kv_heads, P + S, D), dtype=dtype, device=device)
    try:
        gqa = kv_heads != H
        params = SDPAParams(qq, kk, kk, None, 0.0, True, gqa) if _sdpa_has_gqa() else \
            SDPAParams(qq, kk, kk, None, 0.0, True)
        return bool(can_use_cudnn_attention(params, False))
    except Exception:  # an older signature, or a refusal that raises
        return False


def _concat(prefix: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    B = seq.shape[0]
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0).expand(B, -1, -1, -1)
    return torch.cat([prefix, seq], dim=2)


def _sdpa(q, kc, vc, scale, mask=None, is_causal=False):
    G = q.shape[1] // kc.shape[1]
    kwargs = {}
    if G > 1:
        if _sdpa_has_gqa():
            kwargs["enable_gqa"] = True
        else:  # pragma: no cover - PyTorch before enable_gqa
            kc, vc = kc.repeat_interleave(G, dim=1), vc.repeat_interleave(G, dim=1)
    with backend_order() if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs)


def prefix_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    *, causal: bool = True, key_padding_mask: Optional[torch.Tensor] = None, scale: float,
) -> torch.Tensor:
    """``softmax(q [prefix_k ; k]^T * scale + mask) [prefix_v ; v]`` by concatenation + SDPA.

    Same operands and semantics as :func:`fastpeft.ops.prefix_attention.prefix_attention`
    (checked there): ``q [B, H, T, D]``, ``k/v [B, KVH, S, D]``, a prefix ``[KVH, P, D]`` (or
    per batch ``[B, KVH, P, D]``), ``key_padding_mask`` None or ``[B, S]`` (True/nonzero = keep),
    causal right-aligned. Returns ``[B, H, T, D]`` in q's dtype.
    """
    B, H, T, D = q.shape
    S, P = k.shape[2], prefix_k.shape[-2]
    kc, vc = _concat(prefix_k, k), _concat(prefix_v, v)
    if key_padding_mask is not None or (causal and T > S):
        # a boolean mask over [prefix ; sequence] (prefix visible); also for T > S, where the first
        # T - S rows see the prefix only, which no causal alignment of SDPA expresses
        keep = torch.ones((B, 1, T, P + S), dtype=torch.bool, device=q.device)
        if causal:
            keep[..., P:] = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if key_padding_mask is not None:
            keep[..., P:] &= key_padding_mask.to(torch.bool)[:, None, None, :]
        return _sdpa(q, kc, vc, scale, mask=keep)
    if not causal:
        return _sdpa(q, kc, vc, scale)
    if T == S:
        # P zero query rows before q: the square causal problem, whose last T rows are the answer
        qz = torch.cat([q.new_zeros((B, H, P, D)), q], dim=2)
        return _sdpa(qz, kc, vc, scale, is_causal=True)[:, :, P:]
    from torch.nn.attention.bias import causal_lower_right

    return _sdpa(q, kc, vc, scale, mask=causal_lower_right(T, P + S))
