"""Compile fastpeft's Triton kernels for an H100 (sm_90) without a GPU, ahead of time.

Not a timing: triton's own compiler (``triton.compile`` with a ``GPUTarget``, no driver, no
``TRITON_INTERPRET``) builds each kernel for sm_90 and the bundled ``cuobjdump`` reads back the
registers per thread and local/stack bytes (spills) of the cubin; the PTX tells whether the
tensor-core path is Hopper's ``wgmma``. It proves the kernels compile for sm_90 with the installed
triton (3.9 on the CPU machine; the GPU machines have 3.6) before a GPU session is spent on it.

The helpers (:func:`compile_sm90`, :func:`signature`, :func:`regs_and_spills`) are shared with
``aot_lora_linear.py`` (the autotuned LoRA-linear kernels, per autotune config). Run as a script,
this module compiles the other kernels - NF4 (dequantise, fused dequant GEMM forward and input
gradient, GEMV), DoRA (row norm), prefix attention (forward, dq, dk/dv, dprefix) - once each with
the launch configuration their launcher picks on a GPU for a representative shape (bf16, and
fp32 where the kernel has a distinct fp32 path; LoRA rank 16, head dim 128, NF4 blocksize 64
with double quantisation)::

    python benchmarks/aot.py [--dtype bf16 fp32] [--only nf4 dora prefix]

Prints one markdown table; writes nothing. Exit 1 when a kernel fails to compile (the error is
printed in its row). It has no ``run()``, so ``benchmarks/run.py`` does not run it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback

SM = 90


def tool(name: str) -> str:
    """Path of a CUDA tool bundled with triton (``cuobjdump``, ``ptxas``)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def regs_and_spills(cubin: bytes) -> tuple:
    """(registers per thread, local-memory bytes per thread) of a cubin, read with the bundled
    ``cuobjdump -res-usage`` (local memory > 0 means spills or a stack array)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(text[-2000:])
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1)) + int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, local


def signature(fn, constexprs: dict, types: dict, float_scalars=(), default_scalar: str = "i32") -> dict:
    """Triton signature of ``fn`` (a ``@triton.jit`` function): ``constexpr`` for the names in
    ``constexprs``, ``types[name]`` where given (pointers: ``"*bf16"``), ``fp32`` for
    ``float_scalars``, ``default_scalar`` for every other argument (sizes and strides)."""
    sig = {}
    for n in fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in types:
            sig[n] = types[n]
        elif n in float_scalars:
            sig[n] = "fp32"
        else:
            sig[n] = default_scalar
    unknown = (set(constexprs) | set(types) | set(float_scalars)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: no argument(s) {sorted(unknown)}; it has {fn.arg_names}")
    return sig


def compile_sm90(fn, sig: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile ``fn`` for sm_90 with triton's own compiler. Returns ``regs``, ``local`` (bytes per
    thread of local/stack memory), ``shared`` (bytes), ``wgmma`` (PTX uses it) and the compiled
    kernel (``kernel``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names})
    ck = triton.compile(src, target=GPUTarget("cuda", SM, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, local = regs_and_spills(ck.asm["cubin"])
    return dict(regs=regs, local=local, shared=int(getattr(ck.metadata, "shared", 0) or 0),
                wgmma="wgmma" in ck.asm["ptx"], kernel=ck)


# --------------------------------------------------------------------------------------------
# The kernels other than LoRA-linear, each with the configuration its launcher uses on a GPU
# --------------------------------------------------------------------------------------------

_TT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _nf4_specs(dt: str):
    from fastpeft.kernels import nf4 as K

    fp32 = dt == "fp32"
    # blocksize 64, double quantisation (QLoRA's default): absmax is uint8 codes
    quant = dict(packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8", ncode_ptr="*fp32", nabs_ptr="*fp32",
                 offset_ptr="*fp32")
    qc = dict(BS=64, NESTED=True, NBS=256)
    specs = []
    if not fp32:  # dequantise and GEMV have no fp32-specific path
        specs.append(("nf4.dequant", K._dequant_kernel, dict(quant, out_ptr=f"*{dt}"), (),
                      dict(qc, BLOCK=1024), "BLOCK=1024", 4, 3))
        for m, bn, bk, use_dot in ((1, 64, 64, False), (16, 64, 64, True)):
            specs.append((f"nf4.gemv(M={m})", K._gemv_kernel, dict(quant, x_ptr=f"*{dt}", ws_ptr="*fp32"), (),
                          dict(qc, BLOCK_M=1 if m == 1 else 16, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot,
                               ROW_SCALE=True),
                          f"BM={1 if m == 1 else 16} BN={bn} BK={bk}", 4, 3))
    # matmul: the launcher's choice for a big GEMM (M, P >= 128)
    import torch

    mm_types = dict(quant, **{p: f"*{dt}" for p in ("x_ptr", "c_ptr", "bias_ptr", "l_ptr", "r_ptr", "mask_ptr")})
    dots = dict(DOT_FP32=fp32, IEEE=fp32, LORA_FP32=fp32)
    torch_dt = torch.float32 if fp32 else torch.bfloat16
    for name, trans_w, extra in (
            ("nf4.matmul fwd", True, dict(HAS_BIAS=True, HAS_MASK=False, PAIR=True)),
            ("nf4.matmul dx", False, dict(HAS_BIAS=False, HAS_MASK=True, PAIR=False))):
        bm, bp, bq, gm, kw = K._matmul_config(4096, 4096, trans_w, torch_dt, 64, interp=False)
        const = dict(qc, **dots, **extra, TRANS_W=trans_w, HAS_LORA=True, ROW_SCALE=True,
                     BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, R_PAD=16, GROUP_M=gm)
        specs.append((name, K._matmul_kernel, mm_types, ("lora_scale",), const,
                      f"{bm}x{bp}x{bq}" + (" pair" if extra["PAIR"] else ""), kw["num_warps"], kw["num_stages"]))
    return specs


def _dora_specs(dt: str):
    from fastpeft.kernels import dora as K

    fp32 = dt == "fp32"
    types = dict(W=f"*{dt}", A=f"*{dt}", B=f"*{dt}", OUT="*fp32")
    const = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_R=16, UPCAST=fp32, PRECISION="ieee")
    return [("dora.row_norm", K._dora_row_norm_kernel, types, ("scaling",), const, "BN=32 BK=64 BR=16", 4, 3)]


def _prefix_specs(dt: str, head_dim: int = 128):
    import torch

    from fastpeft.kernels import prefix_attention as K

    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    # the launcher's GPU choices (it reads TRITON_INTERPRET, unset in this process)
    cfgs = K._configs(head_dim, torch_dt)
    dot_fp32, prec = K._dot_mode(torch_dt)
    common = dict(BLOCK_D=K._block_d(head_dim), DOT_FP32=dot_fp32, PREC=prec)
    p = f"*{dt}"
    kernels = [
        ("prefix.fwd", K._fwd_kernel, "fwd", dict(CAUSAL=True, HAS_MASK=True),
         dict(Q=p, K=p, V=p, PK=p, PV=p, KPM="*i8", O=p, LSE="*fp32"), ("qk_scale",)),
        ("prefix.dq", K._bwd_dq_kernel, "dq", dict(CAUSAL=True, HAS_MASK=True),
         dict(Q=p, K=p, V=p, PK=p, PV=p, KPM="*i8", DO=p, LSE="*fp32", DELTA="*fp32", DQ=p),
         ("qk_scale", "sm_scale")),
        ("prefix.dkdv", K._bwd_dkdv_kernel, "dkdv", dict(CAUSAL=True, HAS_MASK=True),
         dict(Q=p, K=p, V=p, KPM="*i8", DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p), ("qk_scale", "sm_scale")),
        ("prefix.dprefix", K._bwd_dprefix_kernel, "dprefix", {},
         dict(Q=p, PK=p, PV=p, DO=p, LSE="*fp32", DELTA="*fp32", DPK="*fp32", DPV="*fp32"),
         ("qk_scale", "sm_scale")),
    ]
    specs = []
    for name, fn, key, extra, types, floats in kernels:
        c = cfgs[key]
        const = dict(common, **extra, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"])
        specs.append((name, fn, types, floats, const, f"D={head_dim} BM={c['BLOCK_M']} BN={c['BLOCK_N']}",
                      c["num_warps"], c["num_stages"]))
    return specs


GROUPS = {"nf4": _nf4_specs, "dora": _dora_specs, "prefix": _prefix_specs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_TT))
    ap.add_argument("--only", nargs="+", default=sorted(GROUPS), choices=sorted(GROUPS))
    args = ap.parse_args(argv)

    import triton

    print(f"triton {triton.__version__}, target sm_{SM}\n")
    print("| kernel | dtype | config | warps, stages | regs | local/stack bytes | shared bytes | wgmma |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for group in args.only:
        for dt in args.dtype:
            for name, fn, types, floats, const, cfg, warps, stages in GROUPS[group](dt):
                try:
                    r = compile_sm90(fn, signature(fn, const, types, floats), const, warps, stages)
                except Exception as e:  # report every kernel, fail at the end
                    failed += 1
                    msg = " ".join(traceback.format_exception_only(type(e), e)[-1].split())[-300:].replace("|", "/")  # the error, after the source
                    print(f"| {name} | {dt} | {cfg} | {warps}, {stages} | FAILED: {msg} | | | |", flush=True)
                    continue
                print(f"| {name} | {dt} | {cfg} | {warps}, {stages} | {r['regs']} | {r['local']} | {r['shared']} | "
                      f"{'yes' if r['wgmma'] else 'no'} |", flush=True)
    print(f"\n{failed} kernel(s) failed to compile for sm_{SM}")
    return 1 if failed else 0


if __name__ == "__main__":
    # compile the real kernels, not the interpreter's (before fastpeft.kernels is imported);
    # only as a script: benchmarks/run.py imports this module while discovering benchmarks
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
