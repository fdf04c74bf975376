"""The shared-prefix attention op (Prefix Tuning's attention), reference and fused.

``out = softmax(q [prefix_k ; k]^T * scale + mask) [prefix_v ; v]``

Shapes:

* ``q``: ``[B, H, T, D]`` queries.
* ``k``, ``v``: ``[B, KVH, S, D]`` the sequence's keys and values (``H % KVH == 0``: GQA,
  each KV head serves ``H // KVH`` consecutive query heads, as in transformers).
* ``prefix_k``, ``prefix_v``: ``[KVH, P, D]``, **shared by the whole batch** (what Prefix
  Tuning learns per layer), ``P >= 1``. The fused path never copies them per batch element.
  A per-batch prefix ``[B, KVH, P, D]`` is accepted by the reference backend only (the
  automatic choice sends it there); forcing ``backend="triton"`` with it raises.
* ``key_padding_mask``: None or ``[B, S]`` bool/integer, True/nonzero = keep, for the
  sequence keys only. The prefix is always visible (peft prepends ones to the attention mask).
* ``causal``: query ``t`` sees sequence keys ``s <= t + (S - T)`` (right-aligned, so decoding
  with a cache, ``T < S``, works). Non-causal: every (unpadded) sequence key.

Backends (see :func:`fastpeft.ops.backend.choose_backend`):

* ``reference``: :func:`prefix_attention_reference`: expands the prefix per batch,
  concatenates, builds the boolean mask and runs plain softmax attention in fp32, cast back
  to q's dtype; autograd gives every gradient. It is the oracle in tests and the CPU path.
* ``triton`` (the fused path), in one of two implementations (:func:`choose_prefix_impl`,
  ``Settings.prefix_impl`` / ``FASTPEFT_PREFIX_IMPL`` or ``impl=``):

  - ``kernel``: :class:`PrefixAttentionFunction` over ``fastpeft.kernels.prefix_attention``.
    Its forward saves q, k, v, the prefix, the output and a per-row log-sum-exp (never the
    concatenation); its backward returns dq, dk, dv and the prefix gradients summed over the
    batch and the query heads of each KV group.
  - ``sdpa``: :func:`fastpeft.ops.prefix_attention_sdpa.prefix_attention_sdpa`, the
    concatenation with PyTorch's SDPA and no mask tensor where there is no padding (cuDNN /
    FlashAttention); autograd-native, so it also runs on CPU.

  ``auto`` takes ``sdpa`` for 16-bit CUDA tensors without a padding mask when cuDNN's SDPA
  takes the problem (predicted ~0.7-1.2x the kernel's time, ``benchmarks/roofline.py --only
  prefix``), and the kernel everywhere else (padding, fp32, the interpreter).

:func:`mask_structure` and :func:`prefix_attention_for_structure` read a transformers-style
attention mask and dispatch on it; the glue that plugs this op into transformers' attention
layers (``AttentionInterface``, the per-layer prefix registry) is in
:mod:`fastpeft.prefix_attention_hf`, outside ``ops`` (ops know tensors only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastpeft.kernels._common import interpreting
from fastpeft.ops.backend import choose_backend, requested_backend
from fastpeft.ops.prefix_attention_sdpa import cudnn_takes, prefix_attention_sdpa
from fastpeft.ops.settings import PREFIX_IMPLS, get_settings

__all__ = [
    "prefix_attention",
    "prefix_attention_reference",
    "PrefixAttentionFunction",
    "check_prefix_attention_args",
    "choose_prefix_impl",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: reference only
_MAX_HEAD_DIM = 128  # the fused kernels pad D to a power of two up to this


def check_prefix_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> bool:
    """Raise a ``ValueError``/``TypeError`` naming the problem when the operands do not fit.

    Returns True when the prefix is per batch element (``[B, KVH, P, D]``), False when it is
    the shared ``[KVH, P, D]`` form.
    """
    name = "prefix_attention"
    for n, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {n} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{name}: q has shape {tuple(q.shape)}, expected [batch, heads, q_len, head_dim]")
    B, H, T, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"{name}: k has shape {tuple(k.shape)}, expected [{B}, kv_heads, seq_len, {D}] for q {tuple(q.shape)}")
    KVH, S = k.shape[1], k.shape[2]
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{name}: v has shape {tuple(v.shape)}, expected the shape of k {tuple(k.shape)}")
    if KVH == 0 or H % KVH != 0:
        raise ValueError(
            f"{name}: q has {H} heads and k has {KVH}; the number of query heads must be a multiple "
            "of the number of key/value heads (GQA)")
    if prefix_k.dim() == 4:
        per_batch = True
        if prefix_k.shape[0] != B or prefix_k.shape[1] != KVH or prefix_k.shape[3] != D:
            raise ValueError(
                f"{name}: prefix_k has shape {tuple(prefix_k.shape)}; expected the shared form "
                f"[{KVH}, prefix_len, {D}] (or a per-batch [{B}, {KVH}, prefix_len, {D}], reference backend only)")
    elif prefix_k.dim() == 3:
        per_batch = False
        if prefix_k.shape[0] != KVH or prefix_k.shape[2] != D:
            raise ValueError(
                f"{name}: prefix_k has shape {tuple(prefix_k.shape)}, expected [{KVH}, prefix_len, {D}] "
                "(kv_heads, prefix_len, head_dim), shared by the whole batch")
    else:
        raise ValueError(
            f"{name}: prefix_k has shape {tuple(prefix_k.shape)}, expected [kv_heads, prefix_len, head_dim] "
            "shared by the batch")
    if tuple(prefix_v.shape) != tuple(prefix_k.shape):
        raise ValueError(
            f"{name}: prefix_v has shape {tuple(prefix_v.shape)}, expected the shape of prefix_k {tuple(prefix_k.shape)}")
    if prefix_k.shape[-2] < 1:
        raise ValueError(
            f"{name}: the prefix is empty (prefix_len 0); use torch.nn.functional.scaled_dot_product_attention "
            "for attention without a prefix")
    dtypes = {t.dtype for t in (q, k, v, prefix_k, prefix_v)}
    if len(dtypes) != 1:
        raise TypeError(
            f"{name}: q, k, v, prefix_k and prefix_v must share one dtype, got "
            f"{[str(t.dtype) for t in (q, k, v, prefix_k, prefix_v)]}; cast the prefix to the model's dtype")
    dtype = dtypes.pop()
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {dtype} is not supported; use float32, float16 or bfloat16 "
                        "(float64 on the reference backend)")
    devices = {t.device for t in (q, k, v, prefix_k, prefix_v)}
    if key_padding_mask is not None:
        devices.add(key_padding_mask.device)
    if len(devices) != 1:
        raise ValueError(f"{name}: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{name}: key_padding_mask must be a torch.Tensor or None")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"{name}: key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected [{B}, {S}] "
                "(batch, seq_len) over the sequence keys only (the prefix is always visible)")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(
                f"{name}: key_padding_mask has dtype {key_padding_mask.dtype}; pass a bool or integer mask "
                "(True/1 = keep, False/0 = padding), not an additive float mask")
    return per_batch


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------


def _full_mask(B: int, T: int, S: int, P: int, causal: bool,
               key_padding_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """Boolean ``[B, 1, T, P + S]`` mask, True = attend."""
    keep = torch.ones((B, 1, T, P + S), dtype=torch.bool, device=device)
    if causal:
        t = torch.arange(T, device=device)[:, None]
        s = torch.arange(S, device=device)[None, :]
        keep[:, :, :, P:] &= (s <= t + (S - T))
    if key_padding_mask is not None:
        keep[:, :, :, P:] &= key_padding_mask.to(torch.bool)[:, None, None, :]
    return keep


def prefix_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    *, causal: bool = True, key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None, dropout_p: float = 0.0, seq_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain PyTorch attention on ``[prefix ; sequence]`` in fp32 (the oracle and CPU path).

    Expands a shared ``[KVH, P, D]`` prefix per batch element, concatenates it before the
    sequence keys/values, repeats KV heads for GQA, masks, and computes softmax attention in
    fp32 (fp64 inputs in fp64); the result is cast to q's dtype. ``dropout_p`` drops attention probabilities (as
    transformers' eager attention does in training); the fused path has no dropout.
    ``seq_mask``: an optional boolean ``[B, 1 or H, T, S]`` mask over the sequence keys
    (True = attend) used *instead of* ``causal``/``key_padding_mask``, for mask patterns the
    fused kernel does not express (sliding windows, packed sequences); the prefix stays
    visible to every query. Gradients flow by autograd to every input (the prefix's summed
    over the batch).
    """
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    if prefix_k.dim() == 3:
        pk = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        pv = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    else:
        pk, pv = prefix_k, prefix_v
    P = pk.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    kc = torch.cat([pk, k], dim=2).to(acc)
    vc = torch.cat([pv, v], dim=2).to(acc)
    G = H // KVH
    if G > 1:
        kc = kc.repeat_interleave(G, dim=1)
        vc = vc.repeat_interleave(G, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    scores = torch.matmul(q.to(acc), kc.transpose(-1, -2)) * scale
    if seq_mask is not None:
        if seq_mask.dtype != torch.bool or seq_mask.dim() != 4 or tuple(seq_mask.shape[-2:]) != (T, S):
            raise ValueError(
                f"prefix_attention_reference: seq_mask must be a bool [B, 1 or H, {T}, {S}] mask, got "
                f"{tuple(seq_mask.shape)} {seq_mask.dtype}")
        pre = torch.ones((*seq_mask.shape[:-1], P), dtype=torch.bool, device=seq_mask.device)
        keep = torch.cat([pre, seq_mask], dim=-1)
    else:
        keep = _full_mask(B, T, S, P, causal, key_padding_mask, q.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, vc).to(q.dtype)


# --------------------------------------------------------------------------------------
# fused (Triton)
# --------------------------------------------------------------------------------------


class PrefixAttentionFunction(torch.autograd.Function):
    """Autograd Function over the Triton shared-prefix attention kernels.

    ``apply(q, k, v, prefix_k, prefix_v, key_padding_mask_int8_or_None, causal, scale)``.
    Saves q, k, v, prefix_k, prefix_v, out and the fp32 per-row log-sum-exp.
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, causal: bool, scale: float):
        from fastpeft.kernels.prefix_attention import prefix_attention_fwd

        out, lse2 = prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse2)
        ctx.causal = causal
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        from fastpeft.kernels.prefix_attention import prefix_attention_bwd

        q, k, v, prefix_k, prefix_v, kpm, out, lse2 = ctx.saved_tensors
        nq, nk, nv, npk, npv = ctx.needs_input_grad[:5]
        dq, dk, dv, dpk, dpv = prefix_attention_bwd(
            dout, q, k, v, prefix_k, prefix_v, kpm, out, lse2, ctx.causal, ctx.scale,
            need_dq=nq, need_dkv=nk or nv, need_dprefix=npk or npv,
        )
        return (dq if nq else None, dk if nk else None, dv if nv else None,
                dpk if npk else None, dpv if npv else None, None, None, None)


def _impl_name(impl: Optional[str]) -> str:
    value = (impl if impl is not None else get_settings().prefix_impl).strip().lower()
    if value not in PREFIX_IMPLS:
        raise ValueError(f"prefix_attention: impl {value!r} is not one of {PREFIX_IMPLS} "
                         "(Settings.prefix_impl, environment variable FASTPEFT_PREFIX_IMPL)")
    return value


def choose_prefix_impl(q: torch.Tensor, k: torch.Tensor, prefix_k: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor], impl: Optional[str] = None) -> str:
    """``"kernel"`` or ``"sdpa"`` for a call on the fused path (see the module doc).

    ``impl`` (else ``Settings.prefix_impl``): ``"kernel"`` / ``"sdpa"`` force one; ``"auto"``
    picks ``"sdpa"`` only for CUDA tensors in bf16/fp16, outside the Triton interpreter, without
    a key padding mask, when cuDNN's SDPA takes the square causal problem; else ``"kernel"``.
    """
    value = _impl_name(impl)
    if value != "auto":
        return value
    fits = (q.is_cuda and not interpreting() and key_padding_mask is None
            and q.dtype in (torch.bfloat16, torch.float16))
    return "sdpa" if fits and cudnn_takes(q, k, prefix_k.shape[-2]) else "kernel"


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    *, causal: bool = True, key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None, backend: Optional[str] = None, impl: Optional[str] = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``[prefix ; sequence]`` keys/values without a per-batch prefix copy
    in the cache (the ``kernel`` implementation never concatenates at all).

    Args:
        q: ``[B, H, T, D]``.
        k, v: ``[B, KVH, S, D]`` (``H`` a multiple of ``KVH``).
        prefix_k, prefix_v: ``[KVH, P, D]`` shared by the batch (``P >= 1``); a per-batch
            ``[B, KVH, P, D]`` prefix runs on the reference backend only.
        causal: mask sequence keys ``s > t + (S - T)`` for query ``t`` (the prefix is never masked).
        key_padding_mask: optional ``[B, S]`` bool/int, True/1 = keep, for the sequence keys.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"reference"``, ``"triton"``, ``"auto"`` or None (the current settings' backend).
        impl: the fused path's implementation, ``"kernel"``, ``"sdpa"``, ``"auto"`` or None (the
            current settings' ``prefix_impl``); see :func:`choose_prefix_impl`. An explicit
            ``"sdpa"`` also runs on CPU (it needs no Triton); a forced ``backend="triton"``
            always runs the kernel.

    Returns:
        ``[B, H, T, D]`` in q's dtype.
    """
    per_batch = check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask)
    settings = get_settings()  # one read for the whole call
    backend = backend if backend is not None else settings.backend
    impl = _impl_name(impl if impl is not None else settings.prefix_impl)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    forced = requested_backend(backend)
    if per_batch:
        if forced == "triton":
            raise ValueError(
                "prefix_attention: the Triton backend needs a prefix shared by the batch, [kv_heads, prefix_len, "
                "head_dim]; got a per-batch prefix of shape "
                f"{tuple(prefix_k.shape)}. Pass prefix_k[0] if the rows are equal, or use backend='reference'.")
        chosen = "reference"
    elif forced is None and impl == "sdpa" and q.dtype != torch.float64:
        chosen = "sdpa"  # asked for by name: runs wherever PyTorch does
    else:
        chosen = choose_backend(q, k, v, prefix_k, prefix_v, backend=backend)
    if chosen == "triton" and (D > _MAX_HEAD_DIM or q.dtype == torch.float64):
        if forced == "triton":
            what = f"head_dim {D} (at most {_MAX_HEAD_DIM})" if D > _MAX_HEAD_DIM else "float64"
            raise ValueError(
                f"prefix_attention: the Triton kernels do not support {what}; use backend='reference'")
        chosen = "reference"
    if chosen == "triton" and forced is None:
        chosen = "sdpa" if choose_prefix_impl(q, k, prefix_k, key_padding_mask, impl) == "sdpa" else "triton"
    if chosen == "reference":
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=causal,
                                          key_padding_mask=key_padding_mask, scale=scale)
    if chosen == "sdpa":
        return prefix_attention_sdpa(q, k, v, prefix_k, prefix_v, causal=bool(causal),
                                     key_padding_mask=key_padding_mask, scale=scale)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8)
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, kpm, bool(causal), scale)


