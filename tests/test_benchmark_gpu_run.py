"""benchmarks/gpu_run.sh --dry-run on CPU: the one-call GPU session script runs its stages
(environment, GPU tests collected, a benchmark table written) and reports each one."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")


def test_gpu_run_dry_run_writes_a_table_and_a_log(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPEFT_BACKEND", "OUT")}
    env.update(RESULTS_DIR=str(tmp_path / "res"), BENCHES="lora_linear", PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (tmp_path / "res" / "gpu_run.log").read_text()
    for stage in ("environment", "gpu_tests", "bench_lora_linear"):
        assert f"OK {stage}" in log, log
    assert "tests collected" in (tmp_path / "res" / "gpu_tests.log").read_text()
    tables = list((tmp_path / "res" / "lora_linear").glob("cpu-*.md"))
    assert len(tables) == 1 and "| K x N | M | r | pass |" in tables[0].read_text()


def test_gpu_run_reports_a_failing_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(RESULTS_DIR=str(tmp_path / "res"), BENCHES="no_such_benchmark", PYTHON=sys.executable, SKIP_TESTS="1")
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 1
    assert "FAIL bench_no_such_benchmark" in (tmp_path / "res" / "gpu_run.log").read_text()
