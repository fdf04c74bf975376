"""A 16-entry code table held in registers and read with PTX ``prmt`` (byte permute): the PTX text
and the table words of the one-row NF4 GEMV's register lookup (``kernels/nf4.py``, ``LUT``).

``prmt.b32 d, a, b, c`` builds each byte ``j`` of ``d`` from byte ``c[4j+2 : 4j]`` of the 8-byte
pair ``{b, a}`` (bit ``4j+3`` set: that byte's sign bit, replicated). One ``prmt`` is therefore
an 8-entry byte table looked up for 4 indices at once. A 16-entry table of 16-bit values is four
8-byte tables: the high and low byte planes, entries 0-7 and 8-15. Per 4 nibbles of a packed
word (PTX reads a selector's low 16 bits only, so a 32-bit word is two groups):

1. ``s = w & 0x7777``: the 3-bit index of each nibble (bit 3 cleared, so no sign replication);
2. two ``prmt`` per plane look the 4 indices up in entries 0-7 and 8-15;
3. one ``prmt`` per plane picks, per byte, entries 8-15 where the nibble's bit 3 is set
   (``t = ((w >> 1) & 0x4444) | 0x3210``: selector ``j`` or ``j + 4``);
4. two ``prmt`` interleave the planes into two fp16 pairs, widened to fp32 by ``cvt.f32.f16``.

The table is **fp16**: ``code[n]`` rounded to nearest fp16, relative error <= 2^-11, which is
the unit roundoff of an fp16 compute dtype and 1/8 of bf16's (2^-8): bitsandbytes computes
``code * absmax`` in fp32 and rounds that product to the compute dtype, so the GEMV's weight
differs from bitsandbytes' by at most about one rounding of the compute dtype, as the L1-table
path's (fp32 codes, unrounded weight) does. bf16 codes would be 8x coarser than an fp16
reference's own rounding; a third byte plane (24-bit codes) costs 3 more ``prmt`` per 4 weights.
The launcher checks the table is exact to 2^-11 in fp16 (:func:`fp16_exact_enough`; NF4's and
FP4's are) and otherwise keeps the L1 table.

Per packed 32-bit word (8 weights): 16 ``prmt``, 2 ``and``/``or`` (LOP3), 3 shifts, 8 ``cvt``.
:func:`lookup_asm` returns the text for ``tl.inline_asm_elementwise`` with ``pack=4`` (one word
of 4 packed bytes per instance); ``tests/ptx_subset.py`` runs that exact text for all 256 byte
values in a small PTX interpreter (the Triton interpreter cannot run inline PTX).
"""

from __future__ import annotations

import torch

__all__ = ["fp16_planes", "fp16_exact_enough", "lookup_asm", "LOOKUP_CONSTRAINTS", "N_TABLE_WORDS", "PACK"]

PACK = 4  # bytes (one 32-bit register) per asm instance
N_TABLE_WORDS = 8  # high plane entries 0-3, 4-7, 8-11, 12-15, then the low plane's
_REL_TOL = 2.0 ** -11  # fp16's unit roundoff


def fp16_planes(code: torch.Tensor) -> tuple:
    """The 8 int32 table words of ``code`` (16 values) in fp16: the high byte plane's entries 0-3,
    4-7, 8-11, 12-15 (entry ``4i + j`` in byte ``j`` of word ``i``), then the low byte plane's."""
    if code.numel() != 16:
        raise ValueError(f"the register code table holds 16 entries, got {code.numel()}")
    bits = code.detach().to("cpu", torch.float32).to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    planes = [(bits >> 8) & 0xFF, bits & 0xFF]
    words = []
    for plane in planes:
        for i in range(4):
            w = sum(int(plane[4 * i + j]) << (8 * j) for j in range(4))
            words.append(w - (1 << 32) if w >= 1 << 31 else w)  # as int32 kernel arguments
    return tuple(words)


def fp16_exact_enough(code: torch.Tensor) -> bool:
    """True when every entry of ``code`` survives fp16 within 2^-11 relative (zeros exactly):
    finite, no fp16 overflow, no subnormal loss."""
    c = code.detach().to("cpu", torch.float64)
    h = c.to(torch.float16).to(torch.float64)
    ok = torch.isfinite(h) & ((h - c).abs() <= _REL_TOL * c.abs())
    return bool(ok.all())


def _group(out_even: int, out_odd: int, s: str, t: str) -> list:
    """PTX for one group of 4 nibbles (bytes b and b + 1 of the word, in the selectors' low 16
    bits): lanes 0-3 = low nibble (odd element) of byte b, its high nibble (even element), then
    byte b + 1's; the codes go to ``$out_even``, ``$out_even + 1`` and ``$out_odd``, ``+ 1``."""
    w = [f"${9 + 4 * i}" for i in range(N_TABLE_WORDS)]  # first register of each table word
    return [
        f"prmt.b32 a, {w[0]}, {w[1]}, {s};",   # high plane, entries 0-7
        f"prmt.b32 b, {w[2]}, {w[3]}, {s};",   # high plane, entries 8-15
        f"prmt.b32 a, a, b, {t};",              # per byte: 8-15 where bit 3 of the nibble is set
        f"prmt.b32 c, {w[4]}, {w[5]}, {s};",   # low plane
        f"prmt.b32 d, {w[6]}, {w[7]}, {s};",
        f"prmt.b32 c, c, d, {t};",
        "prmt.b32 p, c, a, 0x5140;",            # fp16 pair: (lane 0, lane 1) = (odd, even) of byte b
        "prmt.b32 q, c, a, 0x7362;",            # (lane 2, lane 3): byte b + 1
        "mov.b32 {h0, h1}, p;",
        f"cvt.f32.f16 ${out_odd}, h0;",
        f"cvt.f32.f16 ${out_even}, h1;",
        "mov.b32 {h0, h1}, q;",
        f"cvt.f32.f16 ${out_odd + 1}, h0;",
        f"cvt.f32.f16 ${out_even + 1}, h1;",
    ]


def lookup_asm() -> str:
    """PTX for ``tl.inline_asm_elementwise`` (``pack=4``, :data:`LOOKUP_CONSTRAINTS`): operands
    ``$0-$3`` the fp32 codes of the high nibbles (even elements) of the 4 bytes in ``$8``,
    ``$4-$7`` those of the low nibbles (odd elements); ``$9 + 4i`` is table word ``i``
    (:func:`fp16_planes`; each scalar comes 4 times, one per packed element)."""
    lines = [
        "{",
        ".reg .b32 s, t, a, b, c, d, p, q;",
        ".reg .b16 h0, h1;",
        "and.b32 s, $8, 0x77777777;",     # 3-bit indices
        "shr.u32 t, $8, 1;",
        "and.b32 t, t, 0x44444444;",      # bit 3 of each nibble, moved to bit 2
        "or.b32 t, t, 0x32103210;",       # selector j (entries 0-7) or j + 4 (entries 8-15)
    ]
    lines += _group(0, 4, "s", "t")   # bytes 0, 1
    lines += ["shr.u32 s, s, 16;", "shr.u32 t, t, 16;"]
    lines += _group(2, 6, "s", "t")   # bytes 2, 3
    lines.append("}")
    return "\n".join(lines)


# outputs: 8 fp32; inputs: the packed word, then 8 table scalars x 4 packed copies
LOOKUP_CONSTRAINTS = ",".join(["=f"] * 8 + ["r"] + ["r"] * (4 * N_TABLE_WORDS))
