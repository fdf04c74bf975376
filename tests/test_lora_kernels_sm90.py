"""The LoRA-linear Triton kernels compile for an H100 (sm_90) without a GPU.

Runs ``benchmarks/aot_lora_linear.py`` (triton's own compiler, bundled ``cuobjdump``) in a
subprocess without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` at import time):
one autotune config per kernel (the first the pruning keeps), bf16, r = 16, dropout on. Checks
that every kernel compiles and that the fused forward's big-tile config uses Hopper's ``wgmma``.
Registers / spills are reported by the script, not asserted here (they vary across triton
versions; benchmarks/NOTES-lora-linear.md has the measured tables).
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton build without the bundled CUDA tools")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "aot_lora_linear.py"), "--rank", "16", "--first",
         "--dropout", "on", "--max-local", "1000000"],
        capture_output=True, text=True, timeout=600, cwd="/", env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in proc.stdout.splitlines() if ln.startswith("| ") and "kernel" not in ln]
    rows = [[c.strip() for c in r] for r in rows]
    assert sorted(r[0] for r in rows) == ["da", "down", "dx", "fused"], proc.stdout
    for kernel, r_pad, dropout, config, kept, regs, local, wgmma in rows:
        assert r_pad == "16" and dropout == "True" and kept == "yes"
        assert 0 < int(regs) <= 255
    fused = next(r for r in rows if r[0] == "fused")
    assert fused[3].startswith("(128, 128") and fused[7] == "yes", fused  # Hopper tensor-core path
