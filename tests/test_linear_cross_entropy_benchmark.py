"""benchmarks/train_memory.py on a tiny model: every arm in its own process, results as markdown + JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_memory_dry_run_writes_every_arm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPEFT_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_memory.py"), "--models", "tiny", "--seqs", "48",
         "--steps", "2", "--cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("train_memory-cpu-*.md")
    (js,) = tmp_path.glob("train_memory-cpu-*.json")
    data = json.loads(js.read_text())
    for key in ("date", "commit", "machine", "torch"):
        assert data["environment"][key]
    rows = data["rows"]
    assert [r["arm"] for r in rows] == ["peft", "peft+patch", "fastpeft"]
    peft = rows[0]
    for r in rows:
        assert r["model"] == "tiny" and r["seq"] == 48 and r["steps"] == 2 and r["device"] == "cpu"
        assert r["step s"] > 0 and abs(r["tokens/s"] - 48 / r["step s"]) < 1e-6
        assert 0 < r["peak MiB"] <= r["process peak MiB"]
        assert abs(r["memory vs peft"] - r["peak MiB"] / peft["peak MiB"]) < 1e-9
        assert abs(r["speed vs peft"] - peft["step s"] / r["step s"]) < 1e-9
        assert abs(r["loss"] - peft["loss"]) < 1e-4  # the same model and batch in every arm
    text = md.read_text()
    assert "| model | seq | arm | step s | tokens/s | peak MiB | memory vs peft |" in text
    assert "MALLOC_MMAP_THRESHOLD_=65536" in text and "- commit:" in text
    assert sum(ln.startswith("| tiny | 48 |") for ln in text.splitlines()) == 3
