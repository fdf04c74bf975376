"""Per-rank memory of a QLoRA model whose 4-bit base is sharded with FSDP2, next to one process's.

Each arm is a world size: 1 is a plain process (no torch.distributed, no wrapping); N > 1 starts N
processes that shard a fastpeft LoRA model on a random-weight NF4 Llama (bitsandbytes,
``bnb_4bit_quant_storage`` = fp32, the compute dtype) with ``fastpeft.utils.distributed.wrap_model
(model, "fsdp2")`` and take one training step (forward, backward, SGD). Per rank:

- ``params MiB``: bytes of the parameters this rank holds after wrapping (its shards);
  ``4-bit MiB``: the packed 4-bit weights among them; ``x 1 process``: ``params MiB`` over the
  one-process arm's (1/N is perfect sharding);
- ``live RSS MiB``: resident memory after the step minus after the imports (glibc told to return
  freed memory, ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``, so RSS tracks live
  tensors; see DESIGN.md), split into anonymous memory (tensors) and file-backed pages (the
  checkpoint, memory-mapped by safetensors while tensors still view it); ``peak RSS MiB``: the process's high-water RSS (``VmHWM``, loading the
  checkpoint included: every rank loads the whole 4-bit model before it is sharded);
- ``peak CUDA MiB``: ``torch.cuda.max_memory_allocated`` on GPU (NCCL, one GPU per rank), else n/a.

On CPU the ranks talk over gloo. Run: ``python benchmarks/fsdp_qlora_memory.py [--quick]
[--world-sizes 1,2,4]``; it prints the table and writes ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TITLE = "FSDP2 + QLoRA: per-rank memory of a sharded 4-bit base vs one process"
# quick: the test-suite size; cpu: big enough that weights dominate the interpreter; cuda: 1B-class
CONFIGS = {
    "quick": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "cpu": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=16),
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
}
SEQ = {"quick": 16, "cpu": 256, "cuda": 1024}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MiB = 2 ** 20


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MiB  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _local_bytes(params) -> float:
    total = 0
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total / MiB


def _worker(rank: int, world: int, ckpt: str, config: str, out_dir: str, kind: str) -> None:
    """One rank: load, (shard,) one training step, write this rank's row as JSON."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = kind == "cuda"
    if world > 1:
        from fastpeft.utils.distributed import init_distributed

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo")
        init_distributed("fsdp2", device="cuda" if cuda else "cpu", timeout_s=600,
                         init_method="file://" + os.path.join(out_dir, "store"))
    import fastpeft  # noqa: F401  (imports counted in the baseline)
    import transformers  # noqa: F401
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    rss0 = {f: _proc_status_mib(f) for f in ("VmRSS", "RssAnon", "RssFile")}
    device = f"cuda:{rank}" if cuda else "cpu"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_quant_storage=torch.float32, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(ckpt, quantization_config=q, device_map=device)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    if world > 1:
        from fastpeft.utils.distributed import wrap_model

        model = wrap_model(model, "fsdp2")
        # fully_shard swaps every parameter for a DTensor shard: find the 4-bit ones by module
        packed = [m._parameters["weight"] for m in model.modules()
                  if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"]
    model.train()
    params_mib, packed_mib = _local_bytes(model.parameters()), _local_bytes(packed)
    del packed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, CONFIGS[config]["vocab_size"], (1, SEQ[config]), generator=g).to(device)
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    step_s = time.perf_counter() - t0
    row = {"rank": rank, "params MiB": params_mib, "4-bit MiB": packed_mib,
           "live RSS MiB": _proc_status_mib("VmRSS") - rss0["VmRSS"],
           "of it anon MiB": _proc_status_mib("RssAnon") - rss0["RssAnon"],
           "of it file MiB": _proc_status_mib("RssFile") - rss0["RssFile"],
           "peak RSS MiB": _proc_status_mib("VmHWM"),
           "peak CUDA MiB": torch.cuda.max_memory_allocated() / MiB if cuda else None, "step s": step_s}
    with open(os.path.join(out_dir, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(row, f)
    os.replace(os.path.join(out_dir, f"rank{rank}.json.tmp"), os.path.join(out_dir, f"rank{rank}.json"))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo's threads can abort once the peer has exited)


def _save_checkpoint(config: str, path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=max(SEQ.values()), **CONFIGS[config])).save_pretrained(path)


def _start_world(world: int, ckpt: str, config: str, kind: str, out: str) -> List[subprocess.Popen]:
    """The ``world`` rank processes, each running this file with ``--worker``; stderr to out/rank<r>.log."""
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    for r in range(world):
        with open(os.path.join(out, f"rank{r}.log"), "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world), ckpt, config, out, kind],
                env=env, cwd=tempfile.gettempdir(),  # not the repo root, whose kernels/ bitsandbytes would import
                stdout=subprocess.DEVNULL, stderr=log))
    return procs


