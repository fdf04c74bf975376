"""The training loop of ``fastpeft train``: optimizer, learning-rate schedule, steps, checkpoints."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from fastpeft.cli.checkpoint import save_adapter
from fastpeft.cli.data import IGNORE_INDEX, batches, collate
from fastpeft.cli.errors import TrainError
from fastpeft.cli.loss import batch_loss


def make_optimizer(params, args: argparse.Namespace, device):
    """AdamW; with --qlora on CUDA, bitsandbytes' paged 8-bit AdamW (optimizer state paged out under pressure)."""
    import torch
    if getattr(args, "qlora", False) and device.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay), "paged 8-bit AdamW"
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay), "AdamW"


def make_scheduler(opt, steps: int, warmup_steps: int | None):
    """Linear warmup (default: 10% of ``steps``) then linear decay to 0."""
    import torch
    warmup = warmup_steps if warmup_steps is not None else max(1, steps // 10)

    def lr_lambda(step):  # step counts finished optimizer steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_step(model, micro: list, pad_id: int, device, use_bf16: bool) -> tuple[float, int]:
    """Forward and backward ``micro`` (the micro-batches of one optimizer step), the loss averaged
    over all their target tokens; returns (that loss, tokens processed)."""
    cols = [collate(m, pad_id) for m in micro]
    n_target = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in cols)
    step_loss, tokens = 0.0, 0
    for c in cols:
        s, _ = batch_loss(model, c, device, use_bf16)
        (s / n_target).backward()
        step_loss += float(s.detach()) / n_target
        tokens += int(c["attention_mask"].sum())
    return step_loss, tokens


def train_loop(model, tok, train_ex, params, opt, sched, args, device, use_bf16: bool, out_dir: Path) -> dict:
    """Run ``args.steps`` optimizer steps; {"losses", "tokens_seen", "checkpoints", "train_seconds"}."""
    import torch
    from tqdm.auto import tqdm
    gen = torch.Generator().manual_seed(args.seed)
    stream = batches(train_ex, args.batch_size, gen)
    model.train()
    losses: list[float] = []
    saved: list[str] = []
    tokens_seen = 0
    t_train = time.perf_counter()
    bar = tqdm(total=args.steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in range(1, args.steps + 1):
        step_loss, tokens = train_step(model, [next(stream) for _ in range(args.grad_accum)], tok.pad_token_id,
                                       device, use_bf16)
        tokens_seen += tokens
        if not math.isfinite(step_loss):
            bar.close()
            raise TrainError(f"loss became {step_loss} at step {step}; lower --lr")
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        elapsed = time.perf_counter() - t_train
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / elapsed:.0f}",
                        lr=f"{sched.get_last_lr()[0]:.1e}")
        bar.update(1)
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            saved.append(str(save_adapter(model, out_dir / f"checkpoint-{step}")))
    bar.close()
    return {"losses": losses, "tokens_seen": tokens_seen, "checkpoints": saved,
            "train_seconds": time.perf_counter() - t_train}
