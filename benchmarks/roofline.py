"""Predicted H100 / H200 times for fastpeft's plans, from the sm_90 code ``benchmarks/aot.py`` reads.

**Predictions, not measurements.** No GPU was used. Each kernel's time is the largest of three
floors plus a launch gap:

* bytes it must move / HBM bandwidth (H100 ~3.0 TB/s reached of 3.35, H200 ~4.3 of 4.8);
* tensor-core FLOPs / ~700 TFLOP/s dense bf16 (what cuBLAS reaches, of ~990 on the datasheet);
* SASS instructions it issues / issue rate: 132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz. The
  instructions per element (per weight for NF4) of the Triton kernels' main loops come from
  ``aot.compile_spec`` (the JIT's specialisation, sm_90, triton on this machine); cuBLAS GEMMs
  are taken at the FLOP or byte floor;
* (NF4 GEMV) integer-ALU instructions / the ALU pipe's rate: LOP3, SHF, PRMT, IADD3, LEA, ...
  (``aot.ALU_OPS``) issue to a 16-lane pipe per scheduler, half the issue rate (NVIDIA's pipe
  description for Volta onwards; CUDA guide: 64 integer results per clock per SM on sm_80/90),
  while FFMA / IMAD / HADD2 go to the FMA pipes;
* (NF4 GEMV, L1 code table) L1 wavefronts / one per clock per SM: a warp's gather of 32 random
  8-byte entries of the 2 KB byte-pair table touches ~14 of its 16 128-byte lines and ~25 of its
  64 sectors; the L1 tag stage resolves 4 lines (16 sectors) per cycle (NVIDIA, Volta onwards,
  assumed unchanged on Hopper), so each gather takes ~4 cycles for 64 weights
  (:func:`table_gather_wavefronts`: NF4 bins are equiprobable, so bytes are taken uniform).

Plans modelled (``M`` tokens, ``x [M, K]``, ``W [N, K]``, rank ``r``, bf16):

* LoRA forward+backward with dropout: the frozen base (2 GEMMs), fastpeft's ``split`` plan (its
  launches, with the mask regenerated in dx_add and grad_a, or alternatively a saved 1-bit mask),
  eager peft (dropout copy, mask, separate adds), the ``fused`` forward (mask regenerated per
  column block), and the ``epilogue`` plan (:func:`lora_epilogue_plan`: LoRA products in Triton
  GEMM epilogues, **assumed at cuBLAS' GEMM rate**, with a column for 10 % slower). Targets:
  fastpeft / base <= 1.10, eager / fastpeft >= 1.2.
* NF4 GEMV at M = 1: fraction of HBM bandwidth on the packed weight (target >= 70 %), for the
  register-table (``prmt``, the default) and the L1-table builds of the one-row GEMV.
* QLoRA forward+backward at training M: fused dequant-GEMM vs dequantise + cuBLAS, over bf16
  dense (target <= 1.15), and dequantise + the LoRA ``epilogue`` plan's Triton GEMMs (assumed at
  cuBLAS' rate, as above) with ``lora_impl="epilogue"`` (:func:`qlora_train_plans`).
* Shared-prefix attention forward+backward (``--only prefix``): fastpeft's four kernels from their
  compiled innermost loops, as a range (softmax overlapped with / serial to the tensor cores),
  against peft's masked SDPA (memory-efficient kernel, float bias, no causal skipping) and the
  alternatives for the same math - FA2 / cuDNN on the concatenation, and the log-sum-exp hybrid -
  at public H100 rates (:data:`SDPA_TFLOPS`). Targets: masked / fastpeft >= 1.3, best alt /
  fastpeft >= 1.

Usage: ``python benchmarks/roofline.py [--device H100 H200]`` prints the tables (markdown).
No ``run()``: ``benchmarks/run.py`` skips it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICES = {  # reachable rates (leads: measure both ceilings once on a GPU and replace them)
    "H100": dict(bw=3.0e12, tc=700e12, sms=132, clock=1.755e9),
    "H200": dict(bw=4.3e12, tc=700e12, sms=132, clock=1.755e9),
}
LANES_PER_SM_CLOCK = 128  # 4 warp schedulers x 32 lanes, one instruction each per clock
LAUNCH_GAP_S = 1.0e-6  # between back-to-back kernels on a busy stream (assumption)
BF16 = 2


def kernel_s(dev: dict, bytes_=0.0, flops=0.0, instrs=0.0, alu=0.0, l1_wavefronts=0.0) -> float:
    """One kernel's predicted seconds: the largest floor plus a launch gap (``alu``: integer-ALU
    instructions, at half the issue rate; ``l1_wavefronts``: L1 cycles, one per clock per SM)."""
    issue = dev["sms"] * LANES_PER_SM_CLOCK * dev["clock"]
    return max(bytes_ / dev["bw"], flops / dev["tc"], instrs / issue, 2.0 * alu / issue,
               l1_wavefronts / (dev["sms"] * dev["clock"])) + LAUNCH_GAP_S


def table_gather_wavefronts(lanes: int = 32, entry_bytes: int = 8, entries: int = 256, warps: int = 20000,
                            seed: int = 0) -> float:
    """Mean L1 wavefronts of one warp's gather of ``lanes`` uniform random entries of a table of
    ``entries`` x ``entry_bytes`` (the L1-table GEMV's byte-pair lookup): max(lines / 4, sectors /
    16) per request, rounded up (the tag stage's 4 lines or 16 sectors per cycle), over a seeded
    sample of warps."""
    import random

    rng = random.Random(seed)
    total = 0
    for _ in range(warps):
        idx = [rng.randrange(entries) for _ in range(lanes)]
        lines = len({i * entry_bytes // 128 for i in idx})
        sectors = len({i * entry_bytes // 32 for i in idx})
        total += max(-(-lines // 4), -(-sectors // 16))
    return total / warps


def gemm_s(dev, M, N, K, extra_bytes=0.0) -> float:
    """cuBLAS GEMM ``[M, K] x [K, N]`` in bf16 at the FLOP or byte floor."""
    return kernel_s(dev, BF16 * (M * K + K * N + M * N) + extra_bytes, 2.0 * M * N * K)


def ew_s(dev, elems, passes) -> float:
    """An elementwise kernel moving ``passes`` bf16 tensors of ``elems`` elements."""
    return kernel_s(dev, BF16 * elems * passes)


# ----------------------------------------------------------------------------- compiled figures
def lora_ipe(M, K, N, r, dropout: bool) -> dict:
    """SASS instructions per element of the LoRA kernels (aot.py, first kept config)."""
    import aot
    import aot_specs

    out = {}
    for s in aot_specs.lora_kernel_specs("bf16", M, K, N, r, dropout):
        res = aot.compile_spec(s)
        out[s["name"]] = res["per_elem"]
        if res.get("epilogue_per_elem") is not None:  # GEMMs: SASS outside the main loop per output element
            out[s["name"] + ":epilogue"] = res["epilogue_per_elem"]
    if dropout:  # the dx GEMM's epilogue without the mask at the same tile (the pruning's first pick differs)
        c = aot_specs.lora_kept_configs("epi_dx", "bf16", M, r, True)[0]
        res = aot.compile_spec(aot_specs.lora_kernel_spec("epi_dx", "bf16", M, K, N, r, False, c))
        out["lora.epilogue_dx:epilogue unmasked"] = res["epilogue_per_elem"]
    return out


# ----------------------------------------------------------------------------- LoRA plans
def lora_plans(dev, M, K, N, r, ipe: dict, ipe0: dict) -> dict:
    """Predicted seconds of LoRA forward+backward (dropout on) per plan; ``ipe``/``ipe0``: the
    kernels' instructions per element with and without dropout."""
    MK, MN = M * K, M * N
    base = gemm_s(dev, M, N, K) + gemm_s(dev, M, K, N)  # y = x W^T; dx = dy W (W, b frozen)
    small = kernel_s(dev, BF16 * M * r)  # g.mul_, dB.mul_, dA cast: tiny launches

    def split(mask_bits_saved: bool) -> float:
        bits = MK / 8 if mask_bits_saved else 0.0
        unpack = 3.0  # shift, and, select per element to read a saved bit
        down = kernel_s(dev, BF16 * MK + bits, 2.0 * MK * r, MK * ipe["lora.down"])
        fwd = gemm_s(dev, M, N, K) + down + kernel_s(dev, BF16 * 2 * MN, 2.0 * MN * r)  # addmm_ beta=1 reads y
        g = kernel_s(dev, BF16 * MN, 2.0 * MN * r)  # g = dy B
        dx_ipe = ipe0["lora.dx_add"] + unpack if mask_bits_saved else ipe["lora.dx_add"]
        da_ipe = ipe0["lora.grad_a"] + unpack if mask_bits_saved else ipe["lora.grad_a"]
        dx_add = kernel_s(dev, BF16 * 2 * MK + bits, 2.0 * MK * r, MK * dx_ipe)
        da = kernel_s(dev, BF16 * MK + bits, 2.0 * MK * r, MK * da_ipe) + kernel_s(dev, 4 * r * K)  # + zero fill
        db = kernel_s(dev, BF16 * MN, 2.0 * MN * r)  # dB = dy^T u
        return fwd + g + gemm_s(dev, M, K, N) + dx_add + da + db + 3 * small

    # peft eager: dropout (read x, write x_d, write a 1-byte mask), x_d A^T, (.) B^T, * s, add;
    # backward through each: mul by s, dB, g, g A, mask multiply, dA, and the add into dx
    eager_fwd = (gemm_s(dev, M, N, K) + kernel_s(dev, BF16 * 2 * MK + MK) + kernel_s(dev, BF16 * MK, 2.0 * MK * r)
                 + kernel_s(dev, BF16 * MN, 2.0 * MN * r) + ew_s(dev, MN, 2) + ew_s(dev, MN, 3))
    eager_bwd = (ew_s(dev, MN, 2) + kernel_s(dev, BF16 * MN, 2.0 * MN * r) + kernel_s(dev, BF16 * MN, 2.0 * MN * r)
                 + kernel_s(dev, BF16 * MK, 2.0 * MK * r) + kernel_s(dev, BF16 * 2 * MK + MK)
                 + kernel_s(dev, BF16 * MK, 2.0 * MK * r) + gemm_s(dev, M, K, N) + ew_s(dev, MK, 3))
    out = dict(base=base, split=split(False), split_saved_mask=split(True), eager=eager_fwd + eager_bwd)
    if "lora.epilogue_dx" in ipe:
        out.update(epilogue=lora_epilogue_plan(dev, M, K, N, r, ipe, ipe0),
                   epilogue_gemm_10pct_slower=lora_epilogue_plan(dev, M, K, N, r, ipe, ipe0, gemm_slowdown=1.1))
    if "lora.fused_fwd" in ipe:
        bn = 128
        fused_fwd = kernel_s(dev, BF16 * (MK + N * K + MN), 2.0 * M * N * K + 2.0 * MK * r * (N / bn),
                             MK * (N / bn) * ipe["lora.fused_fwd"])
        out["fused_fwd_with_dropout"] = fused_fwd
        out["split_fwd_with_dropout"] = (gemm_s(dev, M, N, K) + kernel_s(dev, BF16 * MK, 2.0 * MK * r, MK * ipe["lora.down"])
                                         + kernel_s(dev, BF16 * 2 * MN, 2.0 * MN * r))
    return out


def dy_split(M, N, sms) -> int:
    """The dy kernel's column slices (g planes), as ``kernels.lora_linear._dy_split`` picks them."""
    return max(1, min(16, -(-4 * sms // -(-M // 64)), -(-N // 64)))


def lora_epilogue_plan(dev, M, K, N, r, ipe: dict, ipe0: dict, gemm_slowdown: float = 1.0, dy_block_m: int = 128) -> float:
    """Predicted seconds of the ``epilogue`` plan's forward+backward (dropout on).

    Assumption (stated, not measured): its two big Triton GEMMs (sm_90 wgmma, 128 x 256 / 128 x
    128 tiles, cp.async 3-4 stage pipelines: benchmarks/NOTES-sm90-compile.md) run at cuBLAS'
    rate at this shape, divided by ``gemm_slowdown`` (1.1: 10 % slower). The LoRA product in
    the epilogue is one more wgmma of K = r (FLOPs counted) plus the u / B (g / A) tiles (bytes
    counted). The dx GEMM's dropout epilogue (mask draws, a second tile, the select) is added
    serially at the SASS issue rate: its instructions outside the main loop with dropout minus
    without (aot.py, same tile), once per output element: at 1 CTA per SM (234 registers) no other CTA
    hides it. The dy kernel reads dy once; its extra bytes: dB's fp32 atomics (``M / BM``
    partials of ``N r``, counted as HBM bytes although they meet in L2), the g planes written and
    read back by the in-order sum."""
    MK, MN = M * K, M * N
    slow = dict(dev, tc=dev["tc"] / gemm_slowdown)
    issue = dev["sms"] * LANES_PER_SM_CLOCK * dev["clock"]
    down = kernel_s(dev, BF16 * MK, 2.0 * MK * r, MK * ipe["lora.down"])
    fwd = down + kernel_s(slow, BF16 * (MK + N * K + MN + M * r + N * r), 2.0 * M * N * K + 2.0 * MN * r)
    split = dy_split(M, N, dev["sms"])
    atomics = 4.0 * (M / dy_block_m) * N * r
    planes = 4.0 * split * M * r
    dy = kernel_s(dev, BF16 * (MN + M * r + N * r) + atomics + planes, 2 * 2.0 * MN * r, MN * ipe["lora.grad_dy"])
    small = 3 * kernel_s(dev, 4 * N * r)  # dB zero fill, dB cast, g cast for dA
    gsum = kernel_s(dev, planes + 4.0 * M * r)
    mask_epi = ipe["lora.epilogue_dx:epilogue"] - ipe["lora.epilogue_dx:epilogue unmasked"]
    dx = (kernel_s(slow, BF16 * (MN + N * K + MK + r * K) + 4.0 * M * r, 2.0 * M * N * K + 2.0 * MK * r)
          + MK * mask_epi / issue)
    da = kernel_s(dev, BF16 * MK, 2.0 * MK * r, MK * ipe["lora.grad_a"]) + kernel_s(dev, 4 * r * K)
    return fwd + dy + gsum + dx + da + small


def lora_floor(dev, M, K, N) -> float:
    """The least any LoRA plan can add to the frozen base's two GEMMs, in seconds: x read once in
    forward (u = x A^T) and once in backward (dA = g^T x: g is only known then), dy read once (g
    and dB), three launches; every other LoRA byte can hide inside a GEMM. Tensor-core work of the
    rank-r products is left out (< 1 %)."""
    return 2 * kernel_s(dev, BF16 * M * K) + kernel_s(dev, BF16 * M * N)


# M >= 4096 (the targets' range) at a square projection and at the two MLP shapes of a 7-8B model
LORA_TABLE_SHAPES = ((4096, 4096, 4096, 16), (4096, 4096, 14336, 16), (4096, 14336, 4096, 16),
                     (16384, 4096, 4096, 16))


def lora_table(devices, shapes=LORA_TABLE_SHAPES) -> list:
    rows = []
    for M, K, N, r in shapes:
        ipe, ipe0 = lora_ipe(M, K, N, r, True), lora_ipe(M, K, N, r, False)
        for name in devices:
            t = lora_plans(DEVICES[name], M, K, N, r, ipe, ipe0)
            rows.append({
                "device": name, "M K N r": f"{M} {K} {N} {r}", "p": 0.05,
                "mask instrs/elem (down, dx, dA)": ", ".join(
                    f"{ipe[k] - ipe0[k]:.1f}" for k in ("lora.down", "lora.dx_add", "lora.grad_a")),
                "base ms": t["base"] * 1e3, "split ms": t["split"] * 1e3,
                "split, saved 1-bit mask ms": t["split_saved_mask"] * 1e3, "eager ms": t["eager"] * 1e3,
                "fastpeft/base (target <= 1.10)": t["split"] / t["base"],
                "eager/fastpeft (target >= 1.2)": t["eager"] / t["split"],
                "fused/split fwd, dropout": t.get("fused_fwd_with_dropout", float("nan")) / t.get("split_fwd_with_dropout", 1),
                "dx mask epilogue instrs/elem": ipe["lora.epilogue_dx:epilogue"] - ipe["lora.epilogue_dx:epilogue unmasked"],
                "epilogue ms": t["epilogue"] * 1e3,
                "epilogue/base (Triton GEMM at cuBLAS rate)": t["epilogue"] / t["base"],
                "epilogue/base, Triton GEMM 10% slower": t["epilogue_gemm_10pct_slower"] / t["base"],
                "floor/base (x twice, dy once)": 1 + lora_floor(DEVICES[name], M, K, N) / t["base"],
            })
    return rows


# ----------------------------------------------------------------------------- NF4
def nf4_ipe(K, N, M=4096) -> dict:
    """SASS per weight of the NF4 kernels, and (``<name> alu``) integer-ALU instructions per weight."""
    import aot
    import aot_specs

    out = {}
    for s in aot_specs.nf4_specs("bf16", K, N, M, gemv_ms=(1,)):
        r = aot.compile_spec(s)
        out[s["name"]], out[s["name"] + " alu"] = r["per_elem"], r["alu_per_elem"]
    return out


def nf4_table(devices, shapes=((4096, 4096), (4096, 14336), (14336, 4096)), M=4096, r=16) -> list:
    rows = []
    wavefronts = table_gather_wavefronts()
    for K, N in shapes:
        ipe = nf4_ipe(K, N, M)
        lora_i, lora_i0 = lora_ipe(M, K, N, r, True), lora_ipe(M, K, N, r, False)
        for name in devices:
            dev = DEVICES[name]
            wbytes = nf4_weight_bytes(N, K)
            gemv = kernel_s(dev, wbytes + BF16 * (K + N), 0.0, N * K * ipe["nf4.gemv(M=1)"],
                            N * K * ipe["nf4.gemv(M=1) alu"])
            # the L1-table build (Settings.nf4_gemv="triton_l1"): one gather per two weights
            gemv_l1 = kernel_s(dev, wbytes + BF16 * (K + N), 0.0, N * K * ipe["nf4.gemv(M=1) l1"],
                               N * K * ipe["nf4.gemv(M=1) l1 alu"], N * K / 64 * wavefronts)
            dense_gemv = kernel_s(dev, BF16 * N * K)
            t = qlora_train_plans(dev, M, K, N, r, ipe, lora_i, lora_i0)
            rows.append({
                "device": name, "K x N": f"{K}x{N}",
                "gemv instrs (ALU)/weight: prmt, L1": f"{ipe['nf4.gemv(M=1)']} ({ipe['nf4.gemv(M=1) alu']}), "
                                                        f"{ipe['nf4.gemv(M=1) l1']} ({ipe['nf4.gemv(M=1) l1 alu']})",
                "M=1 gemv us: prmt, L1": f"{gemv * 1e6:.3g}, {gemv_l1 * 1e6:.3g}", "bf16 gemv us": dense_gemv * 1e6,
                "gemv % of HBM: prmt, L1 (target >= 70)":
                    f"{100 * (wbytes / dev['bw']) / gemv:.3g}, {100 * (wbytes / dev['bw']) / gemv_l1:.3g}",
                "fused fwd+dx instrs/weight": f"{ipe['nf4.matmul fwd']}, {ipe['nf4.matmul dx']}",
                f"M={M} dequant plan / dense (target <= 1.15)": t["dequant"] / t["dense"],
                f"M={M} dequant + epilogue plan / dense (target <= 1.15; Triton GEMM at cuBLAS rate)":
                    t["dequant_epilogue"] / t["dense"],
                f"M={M} fused plan / dense": t["fused"] / t["dense"],
            })
    return rows


def nf4_weight_bytes(N, K) -> float:
    """HBM bytes of a bitsandbytes NF4 weight, blocksize 64, double-quantised: packed nibbles,
    one uint8 absmax per block, one fp32 scale per 256 blocks."""
    return N * K / 2 + N * K / 64 + 4 * N * K / 64 / 256


def qlora_train_plans(dev, M, K, N, r, ipe: dict, lora_i: dict, lora_i0: dict) -> dict:
    """Predicted seconds of QLoRA forward+backward (LoRA r, dropout on) per plan, and of the bf16
    dense base (``dense``: the two cuBLAS GEMMs). ``ipe``: the NF4 kernels' instructions per
    weight (:func:`nf4_ipe`); ``lora_i`` / ``lora_i0``: the LoRA kernels' with / without dropout.

    * ``dequant`` - two Triton dequantisations, cuBLAS for both GEMMs, the LoRA branch as the 16-bit
      ``split`` plan costs it over its base (``lora_impl="split"``, the default);
    * ``dequant_epilogue`` - the same dequantisations, then the 16-bit ``epilogue`` plan
      (``lora_impl="epilogue"``): its base GEMMs are **Triton** GEMMs, taken at cuBLAS' rate
      (:func:`lora_epilogue_plan`'s stated assumption), so this is ``2 dequant + epilogue``;
    * ``fused`` - the dequant-GEMM for forward and dx (every 128-row tile of x re-dequantises the
      weight), the LoRA branch as in ``dequant``.
    """
    wbytes = nf4_weight_bytes(N, K)
    dequant = kernel_s(dev, wbytes + BF16 * N * K, 0.0, N * K * ipe["nf4.dequant"])
    fused_f = kernel_s(dev, wbytes * M / 128 + BF16 * (M * K + M * N), 2.0 * M * N * K,
                       N * K * (M / 128) * ipe["nf4.matmul fwd"])
    fused_dx = kernel_s(dev, wbytes * M / 128 + BF16 * (M * K + M * N), 2.0 * M * N * K,
                        N * K * (M / 128) * ipe["nf4.matmul dx"])
    lora = lora_plans(dev, M, K, N, r, lora_i, lora_i0)
    dense = gemm_s(dev, M, N, K) + gemm_s(dev, M, K, N)  # = lora["base"]
    split_extra = lora["split"] - lora["base"]
    return dict(dense=dense, dequant=2 * dequant + dense + split_extra,
                dequant_epilogue=2 * dequant + dense + (lora["epilogue"] - lora["base"]),
                fused=fused_f + fused_dx + split_extra)


# ----------------------------------------------------------------------------- prefix attention
# Public H100 SXM5 rates of the SDPA backends the alternatives run, bf16, head dim 128, by sequence
# length (TFLOP/s in FlashAttention's convention: causal forward 2 B H T^2 D, backward 2.5x that),
# read off the FlashAttention-3 paper's figures (Shah et al. 2024, arXiv 2407.08608; 16k tokens per
# batch): forward from its causal panel, backward from its (non-causal) panel, used for causal too,
# which flatters the alternatives. FA2 = torch's flash backend; cuDNN = torch's cudnn backend. The
# memory-efficient (CUTLASS, mma.sync) kernel has no H100 figure there: assumed at 0.65x FA2, its ratio
# to FA2 in the FlashAttention-2 paper's A100 figures.
SDPA_TFLOPS = {  # seqlen -> (forward, backward) TFLOP/s
    "FA2": {512: (191, 214), 1024: (260, 260), 2048: (298, 291), 4096: (319, 310)},
    "cuDNN": {512: (315, 305), 1024: (410, 408), 2048: (484, 465), 4096: (518, 499)},
}
SDPA_TFLOPS["efficient"] = {t: (0.65 * f, 0.65 * b) for t, (f, b) in SDPA_TFLOPS["FA2"].items()}


def sdpa_rate(backend: str, T: int) -> tuple:
    """(forward, backward) FLOP/s of an SDPA backend at the tabulated length nearest ``T``."""
    table = SDPA_TFLOPS[backend]
    near = min(table, key=lambda t: abs(t - T))
    return tuple(r * 1e12 for r in table[near])


def prefix_ipe(D: int = 128) -> dict:
    """Instructions per score element of the prefix kernels' innermost loops (aot.py, bf16, causal,
    no padding mask), in source order: fwd/dq (prefix, unmasked, diagonal), dkdv (diagonal,
    unmasked), dprefix (one loop); and the compiled facts the table shows."""
    import aot
    import aot_specs

    out = {}
    for s in aot_specs.prefix_specs("bf16", D=D, has_mask=False):
        r = aot.compile_spec(s)
        per_thread = s["elems_per_iter"] / (32 * s["warps"])
        out[s["name"]] = dict(loops=[n / per_thread for n in r["inner_loops"]], regs=r["regs"], local=r["local"],
                              ctas=r["ctas_per_sm"], tc=r["tensor_core"], wgmma=r["wgmma"])
    return out


def _cdiv(a, b):
    return -(-a // b)


def _query_block_elems(T, S, P, BM, BN):
    """(prefix, unmasked, diagonal) score elements one (batch, head) computes in a kernel that walks
    query blocks of ``BM`` over key blocks of ``BN`` as ``_fwd_kernel`` / ``_bwd_dq_kernel`` do
    (right-aligned causal, no padding)."""
    off, s_full = S - T, (S // BN) * BN
    pre = bulk = edge = 0
    for m0 in range(0, T, BM):
        hi = min(S, m0 + BM + off)
        full = min((max(m0 + off + 1, 0) // BN) * BN, s_full)
        pre += _cdiv(P, BN)
        bulk += full // BN
        edge += _cdiv(max(hi - full, 0), BN)
    return tuple(n * BM * BN for n in (pre, bulk, edge))


def _key_block_elems(T, S, BM, BN):
    """(diagonal, unmasked) score elements of ``_bwd_dkdv_kernel`` per (batch, query head)."""
    off = S - T
    diag = bulk = 0
    for n0 in range(0, S, BN):
        lo = (max(n0 - off, 0) // BM) * BM
        full = min(_cdiv(max(n0 + BN - 1 - off, 0), BM) * BM, T)
        diag += _cdiv(max(full - lo, 0), BM)
        bulk += _cdiv(max(T - full, 0), BM)
    return diag * BM * BN, bulk * BM * BN


def attention_kernel_s(dev, bytes_, flops, instrs) -> tuple:
    """(overlapped, serial) seconds of an FA2-style attention kernel: the softmax instructions
    hidden under the tensor cores (the project's max-of-floors model), or issued between the
    GEMMs of each tile with the tensor cores idle (no warp specialisation: what the Triton
    tutorial kernel of the same structure measures, ~320-390 TFLOP/s in the FA3 paper)."""
    issue = dev["sms"] * LANES_PER_SM_CLOCK * dev["clock"]
    t_b, t_f, t_i = bytes_ / dev["bw"], flops / dev["tc"], instrs / issue
    return max(t_b, t_f, t_i) + LAUNCH_GAP_S, max(t_b, t_f + t_i) + LAUNCH_GAP_S


def prefix_kernel_plan(dev, B, H, KVH, T, P, D, ipe) -> dict:
    """Predicted (overlapped, serial) seconds of fastpeft's four prefix kernels, forward and
    backward, causal, no padding (``S = T``), from the compiled loop lengths ``ipe``."""
    S, G = T, H // KVH
    q_bytes, kv_bytes = BF16 * B * H * T * D, BF16 * B * KVH * S * D
    f = {}
    pre, bulk, edge = (B * H * n for n in _query_block_elems(T, S, P, 128, 64))
    lp = ipe["prefix.fwd"]["loops"]
    f["fwd"] = attention_kernel_s(dev, 2 * q_bytes + 2 * kv_bytes, 4 * D * (pre + bulk + edge),
                                  pre * lp[0] + bulk * lp[1] + edge * lp[2])
    pre, bulk, edge = (B * H * n for n in _query_block_elems(T, S, P, 64, 64))
    lp = ipe["prefix.dq"]["loops"]
    f["dq"] = attention_kernel_s(dev, 3 * q_bytes + 2 * kv_bytes, 6 * D * (pre + bulk + edge),
                                 pre * lp[0] + bulk * lp[1] + edge * lp[2])
    diag, bulk = (B * H * n for n in _key_block_elems(T, S, 64, 64))
    lp = ipe["prefix.dkdv"]["loops"]
    f["dkdv"] = attention_kernel_s(dev, 2 * q_bytes + 4 * kv_bytes, 8 * D * (diag + bulk), diag * lp[0] + bulk * lp[1])
    elems = KVH * _cdiv(P, 64) * 64 * B * G * _cdiv(T, 64) * 64
    f["dprefix"] = attention_kernel_s(dev, 2 * q_bytes, 8 * D * elems, elems * ipe["prefix.dprefix"]["loops"][0])
    pre_s = kernel_s(dev, 2 * q_bytes)  # delta = rowsum(dO * O)
    fwd = f["fwd"]
    bwd = tuple(pre_s + f["dq"][i] + f["dkdv"][i] + f["dprefix"][i] for i in (0, 1))
    return dict(fwd=fwd, bwd=bwd)


def prefix_alternatives(dev, B, H, KVH, T, P, D) -> dict:
    """Predicted (forward, backward) seconds of the same math by SDPA, causal, no padding:

    * ``masked``: peft + transformers - the prefix expanded per batch and concatenated into the
      cache, KV heads repeated when GQA, a boolean [B, 1, T, P+T] mask that SDPA turns into a float
      bias per call and the memory-efficient kernel reads; it cannot skip the masked triangle.
    * ``concat <backend>``: the same concatenation, lower-right causal and no mask (FA2 through
      ``causal_lower_right``; cuDNN needs a square causal, e.g. P zero query rows, whose copy of q is
      counted too), the concat copies (and their backward) at the HBM floor.
    * ``hybrid <backend>``: the backend on the sequence part alone (square causal) merged with the
      prefix part by log-sum-exp, the prefix part as one fused pass (forward: read q, o_s, write
      o; backward: read q, dO, O, dq and write dq, and read q, dO again for the prefix gradient).
    """
    S, G = T, H // KVH
    q_bytes, kv_bytes = BF16 * B * H * T * D, BF16 * B * KVH * S * D
    pre_bytes = BF16 * B * KVH * P * D
    causal = 2.0 * B * H * T * T * D  # FA convention, forward
    out = {}
    # concat copies of k and v (read the sequence, write [prefix ; sequence]); backward: the
    # gradient slices copied out and the prefix gradient summed over the batch
    cat_f = kernel_s(dev, 2 * (2 * kv_bytes + pre_bytes) + 2 * pre_bytes)
    cat_b = kernel_s(dev, 2 * (2 * kv_bytes + pre_bytes) + 2 * pre_bytes)
    fr, br = sdpa_rate("efficient", T)
    full = 4.0 * B * H * T * (P + S) * D  # every score, masked or not
    bias = B * T * (P + S)
    rep = kernel_s(dev, 2 * 2 * BF16 * B * H * (P + S) * D) if G > 1 else 0.0  # repeat_kv copies
    rep_b = kernel_s(dev, 2 * 2 * BF16 * B * H * (P + S) * D) if G > 1 else 0.0  # and their sum back
    out["masked"] = (cat_f + rep + kernel_s(dev, 3 * bias) + max(full / fr, (BF16 * bias + 2 * q_bytes) / dev["bw"]),
                     cat_b + rep_b + max(2.5 * full / br, (BF16 * bias + 6 * q_bytes) / dev["bw"]))
    lower_right = 2.0 * B * H * D * (2 * T * P + T * T)  # T queries over P + T keys, lower-right
    for name in ("FA2", "cuDNN"):
        fr, br = sdpa_rate(name, T)
        extra_f = extra_b = 0.0
        if name == "cuDNN":  # square causal: P zero query rows concatenated before q, dO padded back
            extra_f = kernel_s(dev, 2 * q_bytes + 2 * BF16 * B * H * P * D)
            extra_b = kernel_s(dev, 2 * q_bytes + 2 * BF16 * B * H * P * D)
        flops = lower_right if name == "FA2" else 2.0 * B * H * (T + P) ** 2 * D
        out[f"concat {name}"] = (cat_f + extra_f + flops / fr, cat_b + extra_b + 2.5 * flops / br)
        pf = 4.0 * B * H * T * P * D
        hyb_f = kernel_s(dev, 3 * q_bytes, pf)
        hyb_b = kernel_s(dev, 5 * q_bytes, 2.5 * pf) + kernel_s(dev, 2 * q_bytes, 1.5 * pf)
        out[f"hybrid {name}"] = (causal / fr + hyb_f, 2.5 * causal / br + hyb_b)
    return out


PREFIX_SHAPES = [(16, 32, 32, 2048, 32), (16, 32, 32, 2048, 128), (16, 32, 8, 2048, 32), (8, 32, 32, 512, 32),
                 (32, 32, 32, 1024, 32), (8, 32, 32, 4096, 32), (16, 32, 32, 2048, 10)]


def prefix_table(devices, shapes=PREFIX_SHAPES, D=128) -> list:
    """One row per (device, shape): fastpeft's kernels (overlapped - serial) against the masked
    baseline and the best alternative, forward + backward, all predicted."""
    ipe = prefix_ipe(D)
    rows = []
    for B, H, KVH, T, P in shapes:
        for name in devices:
            dev = DEVICES[name]
            ours = prefix_kernel_plan(dev, B, H, KVH, T, P, D, ipe)
            alt = prefix_alternatives(dev, B, H, KVH, T, P, D)
            o_lo, o_hi = (ours["fwd"][i] + ours["bwd"][i] for i in (0, 1))
            tot = {k: f + b for k, (f, b) in alt.items()}
            best = min((k for k in tot if k != "masked"), key=tot.get)
            rows.append({
                "device": name, "B H KVH T P": f"{B} {H} {KVH} {T} {P}",
                "fastpeft fwd+bwd ms": f"{o_lo * 1e3:.2f}-{o_hi * 1e3:.2f}",
                "masked ms": tot["masked"] * 1e3,
                "concat FA2 ms": tot["concat FA2"] * 1e3, "concat cuDNN ms": tot["concat cuDNN"] * 1e3,
                "hybrid FA2 ms": tot["hybrid FA2"] * 1e3, "hybrid cuDNN ms": tot["hybrid cuDNN"] * 1e3,
                "masked/fastpeft (target >= 1.3)": f"{tot['masked'] / o_hi:.2f}-{tot['masked'] / o_lo:.2f}",
                "best alt": best,
                "best alt/fastpeft (target >= 1)": f"{tot[best] / o_hi:.2f}-{tot[best] / o_lo:.2f}",
                "concat FA2/fastpeft": f"{tot['concat FA2'] / o_hi:.2f}-{tot['concat FA2'] / o_lo:.2f}",
            })
    return rows


def prefix_facts(ipe: dict) -> list:
    """The compiled facts the prefix predictions use, one row per kernel."""
    return [{"kernel": k, "regs": v["regs"], "local B": v["local"], "CTAs/SM": v["ctas"], "tensor-core instrs": v["tc"],
             "wgmma": v["wgmma"], "innermost loops, instrs per score element": ", ".join(f"{x:.1f}" for x in v["loops"])}
            for k, v in ipe.items()]


def markdown(rows) -> str:
    if not rows:
        return ""
    keys = list(rows[0])

    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(f(r[k]) for k in keys) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    ap.add_argument("--only", nargs="+", default=["lora", "nf4", "prefix"], choices=["lora", "nf4", "prefix"])
    args = ap.parse_args(argv)
    import triton

    print(f"PREDICTIONS (static model, no GPU): sm_90 code from triton {triton.__version__}\n")
    if "lora" in args.only:
        print("### LoRA linear, forward+backward, dropout 0.05 (predicted)\n")
        print(markdown(lora_table(args.device)) + "\n")
    if "nf4" in args.only:
        print("### NF4 / QLoRA (predicted)\n")
        print(markdown(nf4_table(args.device)) + "\n")
    if "prefix" in args.only:
        print("### Shared-prefix attention, forward+backward, causal, no padding, bf16, D=128 (predicted)\n")
        print(markdown(prefix_facts(prefix_ipe())) + "\n")
        print(markdown(prefix_table(args.device)) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