def _collect_world(world: int, procs: List[subprocess.Popen], out: str, deadline: float) -> List[Dict[str, object]]:
    """Wait for the ranks (killing all of them past ``deadline``) and read their rows."""
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"world size {world}: ranks still running at the deadline") from None
    rows = []
    for r, p in enumerate(procs):
        path = os.path.join(out, f"rank{r}.json")
        if not os.path.exists(path):
            with open(os.path.join(out, f"rank{r}.log")) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"world size {world}, rank {r} exited {p.returncode} without a result:\n{tail}")
        with open(path) as f:
            rows.append({"ranks": world, **json.load(f)})
    return rows


def run(quick: bool = False, world_sizes: Optional[Sequence[int]] = None, timeout_s: float = 1800.0) -> List[Dict[str, object]]:
    """Rows per (world size, rank); world size 1 is the one-process baseline (always run first).
    ``quick``: the tiny model, all arms started together (seconds on a CPU)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # CUDA only where every rank gets its own GPU (NCCL); else every arm on CPU, gloo between ranks
    kind = "cuda" if gpus >= 2 and not quick else "cpu"
    config = "quick" if quick else kind
    if world_sizes is None:
        world_sizes = (2, gpus) if kind == "cuda" else (2,)
    worlds = [1] + sorted({w for w in world_sizes if w > 1})
    deadline = time.monotonic() + timeout_s
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="fsdp-qlora-") as tmp:
        ckpt = os.path.join(tmp, "checkpoint")
        _save_checkpoint(config, ckpt)
        outs = {w: os.path.join(tmp, f"world{w}") for w in worlds}
        for out in outs.values():
            os.makedirs(out)
        if quick:  # the arms at once: per-process memory does not change, and the test suite waits less
            started = {w: _start_world(w, ckpt, config, kind, outs[w]) for w in worlds}
            for w in worlds:
                rows += _collect_world(w, started[w], outs[w], deadline)
        else:  # one arm at a time: the ranks of one arm compete for nothing but each other
            for w in worlds:
                rows += _collect_world(w, _start_world(w, ckpt, config, kind, outs[w]), outs[w], deadline)
    one = rows[0]["params MiB"]
    return [{"model": config, **row, "x 1 process": row["params MiB"] / one} for row in rows]


def _write_results(rows: List[Dict[str, object]]) -> str:
    from common import atomic_write, environment, markdown_table, slug

    env = environment()
    name = f"fsdp-qlora-memory-{slug(env['device'])}-{env['date'][:10]}"
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    atomic_write(os.path.join(HERE, "results", name + ".json"), json.dumps({"environment": env, "rows": rows}, indent=1))
    md = os.path.join(HERE, "results", name + ".md")
    atomic_write(md, f"# {TITLE}\n\n{header}\n\n{markdown_table(rows)}\n{__doc__.split(chr(10) + chr(10), 1)[1]}")
    return md


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, ckpt, config, out, kind = sys.argv[2:8]
        _worker(int(rank), int(world), ckpt, config, out, kind)
    ap = argparse.ArgumentParser(description=TITLE)
    ap.add_argument("--quick", action="store_true", help="the tiny test-suite model")
    ap.add_argument("--world-sizes", default="", help="comma-separated process counts besides 1 (default 2)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results/")
    args = ap.parse_args(argv)
    sizes = [int(w) for w in args.world_sizes.split(",") if w] or None
    rows = run(args.quick, sizes)
    from common import markdown_table

    print(markdown_table(rows))
    if not args.no_write:
        print("wrote", _write_results(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
