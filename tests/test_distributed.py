"""fastpeft models under torch.distributed (DDP, gloo backend on CPU): gradients all-reduce like a single process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_llama

    import fastpeft

    torch.manual_seed(0)
    return fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear", task_type="CAUSAL_LM"))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 128, (4, 10), generator=g)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        ids = _batch()[rank * 2:(rank + 1) * 2]
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g0 = torch.load(tmp_path / "grads0.pt")
    g1 = torch.load(tmp_path / "grads1.pt")
    # reference: one process, mean of the two half-batch losses (what DDP's averaging computes)
    model = _model()
    ids = _batch()
    loss = 0.5 * (model(input_ids=ids[:2], labels=ids[:2]).loss + model(input_ids=ids[2:], labels=ids[2:]).loss)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(g0) == sorted(ref) and all("lora_" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(g0[n], g1[n], atol=0, rtol=0)
        torch.testing.assert_close(g0[n], ref[n], atol=1e-5, rtol=1e-4)
