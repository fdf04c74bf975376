"""benchmarks/prefix_attention.py through benchmarks/run.py --quick on CPU (protocol of benchmarks/README.md)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prefix_attention_benchmark_quick(tmp_path):
    env = dict(os.environ)
    env.pop("FASTPEFT_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--only", "prefix_attention",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [md] = list(tmp_path.glob("*.md"))
    [js] = list(tmp_path.glob("*.json"))
    text = md.read_text()
    assert "## prefix_attention" in text and "- device: cpu" in text
    header = ("| what | B | T | P | kv heads | padded | base ms | fastpeft ms | base/fastpeft | best alt ms "
              "| best alt/fastpeft | peak MiB base | peak MiB fastpeft | MiB saved | max |diff| | best alt | base fwd ms "
              "| fastpeft fwd ms | best alt fwd ms | peak MiB best alt | auto impl | auto ms | lower-right runs "
              "| alternatives (fwd+bwd ms) |")
    assert header in text
    rows = json.loads(js.read_text())["benchmarks"]["prefix_attention"]["rows"]
    assert [r["what"] for r in rows] == ["attn fwd+bwd", "attn fwd+bwd", "llama step"]
    assert {r["padded"] for r in rows[:2]} == {"yes", "no"}
    for r in rows:
        assert r["base ms"] > 0 and r["fastpeft ms"] > 0
        assert abs(r["base/fastpeft"] - r["base ms"] / r["fastpeft ms"]) < 1e-9
        assert r["peak MiB fastpeft"] is None  # no allocator statistics on CPU
        # every arm's output and gradients agree with fastpeft's (attention rows; the step: |loss diff|)
        assert r["max |diff|"] < 1e-4
    unpadded = next(r for r in rows[:2] if r["padded"] == "no")
    assert unpadded["best alt ms"] > 0 and unpadded["best alt fwd ms"] > 0 and unpadded["fastpeft fwd ms"] > 0
    assert abs(unpadded["best alt/fastpeft"] - unpadded["best alt ms"] / unpadded["fastpeft ms"]) < 1e-9
    alts = dict(part.split(": ", 1) for part in unpadded["alternatives (fwd+bwd ms)"].split("; "))
    assert set(alts) == {"lower-right", "square flash", "square cudnn", "square efficient", "hybrid flash"}
    timed = {n: float(t) for n, t in alts.items() if not t.startswith("refused")}
    assert {"lower-right", "hybrid flash"} <= set(timed)  # both run on CPU (math dispatch, the CPU flash ops)
    assert alts["square cudnn"].startswith("refused")  # no cuDNN on CPU: recorded, not fatal
    # the best alternative is the fastest that ran (the list prints 3 significant digits)
    assert alts[unpadded["best alt"]] == format(unpadded["best alt ms"], ".3g")
    assert float(alts[unpadded["best alt"]]) == min(timed.values())
    assert unpadded["lower-right runs"] == "math" and unpadded["auto impl"] == "kernel"  # CPU
    padded = next(r for r in rows[:2] if r["padded"] == "yes")
    assert padded["best alt ms"] is None and padded["best alt"] == "n/a (padded)" and padded["auto ms"] > 0
