"""What the sm_90 code of the kernels must say about numerics the interpreter cannot see.

Compiled with triton's own compiler for sm_90 and the JIT's specialisation (``benchmarks/aot.py``)
in a subprocess without ``TRITON_INTERPRET``:

* 64-bit address math: every row stride of an ``[M, ...]`` operand (x, u, dx, g, y, c, dy) enters the
  pointer arithmetic as int64 (``arith.extsi`` in the TTIR), so ``m * stride`` cannot wrap once
  ``M * K >= 2^31`` (M >= 149,797 tokens at K = 14336); the interpreter computes the same
  offsets in int32 numpy and wraps identically, so only the compiled IR shows this.
* No FMA contraction where bitsandbytes rounds twice: the double-quantised scale
  ``nested_code[q] * nested_absmax + offset`` is a product stored in fp32 then an add in
  bitsandbytes; a contracted ``fma.rn.f32`` rounds once and is not bit-exact. The NF4 kernels'
  PTX carries the product as ``mul.rn.f32``, and the dequantisation kernel (which has no other
  multiply-add) has no ``fma.rn.f32`` at all.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
import aot, aot_specs
out = {}
specs = aot_specs.lora_kernel_specs("bf16", 4096, 4096, 4096, 16, True)
specs += [s for s in aot_specs.nf4_specs("bf16", gemv_ms=(1,)) if s["name"] in ("nf4.dequant", "nf4.matmul fwd", "nf4.gemv(M=1)")]
for s in specs:
    sig, const, attrs = aot.jit_signature(s["fn"], s["args"], s["const"])
    ck = aot.compile_sm90(s["fn"], sig, const, s["warps"], s["stages"], attrs, **s.get("options", {}))["kernel"]
    out[s["name"]] = dict(ttir=ck.asm["ttir"], ptx=ck.asm["ptx"], args=list(s["args"]))
print(json.dumps(out))
"""

# the row stride of every M-indexed operand, per kernel
ROW_STRIDES = {
    "lora.down": ["stride_xm", "stride_um"],
    "lora.dx_add": ["stride_dxm", "stride_gm"],
    "lora.grad_a": ["stride_gm", "stride_xm"],
    "lora.fused_fwd": ["stride_xm", "stride_ym", "stride_um", "stride_wn"],
    "nf4.matmul fwd": ["stride_xm", "stride_cm", "stride_lm"],
    "lora.epilogue_fwd": ["stride_am", "stride_lm", "stride_om"],
    "lora.epilogue_dx": ["stride_am", "stride_lm", "stride_om"],
    "lora.grad_dy": ["stride_dym", "stride_um", "stride_gm"],
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("triton build without the bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the fp-fusion default of triton 3.6 (3.9 warns when unset)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ROOT], capture_output=True, text=True, timeout=600,
                          cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", sorted(ROW_STRIDES))
def test_row_offsets_are_64_bit(compiled, kernel):
    ttir = compiled[kernel]["ttir"]
    for name in ROW_STRIDES[kernel]:
        assert f"%{name}" in ttir, (kernel, name, "stride not an argument (specialised away?)")
        assert f"arith.extsi %{name} : i32 to i64" in ttir, (kernel, name, "row stride multiplied in 32 bits")


def test_nested_scale_is_not_contracted(compiled):
    for kernel in ("nf4.dequant", "nf4.matmul fwd", "nf4.gemv(M=1)"):
        assert "mul.rn.f32" in compiled[kernel]["ptx"], kernel
    assert "fma.rn.f32" not in compiled["nf4.dequant"]["ptx"]
