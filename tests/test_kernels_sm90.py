"""The NF4, DoRA, prefix-attention and linear-cross-entropy Triton kernels compile for an H100 (sm_90) without a GPU.

Runs ``benchmarks/aot.py`` (triton's own compiler, bundled ``cuobjdump``) in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` at import time) and with an empty
triton cache (so every kernel is really compiled, not read back): each kernel once, with the
configuration its launcher picks on a GPU, in bf16 and (where the kernel has a distinct fp32
path) fp32. Checks that every kernel compiles to a cubin with a register count in (0, 255] and
that the bf16 GEMM-shaped kernels use Hopper's ``wgmma``. Small spills are reported by the script,
not asserted (they vary across triton versions), but no kernel may keep more than 1 KB per thread in
local memory: that is the compiler giving up on registers (32 registers and a 5-10 KB stack, as the
fp32 NF4 dx and fp32 prefix kernels once did), not a spill to tune on a GPU. The LoRA-linear
kernels: test_lora_kernels_sm90.py.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

EXPECTED = {
    ("dora.row_norm", "bf16"), ("dora.row_norm", "fp32"),
    ("nf4.dequant", "bf16"), ("nf4.gemv(M=1)", "bf16"), ("nf4.gemv(M=1) l1", "bf16"), ("nf4.gemv(M=16)", "bf16"),
    ("nf4.matmul fwd", "bf16"), ("nf4.matmul dx", "bf16"),
    ("nf4.matmul fwd", "fp32"), ("nf4.matmul dx", "fp32"),
} | {(f"prefix.{k}", dt) for k in ("fwd", "dq", "dkdv", "dprefix") for dt in ("bf16", "fp32")} | {
    (f"lora.{k}", dt) for k in ("down", "dx_add", "grad_a", "fused_fwd", "epilogue_fwd", "epilogue_dx", "grad_dy")
    for dt in ("bf16", "fp32")} | {
    (k, dt) for k in ("lce.rows", "lce.rows softcap") for dt in ("bf16", "fp32")}

# bf16 tensor-core tiles of >= 64 rows: Hopper's warpgroup MMA
WGMMA = {("nf4.matmul fwd", "bf16"), ("nf4.matmul dx", "bf16")} | {
    (f"prefix.{k}", "bf16") for k in ("fwd", "dq", "dkdv", "dprefix")}


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton build without the bundled CUDA tools")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out_json = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "aot.py"), "--dtype", "bf16", "fp32", "--json", str(out_json)],
        capture_output=True, text=True, timeout=900, cwd="/", env=env,
    )
    out = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    rows = json.loads(out_json.read_text())
    assert {(r["name"], r["dtype"]) for r in rows} == EXPECTED, out
    for r in rows:
        where = (r["name"], r["dtype"], r["shape"], r["config"])
        assert 0 < r["regs"] <= 255, where
        assert 0 <= r["local"] <= 1024, (where, f"{r['local']} local/stack bytes per thread")
        assert r["shared"] >= 0 and r["ctas_per_sm"] >= 1, where
        assert r["loop_instrs"] > 0 and r["per_elem"] > 0, where
        # the JIT's specialisation (aligned pointers, unit strides): every kernel's main loop
        # loads at least 32 bits at once (unspecialised builds fell to 16-bit loads)
        assert r["widest_load"] >= 32, where
        if (r["name"], r["dtype"]) in WGMMA:
            assert r["wgmma"] and r["tensor_core"] > 0, where
    # the decoding GEMV's register-table build (issue 12): under 7 SASS per weight, 16-byte
    # packed loads, no spills (the L1-table build has fewer instructions but is L1-bound)
    prmt = next(r for r in rows if (r["name"], r["dtype"]) == ("nf4.gemv(M=1)", "bf16"))
    assert "prmt" in prmt["config"] and prmt["per_elem"] < 7 and prmt["widest_load"] == 128 and prmt["local"] == 0, prmt
    # the epilogue plan at the training shape (M = 4096; M = 1 takes 16-row tiles, no wgmma): its
    # kernels on wgmma without spills, 16-byte loads, and GEMM epilogues (the masked g A and the
    # mask draws in dx) of a few tens of SASS instructions per output element
    for r in rows:
        if r["name"] in ("lora.epilogue_fwd", "lora.epilogue_dx", "lora.grad_dy") and r["shape"].startswith("M=4096"):
            assert r["local"] == 0 and r["widest_load"] == 128, r
            if r["name"] != "lora.grad_dy":
                assert r["epilogue_per_elem"] > 0, r
            if r["dtype"] == "bf16":  # (fp32 "ieee" dots are FMA loops: no wgmma, longer epilogues)
                assert r["wgmma"] and r["tensor_core"] > 0, r
                assert r["name"] == "lora.grad_dy" or r["epilogue_per_elem"] < 40, r
