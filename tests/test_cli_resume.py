"""`fastpeft train` never loses a run: full checkpoints, SIGINT/SIGTERM, --resume, --save-total-limit,
leftovers of killed saves. All on a tiny random Llama, fp32 on CPU, with LoRA dropout on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import run_files
from fastpeft.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return run_files(d)


def _argv(setup, out: Path, *extra: str) -> list[str]:
    """6 steps of 2 micro-batches of 8 rows: 64 rows make 4 steps an epoch, so the run reshuffles."""
    model, train, ev = setup
    return ["train", "--model", str(model), "--data", str(train), "--eval-data", str(ev), "--output-dir", str(out),
            "--steps", "6", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-2", "--r", "4",
            "--lora-dropout", "0.2", "--seed", "5", "--device", "cpu", "--threads", "1", "--max-new-tokens", "3",
            *extra]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _interrupt_during_step(monkeypatch, step: int, grad_accum: int = 2, signum=signal.SIGINT):
    """Send ``signum`` to this process in the middle of optimizer step ``step`` (after its first micro-batch)."""
    from fastpeft.cli import loop

    calls, real = [0], loop.batch_loss

    def batch_loss(*a, **k):
        calls[0] += 1
        out = real(*a, **k)
        if calls[0] == (step - 1) * grad_accum + 1:
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(loop, "batch_loss", batch_loss)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(_argv(setup, out)) == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_matches_an_uninterrupted_run(setup, uninterrupted, tmp_path, monkeypatch, capsys,
                                                            signum):
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        _interrupt_during_step(m, step=3, signum=signum)
        assert main(_argv(setup, out)) == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"{name}: finishing this step, then saving a checkpoint" in err
    assert f"stopped by {name} at step 3: checkpoint saved to {out / 'checkpoint-3'}" in err
    assert sorted(os.listdir(out)) == ["checkpoint-3"]  # the step finished and was saved; nothing else

    # the checkpoint: a PEFT adapter plus the whole training state, loadable without pickle
    ckpt = out / "checkpoint-3"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt"} <= set(os.listdir(ckpt))
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["data"]["offset"] == 6 * 8 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3

    assert main(_argv(setup, out, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    whole, resumed = _summary(uninterrupted), _summary(out)
    assert resumed["resumed_from_step"] == 3 and len(resumed["train_losses"]) == 6
    # step by step the same losses (fp32 CPU, dropout on), the same adapter, the same evals
    assert resumed["train_losses"] == pytest.approx(whole["train_losses"], abs=1e-4, rel=0)
    assert resumed["eval_before"] == whole["eval_before"]
    assert resumed["eval_after"]["loss"] == pytest.approx(whole["eval_after"]["loss"], abs=1e-4)
    a, b = _adapter(uninterrupted / "adapter"), _adapter(out / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)


def test_resume_refuses_another_run_and_starts_fresh_without_checkpoint(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_during_step(m, step=2)
        assert main(_argv(setup, out)) == 130
    capsys.readouterr()
    argv = _argv(setup, out, "--resume")
    argv[argv.index("--lr") + 1] = "2e-2"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out / 'checkpoint-2'} was written by a run with --lr 0.01, this command has 0.02" in err
    # --resume into an empty directory is a fresh start, said so
    fresh = tmp_path / "fresh"
    assert main(_argv(setup, fresh, "--resume", "--steps", "2")) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    assert _summary(fresh)["resumed_from_step"] == 0 and len(_summary(fresh)["train_losses"]) == 2


def test_save_total_limit_keeps_the_newest(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(setup, out, "--save-every", "1", "--save-total-limit", "2")) == 0
    # steps 1..5 saved (the 6th is the final adapter), the oldest three deleted
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint-4", "checkpoint-5", "summary.json"]
    assert _summary(out)["checkpoints"] == [str(out / "checkpoint-4"), str(out / "checkpoint-5")]
    assert main(_argv(setup, tmp_path / "bad", "--save-total-limit", "0")) == 2
    assert "--save-total-limit must be >= 1 (got 0)" in capsys.readouterr().err


def test_leftovers_of_a_killed_save_are_removed(setup, tmp_path, capsys):
    from fastpeft.cli.checkpoint import remove_leftovers

    out = tmp_path / "run"
    out.mkdir()
    # what SIGKILL leaves mid-save: a half-written temp dir, and a previous copy moved aside for the swap
    (out / ".checkpoint-4.tmp-k1ll3d").mkdir()
    (out / ".checkpoint-4.tmp-k1ll3d" / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".adapter.tmp-x9").mkdir()
    (out / ".checkpoint-2.old-1234").mkdir()
    (out / ".checkpoint-2.old-1234" / "adapter_config.json").write_text("{}")
    (out / ".summary.json.q7w2").write_text("{")
    (out / "notes.txt").write_text("mine")
    (out / ".hidden").write_text("not ours")
    assert remove_leftovers(out) == [".adapter.tmp-x9", ".checkpoint-4.tmp-k1ll3d", ".summary.json.q7w2"]
    # the moved-aside copy had no replacement: it is put back, not deleted
    assert sorted(os.listdir(out)) == [".hidden", "checkpoint-2", "notes.txt"]
    assert (out / "checkpoint-2" / "adapter_config.json").read_text() == "{}"

    (out / ".checkpoint-7.tmp-abc").mkdir()
    assert main(_argv(setup, out, "--steps", "1")) == 0
    assert "removed 1 temporary folder(s) left by an interrupted save" in capsys.readouterr().err
    assert [n for n in os.listdir(out) if n.startswith(".")] == [".hidden"]


def test_sigterm_to_a_real_process(setup, tmp_path):
    """A separate `fastpeft train` process gets SIGTERM once its loop runs: it saves and exits 130."""
    out = tmp_path / "run"
    argv = _argv(setup, out)
    argv[argv.index("--steps") + 1] = "400"
    code = "import sys; from fastpeft.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: proc.stderr.read(1), b"")])
    reader.start()
    deadline = time.monotonic() + 240
    while b"train:" not in err and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the progress bar appears once the loop has started
    assert b"train:" in err, err.decode(errors="replace")
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        reader.join()
    text = err.decode(errors="replace")
    assert rc == 130, text
    assert "stopped by SIGTERM at step" in text and "--resume to continue" in text
    ckpts = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert len(ckpts) == 1 and 1 <= int(ckpts[0].split("-")[1]) < 400, ckpts
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt"} <= set(os.listdir(out / ckpts[0]))
    assert not (out / "summary.json").exists() and not [n for n in os.listdir(out) if n.startswith(".")]
