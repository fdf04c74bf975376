"""LoRA linear: fastpeft's fused op vs eager PyTorch LoRA (as peft computes it) vs the frozen
base linear alone (the floor), forward (inference) and forward+backward (training, dropout 0.05).

GPU (full run): Llama-7B/8B projection shapes K x N in 4096x4096, 4096x14336, 14336x4096,
M (tokens) in 1, 16, 512, 4096, 16384, r in 8, 16, 64, bf16. The fastpeft columns are the op's
Triton plans (see fastpeft/kernels/lora_linear.py): ``split`` (the default: cuBLAS base GEMM +
Triton kernels for the mask-carrying parts + cuBLAS beta=1 epilogue for the LoRA add),
``fused`` (one Triton kernel for the forward), ``kernels`` (Triton LoRA kernels even without
dropout), ``epilogue`` (Triton GEMMs with the LoRA products in their epilogues, g and dB from one
pass over dy; GPU only, like ``fused`` and ``kernels``). CPU (``quick``): small shapes on the reference path, fp32, to exercise the script.

Columns: median ms per call; ``eager/fastpeft`` > 1 means fastpeft is faster than eager;
``fastpeft/base`` is the cost over the frozen linear alone (1.00 = free LoRA); peak MiB is the
device memory allocated during one call above the inputs (activations kept for backward,
gradients, temporaries).

Run: ``python benchmarks/lora_linear.py [--quick]`` or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, peak_memory_mib, standalone_main, sweep  # noqa: E402

from fastpeft.ops.lora_linear import lora_linear  # noqa: E402

TITLE = "LoRA linear (fused op vs eager peft-style LoRA vs frozen base linear)"
DROPOUT = 0.05
SCALING = 2.0

FULL = dict(kn=[(4096, 4096), (4096, 14336), (14336, 4096)], ms=[1, 16, 512, 4096, 16384], rs=[8, 16, 64],
            dtype=torch.bfloat16)
QUICK = dict(kn=[(64, 96), (96, 64)], ms=[1, 16, 128], rs=[8], dtype=torch.float32)


def _eager(x, W, b, A, B, p, training):
    """peft's LoRA Linear forward: base(x) + lora_B(lora_A(dropout(x))) * scaling."""
    xd = F.dropout(x, p, training) if p > 0 else x
    return F.linear(x, W, b) + F.linear(F.linear(xd, A), B) * SCALING


def _variants(on_gpu: bool, r: int):
    v = {
        "base": lambda x, W, b, A, B, p, tr: F.linear(x, W, b),
        "eager": _eager,
        "fastpeft": lambda x, W, b, A, B, p, tr: lora_linear(x, W, b, A, B, SCALING, p, tr, impl="split"),
    }
    if on_gpu:
        if r <= 64:
            v["fused"] = lambda x, W, b, A, B, p, tr: lora_linear(x, W, b, A, B, SCALING, p, tr, impl="fused")
        v["kernels"] = lambda x, W, b, A, B, p, tr: lora_linear(x, W, b, A, B, SCALING, p, tr, impl="kernels")
        v["epilogue"] = lambda x, W, b, A, B, p, tr: lora_linear(x, W, b, A, B, SCALING, p, tr, impl="epilogue")
    return v


def _case(K, N, M, r, dtype, dev, quick) -> List[Dict[str, object]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dev, dtype)
    b = torch.randn(N, generator=g).to(dev, dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dev, dtype).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dev, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(dev, dtype)
    xg = x.clone().requires_grad_()
    variants = _variants(dev.type == "cuda", r)
    rows = []
    warm, rep = (2, 7) if quick else (10, 50)
    for mode in ("fwd", "fwd+bwd"):
        ms, mem = {}, {}
        for name, f in variants.items():
            if mode == "fwd":
                def call(f=f):
                    with torch.no_grad():
                        return f(x, W, b, A, B, 0.0, False)
            else:
                def call(f=f):
                    xg.grad = A.grad = B.grad = None
                    f(xg, W, b, A, B, DROPOUT, True).backward(dy)
            ms[name] = bench(call, warmup=warm, rep=rep)
            mem[name] = peak_memory_mib(call)
        row: Dict[str, object] = {"K x N": f"{K}x{N}", "M": M, "r": r, "pass": mode}
        for name in variants:
            row[f"{name} ms"] = ms[name]
        row["eager/fastpeft"] = ms["eager"] / ms["fastpeft"]
        row["fastpeft/base"] = ms["fastpeft"] / ms["base"]
        if "fused" in ms:
            row["eager/fused"] = ms["eager"] / ms["fused"]
        if "epilogue" in ms:  # the plan whose predicted ratio is 1.14 at 4096^3 (benchmarks/roofline.py)
            row["epilogue/base"] = ms["epilogue"] / ms["base"]
        for name in ("base", "eager", "fastpeft"):
            row[f"peak MiB {name}"] = mem[name]
        rows.append(row)
    return rows


def run(quick: bool = False) -> List[Dict[str, object]]:
    """Benchmark protocol entry point (see benchmarks/README.md): one row per shape and pass."""
    return sweep(QUICK, FULL, _case, quick)


if __name__ == "__main__":
    standalone_main(run, __doc__)
