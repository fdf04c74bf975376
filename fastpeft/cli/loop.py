"""The training loop of ``fastpeft train``: optimizer, learning-rate schedule, steps, checkpoints,
resuming, and stopping cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastpeft.cli.checkpoint import (capture_rng, checkpoint_dirs, load_training_state, prune_checkpoints,
                                     restore_rng, ADAPTER_WEIGHTS)
from fastpeft.cli.data import IGNORE_INDEX, BatchStream, collate
from fastpeft.cli.distributed import SINGLE, Ranks
from fastpeft.cli.errors import TrainError, TrainInterrupted
from fastpeft.cli.loss import batch_loss

STATE_FORMAT = 1


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


def train_step(model, micro: list, pad_id: int, device, use_bf16: bool, ranks: Ranks = SINGLE) -> tuple[float, int]:
    """Forward and backward ``micro`` (the global micro-batches of one optimizer step; this rank takes
    its share of each), the loss averaged over all their target tokens on all ranks; returns (that
    loss, tokens processed by all ranks)."""
    cols = [collate(ranks.shard(m), pad_id) for m in micro]
    n_target = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in cols)
    if ranks.distributed:
        # the global count; times the world size because DDP and FSDP2 average the ranks' gradients
        n_target = int(ranks.sum(n_target)[0])
    step_loss, tokens = 0.0, 0
    for i, c in enumerate(cols):
        with ranks.accumulating(model, last=i == len(cols) - 1):
            s, _ = batch_loss(model, c, device, use_bf16)
            loss = s / n_target
            (loss * ranks.world_size if ranks.distributed else loss).backward()
        step_loss += float(s.detach()) / n_target
        tokens += int(c["attention_mask"].sum())
    if ranks.distributed:
        step_loss, tokens = ranks.sum(step_loss, tokens)
    return step_loss, int(tokens)


class StopOnSignal:
    """While training (``deferring``), SIGINT / SIGTERM only set ``signum``: the loop finishes its
    step, saves a checkpoint and stops. Outside the loop (loading, evaluation), or on a second
    signal, they raise KeyboardInterrupt at once. The previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.deferring and self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(send it again to stop at once, without one)", file=sys.stderr)
            return
        raise KeyboardInterrupt