# --------------------------------------------------------------------------------------
# attention under a transformers-style mask (what an attention layer hands over)
# --------------------------------------------------------------------------------------


def mask_structure(attention_mask: Optional[torch.Tensor], T: int, S: int, causal: bool):
    """Read a transformers attention mask as the fused op's ``(causal, key_padding_mask)``.

    Returns ``("fused", causal, key_padding_mask_or_None)`` when the mask is exactly
    "causal (right-aligned) and/or key padding", else ``("dense", bool_mask [B, 1|H, T, S])``
    for the reference path. ``attention_mask`` is what transformers passes to attention
    functions: None (plain causal or full attention, per ``causal``), a boolean
    ``[B, 1, T, S]`` mask (True = attend, ``sdpa_mask``), or an additive float mask.
    """
    if attention_mask is None:
        return ("fused", causal, None)
    m = attention_mask
    if m.dim() != 4 or tuple(m.shape[-2:]) != (T, S):
        raise ValueError(
            f"prefix attention: attention_mask has shape {tuple(m.shape)}, expected [batch, 1, {T}, {S}] "
            "(query length, key length of the sequence part; the prefix is not in the mask)")
    if m.dtype != torch.bool:  # additive float mask (eager style): 0 = attend
        m = m > torch.finfo(m.dtype).min / 2 if m.dtype.is_floating_point else m != 0
    if m.shape[1] != 1:
        return ("dense", m)
    B = m.shape[0]
    rows = m[:, 0]  # [B, T, S]
    kpm = rows[:, -1, :]  # the last query sees every unpadded key under both patterns
    tri = torch.ones(T, S, dtype=torch.bool, device=m.device).tril(S - T)
    if torch.equal(rows, tri[None] & kpm[:, None, :]):
        is_causal = True
    elif torch.equal(rows, kpm[:, None, :].expand(B, T, S)):
        is_causal = False
    else:
        return ("dense", m)
    return ("fused", is_causal, None if bool(kpm.all()) else kpm)


def prefix_attention_for_structure(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor, structure: tuple,
    *, scale: Optional[float] = None, dropout_p: float = 0.0, backend: Optional[str] = None,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Prefix attention under a mask read by :func:`mask_structure`, ``[B, H, T, D]``.

    "causal and/or padding" masks go to :func:`prefix_attention` (fused where the backend
    allows); any other pattern, and attention dropout (the fused path has none), run
    :func:`prefix_attention_reference` on the concatenation with the prefix always visible.
    """
    if structure[0] == "dense" or dropout_p > 0.0:
        if structure[0] == "dense":
            seq_mask = structure[1]
        else:
            seq_mask = _full_mask(q.shape[0], q.shape[2], k.shape[2], 0, structure[1], structure[2], q.device)
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, scale=scale, dropout_p=dropout_p,
                                          seq_mask=seq_mask)
    return prefix_attention(q, k, v, prefix_k, prefix_v, causal=structure[1], key_padding_mask=structure[2],
                            scale=scale, backend=backend, impl=impl)


__all__ += ["mask_structure", "prefix_attention_for_structure"]
