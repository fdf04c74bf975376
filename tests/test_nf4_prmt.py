"""The register code table of the one-row NF4 GEMV (kernels/nf4_prmt.py): the exact inline-PTX
text the kernel embeds, run for every byte value through a small PTX interpreter
(tests/ptx_subset.py), against the code table; the fp16 table's precision; the launcher's choice.

Tolerances: the lookup is exact against the fp16-rounded table (``torch.equal``); the fp16 table
against the fp32 code: relative 2^-11 (fp16's unit roundoff). The GPU test compares the compiled
GEMV with dequantise + matmul in fp32 at rtol/atol 1e-5 scaled by sqrt(K) * 2^-11 (the fp16 codes).
"""

import os
import random

import pytest
import torch

from fastpeft.kernels import nf4_prmt
from fastpeft.ops.nf4 import FP4_CODE, NF4_CODE

from ptx_subset import prmt, run

TABLES = {"nf4": torch.tensor(NF4_CODE), "fp4": torch.tensor(FP4_CODE),
          "random": torch.randn(16, generator=torch.Generator().manual_seed(3))}


def _lookup(asm, words, word):
    ops = {8: word}
    for i, w in enumerate(words):
        for j in range(4):  # each table scalar arrives once per packed element
            ops[9 + 4 * i + j] = w
    out = run(asm, ops)
    return [out[f"${n}"] for n in range(8)]


def test_prmt_semantics_of_the_interpreter():
    """The interpreter's prmt against hand-worked PTX ISA examples (bytes of {b, a}, sign bit)."""
    a, b = 0x44332211, 0x88776655
    assert prmt(a, b, 0x3210) == a and prmt(a, b, 0x7654) == b
    assert prmt(a, b, 0x0123) == 0x11223344
    assert prmt(a, b, 0x5140) == 0x66225511  # lanes 0-3: a.0, b.0, a.1, b.1 (the fp16 interleave)
    assert prmt(a, b, 0x0008) == 0x11111100  # lane 0: sign of byte 0 (0x11 -> 0x00)
    assert prmt(a, b, 0x000F) == 0x111111FF  # lane 0: sign of byte 7 (0x88 -> 0xFF)
    assert prmt(a, b, 0xFFFF0000 | 0x3210) == a  # only the selector's low 16 bits count


@pytest.mark.parametrize("name", sorted(TABLES))
def test_asm_text_looks_up_every_byte(name):
    code = TABLES[name]
    asm = nf4_prmt.lookup_asm()
    words = nf4_prmt.fp16_planes(code)
    want = code.to(torch.float16).to(torch.float32)
    rng = random.Random(7)
    for byte in range(256):
        for pos in range(4):  # the byte in each lane of the packed word, the others random
            packed = [rng.randrange(256) for _ in range(4)]
            packed[pos] = byte
            word = sum(v << (8 * j) for j, v in enumerate(packed))
            out = _lookup(asm, words, word)
            for j, v in enumerate(packed):
                assert out[j] == float(want[v >> 4]), (name, byte, pos, j, "high nibble")
                assert out[4 + j] == float(want[v & 15]), (name, byte, pos, j, "low nibble")


def test_fp16_table_precision_and_guard():
    for name in ("nf4", "fp4"):
        code = TABLES[name].double()
        h = code.to(torch.float16).double()
        assert ((h - code).abs() <= 2.0 ** -11 * code.abs()).all(), name
        assert nf4_prmt.fp16_exact_enough(TABLES[name])
    assert not nf4_prmt.fp16_exact_enough(torch.tensor([1e-7] + [0.5] * 15))  # fp16 subnormal: coarse
    assert not nf4_prmt.fp16_exact_enough(torch.tensor([7e4] + [0.5] * 15))   # fp16 overflow
    with pytest.raises(ValueError, match="16 entries"):
        nf4_prmt.fp16_planes(torch.zeros(8))


def test_constraints_match_the_operands():
    asm = nf4_prmt.lookup_asm()
    cons = nf4_prmt.LOOKUP_CONSTRAINTS.split(",")
    used = {int(n) for n in __import__("re").findall(r"\$(\d+)", asm)}
    assert max(used) < len(cons) and cons[:8] == ["=f"] * 8 and all(c == "r" for c in cons[8:])
    assert set(range(8)) <= used and 8 in used


def test_launcher_uses_the_register_table_only_when_compiled(monkeypatch):
    """Under the interpreter the register path cannot run: the launcher passes LUT=False and the
    L1 table; register_table refuses a table fp16 cannot hold."""
    from fastpeft.kernels import nf4 as K_

    assert K_.register_table(TABLES["nf4"]) == nf4_prmt.fp16_planes(TABLES["nf4"])
    assert K_.register_table(torch.tensor([1e-7] + [0.5] * 15)) is None
    seen = {}
    real = K_._gemv1_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.update(k)
                return real[grid](*a, **k)
            return launch

    monkeypatch.setattr(K_, "_gemv1_kernel", Spy())
    from fastpeft.ops import nf4

    packed, st = nf4.quantize_nf4(torch.randn(20, 128) * 0.1, 64, compress_statistics=True)
    x = torch.randn(1, 128)
    got = K_.gemv(x, packed.reshape(-1), st, lut=True)
    assert seen["LUT"] is False
    torch.testing.assert_close(got, x @ nf4.dequantize_nf4_reference(packed, st, torch.float32).t(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inline PTX runs compiled only)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_register_table_gemv_on_gpu(dtype, quant_type):
    """The compiled prmt GEMV against dequantise + matmul in fp32, and against the L1-table GEMV."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is on")
    from fastpeft.kernels import nf4 as K_
    from fastpeft.ops import nf4

    N, K = 4096 + 37, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    packed, st = nf4.quantize_nf4(torch.randn(N, K, device="cuda", generator=g) * 0.05, 64,
                                  compress_statistics=True, quant_type=quant_type)
    x = torch.randn(1, K, device="cuda", generator=g).to(dtype)
    ref = x.float() @ nf4.dequantize_nf4_reference(packed, st, torch.float32).t()
    got = K_.gemv(x, packed.reshape(-1), st, lut=True).float()
    l1 = K_.gemv(x, packed.reshape(-1), st, lut=False).float()
    scale = ref.abs().mean().item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype] + 2.0 ** -11 * K ** 0.5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(got, l1, rtol=tol, atol=tol * scale)
