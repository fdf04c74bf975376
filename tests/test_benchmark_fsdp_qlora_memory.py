"""benchmarks/fsdp_qlora_memory.py in its quick configuration: one process and two FSDP2 ranks on a
tiny 4-bit Llama. The two ranks hold half of the one process's parameters each (the tiny shapes
split evenly), the packed 4-bit weights included, and the results file is written."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("bitsandbytes")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "benchmarks", "fsdp_qlora_memory.py")
    spec = importlib.util.spec_from_file_location("fastpeft_bench_fsdp_qlora_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_rows_show_the_base_sharded_in_half(tmp_path, monkeypatch):
    bench = _load()
    rows = bench.run(quick=True, timeout_s=600)
    assert [(r["ranks"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert all(list(r) == list(rows[0]) for r in rows) and all(r["model"] == "quick" for r in rows)
    one, shards = rows[0], rows[1:]
    assert one["4-bit MiB"] > 0 and one["params MiB"] > one["4-bit MiB"]
    for r in shards:
        assert r["4-bit MiB"] == pytest.approx(one["4-bit MiB"] / 2, rel=1e-9)
        assert r["params MiB"] == pytest.approx(one["params MiB"] / 2, rel=1e-9)
        assert r["x 1 process"] == pytest.approx(0.5, rel=1e-9)
    for r in rows:
        assert 0 < r["live RSS MiB"] < r["peak RSS MiB"] and r["peak CUDA MiB"] is None and r["step s"] > 0
    monkeypatch.setattr(bench, "HERE", str(tmp_path))
    md = bench._write_results(rows)
    assert "| model | ranks | rank | params MiB |" in open(md).read()
    assert json.load(open(md[:-3] + ".json"))["rows"] == rows
