"""`fastpeft train` under torchrun: 2 processes, gloo over loopback, fp32 on CPU, a tiny random Llama.

- ``--strategy ddp``, ``--strategy fsdp2`` and ``--strategy fsdp2 --qlora`` (a sharded 4-bit base) give
  the per-step losses of one process with the same global batch (LoRA dropout off: the ranks draw
  masks for their own shares of the batch);
- only rank 0 prints (rank 1's stdout stays empty) and writes the adapter and checkpoints;
- DDP and FSDP2 checkpoints resume across ranks (FSDP2 with dropout on, so every rank's own RNG
  stream must come back): the resumed run continues the uninterrupted one exactly;
- ``accelerate launch`` (no ``--strategy``: DDP) runs the same;
- SIGTERM to one rank stops every rank after the same step, with one checkpoint;
- `--strategy` without a launcher, and a batch the ranks cannot split, are refused naming the fix.

Tolerance against one process: 1e-5 absolute on losses around 1-5. Each rank pads its share of a
batch to its own longest row and the ranks' sums are added in another order than one process's,
so fp32 round-off differs (measured: about 1e-6).

Each torchrun spawn costs 10-40 s on a busy 2-core machine: nine in all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import run_files
from fastpeft.cli.main import main

LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return run_files(d)


def _argv(setup, out: Path, *extra: str, dropout: str = "0") -> list[str]:
    """6 steps of 2 global micro-batches of 8 rows (4 per rank): 64 rows make 4 steps an epoch, so it reshuffles.
    ``--lora-r``, not ``--r``: torchrun's parser refuses ``--r`` as an ambiguous abbreviation of its own options."""
    model, train, ev = setup
    return ["train", "--model", str(model), "--data", str(train), "--eval-data", str(ev), "--output-dir", str(out),
            "--steps", "6", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-2", "--lora-r", "4",
            "--lora-dropout", dropout, "--seed", "5", "--device", "cpu", "--threads", "1", "--max-new-tokens", "3",
            *extra]


def _rank_logs(log_dir: Path) -> dict[str, str]:
    """{"<rank>/stdout.log": text, ...} of torchrun's per-rank log files (``--redirects 3``)."""
    return {f"{p.parent.name}/{p.name}": p.read_text(errors="replace")
            for p in sorted(log_dir.rglob("*.log")) if p.parent.name.isdigit()}


