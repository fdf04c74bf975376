"""Run every benchmark and write ``benchmarks/results/<gpu>-<date>.md`` (+ ``.json``).

    python benchmarks/run.py [--quick] [--only lora_linear,...] [--out DIR]

Discovers each ``benchmarks/*.py`` module (other than ``common.py`` and this file) that
defines ``run(quick: bool) -> list[dict]`` (protocol in benchmarks/README.md), runs it, and
writes one markdown table per benchmark under a header naming the device, versions, date
and commit. On a machine without CUDA each benchmark runs its small CPU configuration.
A benchmark that raises is reported in the file (with its error) and the others still run;
the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import atomic_write, environment, gpu_name, markdown_table, slug  # noqa: E402

SKIP = {"common.py", "run.py", "__init__.py"}


def discover(only=None):
    """(name, module) for each benchmark module with a ``run`` callable, sorted by name."""
    found = []
    for fname in sorted(os.listdir(HERE)):
        if not fname.endswith(".py") or fname in SKIP or fname.startswith("_"):
            continue
        name = fname[:-3]
        if only and name not in only:
            continue
        spec = importlib.util.spec_from_file_location(f"fastpeft_bench_{name}", os.path.join(HERE, fname))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if callable(getattr(mod, "run", None)):
            found.append((name, mod))
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run fastpeft benchmarks and write a markdown + JSON report.")
    ap.add_argument("--quick", action="store_true", help="small shapes (what the tests run on CPU)")
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None

    env = environment()
    stem = f"{slug(gpu_name())}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}"
    md = [f"# fastpeft benchmarks{' (quick)' if args.quick else ''}", ""]
    md += [f"- {k}: {v}" for k, v in env.items()] + [""]
    report = {"environment": env, "quick": args.quick, "benchmarks": {}}
    failed = False
    benches = discover(only)
    if only and len(benches) != len(only):
        missing = sorted(only - {n for n, _ in benches})
        print(f"unknown benchmark(s): {missing}", file=sys.stderr)
        return 2
    for name, mod in benches:
        title = getattr(mod, "TITLE", name)
        print(f"== {name}: {title}", flush=True)
        md += [f"## {name}: {title}", ""]
        try:
            rows = list(mod.run(quick=args.quick))
            table = markdown_table(rows)
            md += [table]
            report["benchmarks"][name] = {"title": title, "rows": rows}
            print(table, flush=True)
        except Exception as e:  # a broken benchmark must not hide the others
            failed = True
            tb = traceback.format_exc()
            md += [f"**failed**: `{type(e).__name__}: {e}`", "", "```", tb, "```", ""]
            report["benchmarks"][name] = {"title": title, "error": tb}
            print(tb, file=sys.stderr)
    md_path = os.path.join(args.out, stem + ".md")
    atomic_write(md_path, "\n".join(md) + "\n")
    atomic_write(os.path.join(args.out, stem + ".json"), json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
