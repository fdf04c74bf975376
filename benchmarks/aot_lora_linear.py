"""Compile the LoRA-linear Triton kernels for an H100 (sm_90) without a GPU and report, per
autotune config, registers per thread, local/stack bytes and whether the tensor-core path is Hopper's
``wgmma``.

Why: the autotune pruning in ``kernels/lora_linear.py`` bounds register use per thread; this
script checks those bounds against the real compiler (triton's own compile, read back with the bundled ``cuobjdump``; the
helpers are shared with ``benchmarks/aot.py``, which compiles the other kernels) on a machine
without a GPU. It is a compile check, not a timing: it proves the kernels compile for sm_90 with
the installed triton (3.9 here; the GPU machines have 3.6) and that the configs the pruning keeps
do not spill.

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

from aot import compile_sm90, signature  # noqa: E402  (benchmarks/aot.py: the shared AOT helpers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--m", type=int, default=4096, help="M used by the pruning (tiny M keeps small row blocks)")
    ap.add_argument("--max-local", type=int, default=0,
                    help="exit 1 when a kept config uses more local/stack bytes than this (default 0)")
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--first", action="store_true", help="only the first kept config per kernel/rank/dropout (quick check)")
    ap.add_argument("--dropout", choices=["both", "on", "off"], default="both")
    ap.add_argument("--precision", choices=["ieee", "tf32"], default=None,
                    help="fp32 dot precision (default ieee: what the op uses unless torch allows tf32)")
    args = ap.parse_args(argv)

    import triton

    from fastpeft.kernels import lora_linear as K

    dt = args.dtype
    kernels = {
        "down": (K._lora_down_kernel, K._down_configs(), {"u_ptr": dt}),
        "dx": (K._lora_dx_add_kernel, K._dx_configs(), {}),
        "da": (K._lora_grad_a_kernel, K._da_configs(), {"da_ptr": "fp32"}),
        "fused": (K._lora_fused_fwd_kernel, K._fused_configs(), {}),
    }
    print(f"triton {triton.__version__}, target sm_90, dtype {dt}, M = {args.m}\n")
    print("| kernel | r_pad | dropout | config (BM, BN, BK, warps, stages) | kept by pruning | regs | local/stack bytes | wgmma |")
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    for kind, (autotuner, configs, ptr_types) in kernels.items():
        fn = autotuner.fn
        for r in args.rank:
            rp = K._pad_rank(r)
            if kind == "fused" and r > K.MAX_FUSED_RANK:
                continue
            for has_dropout in {"both": (False, True), "on": (True,), "off": (False,)}[args.dropout]:
                const = dict(HAS_DROPOUT=has_dropout, R_PAD=rp, UPCAST=False,
                             PRECISION=(args.precision or "ieee") if dt == "fp32" else "tf32")
                if kind == "dx":
                    const["R_CHUNK"] = K._dx_rank_chunk(rp, const["PRECISION"])
                if kind == "da":
                    const["BLOCK_R"] = min(rp, 128)
                if kind == "fused":
                    const.update(HAS_BIAS=True, WRITE_U=True, GROUP_M=8)
                prune_args = dict(const, M=args.m, ELEM_BYTES=4 if dt == "fp32" else 2)
                kept_list = K._prune(kind)(configs, prune_args)
                kept = {id(c) for c in kept_list}
                for c in (kept_list[:1] if args.first else configs):
                    if id(c) not in kept and not args.all_configs:
                        continue
                    cc = {k: v for k, v in dict(const, **c.kwargs).items() if k in fn.arg_names}
                    ptrs = {n: "*" + ptr_types.get(n, dt) for n in fn.arg_names
                            if n.endswith("_ptr") and n not in cc}
                    sig = signature(fn, cc, ptrs, float_scalars=[n for n in ("p", "scale", "s") if n in fn.arg_names])
                    res = compile_sm90(fn, sig, cc, c.num_warps, c.num_stages)
                    regs, spills, wg = res["regs"], res["local"], res["wgmma"]
                    shape = (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N", "-"), c.kwargs.get("BLOCK_K"),
                             c.num_warps, c.num_stages)
                    is_kept = id(c) in kept
                    bad += int(is_kept and spills > args.max_local)
                    print(f"| {kind} | {rp} | {has_dropout} | {shape} | {'yes' if is_kept else 'no'} | {regs} | {spills} | {'yes' if wg else 'no'} |",
                          flush=True)
    print(f"\n{bad} kept config(s) use more than {args.max_local} local/stack bytes per thread")
    return 1 if bad else 0


if __name__ == "__main__":
    # compile the real kernels, not the interpreter's (before fastpeft.kernels is imported);
    # only as a script: benchmarks/run.py imports this module while discovering benchmarks
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
