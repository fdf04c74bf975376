"""fastpeft under torch.distributed on CPU (gloo): DDP and FSDP2 (``fully_shard``) all-reduce the same
LoRA gradients as one process, for a fastpeft model and for a Hugging Face peft model patched by
``fastpeft.patch``. One spawn of two processes runs every setup (process start-up dominates)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SETUPS = ("ddp-fastpeft", "ddp-peft-patched", "fsdp2-fastpeft")


def _model(setup: str):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_llama

    import fastpeft

    torch.manual_seed(0)
    kw = dict(r=4, init_lora_weights=False, target_modules="all-linear", task_type="CAUSAL_LM")
    if setup == "ddp-peft-patched":
        import peft

        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
        report = fastpeft.patch(model, backend="reference")
        assert report.patched, report
        return model
    return fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 128, (4, 10), generator=g)


def _wrap(setup: str, model):
    if setup.startswith("ddp"):
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, out_dir: str, canary: bool = False) -> None:
    # Each rank's stderr goes to its own log, so a crash in the C++ layers (gloo aborts without a Python
    # traceback) can be reported by the fixture instead of vanishing into pytest's capture.
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    # Rendezvous through a file and talk over loopback: no free-port race, no TCPStore server thread, and
    # no dependence on the machine's hostname resolving to a usable interface.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"),
                                rank=rank, world_size=world)
    except Exception as e:  # torch alone could not form the group (e.g. no loopback address)
        with open(os.path.join(out_dir, f"init-failed-{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}")
        log.flush()
        os._exit(3)
    if canary:  # torch alone, no fastpeft: can this machine run a gloo all-reduce at all?
        t = torch.full((4,), float(rank + 1))
        dist.all_reduce(t)
        _save({"sum": t}, os.path.join(out_dir, f"canary-{rank}.pt"))
    for setup in () if canary else SETUPS:
        model = _wrap(setup, _model(setup))
        ids = _batch()[rank * 2:(rank + 1) * 2]
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n.removeprefix("module."): _full(p.grad).clone()
                 for n, p in model.named_parameters() if p.requires_grad}
        _save(grads, os.path.join(out_dir, f"{setup}-{rank}.pt"))
    # Both ranks leave together; then skip the interpreter's teardown, where gloo's socket threads can
    # abort when the peer process has already gone (a known gloo-at-exit race, not a fastpeft result).
    dist.barrier()
    dist.destroy_process_group()
    log.flush()
    os._exit(0)


def _save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _logs(out) -> str:
    text = []
    for rank in range(2):
        f = out / f"rank{rank}.log"
        lines = [ln for ln in (f.read_text().splitlines() if f.exists() else []) if ln.strip()]
        text.append(f"rank {rank} stderr: " + (" | ".join(lines[-6:]) or "<empty>"))
    return "; ".join(text)


def _spawn(out, canary: bool = False, attempts: int = 2):
    """Run the two workers; return None when every expected file is on disk, else why not. A worker
    killed by a signal before finishing is run once more (gloo's socket set-up has known aborts)."""
    names = ["canary"] if canary else list(SETUPS)
    why = None
    for _ in range(attempts):
        for f in out.glob("*"):
            f.unlink()
        try:
            mp.spawn(_worker, args=(2, str(out), canary), nprocs=2, join=True)
        except mp.ProcessExitedException as e:
            why = f"{e}; {_logs(out)}"
        done = all((out / f"{n}-{r}.pt").exists() for n in names for r in range(2))
        if done:
            if why:  # the crash came after the work, in process teardown
                warnings.warn(f"a distributed worker crashed after saving its results ({why})")
            return None
    return why


@pytest.fixture(scope="module")
def dist_grads(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    why = _spawn(out)
    if why is None:
        return out
    init_failed = sorted(out.glob("init-failed-*.txt"))
    if init_failed:  # before any fastpeft code ran: this machine cannot run torch.distributed's gloo
        pytest.skip(f"torch.distributed (gloo) cannot start here: {init_failed[0].read_text()}")
    # The workers died (by a signal: a Python error would have raised above). Tell a fastpeft failure
    # from a machine where torch's gloo backend itself cannot run, with a bare two-process all-reduce.
    canary = tmp_path_factory.mktemp("dist-canary")
    canary_why = _spawn(canary, canary=True)
    if canary_why is not None:
        pytest.skip(f"torch.distributed (gloo) cannot run on this machine: a bare all-reduce died too ({canary_why})")
    raise RuntimeError(f"distributed workers died before saving their gradients ({why})")


@pytest.mark.parametrize("setup", SETUPS)
def test_distributed_gradients_match_single_process(dist_grads, setup):
    g0 = torch.load(dist_grads / f"{setup}-0.pt")
    g1 = torch.load(dist_grads / f"{setup}-1.pt")
    # reference: one process, unpatched fastpeft model, mean of the two half-batch losses
    # (what DDP's and FSDP's gradient averaging computes)
    model = _model("ddp-fastpeft")
    ids = _batch()
    loss = 0.5 * (model(input_ids=ids[:2], labels=ids[:2]).loss + model(input_ids=ids[2:], labels=ids[2:]).loss)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(g0) == sorted(ref) and all("lora_" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(g0[n], g1[n], atol=0, rtol=0)
        torch.testing.assert_close(g0[n], ref[n], atol=1e-5, rtol=1e-4)
