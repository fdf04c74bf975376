"""Triton kernels for shared-prefix attention (Prefix Tuning), and their launchers.

Queries ``q [B, H, T, D]`` attend over ``[prefix ; sequence]`` keys where the prefix
``prefix_k / prefix_v [KVH, P, D]`` is shared by every batch element and the sequence part
``k / v [B, KVH, S, D]`` is per batch element. Nothing is concatenated or expanded: every
program reads the prefix tiles of its KV head straight from the one shared tensor (they
stay hot in L2 because every batch element and query block reads the same bytes).

Forward (``_fwd_kernel``, one program per (query block, batch * head)): flash-attention
online softmax, first over the prefix blocks (never masked except for the ragged tail),
then over the sequence blocks (causal mask ``s <= t + S - T``, right-aligned so decoding
with ``T < S`` works, and the key padding mask). One pass over both parts is the same as
two partial attentions merged by their log-sum-exp, without writing the partials out.
Sequence key blocks that lie wholly inside the causal triangle (and inside ``S``) run
without the causal/bounds mask; only the diagonal blocks pay for it (the backward kernels
split their loops the same way). It stores the output and the base-2 log-sum-exp per row (``lse2``, fp32 ``[B, H, T]``),
which is all the backward needs besides q, k, v and the prefix.

Backward (FlashAttention-2 style recomputation, no atomics, deterministic):

* ``_bwd_preprocess``: ``delta = rowsum(dO * O)``.
* ``_bwd_dkdv_kernel`` (one program per (sequence key block, batch * KV head)): loops over
  the query heads of its GQA group and the query blocks that can see its keys, and writes
  ``dk``/``dv`` of the sequence part directly (each program owns its key block).
* ``_bwd_dq_kernel`` (one program per (query block, batch * head)): recomputes the
  probabilities over prefix and sequence keys and writes ``dq``.
* ``_bwd_dprefix_kernel`` (one program per (prefix key block, KV head, batch split)): the
  prefix gradient is a sum over the whole batch and over the query heads of each KV group.
  Each program sums a contiguous slice of the batch in registers and writes one fp32
  partial ``[NSPLIT, KVH, P, D]``; the launcher reduces the NSPLIT partials with one
  ``sum``. NSPLIT is small (enough programs to fill the GPU, at most 16), so the partial
  buffer is a few MiB, never a per-batch copy of the prefix, and the result does not
  depend on scheduling (atomics would).

Numerics: fp32 accumulation everywhere. ``DOT_FP32`` casts every tile to fp32 before
``tl.dot``: used for fp32 inputs (with ``input_precision="ieee"``, no TF32) and whenever
the Triton interpreter runs (its ``tl.dot`` on bf16 tiles is wrong). On a GPU with bf16 or
fp16 inputs the tiles go to ``tl.dot`` in their own dtype with fp32 accumulators, like
FlashAttention. Head dims up to 128 (padded to a power of two >= 16 with masks); ragged
``T``, ``S`` and ``P`` are masked. Only features available in triton 3.6 are used.

These are launchers only: the autograd Function lives in ``fastpeft.ops.prefix_attention``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import interpreting as _interpreting

__all__ = ["prefix_attention_fwd", "prefix_attention_bwd", "MAX_HEAD_DIM"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale,
                         APPLY_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
    # scores in the base-2 domain: qk * scale * log2(e)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if APPLY_MASK:
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc += tl.dot(p, v, input_precision=PREC)
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _load_kv(k_base, v_base, n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, mask, DOT_FP32: tl.constexpr):
    """Rows ``n`` of one head's K and V ([BLOCK_N, BLOCK_D]), widened to fp32 when the dots run in fp32."""
    k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
    v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _inner_valid(kpm_row, n, stride_kpm, HAS_MASK: tl.constexpr):
    """Key validity of a sequence block inside the causal triangle and inside S: padding only."""
    valid = n[None, :] >= 0
    if HAS_MASK:
        keep = tl.load(kpm_row + n * stride_kpm)
        valid = (keep != 0)[None, :]
    return valid


