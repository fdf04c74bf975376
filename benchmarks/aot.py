"""Compile fastpeft's Triton kernels for an H100 (sm_90) without a GPU, as the JIT would, and read
the machine code.

Not a timing: triton's own compiler (``triton.compile`` with a ``GPUTarget``, no driver, no
``TRITON_INTERPRET``) builds each kernel for sm_90 with the specialisation triton's JIT gives a
real launch (:func:`jit_signature`: 16-byte-aligned pointers and integers divisible by 16 carry
``tt.divisibility = 16``, integers equal to 1 become constants), for the launch configuration
its launcher picks (autotuned LoRA kernels: the first config the pruning keeps) at a benchmark
shape. The bundled ``cuobjdump`` then reads back, per kernel (:func:`analyse`):

* registers per thread, local/stack bytes (spills), shared memory, occupancy on an H100
  (CTAs and warps per SM from registers, shared memory and warps);
* tensor-core instructions (``HGMMA`` = Hopper's wgmma, ``HMMA`` = mma.sync) in the SASS;
* the widest global load in the main loop (bits: 128 = 16-byte vector loads);
* the SASS instructions of the main loop (the longest backward branch; the whole kernel when
  it has no loop) per element it processes per thread (per weight for NF4), the figure
  ``benchmarks/roofline.py`` turns into predicted times, and (``alu_per_elem``, JSON only) those
  of them that issue to the integer-ALU pipe (:data:`ALU_OPS`).

The specs (kernel, argument values at a shape, constants, warps, stages, elements per loop
iteration) are in ``aot_specs.py``. Usage::

    python benchmarks/aot.py [--only lora nf4 dora prefix] [--dtype bf16 fp32] [--shapes all] [--json F]

Prints one markdown table (and writes the rows as JSON with ``--json``). Exit 1 when a kernel
fails to compile (the error is in its row). No ``run()``: ``benchmarks/run.py`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SM = 90
# H100 SXM per-SM limits (the same on H200): registers, shared memory, warps, CTAs
SM_REGS, SM_SHARED, SM_WARPS, SM_CTAS = 65536, 228 * 1024, 64, 32


def tool(name: str) -> str:
    """Path of a CUDA tool bundled with triton (``cuobjdump``, ``ptxas``)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool("cuobjdump"), flag, path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError((out.stdout + out.stderr)[-2000:])
    return out.stdout


def regs_and_spills(cubin: bytes) -> tuple:
    """(registers per thread, local-memory bytes per thread) of a cubin, read with the bundled
    ``cuobjdump -res-usage`` (local memory > 0 means spills or a stack array)."""
    text = _cuobjdump(cubin, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1)) + int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, local


def signature(fn, constexprs: dict, types: dict, float_scalars=(), default_scalar: str = "i32") -> dict:
    """Unspecialised triton signature of ``fn``: ``constexpr`` for the names in ``constexprs``,
    ``types[name]`` where given, ``fp32`` for ``float_scalars``, ``default_scalar`` otherwise.
    (Compiles a different binary than the JIT: prefer :func:`jit_signature`.)"""
    sig = {}
    for n in fn.arg_names:
        sig[n] = ("constexpr" if n in constexprs else types.get(n) or ("fp32" if n in float_scalars else default_scalar))
    unknown = (set(constexprs) | set(types) | set(float_scalars)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: no argument(s) {sorted(unknown)}; it has {fn.arg_names}")
    return sig


def jit_signature(fn, args: dict, constexprs: dict):
    """(signature, constexprs, attrs) that triton's JIT derives for a launch of ``fn`` with these
    argument values: ``args`` maps every non-constexpr argument to a pointer type (``"*bf16"``,
    taken as 16-byte aligned like every fresh torch allocation), an int or a float.

    The JIT's rules (``triton.runtime.jit`` / ``BaseBackend.get_int_specialization``): pointers
    aligned to 16 bytes and ints divisible by 16 get ``tt.divisibility = 16``; ints equal to 1 are
    compiled as the constant 1; ints outside int32 are ``i64``; floats are ``fp32``; parameters
    marked ``do_not_specialize`` are left alone."""
    sig, const, attrs = {}, dict(constexprs), {}
    missing = [n for n in fn.arg_names if n not in constexprs and n not in args]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for {missing}")
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v, param = args[name], fn.params[i]
        if isinstance(v, str):
            sig[name] = v
            if not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or isinstance(v, float):
            sig[name] = "i1" if isinstance(v, bool) else "fp32"
        elif isinstance(v, int):
            if v == 1 and not param.do_not_specialize:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and not param.do_not_specialize and not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}.{name}: cannot specialise a {type(v).__name__}")
    return sig, const, attrs


