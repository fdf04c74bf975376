"""Predicted H100 / H200 times for fastpeft's plans, from the sm_90 code ``benchmarks/aot.py`` reads.

**Predictions, not measurements.** No GPU was used. Each kernel's time is the largest of three
floors plus a launch gap:

* bytes it must move / HBM bandwidth (H100 ~3.0 TB/s reached of 3.35, H200 ~4.3 of 4.8);
* tensor-core FLOPs / ~700 TFLOP/s dense bf16 (what cuBLAS reaches, of ~990 on the datasheet);
* SASS instructions it issues / issue rate: 132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz. The
  instructions per element (per weight for NF4) of the Triton kernels' main loops come from
  ``aot.compile_spec`` (the JIT's specialisation, sm_90, triton on this machine); cuBLAS GEMMs
  are taken at the FLOP or byte floor.

Plans modelled (``M`` tokens, ``x [M, K]``, ``W [N, K]``, rank ``r``, bf16):

* LoRA forward+backward with dropout: the frozen base (2 GEMMs), fastpeft's ``split`` plan (its
  launches, with the mask regenerated in dx_add and grad_a, or alternatively a saved 1-bit mask),
  eager peft (dropout copy, mask, separate adds), the ``fused`` forward (mask regenerated per
  column block), and the ``epilogue`` plan (:func:`lora_epilogue_plan`: LoRA products in Triton
  GEMM epilogues, **assumed at cuBLAS' GEMM rate**, with a column for 10 % slower). Targets:
  fastpeft / base <= 1.10, eager / fastpeft >= 1.2.
* NF4 GEMV at M = 1: fraction of HBM bandwidth on the packed weight (target >= 70 %).
* QLoRA forward+backward at training M: fused dequant-GEMM vs dequantise + cuBLAS, over bf16
  dense (target <= 1.15).

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


def kernel_s(dev: dict, bytes_=0.0, flops=0.0, instrs=0.0) -> float:
    """One kernel's predicted seconds: the largest floor plus a launch gap."""
    issue = dev["sms"] * LANES_PER_SM_CLOCK * dev["clock"]
    return max(bytes_ / dev["bw"], flops / dev["tc"], instrs / issue) + LAUNCH_GAP_S


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


def lora_table(devices, shapes=((4096, 4096, 4096, 16),)) -> list:
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
            })
    return rows


# ----------------------------------------------------------------------------- NF4
def nf4_ipe(K, N, M=4096) -> dict:
    import aot
    import aot_specs

    return {s["name"]: aot.compile_spec(s)["per_elem"] for s in aot_specs.nf4_specs("bf16", K, N, M, gemv_ms=(1,))}


def nf4_table(devices, shapes=((4096, 4096), (4096, 14336), (14336, 4096)), M=4096, r=16) -> list:
    rows = []
    for K, N in shapes:
        ipe = nf4_ipe(K, N, M)
        lora_i, lora_i0 = lora_ipe(M, K, N, r, True), lora_ipe(M, K, N, r, False)
        for name in devices:
            dev = DEVICES[name]
            wbytes = N * K / 2 + N * K / 64 + 4 * N * K / 64 / 256  # packed nibbles + uint8 absmax + nested
            gemv = kernel_s(dev, wbytes + BF16 * (K + N), 0.0, N * K * ipe["nf4.gemv(M=1)"])
            dense_gemv = kernel_s(dev, BF16 * N * K)
            dequant = kernel_s(dev, wbytes + BF16 * N * K, 0.0, N * K * ipe["nf4.dequant"])
            # fused dequant-GEMM: every M tile re-dequantises the weight (M / BLOCK_M times)
            fused_f = kernel_s(dev, wbytes * M / 128 + BF16 * (M * K + M * N), 2.0 * M * N * K,
                               N * K * (M / 128) * ipe["nf4.matmul fwd"])
            fused_dx = kernel_s(dev, wbytes * M / 128 + BF16 * (M * K + M * N), 2.0 * M * N * K,
                                N * K * (M / 128) * ipe["nf4.matmul dx"])
            lora = lora_plans(dev, M, K, N, r, lora_i, lora_i0)
            lora_extra = lora["split"] - lora["base"]
            dense = gemm_s(dev, M, N, K) + gemm_s(dev, M, K, N)
            deq_plan = 2 * dequant + dense + lora_extra
            fused_plan = fused_f + fused_dx + lora_extra
            rows.append({
                "device": name, "K x N": f"{K}x{N}",
                "gemv instrs/weight": ipe["nf4.gemv(M=1)"],
                "M=1 gemv us": gemv * 1e6, "bf16 gemv us": dense_gemv * 1e6,
                "gemv % of HBM (target >= 70)": 100 * (wbytes / dev["bw"]) / gemv,
                "fused fwd+dx instrs/weight": f"{ipe['nf4.matmul fwd']}, {ipe['nf4.matmul dx']}",
                f"M={M} dequant plan / dense (target <= 1.15)": deq_plan / dense,
                f"M={M} fused plan / dense": fused_plan / dense,
            })
    return rows


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
    ap.add_argument("--only", nargs="+", default=["lora", "nf4"], choices=["lora", "nf4"])
    args = ap.parse_args(argv)
    import triton

    print(f"PREDICTIONS (static model, no GPU): sm_90 code from triton {triton.__version__}\n")
    if "lora" in args.only:
        print("### LoRA linear, forward+backward, dropout 0.05 (predicted)\n")
        print(markdown(lora_table(args.device)) + "\n")
    if "nf4" in args.only:
        print("### NF4 / QLoRA (predicted)\n")
        print(markdown(nf4_table(args.device)) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
