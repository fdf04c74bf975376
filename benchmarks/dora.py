"""DoRA linear: fastpeft's DoRA op (fused weight-norm kernel + LoRA-linear op) vs eager DoRA as
peft computes it (materialises ``W + s B A`` every forward for the column norm) vs the frozen
base linear alone (the floor), forward (inference) and forward+backward (training, no dropout).

GPU (full run): Llama projection shapes K x N in 4096x4096, 4096x14336, 14336x4096, M (tokens)
in 1, 512, 4096, r in 16, 64, bf16. The ``norm`` columns time the weight norm alone (fused
kernel vs materialised ``torch.linalg.norm``). CPU (``quick``): small shapes on the reference
path, fp32, to exercise the script.

Columns: median ms per call; ``eager/fastpeft`` > 1 means fastpeft is faster than eager;
``fastpeft/base`` is the cost over the frozen linear; peak MiB is the device memory allocated
during one call above the inputs (the eager merged weight is an N x K temporary).

Run: ``python benchmarks/dora.py [--quick]`` or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, peak_memory_mib, standalone_main, sweep  # noqa: E402

from fastpeft.ops.dora import dora_linear, dora_weight_norm  # noqa: E402

TITLE = "DoRA linear (fused weight norm + LoRA op vs eager peft-style DoRA vs frozen base linear)"
SCALING = 2.0

FULL = dict(kn=[(4096, 4096), (4096, 14336), (14336, 4096)], ms=[1, 512, 4096], rs=[16, 64], dtype=torch.bfloat16)
QUICK = dict(kn=[(64, 96)], ms=[1, 128], rs=[8], dtype=torch.float32)


def _eager_norm(W, A, B):
    return torch.linalg.norm(W + SCALING * (B @ A), dim=1).detach()


def _eager(x, W, b, A, B, m):
    """peft's DoRA Linear forward (no dropout): base + (m/n - 1) * base_nb + m/n * s * x A^T B^T."""
    scale = m / _eager_norm(W, A, B)
    base_nb = F.linear(x, W)
    return base_nb + b + (scale - 1) * base_nb + scale * (F.linear(F.linear(x, A), B) * SCALING)


def _case(K, N, M, r, dtype, dev, quick) -> List[Dict[str, object]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dev, dtype)
    b = torch.randn(N, generator=g).to(dev, dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dev, dtype).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dev, dtype).requires_grad_()
    m = dora_weight_norm(W, A, B, SCALING).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(dev, dtype)
    xg = x.clone().requires_grad_()
    variants = {
        "base": lambda x: F.linear(x, W, b),
        "eager": lambda x: _eager(x, W, b, A, B, m),
        "fastpeft": lambda x: dora_linear(x, W, b, A, B, m, SCALING),
    }
    warm, rep = (2, 7) if quick else (10, 50)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        ms, mem = {}, {}
        for name, f in variants.items():
            if mode == "fwd":
                def call(f=f):
                    with torch.no_grad():
                        return f(x)
            else:
                def call(f=f):
                    xg.grad = A.grad = B.grad = m.grad = None
                    f(xg).backward(dy)
            ms[name] = bench(call, warmup=warm, rep=rep)
            mem[name] = peak_memory_mib(call)
        row: Dict[str, object] = {"K x N": f"{K}x{N}", "M": M, "r": r, "pass": mode}
        for name in variants:
            row[f"{name} ms"] = ms[name]
        row["eager/fastpeft"] = ms["eager"] / ms["fastpeft"]
        row["fastpeft/base"] = ms["fastpeft"] / ms["base"]
        for name in variants:
            row[f"peak MiB {name}"] = mem[name]
        rows.append(row)
    with torch.no_grad():
        n_fused = bench(lambda: dora_weight_norm(W, A, B, SCALING), warmup=warm, rep=rep)
        n_eager = bench(lambda: _eager_norm(W, A, B), warmup=warm, rep=rep)
    for row in rows:
        row["norm fused ms"], row["norm eager ms"] = n_fused, n_eager
    return rows


def run(quick: bool = False) -> List[Dict[str, object]]:
    """Benchmark protocol entry point (see benchmarks/README.md): one row per shape and pass."""
    return sweep(QUICK, FULL, _case, quick)


if __name__ == "__main__":
    standalone_main(run, __doc__)
