"""Evaluation and the end-of-run report of ``fastpeft train``.

Evaluation runs before and after training on held-out rows: mean completion-token loss and
greedy exact match (generate, strip, compare with the reference completion, i.e. the last
assistant turn for chat rows).
"""

from __future__ import annotations

import sys
import time

from fastpeft.cli.data import Example, collate
from fastpeft.cli.loss import autocast, batch_loss


def _greedy_predictions(model, tok, chunk: list[Example], device, use_bf16: bool, max_new_tokens: int):
    pad = tok.pad_token_id
    prompts = [Example(e.prompt_ids, e.prompt_ids, e.prompt_ids, "", "") for e in chunk]
    g = collate(prompts, pad, left_pad=True)
    with autocast(device, use_bf16):
        out = model.generate(input_ids=g["input_ids"].to(device), attention_mask=g["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)
    new = out[:, g["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=True).strip() for row in new]


def evaluate(model, tok, examples: list[Example], device, use_bf16: bool, batch_size: int,
             max_new_tokens: int, desc: str | None = None) -> dict:
    """Mean completion loss and greedy exact match over ``examples`` (a progress bar when ``desc`` is given)."""
    import torch
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    loss_sum, n_tok, hits, samples = 0.0, 0, 0, []
    starts = range(0, len(examples), batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None, file=sys.stderr,
                      dynamic_ncols=True):
            chunk = examples[i:i + batch_size]
            s, n = batch_loss(model, collate(chunk, tok.pad_token_id), device, use_bf16)
            loss_sum += float(s)
            n_tok += n
            for e, pred in zip(chunk, _greedy_predictions(model, tok, chunk, device, use_bf16, max_new_tokens)):
                ok = pred == e.reference.strip()
                hits += ok
                samples.append({"prompt": e.prompt_text, "prediction": pred, "reference": e.reference, "ok": ok})
    model.train(was_training)
    return {"loss": loss_sum / max(n_tok, 1), "exact_match": hits / len(examples), "n": len(examples),
            "samples": samples}


def _show_samples(label: str, res: dict, k: int = 3) -> None:
    for s in res["samples"][:k]:
        mark = "ok " if s["ok"] else "bad"
        pred = s["prediction"] if len(s["prediction"]) <= 70 else s["prediction"][:67] + "..."
        print(f"  [{label} {mark}] {s['prompt']!r} -> {pred!r} (want {s['reference']!r})")


def run_eval(label: str, model, tok, eval_ex: list[Example], device, use_bf16: bool, batch_size: int,
             max_new_tokens: int, progress: bool = True) -> dict | None:
    """Evaluate and print one line plus a few samples; None when there are no eval rows.
    ``progress``: show a progress bar (off on the ranks other than 0 of a distributed run)."""
    if not eval_ex:
        return None
    t = time.perf_counter()
    res = evaluate(model, tok, eval_ex, device, use_bf16, batch_size, max_new_tokens,
                   desc=f"eval {label}" if progress else None)
    print(f"eval {label}: loss {res['loss']:.4f}, exact match {res['exact_match']:.1%} "
          f"({round(res['exact_match'] * res['n'])}/{res['n']}) [{time.perf_counter() - t:.1f}s]")
    _show_samples(label, res)
    return res


def first_last(losses: list[float], k: int = 5) -> tuple[float, float, int]:
    """(mean of the first ``w`` losses, mean of the last ``w``, ``w``): ``w`` is ``k``, or fewer for a
    short run so that the two windows never overlap (one step each for 2-3 steps)."""
    if not losses:
        return float("nan"), float("nan"), 0
    w = max(1, min(k, len(losses) // 2))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w, w


def without_samples(res: dict | None) -> dict | None:
    """An eval result for summary.json: the numbers, not the per-row samples."""
    return {k: v for k, v in (res or {}).items() if k != "samples"} or None


def print_summary(s: dict, load_s: float) -> None:
    """The closing block of a run, from the summary dict."""
    before, after = s["eval_before"], s["eval_after"]
    print("=" * 72)
    print("summary")
    if before and after:
        print(f"  exact match (held-out, n={after['n']}): {before['exact_match']:.1%} -> {after['exact_match']:.1%}")
        print(f"  eval loss:                      {before['loss']:.4f} -> {after['loss']:.4f}")
    w = s["train_loss_window"]
    print(f"  train loss (first/last {w} step{'s' if w != 1 else ''}): {s['train_loss_first']:.4f} -> "
          f"{s['train_loss_last']:.4f}")
    speed = f", {s['tokens_per_s']:.0f} tokens/s" if s["tokens_per_s"] is not None else ""
    resumed = f" (resumed at step {s['resumed_from_step']})" if s["resumed_from_step"] else ""
    print(f"  time: {s['total_seconds']:.1f}s total ({load_s:.1f}s load, {s['train_seconds']:.1f}s for "
          f"{s['steps'] - s['resumed_from_step']} steps{resumed}{speed}; {s['process_cpu_seconds']:.0f} s of "
          "CPU time in this process)")
    if s["peak_gpu_memory_gib"] is not None:
        print(f"  peak GPU memory: {s['peak_gpu_memory_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
    print(f"  adapter (PEFT format): {s['adapter_dir']}")
    if s["checkpoints"]:
        print(f"  checkpoints: {', '.join(s['checkpoints'])}")
    print("=" * 72)