def compile_sm90(fn, sig: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, attrs=None,
                 **options) -> dict:
    """Compile ``fn`` for sm_90 with triton's own compiler. Returns ``regs``, ``local`` (bytes per
    thread of local/stack memory), ``shared`` (bytes), ``wgmma`` (PTX uses it) and the compiled
    kernel (``kernel``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names},
                    attrs=attrs or {})
    ck = triton.compile(src, target=GPUTarget("cuda", SM, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    regs, local = regs_and_spills(ck.asm["cubin"])
    return dict(regs=regs, local=local, shared=int(getattr(ck.metadata, "shared", 0) or 0),
                wgmma="wgmma" in ck.asm["ptx"], kernel=ck)


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRA = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`?\(?\.?L?_?x?_?\w*\)?\s*)?(0x[0-9a-f]+)")


def sass(cubin: bytes) -> list:
    """[(address, instruction text)] of the cubin's SASS, NOPs dropped."""
    out = []
    for m in _SASS.finditer(_cuobjdump(cubin, "-sass")):
        text = m.group(2).strip()
        if text and not text.split()[-1].startswith("NOP") and " NOP" not in f" {text}":
            out.append((int(m.group(1), 16), text))
    return out


def main_loop(instrs: list) -> tuple:
    """(loop body instructions, True) for the longest backward branch, else (all, False)."""
    best = None
    for addr, text in instrs:
        m = _BRA.search(text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [(a, t) for a, t in instrs if lo <= a <= addr]
            if best is None or len(body) > len(best):
                best = body
    return (best, True) if best else (instrs, False)


def innermost_loops(instrs: list) -> list:
    """Instruction counts of the loops that contain no other loop (backward branches whose body
    holds no other backward branch), in address order: e.g. the prefix, unmasked and diagonal
    key loops of an attention kernel, where :func:`main_loop` sees only the longest (for nested
    loops: the outer one, with every inner loop in it)."""
    ranges = []
    for addr, text in instrs:
        m = _BRA.search(text)
        if m and int(m.group(1), 16) < addr:
            ranges.append((int(m.group(1), 16), addr))
    inner = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    return [sum(1 for a, _ in instrs if lo <= a <= hi) for lo, hi in sorted(set(inner))]


def _load_bits(text: str) -> int:
    op = text.split()[1] if text.startswith("@") else text.split()[0]
    if not (op.startswith("LDG") or op.startswith("LDGSTS")):
        return 0
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if suffix in op:
            return bits
    return 32


# SASS that issues to the integer ALU pipe (16 lanes per SM sub-partition, half the issue rate;
# IMAD and the FP32 instructions go to the FMA pipes): used for the ALU-pipe floor of roofline.py
ALU_OPS = ("LOP3", "SHF", "PRMT", "IADD3", "ISETP", "LEA", "SEL", "MOV", "FSEL", "FMNMX", "IMNMX", "FSETP",
           "P2R", "R2P", "PLOP3", "BMSK", "SGXT", "FLO", "POPC", "BREV")


def _opcode(text: str) -> str:
    return (text.split()[1] if text.startswith("@") else text.split()[0]).split(".")[0]


def occupancy(regs: int, shared: int, warps: int) -> int:
    """CTAs per SM on an H100 from registers (allocated per warp in units of 256), shared memory
    (+1 KB reserved per CTA) and warps."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM_REGS // (regs_per_warp * warps)
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_CTAS
    return max(0, min(by_regs, by_shared, SM_WARPS // warps, SM_CTAS))


def analyse(ck, num_warps: int, elems_per_iter: int, epilogue_elems: int = 0) -> dict:
    """Per-kernel figures of a compiled kernel (see the module docstring). With
    ``epilogue_elems`` (output elements per CTA of a GEMM), also ``epilogue_per_elem``: the SASS
    outside the main loop (prologue, epilogue: spent once per output tile) per output element
    of a thread."""
    regs, local = regs_and_spills(ck.asm["cubin"])
    shared = int(getattr(ck.metadata, "shared", 0) or 0)
    instrs = sass(ck.asm["cubin"])
    body, is_loop = main_loop(instrs)
    tc = sum(1 for _, t in instrs if re.search(r"\b(HGMMA|HMMA)\b", t))
    per_thread = elems_per_iter / (32 * num_warps)
    ctas = occupancy(regs, shared, num_warps)
    return dict(regs=regs, local=local, shared=shared, ctas_per_sm=ctas, warps_per_sm=ctas * num_warps,
                tensor_core=tc, wgmma=any("HGMMA" in t for _, t in instrs),
                widest_load=max([_load_bits(t) for _, t in body] or [0]) or max([_load_bits(t) for _, t in instrs] or [0]),
                loop_instrs=len(body), scope="loop" if is_loop else "kernel", inner_loops=innermost_loops(instrs),
                per_elem=round(len(body) / per_thread, 2) if per_thread else None,
                alu_per_elem=round(sum(_opcode(t) in ALU_OPS for _, t in body) / per_thread, 2) if per_thread else None,
                outside_loop_instrs=len(instrs) - len(body) if is_loop else 0,
                epilogue_per_elem=(round((len(instrs) - len(body)) * 32 * num_warps / epilogue_elems, 2)
                                   if epilogue_elems and is_loop else None),
                ptx=ck.asm["ptx"])


_CACHE: dict = {}


def compile_spec(spec: dict) -> dict:
    """Compile one spec (see ``aot_specs.py``) the way the JIT would and :func:`analyse` it; specs
    that specialise to the same binary are compiled once."""
    fn = spec["fn"]
    sig, const, attrs = jit_signature(fn, spec["args"], spec["const"])
    key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())),
           tuple(sorted(attrs)), spec["warps"], spec["stages"], spec.get("elems_per_iter"),
           spec.get("epilogue_elems", 0), tuple(sorted(spec.get("options", {}).items())))
    if key not in _CACHE:
        ck = compile_sm90(fn, sig, const, spec["warps"], spec["stages"], attrs, **spec.get("options", {}))["kernel"]
        _CACHE[key] = analyse(ck, spec["warps"], spec["elems_per_iter"], spec.get("epilogue_elems", 0))
    return _CACHE[key]


COLUMNS = ("kernel", "dtype", "shape", "config", "warps, stages", "regs", "local B", "shared B", "CTAs/SM",
           "tensor-core instrs", "widest load (bits)", "main-loop instrs", "instrs per elem", "elem")


def _row(spec, r) -> list:
    return [spec["name"], spec["dtype"], spec["shape"], spec["config"], f"{spec['warps']}, {spec['stages']}",
            r["regs"], r["local"], r["shared"], r["ctas_per_sm"], r["tensor_core"], r["widest_load"],
            f"{r['loop_instrs']} ({r['scope']})", r["per_elem"], spec.get("unit", "element")]


def run_specs(specs, out=print) -> tuple:
    """Compile and print every spec; returns (rows as dicts, number that failed)."""
    out("| " + " | ".join(COLUMNS) + " |")
    out("|" + "---|" * len(COLUMNS))
    rows, failed = [], 0
    for spec in specs:
        try:
            r = compile_spec(spec)
        except Exception as e:  # report every kernel, fail at the end
            failed += 1
            msg = " ".join(traceback.format_exception_only(type(e), e)[-1].split())[-300:].replace("|", "/")
            out(f"| {spec['name']} | {spec['dtype']} | {spec['shape']} | {spec['config']} | FAILED: {msg} |")
            continue
        out("| " + " | ".join(str(c) for c in _row(spec, r)) + " |")
        rows.append(dict({k: spec[k] for k in ("name", "dtype", "shape", "config", "warps", "stages")},
                         **{k: v for k, v in r.items() if k != "ptx"}, unit=spec.get("unit", "element")))
    return rows, failed


def main(argv=None) -> int:
    import aot_specs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--only", nargs="+", default=sorted(aot_specs.GROUPS), choices=sorted(aot_specs.GROUPS))
    ap.add_argument("--shapes", choices=["default", "all"], default="default",
                    help="default: one representative shape per kernel; all: every benchmark shape")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import triton

    print(f"triton {triton.__version__}, target sm_{SM}, JIT specialisation (aligned pointers, "
          "ints %16 == 0 divisible, ints == 1 constant)\n")
    specs = [s for g in args.only for dt in args.dtype for s in aot_specs.GROUPS[g](dt, args.shapes == "all")]
    rows, failed = run_specs(specs)
    print(f"\n{failed} kernel(s) failed to compile for sm_{SM}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    # compile the real kernels, not the interpreter's (before fastpeft.kernels is imported);
    # only as a script: benchmarks/run.py imports this module while discovering benchmarks
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9: keep 3.6's default, silence its warning
    sys.exit(main())
