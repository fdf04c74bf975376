"""Compile the LoRA-linear Triton kernels for an H100 (sm_90) without a GPU and report, per
autotune config, registers per thread, local/stack bytes, occupancy, tensor-core instructions and
the SASS instructions per element of the main loop.

Why: the autotune pruning in ``kernels/lora_linear.py`` bounds register use per thread; this
script checks those bounds against the real compiler, with the JIT's specialisation at one
benchmark shape (``aot.compile_spec``: aligned pointers, unit strides constant, sizes divisible
by 16), on a machine without a GPU. ``benchmarks/aot.py`` reports the first kept config of every
kernel at every benchmark shape; this one every config at one shape. Compiler facts, not timings.

Usage (from the repository root, with fastpeft installed)::

    python benchmarks/aot_lora_linear.py [--rank 16 64] [--dtype bf16] [--all-configs]

Writes nothing; prints one markdown table. ``--all-configs`` also compiles configs the pruning
drops (to see that they are the spilling ones).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aot import compile_spec  # noqa: E402  (benchmarks/aot.py: the shared AOT helpers)
from aot_specs import LORA_KERNELS, lora_kernel_spec, lora_kept_configs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--m", type=int, default=4096, help="M (tokens): the pruning keeps small row blocks for tiny M")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--max-local", type=int, default=0,
                    help="exit 1 when a kept config uses more local/stack bytes than this (default 0)")
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--first", action="store_true", help="only the first kept config per kernel/rank/dropout (quick check)")
    ap.add_argument("--dropout", choices=["both", "on", "off"], default="both")
    ap.add_argument("--kernels", nargs="+", default=list(LORA_KERNELS), choices=list(LORA_KERNELS))
    ap.add_argument("--mask-cost", action="store_true",
                    help="per kernel and rank: the first config kept with dropout, compiled with and without it; "
                         "prints the dropout mask's SASS instructions per element (the difference)")
    args = ap.parse_args(argv)
    if args.mask_cost:
        return mask_cost(args)

    import triton

    from fastpeft.kernels import lora_linear as K

    dt = args.dtype
    print(f"triton {triton.__version__}, target sm_90, dtype {dt}, M={args.m} K={args.k} N={args.n}\n")
    print("| kernel | r_pad | dropout | config (BM, BN, BK, warps, stages) | kept by pruning | regs | local/stack bytes "
          "| wgmma | CTAs/SM | instrs per elem | epilogue instrs per out elem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for kind in args.kernels:
        configs = getattr(K, LORA_KERNELS[kind][2])()
        for r in args.rank:
            if kind == "fused" and r > K.MAX_FUSED_RANK:
                continue
            for has_dropout in {"both": (False, True), "on": (True,), "off": (False,)}[args.dropout]:
                kept_list = lora_kept_configs(kind, dt, args.m, r, has_dropout, configs)
                kept = {id(c) for c in kept_list}
                for c in (kept_list[:1] if args.first else configs):
                    if id(c) not in kept and not args.all_configs:
                        continue
                    res = compile_spec(lora_kernel_spec(kind, dt, args.m, args.k, args.n, r, has_dropout, c))
                    shape = (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N", "-"), c.kwargs.get("BLOCK_K"),
                             c.num_warps, c.num_stages)
                    is_kept = id(c) in kept
                    bad += int(is_kept and res["local"] > args.max_local)
                    print(f"| {kind} | {K._pad_rank(r)} | {has_dropout} | {shape} | {'yes' if is_kept else 'no'} | "
                          f"{res['regs']} | {res['local']} | {'yes' if res['wgmma'] else 'no'} | {res['ctas_per_sm']} | "
                          f"{res['per_elem']} | {res['epilogue_per_elem'] if res['epilogue_per_elem'] is not None else '-'} |",
                          flush=True)
    print(f"\n{bad} kept config(s) use more than {args.max_local} local/stack bytes per thread")
    return 1 if bad else 0


# the kernels that draw the dropout mask: in their main loop, or (the epilogue plan's dx GEMM) in
# the epilogue, where the cost is counted per output element
MASKED_KERNELS = {"down": "per_elem", "dx": "per_elem", "da": "per_elem", "fused": "per_elem",
                  "epi_dx": "epilogue_per_elem"}


def mask_cost(args) -> int:
    """The dropout mask's cost in one binary's terms: the first config kept with dropout, compiled
    with and without it (the issue's bound is 16 SASS instructions per element)."""
    from fastpeft.kernels import lora_linear as K

    print("| kernel | r_pad | config (BM, BN, BK, warps, stages) | instrs/elem, no dropout | with dropout | mask |")
    print("|---|---|---|---|---|---|")
    for kind in args.kernels:
        if kind not in MASKED_KERNELS:
            continue
        figure = MASKED_KERNELS[kind]
        for r in args.rank:
            if kind == "fused" and r > K.MAX_FUSED_RANK:
                continue
            c = lora_kept_configs(kind, args.dtype, args.m, r, True)[0]
            off, on = (compile_spec(lora_kernel_spec(kind, args.dtype, args.m, args.k, args.n, r, d, c))[figure]
                       for d in (False, True))
            shape = (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N", "-"), c.kwargs.get("BLOCK_K"), c.num_warps, c.num_stages)
            print(f"| {kind} | {K._pad_rank(r)} | {shape} | {off} | {on} | {on - off:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    # compile the real kernels, not the interpreter's (before fastpeft.kernels is imported);
    # only as a script: benchmarks/run.py imports this module while discovering benchmarks
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