@triton.jit
def _edge_valid(kpm_row, n, n_ok, stride_kpm, offs_m, off, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Key validity of a sequence block on the causal diagonal or past S: bounds, padding, causal."""
    key_ok = n_ok
    if HAS_MASK:
        keep = tl.load(kpm_row + n * stride_kpm, mask=n_ok, other=0)
        key_ok = key_ok & (keep != 0)
    valid = key_ok[None, :]
    if CAUSAL:
        valid = valid & (n[None, :] <= offs_m[:, None] + off)
    return valid


@triton.jit
def _seq_bounds(m0, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block bounds over the sequence for the query rows ``[m0, m0 + BLOCK_M)``.

    Returns ``(full, hi)``: blocks starting below ``full`` need no causal or bounds mask
    (every key ``s < full`` is ``< S`` and ``<= m0 + S - T``, visible to every row of the
    block); blocks in ``[full, hi)`` need masks; keys from ``hi`` on are invisible to all rows.
    """
    s_full = (S // BLOCK_N) * BLOCK_N
    if CAUSAL:
        off = S - T
        hi = tl.minimum(S, m0 + BLOCK_M + off)
        full = tl.minimum((tl.maximum(m0 + off + 1, 0) // BLOCK_N) * BLOCK_N, s_full)
    else:
        hi = S
        full = s_full
    return full, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, O, LSE,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    spkh, spkp, spkd,
    spvh, spvp, spvd,
    smb, sms,
    sob, soh, sot, sod,
    H, GROUP, T, S, P, HEAD_D, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: b * stride can pass 2**31
    h = pid_bh % H
    kvh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_ok = offs_m < T

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1) the shared prefix: every row sees every prefix key (P >= 1, so m_i is finite after it)
    pk_base = PK + kvh * spkh
    pv_base = PV + kvh * spvh
    for start in range(0, P, BLOCK_N):
        n = start + offs_n
        n_ok = n < P
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k, v = _load_kv(pk_base, pv_base, n, offs_d, spkp, spkd, spvp, spvd, kv_mask, DOT_FP32)
        acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, n_ok[None, :], qk_scale,
                                             True, DOT_FP32, PREC)

    # 2) the sequence: causal (right-aligned) and padding masks. Blocks below ``full`` lie
    #    entirely inside the causal triangle and inside S: only the padding mask applies there.
    full, hi = _seq_bounds(pid_m * BLOCK_M, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    off = S - T
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for start in range(0, full, BLOCK_N):
        n = start + offs_n
        k, v = _load_kv(k_base, v_base, n, offs_d, sks, skd, svs, svd, d_ok[None, :], DOT_FP32)
        valid = _inner_valid(KPM + b * smb, n, sms, HAS_MASK)
        acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale,
                                             HAS_MASK, DOT_FP32, PREC)
    for start in range(full, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < S
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k, v = _load_kv(k_base, v_base, n, offs_d, sks, skd, svs, svd, kv_mask, DOT_FP32)
        valid = _edge_valid(KPM + b * smb, n, n_ok, sms, offs_m, off, HAS_MASK, CAUSAL)
        acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale,
                                             True, DOT_FP32, PREC)

    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log2(l_i), mask=m_ok)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    O, DO, DELTA,
    sob, soh, sot, sod,
    sdob, sdoh, sdot, sdod,
    H, T, HEAD_D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _kv_block_grads(k, v, dk, dv, q, do, lse, delta, valid, qk_scale,
                    APPLY_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
    # transposed formulation: rows are keys [BLOCK_N], columns are queries [BLOCK_M]
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    pT = tl.exp2(qkT - lse[None, :])
    if APPLY_MASK:
        pT = tl.where(valid, pT, 0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    if DOT_FP32:
        dv += tl.dot(pT, do, input_precision=PREC)
        dk += tl.dot(dsT, q, input_precision=PREC)
    else:
        dv += tl.dot(pT.to(do.dtype), do)
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KPM, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    smb, sms,
    sdob, sdoh, sdot, sdod,
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    H, KVH, GROUP, T, S, HEAD_D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // KVH).to(tl.int64)
    kvh = pid_bk % KVH

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_ok = offs_n < S
    kv_mask = n_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = n_ok
    if HAS_MASK:
        keep = tl.load(KPM + b * smb + offs_n * sms, mask=n_ok, other=0)
        key_ok = key_ok & (keep != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks that see this key block: from ``lo`` on (causal: query t sees key s iff
    # s <= t + off). From ``full`` on every row sees every key of the block, so only the
    # padding mask applies. Query rows past T load zeros and add exactly nothing (q = dO = 0,
    # lse = delta = 0), and key rows past S are never stored: neither needs a mask.
    off = S - T
    n0 = pid_n * BLOCK_N
    if CAUSAL:
        lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
        full = ((tl.maximum(n0 + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        full = tl.minimum(full, T)
    else:
        lo = 0
        full = 0
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (pid_bk // KVH * H + h) * T
        for start in range(lo, full, BLOCK_M):
            offs_m = start + offs_m0
            m_ok = offs_m < T
            qm = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qm, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=qm, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            valid = key_ok[:, None] & (offs_n[:, None] <= offs_m[None, :] + off)
            dk, dv = _kv_block_grads(k, v, dk, dv, q, do, lse, delta, valid, qk_scale,
                                     True, DOT_FP32, PREC)
        for start in range(full, T, BLOCK_M):
            offs_m = start + offs_m0
            m_ok = offs_m < T
            qm = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qm, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=qm, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            dk, dv = _kv_block_grads(k, v, dk, dv, q, do, lse, delta, key_ok[:, None], qk_scale,
                                     HAS_MASK, DOT_FP32, PREC)

    dk = dk * sm_scale
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dprefix_kernel(
    Q, PK, PV, DO, LSE, DELTA, DPK, DPV,
    sqb, sqh, sqt, sqd,
    spkh, spkp, spkd,
    spvh, spvp, spvd,
    sdob, sdoh, sdot, sdod,
    B, H, KVH, GROUP, T, P, HEAD_D, B_PER_SPLIT, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_ok = offs_n < P
    kv_mask = n_ok[:, None] & d_ok[None, :]

    pk = tl.load(PK + kvh * spkh + offs_n[:, None] * spkp + offs_d[None, :] * spkd, mask=kv_mask, other=0.0)
    pv = tl.load(PV + kvh * spvh + offs_n[:, None] * spvp + offs_d[None, :] * spvd, mask=kv_mask, other=0.0)
    if DOT_FP32:
        pk = pk.to(tl.float32)
        pv = pv.to(tl.float32)

    dpk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dpv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    b_lo = split * B_PER_SPLIT
    b_hi = tl.minimum(b_lo + B_PER_SPLIT, B)
    q_b = Q + b_lo.to(tl.int64) * sqb  # pointers advance by one batch stride per iteration
    do_b = DO + b_lo.to(tl.int64) * sdob
    for b in range(b_lo, b_hi):
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            q_base = q_b + h * sqh
            do_base = do_b + h * sdoh
            row_base = (b * H + h) * T
            # rows past T add exactly nothing (q = dO = 0, lse = delta = 0); prefix keys past P
            # are masked so their (never stored) rows stay finite
            for start in range(0, T, BLOCK_M):
                offs_m = start + offs_m0
                m_ok = offs_m < T
                qm = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qm, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=qm, other=0.0)
                if DOT_FP32:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
                dpk, dpv = _kv_block_grads(pk, pv, dpk, dpv, q, do, lse, delta, n_ok[:, None], qk_scale,
                                           True, DOT_FP32, PREC)
        q_b += sqb
        do_b += sdob

    dpk = dpk * sm_scale
    # partial buffers are contiguous fp32 [NSPLIT, KVH, P, HEAD_D]
    part = (split * KVH + kvh) * P * HEAD_D
    ptrs = part + offs_n[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DPK + ptrs, dpk, mask=kv_mask)
    tl.store(DPV + ptrs, dpv, mask=kv_mask)


@triton.jit
def _dq_step(q, do, lse, delta, k, v, dq, valid, qk_scale,
             APPLY_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.exp2(qk - lse[:, None])
    if APPLY_MASK:
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    if DOT_FP32:
        dq += tl.dot(ds, k, input_precision=PREC)
    else:
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, KPM, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    spkh, spkp, spkd,
    spvh, spvp, spvd,
    smb, sms,
    sdob, sdoh, sdot, sdod,
    sdqb, sdqh, sdqt, sdqd,
    H, GROUP, T, S, P, HEAD_D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_ok = offs_m < T
    qm = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qm, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=qm, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # rows past T load zeros (q = dO = 0, lse = delta = 0): their terms are finite and never stored
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    pk_base = PK + kvh * spkh
    pv_base = PV + kvh * spvh
    for start in range(0, P, BLOCK_N):
        n = start + offs_n
        n_ok = n < P
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k, v = _load_kv(pk_base, pv_base, n, offs_d, spkp, spkd, spvp, spvd, kv_mask, DOT_FP32)
        dq = _dq_step(q, do, lse, delta, k, v, dq, n_ok[None, :], qk_scale, True, DOT_FP32, PREC)

    full, hi = _seq_bounds(pid_m * BLOCK_M, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    off = S - T
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for start in range(0, full, BLOCK_N):
        n = start + offs_n
        k, v = _load_kv(k_base, v_base, n, offs_d, sks, skd, svs, svd, d_ok[None, :], DOT_FP32)
        valid = _inner_valid(KPM + b * smb, n, sms, HAS_MASK)
        dq = _dq_step(q, do, lse, delta, k, v, dq, valid, qk_scale, HAS_MASK, DOT_FP32, PREC)
    for start in range(full, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < S
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k, v = _load_kv(k_base, v_base, n, offs_d, sks, skd, svs, svd, kv_mask, DOT_FP32)
        valid = _edge_valid(KPM + b * smb, n, n_ok, sms, offs_m, off, HAS_MASK, CAUSAL)
        dq = _dq_step(q, do, lse, delta, k, v, dq, valid, qk_scale, True, DOT_FP32, PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qm)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _dot_mode(dtype: torch.dtype) -> Tuple[bool, str]:
    """(DOT_FP32, input_precision) for this input dtype on this run (GPU or interpreter)."""
    if dtype == torch.float32:
        return True, "ieee"
    if _interpreting():
        return True, "ieee"
    return False, "tf32"  # ignored for 16-bit tiles


def _configs(D: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and stages per kernel.

    Interpreter: 16-wide tiles (cheap on CPU, and tiny test shapes still span several blocks).
    GPU, 16-bit: settings in the range of Triton's fused-attention tutorial for Hopper.
    GPU, fp32 (IEEE dots on CUDA cores, twice the register bytes per element): small tiles with 8
    warps. Compiled for sm_90 (``benchmarks/aot.py``, triton 3.6 and 3.9), these spill at most 96
    bytes per thread in any of the four kernels, where the 16-bit tiles in fp32 (or 32x32 with 4
    warps at head dim 128) left 1-16 KB per thread on the local-memory stack with 32 registers.
    """
    if _interpreting():
        t = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return dict(fwd=t, dkdv=t, dq=t, dprefix=t)
    if dtype == torch.float32:
        t = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2) if D > 64 else \
            dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(fwd=t, dkdv=t, dq=t, dprefix=t)
    big = D > 64
    fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if big else 4, num_stages=3)
    dkdv = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if big else 4, num_stages=2)
    dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if big else 4, num_stages=2)
    dprefix = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if big else 4, num_stages=2)
    return dict(fwd=fwd, dkdv=dkdv, dq=dq, dprefix=dprefix)


def _mask_args(key_padding_mask: Optional[torch.Tensor], ref: torch.Tensor):
    if key_padding_mask is None:
        return ref, 0, 0, False  # dummy pointer, never read
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1), True


def prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns ``out [B, H, T, D]`` (q's dtype) and ``lse2 [B, H, T]`` (fp32, base 2).

    Shapes are assumed checked by the caller (``fastpeft.ops.prefix_attention``);
    ``key_padding_mask`` is None or an int8/bool ``[B, S]`` tensor (nonzero = keep).
    """
    B, H, T, D = q.shape
    KVH, S, P = k.shape[1], k.shape[2], prefix_k.shape[1]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = _configs(D, q.dtype)["fwd"]
    dot_fp32, prec = _dot_mode(q.dtype)
    kpm, smb, sms, has_mask = _mask_args(key_padding_mask, lse2)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, kpm, out, lse2,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        smb, sms, *out.stride(),
        H, H // KVH, T, S, P, D, scale * LOG2E,
        CAUSAL=causal, HAS_MASK=has_mask,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(D),
        DOT_FP32=dot_fp32, PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse2


def _num_splits(B: int, KVH: int, n_pblocks: int, device: torch.device) -> int:
    if _interpreting() or device.type != "cuda":
        return min(B, 2)  # exercise the split reduction on CPU
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, 16, triton.cdiv(2 * sms, KVH * n_pblocks)))


def prefix_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    out: torch.Tensor, lse2: torch.Tensor,
    causal: bool, scale: float,
    need_dq: bool = True, need_dkv: bool = True, need_dprefix: bool = True,
):
    """Launch the backward. Returns ``(dq, dk, dv, dprefix_k, dprefix_v)`` (None where not needed).

    ``dprefix_k/dprefix_v`` are ``[KVH, P, D]``: summed over the batch and over the query
    heads of each KV group, in the prefix's dtype.
    """
    B, H, T, D = q.shape
    KVH, S, P = k.shape[1], k.shape[2], prefix_k.shape[1]
    G = H // KVH
    cfgs = _configs(D, q.dtype)
    dot_fp32, prec = _dot_mode(q.dtype)
    BD = _block_d(D)
    qk_scale = scale * LOG2E
    kpm, smb, sms, has_mask = _mask_args(key_padding_mask, lse2)

    delta = torch.empty_like(lse2)
    pre_m = 64 if not _interpreting() else 16
    _bwd_preprocess[(triton.cdiv(T, pre_m), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, T, D, BLOCK_M=pre_m, BLOCK_D=BD,
    )

    dq = dk = dv = dpk = dpv = None
    if need_dkv:
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        c = cfgs["dkdv"]
        _bwd_dkdv_kernel[(triton.cdiv(S, c["BLOCK_N"]), B * KVH)](
            q, k, v, kpm, do, lse2, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), smb, sms, *do.stride(), *dk.stride(), *dv.stride(),
            H, KVH, G, T, S, D, qk_scale, scale,
            CAUSAL=causal, HAS_MASK=has_mask,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=BD, DOT_FP32=dot_fp32, PREC=prec,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
    if need_dq:
        dq = torch.empty_like(q)
        c = cfgs["dq"]
        _bwd_dq_kernel[(triton.cdiv(T, c["BLOCK_M"]), B * H)](
            q, k, v, prefix_k, prefix_v, kpm, do, lse2, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            smb, sms, *do.stride(), *dq.stride(),
            H, G, T, S, P, D, qk_scale, scale,
            CAUSAL=causal, HAS_MASK=has_mask,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=BD, DOT_FP32=dot_fp32, PREC=prec,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
    if need_dprefix:
        c = cfgs["dprefix"]
        n_pb = triton.cdiv(P, c["BLOCK_N"])
        nsplit = _num_splits(B, KVH, n_pb, q.device)
        per_split = triton.cdiv(B, nsplit)
        nsplit = triton.cdiv(B, per_split)
        part_k = torch.empty((nsplit, KVH, P, D), dtype=torch.float32, device=q.device)
        part_v = torch.empty_like(part_k)
        _bwd_dprefix_kernel[(n_pb, KVH, nsplit)](
            q, prefix_k, prefix_v, do, lse2, delta, part_k, part_v,
            *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *do.stride(),
            B, H, KVH, G, T, P, D, per_split, qk_scale, scale,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=BD, DOT_FP32=dot_fp32, PREC=prec,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
        dpk = part_k.sum(0).to(prefix_k.dtype)
        dpv = part_v.sum(0).to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv
