"""benchmarks/run.py --quick on CPU: runs every benchmark module and writes a readable table."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_quick_writes_markdown_and_json(tmp_path):
    env = dict(os.environ)
    env.pop("FASTPEFT_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--only", "lora_linear",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mds = list(tmp_path.glob("*.md"))
    jsons = list(tmp_path.glob("*.json"))
    assert len(mds) == 1 and len(jsons) == 1
    assert mds[0].name.startswith("cpu-")
    text = mds[0].read_text()
    assert "- device: cpu" in text and "- commit:" in text
    assert "## lora_linear" in text
    header = "| K x N | M | r | pass | base ms | eager ms | fastpeft ms | eager/fastpeft | fastpeft/base |"
    assert header in text
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| K x N")]
    data = json.loads(jsons[0].read_text())
    rows = data["benchmarks"]["lora_linear"]["rows"]
    assert len(rows) == len(table_rows) == 2 * 3 * 2  # (K, N) x M x pass
    for row in rows:
        for k in ("base ms", "eager ms", "fastpeft ms"):
            assert row[k] > 0
        assert abs(row["eager/fastpeft"] - row["eager ms"] / row["fastpeft ms"]) < 1e-9
        assert row["peak MiB fastpeft"] is None  # no allocator statistics on CPU
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}


def test_unknown_benchmark_name_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--only", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_fastpeft_bench_passes_options_to_run_py(tmp_path):
    """`fastpeft bench --quick --only X` reaches benchmarks/run.py with its options intact."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from fastpeft.cli.main import main; sys.exit(main())",
         "bench", "--quick", "--only", "lora_linear", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name.startswith("cpu-") for p in tmp_path.glob("*.md")] == [True]
