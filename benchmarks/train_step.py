"""A whole QLoRA training step: fastpeft vs Hugging Face peft + bitsandbytes.

A Llama-architecture causal LM with random weights, every decoder linear a bitsandbytes
``Linear4bit`` (NF4, blocksize 64, double quantisation, bf16 compute: QLoRA's recipe), LoRA
r=16 / alpha=32 on all linear layers, gradient checkpointing (``prepare_model_for_kbit_training``),
AdamW on the adapters. One step = forward + loss + backward + optimizer step on one batch of
random tokens. Arms, each on a fresh model built from the same seed:

* ``peft`` - ``peft.prepare_model_for_kbit_training`` + ``peft.get_peft_model`` (bitsandbytes'
  ``matmul_4bit``: dequantise the weight, then a dense matmul; eager LoRA);
* ``peft+patch`` - the same model after ``fastpeft.patch(model)`` (the QLoRA op on every
  ``lora.Linear4bit``);
* ``fastpeft`` - ``fastpeft.prepare_model_for_kbit_training`` + ``fastpeft.get_peft_model``
  (fastpeft's own ``Linear4bit`` LoRA layers);
* ``peft+patch/dequant`` (GPU runs only) - ``peft+patch`` with the op's other Triton plan,
  ``nf4_impl="dequant"`` (``fastpeft.use_settings``; Triton dequantisation, then a torch matmul).

Columns: median step time, tokens/s, peak allocated memory during a step (total, weights and
optimizer state included) and the ratios to ``peft`` (``speedup`` > 1: faster than peft,
``memory`` < 1: less memory). ``loss`` is the first step's loss (the arms must agree).

GPU (full run): Llama-3.2-1B and Llama-3-8B shapes, batch 1 x seq 2048, bf16 autocast.
CPU (``quick``, or no CUDA): a tiny config in fp32 on the reference path, to exercise the
script; CPU times say nothing about the kernels.

bitsandbytes is required (both arms use its ``Linear4bit`` modules); on the GPU machines bring
it with ``../shared/gpu/prepare-carry``.

Run: ``python benchmarks/train_step.py [--quick] [--config 1b] [--seq 2048]`` or through
``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, device, markdown_table, session  # noqa: E402

TITLE = "QLoRA training step (Llama, NF4 + LoRA r=16 all-linear): fastpeft vs peft + bitsandbytes"

CONFIGS: Dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
}
ARMS = ("peft", "peft+patch", "fastpeft", "peft+patch/dequant")
QUICK_ARMS = ARMS[:3]  # on CPU every arm runs the reference path: the plans do not differ
RANK, ALPHA = 16, 32


def _require_bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "benchmarks/train_step.py needs bitsandbytes (both arms use its Linear4bit); on the GPU machines "
            "carry it with ../shared/gpu/prepare-carry"
        ) from exc
    return bnb


def build_model(config: str, dev: torch.device, compute_dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight Llama whose decoder linears are bitsandbytes NF4 ``Linear4bit`` layers
    (quantised on ``dev`` from the random bf16/fp32 weights; the LM head stays dense, as
    transformers' 4-bit loading leaves it)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown model config {config!r}; one of {sorted(CONFIGS)}")
    bnb = _require_bnb()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, **CONFIGS[config])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64, module=q).to(dev)
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del lin
    model.is_loaded_in_4bit = True  # what transformers sets; peft's dispatch reads it
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return model


def wrap(arm: str, model: nn.Module):
    """The trainable model of ``arm`` and what fastpeft.patch reported (None for other arms)."""
    report = None
    if arm in ("peft", "peft+patch", "peft+patch/dequant"):
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        if arm != "peft":
            import fastpeft

            report = fastpeft.patch(model)
    elif arm == "fastpeft":
        import fastpeft

        model = fastpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        cfg = fastpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                  task_type="CAUSAL_LM")
        model = fastpeft.get_peft_model(model, cfg)
    else:
        raise ValueError(f"unknown arm {arm!r}; one of {ARMS}")
    return model, report


def measure(config: str, arm: str, batch: int, seq: int, warmup: int, rep: int) -> dict:
    dev = device()
    cuda = dev.type == "cuda"
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    _free(cuda)  # nothing of a previous arm may count in this arm's peak memory
    import fastpeft

    # before wrap: fastpeft.patch bakes the settings of the moment into the layers it patches
    with fastpeft.use_settings(nf4_impl="dequant" if arm.endswith("/dequant") else "fused"):
        model, report = wrap(arm, build_model(config, dev, compute_dtype))
        try:
            row = _measure(model, report, config, arm, batch, seq, warmup, rep, dev)
        finally:
            del model, report
            _free(cuda)
    return row


def _free(cuda: bool) -> None:
    gc.collect()  # patched layers and HF modules hold reference cycles
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _measure(model, report, config, arm, batch, seq, warmup, rep, dev) -> dict:
    cuda = dev.type == "cuda"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIGS[config]["vocab_size"], (batch, seq), generator=g).to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    losses: List[float] = []

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    torch.manual_seed(2)
    step()  # first step: the reported loss (same start for every arm), allocator warm
    first_loss = losses[0]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = bench(step, warmup=warmup, rep=rep)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    row = {
        "model": config, "batch x seq": f"{batch}x{seq}", "arm": arm, "step ms": ms,
        "tokens/s": batch * seq / (ms / 1e3), "peak MiB": peak, "loss": first_loss,
        "layers via op": None if report is None else len(report.patched),
    }
    return row


def _with_ratios(rows: List[dict]) -> List[dict]:
    base = {r["model"]: r for r in rows if r["arm"] == "peft"}
    out = []
    for r in rows:
        b = base.get(r["model"])
        r = dict(r)
        r["speedup vs peft"] = b["step ms"] / r["step ms"] if b else None
        r["memory vs peft"] = (r["peak MiB"] / b["peak MiB"]) if b and r["peak MiB"] and b["peak MiB"] else None
        out.append(r)
    return out


def run(quick: bool = False, configs: Optional[List[str]] = None, seq: Optional[int] = None, batch: int = 1,
        arms=None) -> List[dict]:
    """Benchmark rows (protocol of benchmarks/README.md). ``quick`` or no CUDA: the tiny config."""
    cuda = torch.cuda.is_available()
    if quick or not cuda:
        configs, seq, warmup, rep = configs or ["tiny"], seq or 32, 0, 2
        arms = arms or QUICK_ARMS
    else:
        configs, seq, warmup, rep = configs or (["1b"] if session() else ["1b", "8b"]), seq or 2048, 2, 5
        arms = arms or ARMS
    rows = []
    for config in configs:
        for arm in arms:
            t0 = time.perf_counter()
            rows.append(measure(config, arm, batch, seq, warmup, rep))
            print(f"  {config} {arm}: {rows[-1]['step ms']:.1f} ms/step ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    return _with_ratios(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=TITLE)
    ap.add_argument("--quick", action="store_true", help="tiny config on CPU-sized shapes")
    ap.add_argument("--config", default="", help=f"comma-separated, from {sorted(CONFIGS)}")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--arms", default="", help=f"comma-separated, from {ARMS} (default: all; CPU: {QUICK_ARMS})")
    args = ap.parse_args(argv)
    configs = [c for c in args.config.split(",") if c] or None
    arms = tuple(a for a in args.arms.split(",") if a) or None
    print(markdown_table(run(args.quick, configs, args.seq, args.batch, arms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