def _launcher_cmd(launcher: str, log_dir: Path) -> list[str]:
    if launcher == "accelerate":  # its torchrun launcher (--multi_gpu: on CPU too); a fixed port, no log files
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0", "--log-dir", str(log_dir), "--redirects", "3"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], log_dir: Path, launcher: str = "torchrun") -> subprocess.Popen:
    """Start ``fastpeft train`` as 2 processes under torchrun (gloo over loopback, a free port from the
    c10d rendezvous, each rank's stdout and stderr in its own file under ``log_dir``) or accelerate launch."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [*_launcher_cmd(launcher, log_dir), "-m", "fastpeft.cli.main", *argv]
    shutil.rmtree(log_dir, ignore_errors=True)
    # run outside the checkout: its top-level kernels/ must not shadow anything (see DESIGN.md)
    return subprocess.Popen(cmd, env=env, cwd=log_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _failure(proc: subprocess.Popen, output: str, logs: dict[str, str]) -> str:
    text = "\n".join(f"--- rank {k}:\n{v[-3000:]}" for k, v in logs.items() if k.endswith("stderr.log"))
    return f"the launcher exited with {proc.returncode}\n{output[-3000:]}\n{text}"


def _torchrun(argv: list[str], log_dir: Path, attempts: int = 2, launcher: str = "torchrun") -> dict[str, str]:
    """Run ``fastpeft train`` as 2 processes; returns each rank's stdout/stderr (torchrun; accelerate: the
    launcher's output as "output"). A failure raises with both ranks' stderr. A run that died without a
    Python traceback (gloo's socket set-up and teardown have known aborts) is tried once more."""
    for attempt in range(attempts):
        proc = _launch(argv, log_dir, launcher)
        output, _ = proc.communicate(timeout=600)
        logs = _rank_logs(log_dir) if launcher == "torchrun" else {"output": output}
        if proc.returncode == 0:
            return logs
        why = _failure(proc, output, logs)
        if "Traceback" in why or attempt == attempts - 1:
            raise AssertionError(why)
    raise AssertionError("unreachable")


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The one-process run with the given extra flags (each run once per module)."""
    runs: dict = {}

    def run(*extra: str) -> Path:
        if extra not in runs:
            out = tmp_path_factory.mktemp("one") / "run"
            assert main(_argv(setup, out, *extra)) == 0
            runs[extra] = out
        return runs[extra]

    return run


def _assert_matches_one_process(out: Path, one: Path) -> None:
    dist_s, one_s = _summary(out), _summary(one)
    assert len(dist_s["train_losses"]) == 6
    assert dist_s["train_losses"] == pytest.approx(one_s["train_losses"], abs=LOSS_ATOL, rel=0)
    assert dist_s["eval_after"]["loss"] == pytest.approx(one_s["eval_after"]["loss"], abs=LOSS_ATOL, rel=0)
    assert dist_s["eval_after"]["exact_match"] == one_s["eval_after"]["exact_match"]
    assert dist_s["processes"] == 2 and one_s["processes"] == 1 and one_s["strategy"] is None
    # the gathered adapter is the one process's (Adam's normalisation can amplify round-off a little)
    a, b = _adapter(out / "adapter"), _adapter(one / "adapter")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)


def _assert_only_rank0_reports(logs: dict[str, str]) -> None:
    assert "summary" in logs["0/stdout.log"] and "eval after" in logs["0/stdout.log"]
    assert logs["1/stdout.log"] == ""
    assert "train:" not in logs["1/stderr.log"]  # no progress bar either


@pytest.fixture(scope="module")
def ddp_run(setup, tmp_path_factory):
    """A DDP run with a checkpoint at step 3: (its output directory, its ranks' logs)."""
    d = tmp_path_factory.mktemp("ddp")
    logs = _torchrun(_argv(setup, d / "run", "--strategy", "ddp", "--save-every", "3"), d / "logs")
    return d / "run", logs


def test_ddp_losses_match_one_process(ddp_run, one_process):
    out, logs = ddp_run
    _assert_matches_one_process(out, one_process())
    _assert_only_rank0_reports(logs)


@pytest.mark.parametrize("extra", [(), ("--qlora",)], ids=["fp32", "qlora"])
def test_fsdp2_losses_match_one_process(setup, one_process, tmp_path, extra):
    if extra:  # QLoRA: the 4-bit base, stored in fp32 (the compute dtype) so that fully_shard splits it
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    logs = _torchrun(_argv(setup, out, "--strategy", "fsdp2", *extra), tmp_path / "logs")
    _assert_matches_one_process(out, one_process(*extra))
    _assert_only_rank0_reports(logs)


def _resume_matches(setup, whole: Path, tmp_path: Path, *flags: str, dropout: str) -> None:
    """Resume a copy of ``whole``'s checkpoint-3 with the same command: the continuation repeats the
    uninterrupted run's numbers (same processes, shards and RNG streams)."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    logs = _torchrun(_argv(setup, resumed, *flags, "--resume", dropout=dropout), tmp_path / "logs")
    assert "resuming from" in logs["0/stdout.log"]
    s, w = _summary(resumed), _summary(whole)
    assert s["resumed_from_step"] == 3
    assert s["train_losses"] == pytest.approx(w["train_losses"], abs=1e-6, rel=0)
    a, b = _adapter(resumed / "adapter"), _adapter(whole / "adapter")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_ddp_resume_across_ranks_continues_the_run(setup, ddp_run, tmp_path):
    _resume_matches(setup, ddp_run[0], tmp_path, "--strategy", "ddp", "--save-every", "3", dropout="0")


def test_accelerate_launch_runs_ddp_like_torchrun(setup, one_process, tmp_path):
    out = tmp_path / "run"
    logs = _torchrun(_argv(setup, out), tmp_path / "logs", launcher="accelerate")  # no --strategy: ddp
    assert "launched as 2 processes without --strategy: using ddp" in logs["output"]
    assert logs["output"].count("eval after: loss") == 1  # printed by rank 0 only
    _assert_matches_one_process(out, one_process())
    assert _summary(out)["strategy"] == "ddp"


def test_fsdp2_resume_across_ranks_continues_the_run(setup, tmp_path):
    whole = tmp_path / "whole"
    _torchrun(_argv(setup, whole, "--strategy", "fsdp2", "--save-every", "3", dropout="0.2"), tmp_path / "logs")
    state = torch.load(whole / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # the ranks' dropout streams differ
    assert state["optimizer"]["state"], "the full (gathered) optimizer state"

    _resume_matches(setup, whole, tmp_path, "--strategy", "fsdp2", "--save-every", "3", dropout="0.2")


def test_strategy_without_a_launcher_names_torchrun(setup, tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    assert main(_argv(setup, out, "--strategy", "fsdp2")) == 2
    err = capsys.readouterr().err
    assert "--strategy fsdp2 needs one process per device" in err and "torchrun --nproc-per-node N" in err
    assert not out.exists()


def test_a_batch_the_ranks_cannot_split_is_refused(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = _argv(setup, tmp_path / "run", "--strategy", "ddp")
    argv[argv.index("--batch-size") + 1] = "3"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--batch-size 3 is the global micro-batch, split over the 2 processes" in err
    assert "use a global batch of 2 or 4" in err
    import torch.distributed as dist
    assert not dist.is_initialized()  # refused before any process group existed


def _worker_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker (a child of ``parent``) whose RANK is ``rank``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise LookupError(f"no worker of rank {rank} under pid {parent}")


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until rank 0's progress bar (``log``) shows ``step`` optimizer steps done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace") if log.is_file() else ""
        done = [int(m) for m in re.findall(r"train:.*?\| *(\d+)/", text)]
        if done and max(done) >= step:
            return
        time.sleep(0.2)
    state = "exited" if proc.poll() is not None else "hung"
    raise AssertionError(f"training did not reach step {step} (torchrun {state})")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(setup, tmp_path):
    out, log_dir = tmp_path / "run", tmp_path / "logs"
    argv = _argv(setup, out, "--strategy", "ddp")
    argv[argv.index("--steps") + 1] = "100000"  # runs until stopped
    proc = _launch(argv, log_dir)
    try:
        rank0_err = next(iter(log_dir.rglob("0/stderr.log")), None)
        deadline = time.monotonic() + 120
        while rank0_err is None and time.monotonic() < deadline:  # torchrun creates it at the workers' start
            time.sleep(0.2)
            rank0_err = next(iter(log_dir.rglob("0/stderr.log")), None)
        assert rank0_err is not None, "torchrun started no workers"
        _wait_for_step(rank0_err, 3, proc)
        os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns of it by the all-reduce
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = _rank_logs(log_dir)
    stops = {r: re.findall(r"stopped by SIGTERM at step (\d+)", logs[f"{r}/stderr.log"]) for r in (0, 1)}
    assert stops[0] and stops[0] == stops[1], _failure(proc, output, logs)
    step = int(stops[0][0])
    assert (out / f"checkpoint-{step}" / "training_state.pt").is_file()
    assert torch.load(out / f"checkpoint-{step}" / "training_state.pt", weights_only=True)["step"] == step
    assert not (out / "summary.json").exists()
