"""A small interpreter for the PTX subset of fastpeft's inline assembly (test helper, not shipped).

The Triton interpreter cannot run inline PTX, so the asm text the kernels embed is run here on
integers, instruction by instruction, with PTX ISA semantics:

* ``and.b32`` / ``or.b32`` / ``shr.u32`` (logical shift right) on 32-bit values;
* ``prmt.b32 d, a, b, c`` in the default mode: byte ``j`` of ``d`` is byte ``c[4j+2:4j]`` of the
  8-byte value ``{b, a}`` (a in bytes 0-3), or, when bit ``4j+3`` of ``c`` is set, that byte's
  most significant bit replicated into all 8 bits (only ``c``'s low 16 bits are read);
* ``mov.b32 {h0, h1}, r`` (h0 = low 16 bits) and ``cvt.f32.f16`` (exact widening);
* ``{`` / ``}`` scopes and ``.reg`` declarations, ``//`` comments.

Operands: ``$n`` (the asm's numbered operands), declared register names, decimal or ``0x``
immediates. Anything else raises, so the test fails when the kernels' asm grows an instruction
this interpreter does not model.
"""

from __future__ import annotations

import re

import numpy as np

_MASK = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` default mode."""
    src = ((b & _MASK) << 32) | (a & _MASK)
    out = 0
    for j in range(4):
        sel = (c >> (4 * j)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * j)
    return out


def _f16_to_f32(h: int) -> float:
    return float(np.array([h & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def run(asm: str, operands: dict) -> dict:
    """Run ``asm`` with ``operands`` (``{n: value}`` for the inputs ``$n``); returns every ``$n``
    after the run (outputs included: ints for ``.b32`` values, floats for ``cvt.f32`` results)."""
    regs = {f"${n}": v for n, v in operands.items()}

    def val(tok: str):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok):
            return int(tok, 0)
        raise KeyError(f"operand {tok!r} read before it was written")

    for raw in asm.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        m = re.fullmatch(r"([\w.]+)\s+(.*);", line)
        if not m:
            raise ValueError(f"cannot parse {raw!r}")
        op, args = m.group(1), m.group(2)
        if op == "mov.b32" and args.startswith("{"):
            halves, src = re.fullmatch(r"\{\s*(\w+)\s*,\s*(\w+)\s*\}\s*,\s*(\S+)", args).group(1, 2), None
            src = val(args.split("}")[1].lstrip(", "))
            regs[halves[0]], regs[halves[1]] = src & 0xFFFF, (src >> 16) & 0xFFFF
            continue
        ops = [t.strip() for t in args.split(",")]
        d, srcs = ops[0], ops[1:]
        if op == "and.b32":
            regs[d] = val(srcs[0]) & val(srcs[1]) & _MASK
        elif op == "or.b32":
            regs[d] = (val(srcs[0]) | val(srcs[1])) & _MASK
        elif op == "shr.u32":
            regs[d] = (val(srcs[0]) & _MASK) >> min(val(srcs[1]), 32)
        elif op == "prmt.b32":
            regs[d] = prmt(val(srcs[0]), val(srcs[1]), val(srcs[2]))
        elif op == "cvt.f32.f16":
            regs[d] = _f16_to_f32(val(srcs[0]))
        else:
            raise NotImplementedError(f"PTX instruction {op!r} is not modelled ({raw.strip()!r})")
    return {k: v for k, v in regs.items() if k.startswith("$")}
