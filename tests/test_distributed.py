"""fastpeft under torch.distributed on CPU (gloo): DDP and FSDP2 (``fully_shard``) all-reduce the same
LoRA gradients as one process, for a fastpeft model and for a Hugging Face peft model patched by
``fastpeft.patch``. One spawn of two processes runs every setup (process start-up dominates)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SETUPS = ("ddp-fastpeft", "ddp-peft-patched", "fsdp2-fastpeft")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(setup: str):
    import sys

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


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for setup in SETUPS:
            model = _wrap(setup, _model(setup))
            ids = _batch()[rank * 2:(rank + 1) * 2]
            model(input_ids=ids, labels=ids).loss.backward()
            grads = {n.removeprefix("module."): _full(p.grad).clone()
                     for n, p in model.named_parameters() if p.requires_grad}
            torch.save(grads, os.path.join(out_dir, f"{setup}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_grads(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


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
