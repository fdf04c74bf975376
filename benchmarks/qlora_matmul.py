"""QLoRA matmul: fastpeft's NF4 kernels vs bitsandbytes vs a bf16 dense matmul.

GPU (full run): Llama-3-8B projection shapes K x N in 4096x4096 (q/o), 4096x1024 (k/v),
4096x14336 (gate/up), 14336x4096 (down); M (tokens) in 1, 16, 4096; bf16; NF4 blocksize 64
with double quantisation (QLoRA's default). Forward of the frozen 4-bit linear:

* ``fastpeft`` - the op's automatic choice (Triton GEMV for M <= 16, fused dequant-GEMM above);
* ``fastpeft_cuda`` - the CUDA GEMV from ``csrc/`` (M = 1 only; n/a where it does not build);
* ``bnb_dequant_mm`` - bitsandbytes' training path: ``dequantize_4bit`` then ``F.linear``;
* ``bnb_gemv`` - bitsandbytes' ``matmul_4bit`` inference path (its ``gemv_4bit`` kernel at M = 1);
* ``dense_bf16`` - ``F.linear`` on the unquantised bf16 weight (the speed of light for M=4096).

and, at M = 4096, forward+backward of a LoRA r=16 layer (``*_train`` columns): fastpeft's
``qlora_linear`` (fused plan; ``fastpeft_dequant_train``: its ``impl="dequant"`` plan, the GPU default,
Triton dequantisation then a torch matmul, see ``Settings.nf4_impl``;
``fastpeft_dequant_epilogue_train_ms``: that plan with ``lora_impl="epilogue"``, the dequantised
weight in the LoRA layer's Triton GEMMs with the LoRA products in their epilogues, GPU only) vs
bitsandbytes' ``matmul_4bit`` + eager peft-style LoRA. Ratios: ``bnb/fastpeft``
> 1 means fastpeft is faster; ``fastpeft/dense`` is the cost of 4-bit weights over bf16.

CPU (``quick``, or no CUDA): small shapes on the reference path, fp32, to exercise the script.
bitsandbytes is optional (GPU machines may lack it: its columns are then n/a and the weight is
quantised by fastpeft's own bitsandbytes-format quantiser).

Run: ``python benchmarks/qlora_matmul.py [--quick]`` or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, peak_memory_mib, standalone_main, sweep  # noqa: E402

from fastpeft.ops import nf4, nf4_cuda  # noqa: E402
from fastpeft.ops.settings import use_settings  # noqa: E402

TITLE = "QLoRA / NF4 matmul (fastpeft Triton + CUDA vs bitsandbytes vs bf16 dense)"
RANK, SCALING = 16, 2.0

FULL = dict(kn=[(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)], ms=[1, 16, 4096], dtype=torch.bfloat16)
QUICK = dict(kn=[(128, 96), (64, 160)], ms=[1, 16, 64], dtype=torch.float32)


def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
        import bitsandbytes.functional as BF

        return bnb, BF
    except Exception:
        return None, None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _case(K, N, M, dtype, dev, quick) -> List[Dict[str, object]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dev, dtype)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    bnb, BF = _bnb()
    qs = None
    if bnb is not None:
        try:
            packed, qs = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        except Exception:
            bnb = None
    if qs is None:
        packed, st = nf4.quantize_nf4(W, 64, compress_statistics=True)
        packed, st = packed.to(dev), st.to(dev)
        qs = st
    warm, rep = (1, 3) if quick else (10, 50)
    res: Dict[str, object] = {}

    def t(fn):
        with torch.no_grad():
            return bench(fn, warm, rep)

    res["fastpeft"] = t(lambda: nf4.nf4_linear(x, packed, qs))
    res["fastpeft_cuda"] = None
    if dev.type == "cuda" and M == 1:
        if nf4_cuda.available(gemv="cuda"):
            p2, s2 = nf4.canonicalize(packed, qs)
            res["fastpeft_cuda"] = t(lambda: nf4_cuda.gemv(x, p2, s2))
    res["bnb_dequant_mm"] = res["bnb_gemv"] = None
    if bnb is not None:
        res["bnb_dequant_mm"] = t(lambda: F.linear(x, BF.dequantize_4bit(packed, qs).to(dtype)))
        res["bnb_gemv"] = t(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs))
    res["dense_bf16"] = t(lambda: F.linear(x, W))
    best_bnb = min([v for v in (res["bnb_dequant_mm"], res["bnb_gemv"]) if v is not None], default=None)
    fast = min([v for v in (res["fastpeft"], res["fastpeft_cuda"]) if v is not None])
    row = {"K": K, "N": N, "M": M, "dtype": str(dtype).replace("torch.", ""), **{f"{k}_ms": v for k, v in res.items()},
           "bnb/fastpeft": _ratio(best_bnb, fast), "fastpeft/dense": _ratio(fast, res["dense_bf16"])}

    # training: forward + backward with a LoRA adapter, at the largest M
    row["fastpeft_train_ms"] = row["bnb_train_ms"] = row["fastpeft_train_MiB"] = row["bnb_train_MiB"] = None
    row["fastpeft_dequant_train_ms"] = row["fastpeft_dequant_epilogue_train_ms"] = None
    if M == max((QUICK if quick else FULL)["ms"]):
        A = (torch.randn(RANK, K, generator=g) / K**0.5).to(dev, dtype).requires_grad_()
        B = torch.zeros(N, RANK).to(dev, dtype).requires_grad_()
        dy = torch.randn(M, N, generator=g).to(dev, dtype)
        xg = x.clone().requires_grad_()

        def fp():
            nf4.qlora_linear(xg, packed, qs, None, A, B, SCALING, 0.05, True).backward(dy)

        row["fastpeft_train_ms"] = bench(fp, warm, rep)
        row["fastpeft_train_MiB"] = peak_memory_mib(fp)

        def fd():  # the op's other Triton plan: dequantise, then a torch matmul
            nf4.qlora_linear(xg, packed, qs, None, A, B, SCALING, 0.05, True, impl="dequant").backward(dy)

        row["fastpeft_dequant_train_ms"] = bench(fd, warm, rep)
        if dev.type == "cuda":  # the dequant plan on the LoRA epilogue GEMMs (Triton-only: GPU)
            with use_settings(lora_impl="epilogue"):
                row["fastpeft_dequant_epilogue_train_ms"] = bench(fd, warm, rep)
        if bnb is not None:
            def bp():
                y = bnb.matmul_4bit(xg, packed.t(), quant_state=qs)
                y = y + F.linear(F.linear(F.dropout(xg, 0.05, True), A), B) * SCALING
                y.backward(dy)

            row["bnb_train_ms"] = bench(bp, warm, rep)
            row["bnb_train_MiB"] = peak_memory_mib(bp)
    row["bnb/fastpeft_train"] = _ratio(row["bnb_train_ms"], row["fastpeft_train_ms"])
    return [row]


def run(quick: bool = False) -> List[Dict[str, object]]:
    """Rows of the QLoRA matmul table (see the module docstring)."""
    return sweep(QUICK, FULL, _case, quick, ranks=False)


if __name__ == "__main__":
    standalone_main(run, __doc__, TITLE)