@dataclass
class TrainingRun:
    """Everything a checkpoint restores, and the progress so far (``step`` optimizer steps done)."""
    model: object
    pad_id: int
    params: list
    opt: object
    sched: object
    stream: BatchStream
    device: object
    use_bf16: bool
    identity: dict  # the options that define the run; --resume refuses a checkpoint of another run
    step: int = 0
    losses: list = field(default_factory=list)
    tokens_seen: int = 0
    eval_before: dict | None = None
    ranks: Ranks = SINGLE  # a distributed run: `model` is wrapped (DDP) or sharded (FSDP2)

    def training_state(self) -> dict:
        """What a checkpoint restores besides the adapter (collective in a distributed run)."""
        return {"format": STATE_FORMAT, "step": self.step,
                "optimizer": self.ranks.optimizer_state(self.model, self.opt),
                "scheduler": self.sched.state_dict(), "rng": self.ranks.rng_states(capture_rng),
                "data": self.stream.state_dict(), "losses": list(self.losses), "tokens_seen": self.tokens_seen,
                "eval_before": self.eval_before, "run": dict(self.identity)}

    def save(self, out_dir: Path, keep: int | None) -> Path:
        """Write ``checkpoint-<step>`` and drop the oldest beyond ``keep`` (rank 0 writes, all ranks call)."""
        dest = Path(out_dir) / f"checkpoint-{self.step}"
        path = self.ranks.save_checkpoint(self.model, self.training_state(), dest)
        if self.ranks.is_main:
            prune_checkpoints(out_dir, keep)
        return path

    def restore(self, state: dict) -> None:
        """Continue from :func:`read_checkpoint`'s ``state``: optimizer, scheduler, data position, progress
        and RNG states. The adapter weights come first, before the model is wrapped or sharded, with
        :func:`load_adapter_weights`."""
        self.ranks.load_optimizer_state(self.model, self.opt, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.step, self.losses, self.tokens_seen = state["step"], list(state["losses"]), state["tokens_seen"]
        self.eval_before = state["eval_before"]
        # last: nothing may draw random numbers between this and the next step
        restore_rng(self.ranks.own_rng_state(state["rng"]))

    def one_step(self, grad_accum: int, max_grad_norm: float) -> tuple[float, int]:
        """One optimizer step; (its loss, tokens processed)."""
        import torch
        micro = [next(self.stream) for _ in range(grad_accum)]
        loss, tokens = train_step(self.model, micro, self.pad_id, self.device, self.use_bf16, self.ranks)
        if not math.isfinite(loss):
            raise TrainError(f"loss became {loss} at step {self.step + 1}; lower --lr")
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(loss)
        self.tokens_seen += tokens
        return loss, tokens


def read_checkpoint(ckpt: Path, identity: dict) -> dict:
    """``ckpt``'s training state, refused unless it was written by this fastpeft for the run ``identity``."""
    state = load_training_state(ckpt)
    if state.get("format") != STATE_FORMAT:
        raise TrainError(f"--resume: {ckpt} has training-state format {state.get('format')}, this fastpeft "
                         f"writes {STATE_FORMAT}; start a new run in another --output-dir")
    changed = [k for k in identity if state["run"].get(k) != identity[k]]
    if changed:
        k = changed[0]
        raise TrainError(f"--resume: {ckpt} was written by a run with {k} {state['run'].get(k)}, this command "
                         f"has {identity[k]}; resume with the original options, or pass another "
                         "--output-dir to start a new run")
    return state


def load_adapter_weights(model, ckpt: Path) -> None:
    """Copy ``ckpt``'s adapter tensors into ``model`` (not sharded yet: FSDP2 shards what it holds)."""
    from safetensors.torch import load_file

    from fastpeft import set_peft_model_state_dict
    set_peft_model_state_dict(model, load_file(str(Path(ckpt) / ADAPTER_WEIGHTS)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete (resumable) checkpoint in ``out_dir``, or None."""
    found = checkpoint_dirs(out_dir)
    return found[-1][1] if found else None


def train_loop(run: TrainingRun, args: argparse.Namespace, out_dir: Path, stop: StopOnSignal) -> dict:
    """Steps ``run.step + 1 .. args.steps``; a checkpoint every ``--save-every`` steps and when a signal
    arrives (then :class:`TrainInterrupted`). Returns this session's {"tokens", "seconds"}."""
    from tqdm.auto import tqdm
    run.model.train()
    tokens, t0 = 0, time.perf_counter()
    stop.deferring = True  # from here on a signal waits for the end of a step
    bar = tqdm(total=args.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not run.ranks.is_main)
    try:
        while run.step < args.steps:
            loss, n = run.one_step(args.grad_accum, args.max_grad_norm)
            tokens += n
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}",
                            lr=f"{run.sched.get_last_lr()[0]:.1e}")
            bar.update(1)
            signum = run.ranks.agreed_signal(stop.signum)  # every rank stops at the same step
            if signum is not None:
                path = run.save(out_dir, args.save_total_limit)
                raise TrainInterrupted(signal.Signals(signum).name, run.step, path)
            if args.save_every and run.step % args.save_every == 0 and run.step != args.steps:
                run.save(out_dir, args.save_total_limit)
        signum = run.ranks.agreed_signal(stop.signum)
        if signum is not None:  # it came after the last step's check
            raise TrainInterrupted(signal.Signals(signum).name, run.step, run.save(out_dir, args.save_total_limit))
    finally:
        stop.deferring = False
        bar.close()
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}
