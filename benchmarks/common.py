"""Shared helpers for fastpeft benchmarks: timing, peak memory, environment header, writers.

See benchmarks/README.md for the protocol a benchmark module follows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch


def device() -> torch.device:
    """The device benchmarks run on: CUDA when present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment() -> Dict[str, str]:
    """Header facts for a results file: device, versions, date (UTC), commit."""
    env = {
        "device": gpu_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["cuda"] = str(torch.version.cuda)
    return env


def bench(fn: Callable[[], object], warmup: int = 10, rep: int = 50, min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: each call timed with CUDA events (device time, launches included), after ``warmup``
    calls. CPU: ``time.perf_counter`` around each call. ``min_time_s`` extends the repetitions
    until that much time was spent (stable medians for very short calls).
    """
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < rep or (time.perf_counter() - start_all) < min_time_s:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * rep:
            break
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object]) -> Optional[float]:
    """Peak device memory allocated during one ``fn()`` above what was allocated before (MiB);
    None on CPU (no allocator statistics)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: Iterable[Dict[str, object]]) -> str:
    """Rows (dicts with the same keys, in column order of the first row) as a markdown table."""
    rows = list(rows)
    if not rows:
        return "_(no rows)_\n"
    cols = list(rows[0].keys())
    for r in rows[1:]:
        for k in r:
            if k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def session() -> bool:
    """True under ``FASTPEFT_BENCH_GRID=session`` (``benchmarks/gpu_run.sh``): benchmarks run a
    thinned GPU grid so that every table fits one short GPU lease."""
    return os.environ.get("FASTPEFT_BENCH_GRID", "").strip().lower() == "session"


def session_grid(full_cfg: Dict[str, object]) -> Dict[str, object]:
    """The GPU grid, thinned when ``FASTPEFT_BENCH_GRID=session`` (``benchmarks/gpu_run.sh``: every
    table inside one short GPU lease): the first two (K, N) shapes, M in {1, 4096} where the grid
    has them (else its first and last M), r = 16 where it has it (else its first r)."""
    if not session():
        return full_cfg
    ms = [m for m in full_cfg["ms"] if m in (1, 4096)] or [full_cfg["ms"][0], full_cfg["ms"][-1]]
    cfg = dict(full_cfg, kn=list(full_cfg["kn"])[:2], ms=ms)
    if "rs" in full_cfg:
        cfg["rs"] = [16] if 16 in full_cfg["rs"] else list(full_cfg["rs"])[:1]
    return cfg


def sweep(quick_cfg: Dict[str, object], full_cfg: Dict[str, object], case: Callable[..., List[Dict[str, object]]],
          quick: bool, ranks: bool = True) -> List[Dict[str, object]]:
    """Rows of a ``(K, N) x M [x r]`` grid: ``case(K, N, M, [r,] dtype, device, small)`` per point.

    The quick (CPU) grid is used when ``quick`` or when no CUDA device is present; the CUDA
    cache is emptied between points so peak-memory columns do not inherit earlier allocations.
    """
    dev = device()
    small = quick or dev.type != "cuda"
    cfg = quick_cfg if small else session_grid(full_cfg)
    rows: List[Dict[str, object]] = []
    for K, N in cfg["kn"]:
        for M in cfg["ms"]:
            for r in (cfg["rs"] if ranks else [None]):
                args = (K, N, M, r) if ranks else (K, N, M)
                rows.extend(case(*args, cfg["dtype"], dev, small))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def standalone_main(run: Callable[[bool], List[Dict[str, object]]], doc: Optional[str], title: Optional[str] = None,
                    argv: Optional[List[str]] = None) -> None:
    """``python benchmarks/<name>.py [--quick]``: run one benchmark module and print its table."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help="small shapes (the CPU configuration)")
    args = ap.parse_args(argv)
    if title:
        print(f"## {title}\n")
    print(markdown_table(run(args.quick)))
