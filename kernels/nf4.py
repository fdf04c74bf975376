"""Triton kernels for bitsandbytes-format NF4/FP4 weights (launchers only, no autograd).

Every kernel reads the packed weight as bitsandbytes stores it (see ``fastpeft.ops.nf4``):
element ``e = n * K + k`` of the ``[N, K]`` weight sits in byte ``e // 2`` (high nibble when
``e`` is even), its scale is ``absmax[e // blocksize]`` (or, double-quantised,
``nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset``), and its value is
``code[nibble] * scale`` in fp32, rounded to the compute dtype, exactly as bitsandbytes'
dequantisation does. Indexing by flattened element keeps odd ``K`` and blocks that straddle
rows correct.

* :func:`dequantize` - the whole weight, ``[N, K]`` in a given dtype.
* :func:`matmul` - ``C = X @ W^T`` (``trans_w=True``, the forward) or ``C = X @ W`` (the
  input gradient), the weight dequantised tile by tile inside the K loop (never
  materialised), with fused epilogues: ``+ bias`` and ``+ scale * (L @ R) [* mask]`` (the
  LoRA branch: ``U B^T`` forward, ``(G A) * dropout_mask`` backward).
* :func:`gemv` - decoding (M <= 16): split-K over programs each holding a block of output
  rows, reductions in fp32. At one row, :func:`_gemv1_kernel` reads the 16-entry code table from
  registers with PTX ``prmt`` byte permutes (``kernels/nf4_prmt.py``; compiled code only) or,
  in the interpreter and with ``Settings.nf4_gemv="triton_l1"``, from a 2 KB table through L1.

When ``K`` is a multiple of the blocksize and a K tile lies inside one quantisation block
(``ROW_SCALE``), the GEMM and GEMV load one scale per weight row of the tile instead of one per
element (with double quantisation that is three loads per element saved). The forward GEMM
then also loads each packed byte once (``PAIR``): its two nibbles are columns ``2h`` and
``2h + 1`` of the same weight row, so the K tile is split into even and odd columns
(``X[:, 0::2] @ hi + X[:, 1::2] @ lo``, the X tile split in registers with ``tl.split``).

Under ``TRITON_INTERPRET=1`` bf16 ``tl.dot`` is wrong (numpy has no bf16), so the tiles are
cast to fp32 there; on a GPU bf16/fp16 tiles go to the tensor cores with fp32 accumulation.
Only features of triton 3.x up to 3.6 are used.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from . import nf4_prmt
from ._common import interpreting as _interpreting

__all__ = ["dequantize", "matmul", "gemv", "state_args"]


# On a GPU, products that bitsandbytes rounds before an add are issued as PTX ``mul.rn.f32``,
# which neither LLVM nor ptxas fuses into an FMA (a plain ``a * b + c`` is contracted to one
# ``fma.rn.f32``, one rounding fewer than bitsandbytes, with the fp-fusion default of triton 3.6
# and 3.9). The interpreter (numpy) never fuses.
_EXACT_MUL = tl.constexpr(not _interpreting())
_PRMT_ASM = tl.constexpr(nf4_prmt.lookup_asm())
_PRMT_CONSTRAINTS = tl.constexpr(nf4_prmt.LOOKUP_CONSTRAINTS)
_PRMT_PACK = tl.constexpr(nf4_prmt.PACK)


@triton.jit
def _mul_rn(a, b):
    """``a * b`` in fp32, rounded on its own (never contracted with a following add)."""
    if _EXACT_MUL:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _scale_at(blk, mask, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr, NESTED: tl.constexpr, NBS: tl.constexpr):
    if NESTED:
        # bitsandbytes: absmax = dequantize_blockwise(absmax_q) (a product, stored in fp32), then
        # absmax += offset: two roundings, so no FMA here (bit-exact scales on a GPU)
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a = _mul_rn(tl.load(ncode_ptr + q, mask=mask, other=0.0), tl.load(nabs_ptr + blk // NBS, mask=mask, other=0.0))
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _dequant_at(e, mask, packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
                BS: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr):
    # fp32 value of flattened weight elements ``e`` (int64), 0 where masked.
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    nib = tl.where((e & 1) == 0, byte >> 4, byte & 15)
    v = tl.load(code_ptr + nib, mask=mask, other=0.0)
    a = _scale_at(e // BS, mask, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr, NESTED, NBS)
    return tl.where(mask, v * a, 0.0)


@triton.jit
def _dequant_kernel(out_ptr, numel, packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
                    BS: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    w = _dequant_at(e, mask, packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr, BS, NESTED, NBS)
    tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma(acc, x, w, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32:
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
    else:
        acc += tl.dot(x, w)
    return acc


@triton.jit
def _matmul_kernel(
    x_ptr, c_ptr, bias_ptr, l_ptr, r_ptr, mask_ptr,
    packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
    M, P, Q, K, KB, lora_scale, R,
    stride_xm, stride_xq, stride_cm, stride_cp,
    stride_lm, stride_lr, stride_rr, stride_rp, stride_mm, stride_mp,
    TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr,
    BS: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, LORA_FP32: tl.constexpr, ROW_SCALE: tl.constexpr,
    PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C[M, P] = X[M, Q] @ Wop[Q, P]; Wop = W^T (TRANS_W: P = N, Q = K) or W (P = K, Q = N).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_P)
    group = GROUP_M * num_p
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_p = (pid % group) // gsize

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_mask = offs_m < M
    p_mask = offs_p < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        if PAIR:
            # forward, K % BS == 0 (so K is even): the two nibbles of a byte are k = 2h and
            # k = 2h + 1 of the same weight row, so load each byte once and split the K tile into
            # its even and odd columns: X[:, 0::2] @ hi + X[:, 1::2] @ lo
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :] * stride_xq,
                        mask=m_mask[:, None] & (offs_q < Q)[None, :], other=0.0)
            xe, xo = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_Q // 2, 2)))  # even / odd K columns
            offs_h = q0 // 2 + tl.arange(0, BLOCK_Q // 2)
            h_mask = offs_h < Q // 2
            bmask = h_mask[:, None] & p_mask[None, :]
            byte = tl.load(packed_ptr + offs_p[None, :].to(tl.int64) * (K // 2) + offs_h[:, None],
                           mask=bmask, other=0).to(tl.int32)
            a = _scale_at(offs_p.to(tl.int64) * KB + q0 // BS, p_mask, absmax_ptr, ncode_ptr, nabs_ptr,
                          offset_ptr, NESTED, NBS)
            we = tl.where(bmask, tl.load(code_ptr + (byte >> 4), mask=bmask, other=0.0) * a[None, :], 0.0)
            wo = tl.where(bmask, tl.load(code_ptr + (byte & 15), mask=bmask, other=0.0) * a[None, :], 0.0)
            acc = _mma(acc, xe, we.to(x_ptr.dtype.element_ty), DOT_FP32, IEEE)
            acc = _mma(acc, xo, wo.to(x_ptr.dtype.element_ty), DOT_FP32, IEEE)
        else:
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_mask = offs_q < Q
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :] * stride_xq,
                        mask=m_mask[:, None] & q_mask[None, :], other=0.0)
            if TRANS_W:
                e = offs_p[None, :].to(tl.int64) * K + offs_q[:, None]
            else:
                e = offs_q[:, None].to(tl.int64) * K + offs_p[None, :]
            wmask = q_mask[:, None] & p_mask[None, :]
            if ROW_SCALE:
                # K % BS == 0 and the tile's K extent within one quantisation block: one scale
                # per weight row of the tile instead of a scale gather per element
                byte = tl.load(packed_ptr + (e >> 1), mask=wmask, other=0).to(tl.int32)
                nib = tl.where((e & 1) == 0, byte >> 4, byte & 15)
                v = tl.load(code_ptr + nib, mask=wmask, other=0.0)
                if TRANS_W:  # weight rows along P, K along Q
                    blk = offs_p.to(tl.int64) * KB + q0 // BS
                    a = _scale_at(blk, p_mask, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr, NESTED, NBS)
                    w = tl.where(wmask, v * a[None, :], 0.0)
                else:  # weight rows along Q, K along P
                    blk = offs_q.to(tl.int64) * KB + (pid_p * BLOCK_P) // BS
                    a = _scale_at(blk, q_mask, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr, NESTED, NBS)
                    w = tl.where(wmask, v * a[:, None], 0.0)
            else:
                w = _dequant_at(e, wmask, packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
                                BS, NESTED, NBS)
            # the dequantised weight in the compute dtype, as bitsandbytes has it
            acc = _mma(acc, x, w.to(x_ptr.dtype.element_ty), DOT_FP32, IEEE)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
                     mask=r_mask[:, None] & p_mask[None, :], other=0.0)
        if LORA_FP32:
            lora = tl.dot(lt.to(tl.float32), rt.to(tl.float32), input_precision="ieee")
        else:
            lora = tl.dot(lt.to(x_ptr.dtype.element_ty), rt.to(x_ptr.dtype.element_ty))
        lora = lora * lora_scale
        if HAS_MASK:
            dm = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_p[None, :] * stride_mp,
                         mask=m_mask[:, None] & p_mask[None, :], other=0.0)
            lora = lora * dm.to(tl.float32)
        acc += lora
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & p_mask[None, :])


@triton.jit
def _gemv_kernel(
    x_ptr, ws_ptr, packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
    M, N, K, KB, k_per_split, stride_xm, stride_xk,
    BS: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    # ws[split, m, n] = sum over this split's K range of x[m, k] * W[n, k], in fp32.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_start = split * k_per_split
    k_end = min(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        e = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        wmask = n_mask[:, None] & k_mask[None, :]
        if ROW_SCALE:  # K % BS == 0 and the K tile inside one block: one scale per weight row
            byte = tl.load(packed_ptr + (e >> 1), mask=wmask, other=0).to(tl.int32)
            nib = tl.where((e & 1) == 0, byte >> 4, byte & 15)
            v = tl.load(code_ptr + nib, mask=wmask, other=0.0)
            a = _scale_at(offs_n.to(tl.int64) * KB + k0 // BS, n_mask, absmax_ptr, ncode_ptr, nabs_ptr,
                          offset_ptr, NESTED, NBS)
            w = tl.where(wmask, v * a[:, None], 0.0)
        else:
            w = _dequant_at(e, wmask, packed_ptr, code_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
                            BS, NESTED, NBS)
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(ws_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _prmt_codes(byte, t0, t1, t2, t3, t4, t5, t6, t7):
    """fp32 codes of the high (even element) and low (odd element) nibbles of uint8 ``byte``,
    looked up in the fp16 table held in the 8 int32 words ``t0..t7`` (``kernels/nf4_prmt.py``)."""
    return tl.inline_asm_elementwise(_PRMT_ASM, _PRMT_CONSTRAINTS, [byte, t0, t1, t2, t3, t4, t5, t6, t7],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=_PRMT_PACK)


@triton.jit
def _gemv1_kernel(
    x_ptr, ws_ptr, packed_ptr, pairs_ptr, absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr,
    t0, t1, t2, t3, t4, t5, t6, t7,
    N, K, KB, k_per_split, stride_xk,
    BS: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    LUT: tl.constexpr, VEC: tl.constexpr,
):
    """ws[split, n] = sum over this split's K range of x[k] * W[n, k] for one row of x (decoding).

    Needs K % BS == 0 and BS % (2 BLOCK_H) == 0 (one scale per weight row and K tile). Per K
    tile each thread loads its packed bytes as 16-byte vectors (a row's bytes are contiguous) and
    x as even / odd columns, and turns each byte into its two nibbles' codes:

    * ``LUT`` (the GPU default): the 16 codes in fp16 sit in 8 registers (``t0..t7``, kernel
      arguments read once) and ``prmt`` byte permutes look 4 nibbles up at a time (inline PTX,
      :mod:`fastpeft.kernels.nf4_prmt`; fp16 codes: relative error <= 2^-11);
    * otherwise (the interpreter, ``Settings.nf4_gemv="triton_l1"``): each byte indexes a
      256-entry table of its two nibbles' fp32 codes (:func:`code_pairs`, 2 KB, read through L1:
      one 8-byte gather per two weights, several L1 wavefronts per warp).

    Each code is multiplied by its x and the row's scale multiplies the pair sum. Partial sums
    stay in a [BLOCK_N, BLOCK_H] fp32 accumulator across the K loop and are reduced once after it
    (no shuffle reduction inside the loop). Unlike dequantise-then-matmul, the weight is not
    rounded to x's dtype first (code * scale stays fp32): within that rounding of the reference."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # K % BS == 0 with BS >= 32 and k_per_split % (2 BLOCK_H) == 0: rows and K tiles start on
    # 16-byte boundaries, which the compiler is told so that it issues 16-byte packed loads
    rows = offs_n[:, None] * tl.multiple_of(K // 2, 16)
    # the rows' scales, indexed in the accumulator's layout (each thread for its own rows; a
    # [BLOCK_N] vector is converted through shared memory once BLOCK_N exceeds the threads)
    row_blk = offs_n[:, None] * KB + tl.zeros((1, BLOCK_H // VEC), dtype=tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_H // VEC), dtype=tl.float32)
    for k0 in range(k_start, k_end, 2 * BLOCK_H):
        offs_h = tl.multiple_of(k0 // 2, BLOCK_H) + tl.arange(0, BLOCK_H)
        byte = tl.load(packed_ptr + rows + offs_h[None, :], mask=n_mask[:, None], other=0)
        xk = tl.load(x_ptr + (k0 + tl.arange(0, 2 * BLOCK_H)) * stride_xk).to(tl.float32)
        xe, xo = tl.split(tl.reshape(xk, (BLOCK_H, 2)))  # even (high nibble) / odd (low nibble) columns
        if LUT:
            hi, lo = _prmt_codes(byte, t0, t1, t2, t3, t4, t5, t6, t7)
        else:
            pair = tl.load(pairs_ptr + byte.to(tl.int32))  # (code[byte >> 4], code[byte & 15]) as fp32 bits
            hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            lo = pair.to(tl.int32).to(tl.float32, bitcast=True)
        a = _scale_at(row_blk + k0 // BS, n_mask[:, None], absmax_ptr, ncode_ptr, nabs_ptr, offset_ptr, NESTED, NBS)
        # sum each thread's VEC bytes of a row in registers, then scale
        se = tl.sum(tl.reshape(hi * xe[None, :], (BLOCK_N, BLOCK_H // VEC, VEC)), axis=2)
        so = tl.sum(tl.reshape(lo * xo[None, :], (BLOCK_N, BLOCK_H // VEC, VEC)), axis=2)
        acc += (se + so) * a
    tl.store(ws_ptr + split * N + offs_n, tl.sum(acc, axis=1), mask=n_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def state_args(state, device):
    """Kernel pointer arguments for an ``NF4State``: (code, absmax, nested code, nested absmax,
    offset, nested, nested blocksize). Unused pointers get the absmax tensor as a stand-in."""
    code = state.code.to(device=device, dtype=torch.float32).contiguous()
    absmax = state.absmax.to(device).contiguous()
    if state.nested:
        ncode = state.nested_code.to(device=device, dtype=torch.float32).contiguous()
        nabs = state.nested_absmax.to(device=device, dtype=torch.float32).contiguous()
        off = state.offset.to(device=device, dtype=torch.float32).reshape(1).contiguous()
        return code, absmax, ncode, nabs, off, True, state.nested_blocksize
    absmax = absmax.float()
    return code, absmax, absmax, absmax, absmax, False, 256


def _check_device(*tensors):
    for t in tensors:
        if t is not None and not t.is_cuda and not _interpreting():
            raise RuntimeError(
                "fastpeft NF4 Triton kernel called with a CPU tensor outside the Triton interpreter; "
                "use the reference backend (FASTPEFT_BACKEND=reference) or move the tensors to CUDA."
            )


def dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise the whole ``state.shape`` weight to ``dtype``."""
    _check_device(packed)
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    code, absmax, ncode, nabs, off, nested, nbs = state_args(state, packed.device)
    BLOCK = 1024
    _dequant_kernel[(triton.cdiv(numel, BLOCK),)](
        out, numel, packed, code, absmax, ncode, nabs, off,
        BS=state.blocksize, NESTED=nested, NBS=nbs, BLOCK=BLOCK,
    )
    return out


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _matmul_config(M: int, P: int, trans_w: bool, dtype: torch.dtype, blocksize: int, interp: bool):
    """(BLOCK_M, BLOCK_P, BLOCK_Q, GROUP_M, launch kwargs) of :func:`matmul` for an ``[M, P]`` output.

    16-bit on a GPU: 128x128 tiles (64-wide K for dx, where a 64-wide K tile keeps one scale per
    weight row) once both sides reach 128, else 64x64; K steps of 64. fp32 (IEEE dots, twice the
    register bytes): K steps of 32 and 8 warps. Compiled for sm_90 with triton 3.6 and 3.9
    (``benchmarks/aot.py``) these spill at most 56 bytes per thread, where the 16-bit tiles in fp32
    put 5-10 KB per thread of the dx kernel on the local-memory stack with 32 registers.
    """
    if interp:
        return 32, 32, 32, 4, {}
    big = M >= 128 and P >= 128
    if dtype == torch.float32:
        return (128, 64, 32, 8, dict(num_warps=8, num_stages=3)) if big and trans_w else \
            (64, 64, 32, 8, dict(num_warps=8, num_stages=3))
    BM, BP, BQ, GM = (128, 128, 64, 8) if big else (64, 64, 64, 8)
    if big and not trans_w and blocksize == 64:
        BP = 64
    return BM, BP, BQ, GM, dict(num_warps=8 if big else 4, num_stages=3)


def matmul(x: torch.Tensor, packed: torch.Tensor, state, trans_w: bool, bias=None,
           lora_l=None, lora_r=None, lora_scale: float = 1.0, lora_mask=None,
           out_dtype=None, pair: bool = True) -> torch.Tensor:
    """``x @ W^T`` (``trans_w``) or ``x @ W`` for the packed ``[N, K]`` weight, plus optional
    ``bias`` and ``lora_scale * (lora_l @ lora_r)`` (times ``lora_mask``) in the epilogue.
    ``pair=False`` turns the forward's one-load-per-byte path off (``Settings.nf4_pair``, kept
    as a switch until it is timed on a GPU).

    ``x``: ``[M, Q]``; ``lora_l``: ``[M, r]``; ``lora_r``: ``[r, P]`` (any strides).
    """
    _check_device(x, packed)
    N, K = state.shape
    M, Q = x.shape
    P = N if trans_w else K
    if Q != (K if trans_w else N):
        raise ValueError(f"nf4 matmul: x has {Q} columns, expected {K if trans_w else N}")
    out = torch.empty((M, P), dtype=out_dtype or x.dtype, device=x.device)
    code, absmax, ncode, nabs, off, nested, nbs = state_args(state, x.device)
    interp = _interpreting()
    dot_fp32 = x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16)
    has_lora = lora_l is not None
    R = lora_l.shape[1] if has_lora else 1
    lora_fp32 = interp or x.dtype == torch.float32
    BM, BP, BQ, GM, kw = _matmul_config(M, P, trans_w, x.dtype, state.blocksize, interp)
    dummy = out
    row_scale = K % state.blocksize == 0 and state.blocksize % (BQ if trans_w else BP) == 0
    grid = (triton.cdiv(M, BM) * triton.cdiv(P, BP),)
    _matmul_kernel[grid](
        x, out, bias if bias is not None else dummy,
        lora_l if has_lora else dummy, lora_r if has_lora else dummy,
        lora_mask if lora_mask is not None else dummy,
        packed, code, absmax, ncode, nabs, off,
        M, P, Q, K, K // state.blocksize, float(lora_scale), R,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        lora_l.stride(0) if has_lora else 0, lora_l.stride(1) if has_lora else 0,
        lora_r.stride(0) if has_lora else 0, lora_r.stride(1) if has_lora else 0,
        lora_mask.stride(0) if lora_mask is not None else 0, lora_mask.stride(1) if lora_mask is not None else 0,
        TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_MASK=lora_mask is not None,
        BS=state.blocksize, NESTED=nested, NBS=nbs,
        DOT_FP32=dot_fp32, IEEE=x.dtype == torch.float32 or interp, LORA_FP32=lora_fp32,
        ROW_SCALE=row_scale, PAIR=row_scale and trans_w and pair,
        BLOCK_M=BM, BLOCK_P=BP, BLOCK_Q=BQ, R_PAD=_pow2_at_least(R, 16), GROUP_M=GM, **kw,
    )
    return out


def gemv1_config(K: int, N: int, blocksize: int, interp: bool = False):
    """(BLOCK_N, BLOCK_H, warps, split) of the one-row GEMV, or None where it does not apply
    (``K % blocksize`` != 0, or a blocksize under 32): 64 bytes (128 weights) per row and K tile
    up to the blocksize; on a GPU 256 rows per program of 4 warps, so that each thread holds 16
    packed bytes of 4 rows and each x value it converts serves 4 rows; split-K to about 4
    programs per SM of an H100."""
    if K % blocksize or blocksize < 32:
        return None
    block_h = 16 if interp else min(64, blocksize // 2)
    block_n = 16 if interp else 256
    n_blocks = triton.cdiv(N, block_n)
    split = max(1, min(K // (2 * block_h * 4), triton.cdiv(528, n_blocks)))
    return block_n, block_h, 4, split


_TABLES: dict = {}


def _per_code(code: torch.Tensor, kind: str, build):
    """``build(code)``, cached per live code tensor (weakly: the entry goes with the tensor) and
    its version counter (in-place edits rebuild it), so decoding builds it once per table."""
    key = (id(code), kind)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    value = build(code)
    _TABLES[key] = (weakref.ref(code), code._version, value)
    weakref.finalize(code, _TABLES.pop, key, None)
    return value


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """int64 ``[256]``: entry ``b`` holds ``code[b >> 4]`` (high 32 bits) and ``code[b & 15]``
    (low 32 bits) as fp32 bit patterns, the L1-table GEMV's byte-indexed lookup table (cached
    per code tensor)."""
    def build(c):
        bits = c.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256, device=c.device)
        return (bits[b >> 4] << 32) | bits[b & 15]
    return _per_code(code, "pairs", build)


def register_table(code: torch.Tensor):
    """The 8 int32 words of the register (``prmt``) code table (:func:`nf4_prmt.fp16_planes`), or
    None when ``code`` is not exact to 2^-11 in fp16 (then the L1 table is used). Cached."""
    return _per_code(code, "prmt", lambda c: nf4_prmt.fp16_planes(c) if nf4_prmt.fp16_exact_enough(c) else None)


def _gemv1(x, packed, state, split_k, code, absmax, ncode, nabs, off, nested, nbs, lut):
    N, K = state.shape
    interp = _interpreting()
    block_n, block_h, warps, split = gemv1_config(K, N, state.blocksize, interp)
    split = split_k if split_k > 0 else split
    step = 2 * block_h
    k_per_split = triton.cdiv(triton.cdiv(K, split), step) * step
    split = triton.cdiv(K, k_per_split)
    ws = torch.empty((split, N), dtype=torch.float32, device=x.device)
    words = register_table(code) if lut and not interp else None  # inline PTX: compiled GPU code only
    _gemv1_kernel[(triton.cdiv(N, block_n), split)](
        x, ws, packed, code_pairs(code), absmax, ncode, nabs, off, *(words or (0,) * nf4_prmt.N_TABLE_WORDS),
        N, K, K // state.blocksize, k_per_split, x.stride(1),
        BS=state.blocksize, NESTED=nested, NBS=nbs, BLOCK_N=block_n, BLOCK_H=block_h, LUT=words is not None,
        VEC=min(16, block_h), num_warps=warps,
    )
    return ws.sum(0, keepdim=True).to(x.dtype)


def gemv(x: torch.Tensor, packed: torch.Tensor, state, split_k: int = 0, lut: bool = True) -> torch.Tensor:
    """``x @ W^T`` for few rows (``M <= 16``, decoding); fp32 reductions, output in x.dtype.
    One row with ``K`` a multiple of the blocksize: :func:`_gemv1_kernel`, with the code table in
    registers (``prmt``) when ``lut`` (``Settings.nf4_gemv="triton"``), compiled (not the
    interpreter) and the table is exact in fp16; else the L1 table (``"triton_l1"``)."""
    _check_device(x, packed)
    N, K = state.shape
    M = x.shape[0]
    if M > 16:
        raise ValueError(f"nf4 gemv handles at most 16 rows, got {M}; use matmul")
    code, absmax, ncode, nabs, off, nested, nbs = state_args(state, x.device)
    if M == 1 and gemv1_config(K, N, state.blocksize) is not None:
        return _gemv1(x, packed, state, split_k, code, absmax, ncode, nabs, off, nested, nbs, lut)
    BLOCK_M = 1 if M == 1 else 16
    BLOCK_N, BLOCK_K = (32, 32) if _interpreting() else ((64, 128) if M == 1 else (64, 64))
    row_scale = K % state.blocksize == 0
    if row_scale:  # K tiles inside one quantisation block: one scale load per weight row, not per element
        BLOCK_K = min(BLOCK_K, state.blocksize)
    if split_k <= 0:  # enough programs to fill the GPU: about 4 per SM of an H100
        n_blocks = triton.cdiv(N, BLOCK_N)
        split_k = max(1, min(triton.cdiv(K, BLOCK_K * 4), triton.cdiv(528, n_blocks)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, BLOCK_N), split_k)
    _gemv_kernel[grid](
        x, ws, packed, code, absmax, ncode, nabs, off, M, N, K, K // state.blocksize, k_per_split,
        x.stride(0), x.stride(1),
        BS=state.blocksize, NESTED=nested, NBS=nbs, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        USE_DOT=BLOCK_M > 1, ROW_SCALE=row_scale,
    )
    return ws.sum(0).to(x.dtype)
