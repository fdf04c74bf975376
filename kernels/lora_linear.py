"""Triton kernels and launchers for the LoRA linear ``y = x W^T + b + s * dropout(x) A^T B^T``.

Launchers only (no autograd): :mod:`fastpeft.ops.lora_linear` wires them into a
``torch.autograd.Function``. Shapes: ``x [M, K]`` (any strides), ``W [N, K]`` (any strides:
GPT-2's Conv1D passes ``W.T``), ``A [r, K]``, ``B [N, r]``, ``u = dropout(x) A^T [M, r]``,
``1 <= r <= 256``.

Design (argued, to be confirmed by ``benchmarks/lora_linear.py`` on an H100)
---------------------------------------------------------------------------
FLOPs and bytes for a Llama projection (K = N = 4096, bf16, r = 16, M = 4096): the base GEMM is
2 M N K = 137 GFLOP (~0.2 ms on an H100 at ~700 TFLOP/s dense bf16); the LoRA branch adds
2 M r (K + N) = 1 GFLOP (<1 %), but done eagerly it moves bytes: peft's forward writes a dropout
copy of x (M K), reads it for ``x A^T``, writes ``u B^T`` (M N) and reads it back for the add:
~4 extra passes of 32 MiB, ~45 us at ~3 TB/s, i.e. ~20 % on top of the GEMM, more in backward.
So the fusion targets are *memory passes*, not FLOPs, and the big GEMM should stay as fast as
the best library GEMM. Hence the default plan (``impl="split"``):

forward
    ``y = addmm(b, x, W^T)`` (cuBLAS, bias in its epilogue);
    ``u = dropout(x) A^T`` by :func:`lora_down` - one Triton pass over x, the mask drawn
    from ``(seed, m, k)`` with Philox (:func:`_keep_tile`: one 7-round Philox call per 8 columns,
    16-bit draws against ``round(p * 2^16)``; ~10-15 SASS instructions per element), never stored;
    ``y.addmm_(u, B^T, alpha=s)`` - cuBLAS with beta = 1 accumulates the LoRA branch into y in
    the GEMM epilogue: no separate add pass, no M x N temporary.
    Saved for backward: x (an input anyway), u (M r, tiny) and the integer seed. No mask, no
    dropped copy of x.
backward (``g = s dy B``, ``[M, r]``)
    ``dB = s dy^T u`` (u reused, x A^T never recomputed);
    ``dx = dy W`` (cuBLAS), then with dropout :func:`lora_dx_add` adds ``(g A) * mask`` into dx
    in place (mask regenerated), without dropout ``dx.addmm_(g, A)`` (cuBLAS, beta = 1);
    ``dA = g^T (x * mask)`` by :func:`lora_grad_a` - reads x once, regenerates the mask, splits
    M across programs (fp32 atomics) so the [r, K] output still fills the GPU; without dropout
    it is ``g^T x`` in cuBLAS. ``deterministic=True`` (default: torch's deterministic mode)
    replaces the atomics by one fp32 ``[r, K]`` plane per slice of M, summed in order.
With dropout 0 every LoRA GEMM is a plain cuBLAS call with beta = 1 where it adds, which is the
fastest option for the skinny products; ``impl="kernels"`` forces the Triton down/dx/dA kernels
anyway (tests, benchmarks).

``impl="epilogue"`` moves split's remaining extra passes (the beta = 1 add re-reading y, g and dB
each reading dy, dx_add reading and writing dx) into two Triton GEMMs and one dy kernel:

forward
    ``u`` as in split (:func:`lora_down`, one pass over x); then :func:`lora_epilogue_gemm`
    computes ``y = x W^T + b + (s u) B^T``: after the K loop (wgmma, cp.async pipeline) the LoRA
    product is one more dot of K = r into the same fp32 accumulator, s folded into u's rounding.
backward
    :func:`lora_grad_dy` reads dy once for both ``g = s dy B`` and ``dB = s dy^T u``: programs
    over (row block, column slice); g's partials in a few fp32 planes (one per slice) summed in
    order, dB's in fp32 atomics, or one plane per row block with ``deterministic``;
    ``dx = dy W + mask * (g A)`` is the same GEMM kernel (strides pick the transposes), the mask
    regenerated in the epilogue over (row, output column) and applied to the LoRA product alone;
    ``dA`` is :func:`lora_grad_a` as in split.
Predicted at M = K = N = 4096, r = 16, p = 0.05 (benchmarks/roofline.py, a static model, no GPU):
1.14x the frozen base on an H100 (1.13x H200) against split's 1.25x, **if** the Triton GEMMs run
at cuBLAS' rate; 1.24x if they are 10 % slower. What remains above the base: x read twice (down,
dA: ~25 us), the dy kernel (~18 us with its atomics and planes), the mask in the dx epilogue
(~16 SASS instructions per element, ~9 us, not hidden at 1 CTA per SM) and launches. The default
stays ``split`` until a GPU measures the Triton GEMMs.

``impl="fused"`` is the single-kernel alternative: one Triton GEMM whose K loop loads each x
tile once and feeds two dots (x W^T into the [BM, BN] accumulator, dropout(x) A^T into a
[BM, r] accumulator), then the epilogue adds bias and ``s * u B^T`` and the ``pid_n == 0``
programs write u for backward. It reads x once instead of twice and launches one kernel
instead of three (the win for decoding-sized M), but every column block recomputes u
(r / BN extra tensor-core work, 12 % at r = 16, 50 % at r = 64) and competes with cuBLAS on
the big GEMM; it is limited to r <= 64 (register budget). ``benchmarks/lora_linear.py`` times
split / kernels / epilogue / fused side by side; the op's default stays ``split`` until an H100 run shows
otherwise (``FASTPEFT_LORA_IMPL`` selects one).

Numerics: all dots accumulate in fp32; fp32 inputs use exact ("ieee") dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set, matching cuBLAS' behaviour. The dropout mask
is a pure function of ``(seed, m, k // 8)`` with int64 offsets, identical in every kernel
(:func:`dropout_mask` materialises it for tests); it drops with probability
``round(p * 2^16) / 2^16`` (:func:`dropout_threshold`) and scales by the inverse of what it keeps.
Backward regenerates the mask (dx_add, grad_a) rather than reading a saved 1-bit mask: at
~10-15 instructions per element both stay memory-bound on an H100 (benchmarks/roofline.py), and
regenerating keeps M K / 8 bytes per layer out of the saved activations.
``impl="fused"`` with dropout would regenerate the mask in every output column block, so the op
runs ``split`` instead (with a warning). Under ``TRITON_INTERPRET=1`` tiles are cast
to fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong) and a single small config is
used per kernel (no autotuning on CPU).

Autotuning: configs for H100 (row blocks 16-128, column/K blocks 32-128, 4-8 warps, 3-4
stages; 64+ row blocks take Hopper's ``wgmma`` path), pruned before tuning by a per-thread
register budget and, for tiny M, to small row blocks (``_prune``); keyed on ``K``, the padded
rank, N, and a power-of-two bucket of M (not M itself, so a new sequence length does not
retune). Triton caches the choice per key in-process; ``cache_results=True`` (checked in triton 3.6 and 3.9;
skipped where absent) also keeps it on disk, so tuning happens once per shape.
``benchmarks/aot_lora_linear.py`` compiles every config for sm_90 without a GPU and reports
registers and spills (benchmarks/NOTES-lora-linear.md).
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import interpreting

__all__ = [
    "lora_down",
    "lora_dx_add",
    "lora_grad_a",
    "lora_fused_forward",
    "lora_epilogue_gemm",
    "lora_grad_dy",
    "dropout_mask",
    "interpreting",
    "MAX_RANK",
    "MAX_FUSED_RANK",
]

MAX_RANK = 256
MAX_FUSED_RANK = 64


_INTERPRET = interpreting()


def _pad_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _m_bucket(M: int) -> int:
    return triton.next_power_of_2(max(M, 1))


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact dots unless torch allows tf32 (as cuBLAS does); 16-bit inputs: the tensor-core
    # default (the precision setting only matters for fp32 operands).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _autotune(configs, key, **kw):
    params = inspect.signature(triton.autotune).parameters
    if "cache_results" in params and not _INTERPRET:
        kw["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kw)


def _cfg(kw, warps, stages):
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------- configs
# Largest row blocks first (down, grad_a): autotuning times every kept config either way, but the first one
# kept is what runs before tuning and what benchmarks/aot.py reports as representative. At
# training M the big tiles issue the fewest SASS instructions per element (the dropout down
# kernel at r = 64, 4096^3: 13.7 at 128 rows, 8 warps, against 25.8 at 16 rows, 4 warps;
# benchmarks/aot_lora_linear.py); for tiny M the pruning drops them and leaves the small ones.
ROW_BLOCKS_LARGE_FIRST = (128, 64, 32, 16)

def _down_configs():
    if _INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_K": 32}, 4, 1)]
    out = []
    for bm in ROW_BLOCKS_LARGE_FIRST:
        for bk in (64, 128):
            for w in (4, 8):
                out.append(_cfg({"BLOCK_M": bm, "BLOCK_K": bk}, w, 3))
    return out


def _regs_ok(c, args, acc_elems: int, rng_elems: int, acc_limit: int = 64, total_limit: int = 80,
             operand_elems: int = 0) -> bool:
    """Heuristic register budget per thread (fp32 elements): the accumulator(s), plus one Philox
    value per element of the tile that carries the dropout mask. It drops the configs that are
    sure to spill; ``benchmarks/aot_lora_linear.py`` compiles what it keeps for sm_90 and reports
    registers and local memory (some kept configs still spill a little with some triton
    versions; autotuning then times them out of the choice)."""
    threads = 32 * c.num_warps
    acc = acc_elems / threads
    rng = rng_elems / threads if args.get("HAS_DROPOUT", True) else 0
    # operand tiles held in registers: two 16-bit values per 32-bit register, one fp32 value
    opnd = operand_elems * _elem_bytes(args) / (4 * threads)
    return acc <= acc_limit and rng <= 32 and acc + rng + opnd <= total_limit


def _elem_bytes(args) -> int:
    """Bytes per input element: from the first tensor argument, else ``ELEM_BYTES`` (default 2)."""
    for name in ("x_ptr", "g_ptr"):
        t = args.get(name)
        if hasattr(t, "element_size"):
            return t.element_size()
    return int(args.get("ELEM_BYTES", 2))


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        rp, m = args["R_PAD"], args["M"]
        if kind == "dy" and args.get("DETERMINISTIC", False):  # the row block fixes the dB plane count
            configs = [c for c in configs if c.kwargs["BLOCK_M"] == _dy_det_block_m(m)]
        keep = []
        for c in configs:
            bm, bk = c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_K", 64)
            if bm > 16 and bm >= 2 * triton.next_power_of_2(max(m, 1)):  # tiny M: small row blocks only
                continue
            if kind == "down":  # + the A^T tile [BK, R_PAD]: large ranks spilled without it (aot script)
                ok = _regs_ok(c, args, bm * rp, bm * bk, total_limit=72, operand_elems=bk * rp)
            elif kind == "dx":
                ok = _regs_ok(c, args, bm * bk, bm * bk, acc_limit=32, total_limit=64)
            elif kind == "da":
                br = args["BLOCK_R"]  # + the g^T [BR, BM] and x [BM, BK] operand tiles
                ok = _regs_ok(c, args, br * bk, bm * bk, total_limit=72, operand_elems=br * bm + bm * bk)
                if _elem_bytes(args) == 4:  # fp32 "ieee" dots are FMA loops over BM held in registers:
                    # every 64- and 128-row block spilled on sm_90 (264-2440 B), as did a [64, 128] acc
                    ok = ok and bm <= 32 and br * bk <= 16 * 32 * c.num_warps
            elif kind == "epi":
                ok = _epi_regs_ok(c, args)
            elif kind == "dy":
                ok = _dy_config_ok(c, args)
            else:  # fused: [BM, BN] and [BM, R_PAD] accumulators (+ the x and W^T operand tiles: fp32
                # 128x128x64 kept 1.9 KB of local memory per thread on sm_90 without them)
                bn = c.kwargs["BLOCK_N"]
                ok = _regs_ok(c, args, bm * bn + bm * rp, bm * bk, acc_limit=80,
                              total_limit=104 if _elem_bytes(args) == 4 else 136, operand_elems=bm * bk + bk * bn)
            if ok:
                keep.append(c)
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_K", 64) / c.num_warps)]

    return prune


def _dx_configs():
    if _INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_K": 32}, 4, 1)]
    out = []
    for bm in (32, 64, 128):  # small first: at 128 rows the dropout mask cost 16.0-16.1 instrs/elem, at 32 14.7-14.9
        for bk in (64, 128):
            for w in (4, 8):
                out.append(_cfg({"BLOCK_M": bm, "BLOCK_K": bk}, w, 3))
    return out


def _da_configs():
    if _INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_K": 32}, 4, 1)]
    out = []
    for bm in ROW_BLOCKS_LARGE_FIRST[:-1]:
        for bk in (32, 64, 128):
            for w in (4, 8):
                out.append(_cfg({"BLOCK_M": bm, "BLOCK_K": bk}, w, 3))
    return out


def _fused_configs():
    if _INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 1)]
    out = []
    # Picked with benchmarks/aot_lora_linear.py (sm_90, bf16, triton 3.6): configs that spilled
    # hundreds of bytes per thread there ((64,128,64,4w), (16,128,128), (16,64,128,4w),
    # (32,128,64,4w)) were replaced by 8-warp or narrower tiles that do not.
    for bm, bn, bk, w, s in (
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 8, 4),
        (64, 64, 64, 8, 4),
        (64, 64, 32, 4, 4),
        (16, 64, 64, 4, 4),  # decode-sized M (no wgmma below 64 rows)
        (16, 64, 128, 8, 4),
        (32, 64, 64, 4, 4),
        (32, 128, 64, 8, 4),
    ):
        out.append(_cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, s))
    return out


def _epi_configs():
    if _INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 1)]
    out = []
    # H100 GEMM tiles: 128 x 256 and 128 x 128 with 8 warps (two warpgroups of wgmma) are what
    # the big training shapes use (Triton's own H100 matmul configs); 64-row tiles for mid-size
    # M; 16 / 32 rows for decode-sized M (no wgmma below 64 rows).
    for bm, bn, bk, w, s in (
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (16, 64, 64, 4, 4),
        (16, 128, 64, 4, 4),
    ):
        out.append(_cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, s))
    return out


def _epi_regs_ok(c, args) -> bool:
    """Register budget of the LoRA-epilogue GEMM (fp32 elements per thread). The main loop holds
    the [BM, BN] accumulator (operands stream through shared memory); with dropout the epilogue
    also holds the masked LoRA product (a second [BM, BN] tile) and the Philox draws of the mask
    tile (one int32 per element while the keep-mask is formed)."""
    threads = 32 * c.num_warps
    tile = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / threads
    if _elem_bytes(args) == 4:  # fp32 operands: ieee FMA dots keep their tiles in registers
        tile *= 1.5
    if args.get("HAS_DROPOUT", True):
        return 3 * tile <= 200
    return tile <= 128


def _dy_det_block_m(M: int) -> int:
    """The row block of the dy kernel in deterministic mode: the launcher allocates one dB plane
    per row block, so the block (hence the plane count) is fixed before autotuning."""
    if _INTERPRET:
        return 32
    return 128 if M >= 256 else 16


def _dy_configs():
    if _INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 1)]
    out = []
    # 128-row blocks first: dB's atomics (or deterministic planes) scale with M / BLOCK_M
    for bm in (128, 64, 16):
        for bn in (64, 128):
            for w in (8, 4):
                out.append(_cfg({"BLOCK_M": bm, "BLOCK_N": bn}, w, 3))
    return out


def _dy_config_ok(c, args) -> bool:
    bm, bn, rp = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args["R_PAD"]
    # g accumulator [BM, R_PAD] and the dB partial [BN, R_PAD], plus the dy and u tiles
    return _regs_ok(c, dict(args, HAS_DROPOUT=False), bm * rp + bn * rp, 0, operand_elems=bm * bn + bm * rp)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``; ``UPCAST`` widens 16-bit tiles to fp32 first (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# Philox-4x32 with 7 rounds: the smallest round count its authors found to pass TestU01's
# BigCrush (Salmon et al., SC'11; 10 is triton's and cuRAND's default, kept as a safety margin).
# Seven save ~2 SASS instructions per masked element on sm_90 (benchmarks/aot.py).
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _keep_tile(seed, offs_m, k_start, K, thresh, BLOCK_K: tl.constexpr):
    """Boolean keep-mask of the tile ``[offs_m, k_start : k_start + BLOCK_K]`` (``k_start`` a
    multiple of 8).

    One Philox call (``tl.philox``: four 32-bit words) per group of 8 consecutive columns, its
    counter ``(k // 8, m, 0, 0)``: each word gives two 16-bit draws, and a column is kept when
    its draw is ``>= thresh`` (``round(p * 2^16)``). The counter's words are handed over as a row
    ``[1, BK/8]`` and a column ``[BM, 1]``: Philox's first two rounds mix only one of them per word,
    so they run on those vectors, not on the tile (~2 of the 7 rounds saved per element; an int64
    ``m * groups + k // 8`` offset through ``tl.randint4x`` also cost its 64-bit arithmetic).
    ``tl.rand`` ran one Philox call per element and kept one of its four words: ~70 SASS
    instructions per element on sm_90 against ~10 here (benchmarks/aot_lora_linear.py --mask-cost).
    ``K`` is unused (the counter needs no row length); it stays so every caller passes the same."""
    kg = (k_start // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.uint32)
    rows = offs_m.to(tl.uint32)  # M < 2^32 rows
    w0, w1, w2, w3 = tl.philox(seed, kg[None, :], rows[:, None], 0, 0, PHILOX_ROUNDS)
    # the 16-bit draws stay uint32 (the high half is then a logical shift, no mask), joined and
    # reshaped to the tile, then one unsigned integer compare per column (joining booleans instead
    # cost an int->float convert and a float compare per column on sm_90)
    words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [BM, BK/8, 2, 2]: word 2 a + c at [.., a, c]
    halves = tl.join(words & 0xFFFF, words >> 16)  # [BM, BK/8, 2, 2, 2]
    # -> [BM, BK]: column k_start + 8 j + 4 a + 2 c + b is word (2 a + c), half b
    draws = tl.reshape(halves, (offs_m.shape[0], BLOCK_K))
    return draws >= thresh


# ----------------------------------------------------------------------------- kernels
@_autotune(_down_configs(), key=["K", "R_PAD", "M_BUCKET"], prune_configs_by={"early_config_prune": _prune("down")})
@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, u_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
    seed, thresh, scale,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    offs_r = tl.arange(0, R_PAD)
    offs_k0 = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # A^T tile [BK, R_PAD]
        if HAS_DROPOUT:  # the 1 / (1 - p) scale is applied to the fp32 sum once, after the loop
            x = tl.where(_keep_tile(seed, offs_m, k0, K, thresh, BLOCK_K), x, 0.0).to(x.dtype)
        acc = _dot(x, a, acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = acc * scale
    tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
             acc.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@_autotune(_dx_configs(), key=["K", "R_PAD", "M_BUCKET"], restore_value=["dx_ptr"],
           prune_configs_by={"early_config_prune": _prune("dx")})
@triton.jit
def _lora_dx_add_kernel(
    dx_ptr, g_ptr, a_ptr,
    M, K, R, M_BUCKET,
    stride_dxm, stride_dxk, stride_gm, stride_gr, stride_ar, stride_ak,
    seed, thresh, scale,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[m, k] += mask[m, k] * sum_r g[m, r] A[r, k]  (in place).

    The rank is reduced in chunks of ``R_CHUNK``: one dot over the whole padded rank compiled for
    sm_90 into kilobytes of local memory per thread for fp32 "ieee" dots at r >= 64
    (benchmarks/aot_lora_linear.py)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    k_ok = offs_k < K
    d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in tl.static_range(0, R_PAD, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_ok = offs_r < R
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        d = _dot(g, a, d, UPCAST, PRECISION)
    ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    io_mask = m_ok[:, None] & k_ok[None, :]
    dx = tl.load(ptrs, mask=io_mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:  # masked in dx's (load) layout, where d is converted to anyway for the add
        out = tl.where(_keep_tile(seed, offs_m, pid_k * BLOCK_K, K, thresh, BLOCK_K), dx + d * scale, dx)
    else:
        out = dx + d
    tl.store(ptrs, out.to(dx_ptr.dtype.element_ty), mask=io_mask)


@_autotune(_da_configs(), key=["K", "R_PAD", "M_BUCKET"], reset_to_zero=["da_ptr"],
           prune_configs_by={"early_config_prune": _prune("da")})
@triton.jit
def _lora_grad_a_kernel(
    da_ptr, g_ptr, x_ptr,
    M, K, R, M_BUCKET,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_das, stride_dar, stride_dak,
    seed, thresh, scale,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[r, k] += sum_m g[m, r] * (x * mask)[m, k] over this program's slice of M: fp32 atomics
    into ``[r, K]``, or (``DETERMINISTIC``) a plain store into this slice's own ``[r, K]`` plane of
    ``da_ptr`` (stride ``stride_das``), summed afterwards in a fixed order."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    chunk = tl.cdiv(tl.cdiv(M, n_split), BLOCK_M) * BLOCK_M
    m_start = pid_s.to(tl.int64) * chunk  # int64 rows: M * K may pass 2^31
    m_end = tl.minimum(m_start + chunk, M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        gt = tl.load(g_ptr + offs_r[:, None] * stride_gr + offs_m[None, :] * stride_gm,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # g^T tile [BR, BM]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:  # scale applied once to the fp32 sum
            x = tl.where(_keep_tile(seed, offs_m, pid_k * BLOCK_K, K, thresh, BLOCK_K), x, 0.0).to(x.dtype)
        acc = _dot(gt, x, acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = acc * scale
    if DETERMINISTIC:
        tl.store(da_ptr + pid_s * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, acc,
                 mask=r_ok[:, None] & k_ok[None, :])
    elif m_start < M:
        tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, acc,
                      mask=r_ok[:, None] & k_ok[None, :])


@_autotune(_fused_configs(), key=["N", "K", "R_PAD", "M_BUCKET"],
           prune_configs_by={"early_config_prune": _prune("fused")})
@triton.jit
def _lora_fused_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_um, stride_ur,
    seed, thresh, scale, s,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_U: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """y = x W^T + b + s * (dropout(x) A^T) B^T in one K loop; writes u = dropout(x) A^T once."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * K may pass 2^31
    offs_r = tl.arange(0, R_PAD)
    offs_k0 = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    uacc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # W^T tile [BK, BN]
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # A^T tile [BK, R_PAD]
        acc = _dot(x, wt, acc, UPCAST, PRECISION)
        xd = x
        if HAS_DROPOUT:  # scale applied once to the fp32 sum
            xd = tl.where(_keep_tile(seed, offs_m, k0, K, thresh, BLOCK_K), x, 0.0).to(x.dtype)
        uacc = _dot(xd, at, uacc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        uacc = uacc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    u = uacc.to(u_ptr.dtype.element_ty)  # u as saved for backward (rounded like the split path)
    # s folded into the rounded operand (one rounding, like u itself) so the LoRA product
    # accumulates straight into acc: no second [BM, BN] accumulator (registers)
    us = (uacc * s).to(u_ptr.dtype.element_ty)
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=n_ok[None, :] & r_ok[:, None], other=0.0)  # B^T tile [R_PAD, BN]
    acc = _dot(us, bt, acc, UPCAST, PRECISION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if WRITE_U:
        if pid_n == 0:
            tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u,
                     mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_rank_product(l_ptr, r_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rr, stride_rn,
                       lora_scale, acc, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``acc + round(lora_scale * L[offs_m, :]) @ Rt[:, offs_n]`` over the padded rank, in chunks of
    ``R_CHUNK`` (fp32 "ieee" dots over a whole 64+ rank spilled on sm_90: see ``_lora_dx_add_kernel``).
    The scale is folded into the left operand before it is rounded to the dot's dtype (one
    rounding, as for u itself), so the product accumulates straight into ``acc``."""
    for r0 in tl.static_range(0, R_PAD, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_ok = offs_r < R
        lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        lt = (lt.to(tl.float32) * lora_scale).to(DOT_DTYPE)
        rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(lt, rt, acc, UPCAST, PRECISION)
    return acc


@_autotune(_epi_configs(), key=["N", "K", "R_PAD", "M_BUCKET", "HAS_DROPOUT"],
           prune_configs_by={"early_config_prune": _prune("epi")})
@triton.jit
def _lora_epilogue_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, l_ptr, r_ptr, out_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    seed, thresh, lora_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """``out[M, N] = a[M, K] @ b[K, N] + bias + keep * (round(lora_scale * L[M, R]) @ Rt[R, N])``.

    The strides say which operand is transposed: the forward passes ``a = x``, ``b = W^T``,
    ``L = u``, ``Rt = B^T``, ``lora_scale = s``; the dx backward ``a = dy``, ``b = W``,
    ``L = g``, ``Rt = A``, ``lora_scale = 1 / (1 - p)`` with ``HAS_DROPOUT``: the mask of the
    element ``(m, n)`` of the output (x's ``(m, k)``), regenerated by ``_keep_tile``, applies to
    the LoRA product only."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # GROUP_M row blocks share each W column block while it is in L2
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * K may pass 2^31
    offs_k0 = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_ok = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dt = a_ptr.dtype.element_ty
    if HAS_DROPOUT:  # the mask multiplies the LoRA product alone: a second tile, masked, then added
        d = _lora_rank_product(l_ptr, r_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rr,
                               stride_rn, lora_scale, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                               R_PAD, R_CHUNK, UPCAST, PRECISION, dt)
        acc += tl.where(_keep_tile(seed, offs_m, pid_n * BLOCK_N, N, thresh, BLOCK_N), d, 0.0)
    else:
        acc = _lora_rank_product(l_ptr, r_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rr,
                                 stride_rn, lora_scale, acc, R_PAD, R_CHUNK, UPCAST, PRECISION, dt)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@_autotune(_dy_configs(), key=["N", "R_PAD", "M_BUCKET", "DETERMINISTIC"], reset_to_zero=["db_ptr"],
           prune_configs_by={"early_config_prune": _prune("dy")})
@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, u_ptr, g_ptr, db_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur,
    stride_gs, stride_gm, stride_gr, stride_dbs, stride_dbn, stride_dbr,
    s,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """From one read of ``dy``: ``g = s dy B`` (``[M, r]``) and ``dB = s dy^T u`` (``[N, r]``).

    Program ``(i, j)`` takes row block ``i`` of dy and the ``j``-th of ``num_programs(1)`` slices
    of its columns. g's reduction (over N) stays in registers along the slice and is stored into
    the fp32 plane ``j`` of ``g_ptr`` (a few planes, summed in order after); dB's reduction (over
    M) meets across row blocks: each column block's ``[BN, r]`` partial is an fp32 atomic add into
    ``db_ptr``, or (``DETERMINISTIC``) a plain store into row block ``i``'s own plane, summed in
    order after. Why this way round: g is ``[M, r]`` and dB ``[N, r]``; splitting N into a few
    slices keeps g's partials to a few planes of ``M r`` fp32 while dB takes ``M / BM`` partials
    of ``N r`` fp32, which are tiny against dy (``M N`` elements) when BM >= 64 (8 MiB of fp32
    atomics against 32 MiB of dy at 4096^2, r = 16, BM = 128), and atomics in L2 need no
    second pass. The other way round (programs over column blocks, M split) mirrors the cost."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(N, n_split), BLOCK_N) * BLOCK_N
    n_start = pid_s * chunk
    n_end = tl.minimum(n_start + chunk, N)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * N may pass 2^31
    offs_r = tl.arange(0, R_PAD)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    r_ok = offs_r < R
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < n_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # B tile [BN, R_PAD]
        g = _dot(dy, bt, g, UPCAST, PRECISION)
        db = _dot(tl.trans(dy), u, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), UPCAST, PRECISION) * s
        db_off = offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
        db_mask = n_ok[:, None] & r_ok[None, :]
        if DETERMINISTIC:
            tl.store(db_ptr + pid_m.to(tl.int64) * stride_dbs + db_off, db, mask=db_mask)
        else:
            tl.atomic_add(db_ptr + db_off, db, mask=db_mask)
    # every plane element is written (zeros where the slice has no columns): no zero fill needed
    tl.store(g_ptr + pid_s * stride_gs + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr, g * s,
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, thresh, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = tl.where(_keep_tile(seed, offs_m, tl.program_id(1) * BLOCK_K, K, thresh, BLOCK_K), scale, 0.0)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], mk,
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------- launchers
THRESH_BITS = 16


def dropout_threshold(p: float) -> Tuple[int, float]:
    """``(thresh, p_eff)``: a column is dropped when its 16-bit draw is ``< thresh =
    round(p * 2^16)``, so the kernels drop with probability ``p_eff = thresh / 2^16`` (within
    2^-17 of ``p``; a ``p > 0`` too small to round to 1/65536 still drops with that probability) and
    scale kept values by ``1 / (1 - p_eff)``, which keeps the expectation exact."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    full = 1 << THRESH_BITS
    thresh = 0 if p == 0.0 else min(full, max(1, round(p * full)))
    return thresh, thresh / full


def _dropout_args(p: float) -> Tuple[bool, int, float]:
    thresh, p_eff = dropout_threshold(p)
    scale = 0.0 if p_eff >= 1.0 else 1.0 / (1.0 - p_eff)
    return thresh > 0, thresh, float(scale)


def _check_rank(r: int) -> None:
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"LoRA rank r={r} is outside the Triton kernels' range 1..{MAX_RANK}; "
                         "use the reference backend (FASTPEFT_BACKEND=reference) for larger ranks.")


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: int = 0, p: float = 0.0,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``u = dropout(x) A^T`` (``[M, r]``) in one pass over ``x``; the mask comes from ``seed``."""
    M, K = x.shape
    R = lora_A.shape[0]
    _check_rank(R)
    has, thresh, scale = _dropout_args(p)
    u = torch.empty((M, R), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0:
        return u
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _lora_down_kernel[grid](
        x, lora_A, u, M, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), u.stride(0), u.stride(1),
        seed, thresh, scale,
        HAS_DROPOUT=has, R_PAD=_pad_rank(R), UPCAST=_INTERPRET, PRECISION=_precision(x.dtype),
    )
    return u


def _dx_rank_chunk(r_pad: int, precision: str) -> int:
    # fp32 "ieee" dots are FMA loops: keep their reduction short; tensor-core dots take 64 at once
    return 16 if precision == "ieee" else min(r_pad, 64)


def lora_dx_add(dx: torch.Tensor, g: torch.Tensor, lora_A: torch.Tensor, seed: int = 0, p: float = 0.0) -> torch.Tensor:
    """In place: ``dx += (g @ A) * mask`` (mask regenerated from ``seed``); returns ``dx``."""
    M, K = dx.shape
    R = lora_A.shape[0]
    _check_rank(R)
    has, thresh, scale = _dropout_args(p)
    g = g.to(lora_A.dtype)
    if M == 0:
        return dx
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
    _lora_dx_add_kernel[grid](
        dx, g, lora_A, M, K, R, _m_bucket(M),
        dx.stride(0), dx.stride(1), g.stride(0), g.stride(1), lora_A.stride(0), lora_A.stride(1),
        seed, thresh, scale,
        HAS_DROPOUT=has, R_PAD=_pad_rank(R), R_CHUNK=_dx_rank_chunk(_pad_rank(R), _precision(dx.dtype)),
        UPCAST=_INTERPRET, PRECISION=_precision(dx.dtype),
    )
    return dx


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _deterministic(flag: Optional[bool]) -> bool:
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def lora_grad_a(g: torch.Tensor, x: torch.Tensor, seed: int = 0, p: float = 0.0,
                out_dtype: Optional[torch.dtype] = None, deterministic: Optional[bool] = None) -> torch.Tensor:
    """``dA = g^T (x * mask)`` (``[r, K]``), reading ``x`` once and regenerating the mask.

    M is split across programs so the small output still fills the GPU. Their partial sums meet
    in fp32 atomics (order, so the last bits, vary run to run) unless ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``): then each slice stores its own ``[r, K]``
    plane and the planes are summed in order (``splits * r * K * 4`` bytes more, a few MiB at
    most; same kernel otherwise)."""
    M, K = x.shape
    R = g.shape[1]
    _check_rank(R)
    has, thresh, scale = _dropout_args(p)
    g = g.to(x.dtype)
    det = _deterministic(deterministic)
    if M == 0:
        return torch.zeros((R, K), device=x.device, dtype=out_dtype or x.dtype)
    sms = _num_sms(x.device)
    block_r = min(_pad_rank(R), 128)  # r = 256: two row blocks (x read twice) to bound registers
    max_split = max(1, min(2 * sms, triton.cdiv(M, 4 * 16)))  # the grid's split is never above this

    def grid(meta):
        tiles = triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(R, block_r)
        split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, 4 * meta["BLOCK_M"]), max_split))
        return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, block_r), split)

    # deterministic: one zeroed [r, K] plane per possible slice (unused planes stay zero)
    da = torch.zeros((max_split if det else 1, R, K), device=x.device, dtype=torch.float32)
    _lora_grad_a_kernel[grid](
        da, g, x, M, K, R, _m_bucket(M),
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1), da.stride(2),
        seed, thresh, scale,
        HAS_DROPOUT=has, R_PAD=_pad_rank(R), BLOCK_R=block_r, UPCAST=_INTERPRET,
        PRECISION=_precision(x.dtype), DETERMINISTIC=det,
    )
    return (da.sum(0) if det else da[0]).to(out_dtype or x.dtype)


def lora_fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, seed: int = 0,
                       p: float = 0.0, write_u: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One-kernel forward: returns ``(y, u)`` (``u`` None unless ``write_u``). ``r <= 64``."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    if not 1 <= R <= MAX_FUSED_RANK:
        raise ValueError(f"the fused single-kernel LoRA forward supports r <= {MAX_FUSED_RANK}, got r={R}; "
                         "use impl='split'.")
    has, thresh, scale = _dropout_args(p)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=x.dtype) if write_u else None
    if M == 0:
        return y, u
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    u_arg = u if u is not None else y
    _lora_fused_fwd_kernel[grid](
        x, weight, bias if bias is not None else y, lora_A, lora_B, y, u_arg,
        M, N, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), u_arg.stride(0), u_arg.stride(1),
        seed, thresh, scale, float(scaling),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has, WRITE_U=u is not None,
        R_PAD=_pad_rank(R), UPCAST=_INTERPRET, PRECISION=_precision(x.dtype),
    )
    return y, u


def lora_epilogue_gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], lora_l: torch.Tensor,
                       lora_r: torch.Tensor, lora_scale: float, seed: int = 0, p: float = 0.0) -> torch.Tensor:
    """``a @ b + bias + mask * (round(lora_scale * lora_l) @ lora_r)`` in one Triton GEMM.

    ``a [M, K]``, ``b [K, N]``, ``lora_l [M, r]``, ``lora_r [r, N]``, any strides (pass views:
    ``W.t()``, ``B.t()``); ``bias [N]`` or None; the output is a new contiguous ``[M, N]`` tensor
    in ``a``'s dtype. The LoRA product is one more tensor-core dot (K = r) in the epilogue into the
    GEMM's fp32 accumulator. With ``p > 0`` the product is multiplied by the dropout mask of
    ``(seed, m, n)`` (n the output column: x's k in the dx backward), ``lora_scale`` then
    carrying ``1 / (1 - p)``."""
    M, K = a.shape
    N = b.shape[1]
    R = lora_l.shape[1]
    _check_rank(R)
    if tuple(b.shape) != (K, N) or tuple(lora_r.shape) != (R, N) or lora_l.shape[0] != M:
        raise ValueError(f"lora_epilogue_gemm: a {tuple(a.shape)}, b {tuple(b.shape)}, lora_l {tuple(lora_l.shape)}, "
                         f"lora_r {tuple(lora_r.shape)} do not fit (expected [M, K], [K, N], [M, r], [r, N]).")
    has, thresh, _ = _dropout_args(p)
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    rp, prec = _pad_rank(R), _precision(a.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lora_epilogue_gemm_kernel[grid](
        a, b, bias if bias is not None else out, lora_l, lora_r, out,
        M, N, K, R, _m_bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), lora_l.stride(0), lora_l.stride(1),
        lora_r.stride(0), lora_r.stride(1), out.stride(0), out.stride(1),
        seed, thresh, float(lora_scale),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has, R_PAD=rp, R_CHUNK=_dx_rank_chunk(rp, prec),
        UPCAST=_INTERPRET, PRECISION=prec,
    )
    return out


def _dy_split(M: int, N: int, device: torch.device) -> int:
    """Column slices of the dy kernel (its g planes): enough programs to fill the GPU about four
    times over at a nominal 64-row block, at most 16 planes, at least 64 columns per slice."""
    return max(1, min(16, triton.cdiv(4 * _num_sms(device), triton.cdiv(M, 64)), triton.cdiv(N, 64)))


def lora_grad_dy(dy: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor, scaling: float,
                 deterministic: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g, dB) = (s dy B, s dy^T u)`` (fp32 ``[M, r]`` and ``[N, r]``) from one pass over ``dy``.

    dB's partial sums over row blocks meet in fp32 atomics (order, so the last bits, vary run to
    run) unless ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``):
    then each row block stores its own ``[N, r]`` plane (``M / 128`` planes at M >= 256:
    ``4 M N r / 128`` bytes, 8 MiB at 4096^2, r = 16) and the planes are summed in order. g's
    partials (a few ``[M, r]`` planes, one per column slice) are always summed in order."""
    M, N = dy.shape
    R = lora_B.shape[1]
    _check_rank(R)
    if tuple(lora_B.shape) != (N, R) or tuple(u.shape) != (M, R):
        raise ValueError(f"lora_grad_dy: dy {tuple(dy.shape)}, lora_B {tuple(lora_B.shape)}, u {tuple(u.shape)} "
                         "do not fit (expected [M, N], [N, r], [M, r]).")
    det = _deterministic(deterministic)
    if M == 0:
        return (torch.zeros((M, R), device=dy.device, dtype=torch.float32),
                torch.zeros((N, R), device=dy.device, dtype=torch.float32))
    u = u.to(dy.dtype)
    lora_B = lora_B.to(dy.dtype)
    split = _dy_split(M, N, dy.device)
    g = torch.empty((split, M, R), device=dy.device, dtype=torch.float32)
    # deterministic: every element of the per-row-block planes is stored (no zero fill)
    db = (torch.empty((triton.cdiv(M, _dy_det_block_m(M)), N, R), device=dy.device, dtype=torch.float32) if det
          else torch.zeros((1, N, R), device=dy.device, dtype=torch.float32))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), split)  # noqa: E731
    _lora_dy_kernel[grid](
        dy, lora_B, u, g, db, M, N, R, _m_bucket(M),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1),
        g.stride(0), g.stride(1), g.stride(2), db.stride(0), db.stride(1), db.stride(2),
        float(scaling),
        R_PAD=_pad_rank(R), UPCAST=_INTERPRET, PRECISION=_precision(dy.dtype), DETERMINISTIC=det,
    )
    return (g[0] if split == 1 else g.sum(0)), (db.sum(0) if det else db[0])


def dropout_mask(seed: int, p: float, M: int, K: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The ``[M, K]`` dropout mask (0 or ``1/(1-p)``) the kernels use for ``seed`` (for tests)."""
    has, thresh, scale = _dropout_args(p)
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if not has:
        return out.fill_(1.0).to(dtype)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, seed, thresh, scale, BLOCK_M=32, BLOCK_K=32)
    return out.to(dtype)
