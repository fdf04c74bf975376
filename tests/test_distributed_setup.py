"""fastpeft.utils.distributed without a process group: launch detection from the environment, the
errors for strategies that cannot work on this machine (each naming its fix), batch splitting, and
which modules/keys wrapping and saving act on. Wrapping and gathering across real processes are
tested in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from conftest import tiny_llama
from fastpeft.utils import distributed as D

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_detect_launch_torchrun_accelerate_and_plain():
    assert D.detect_launch({}) is None
    info = D.detect_launch(TORCHRUN)
    assert (info.rank, info.local_rank, info.world_size, info.launcher, info.is_main) == (1, 1, 2, "torchrun", False)
    info = D.detect_launch({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "ACCELERATE_MIXED_PRECISION": "no"})
    assert (info.launcher, info.is_main) == ("accelerate", True)


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, r"RANK set but WORLD_SIZE, LOCAL_RANK not: start the processes with `torchrun"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, r"WORLD_SIZE='two'.*must be integers"),
    ({**TORCHRUN, "RANK": "2"}, r"RANK=2, LOCAL_RANK=1, WORLD_SIZE=2: need 0 <= RANK"),
])
def test_detect_launch_refuses_a_half_set_environment(env, match):
    with pytest.raises(D.DistributedSetupError, match=match):
        D.detect_launch(env)


def test_strategy_backends_and_unknown_names():
    assert D.check_strategy("ddp", "cpu") == "gloo"
    assert D.check_strategy("fsdp2", "cpu") == "gloo"
    with pytest.raises(D.DistributedSetupError, match=r"Unknown strategy 'zero3': choose one of ddp, fsdp2"):
        D.check_strategy("zero3", "cpu")
    with pytest.raises(D.DistributedSetupError, match=r"Unknown device 'mps'"):
        D.check_strategy("ddp", "mps")


def test_nccl_without_gpus_names_the_cpu_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(D.DistributedSetupError,
                       match=r"--strategy fsdp2 on CUDA \(NCCL\) needs GPUs, but torch sees none.*pass device 'cpu'.*gloo"):
        D.check_strategy("fsdp2", "cuda")


def test_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(D.DistributedSetupError, match=r"LOCAL_RANK 2 but only 2 GPU\(s\) visible.*--nproc-per-node 2"):
        D.check_strategy("ddp", "cuda", local_rank=2)


def test_fsdp2_missing_from_torch(monkeypatch):
    monkeypatch.setattr(D, "_fully_shard_fn", lambda: None)
    with pytest.raises(D.DistributedSetupError, match=r"fsdp2 needs torch's fully_shard \(torch >= 2.6\).*--strategy ddp"):
        D.check_strategy("fsdp2", "cpu")
    assert D.check_strategy("ddp", "cpu") == "gloo"
    with pytest.raises(D.DistributedSetupError, match=r"upgrade torch, or use --strategy ddp"):
        D.wrap_model(torch.nn.Linear(2, 2), "fsdp2")


def test_per_rank_batch_size():
    assert D.per_rank_batch_size(8, 2) == 4
    assert D.per_rank_batch_size(8, 2, grad_accum_steps=2) == 2
    with pytest.raises(D.DistributedSetupError,
                       match=r"global batch size 6 does not split over 4 processes x 1 accumulation step\(s\).*"
                             r"use a global batch of 4 or 8 \(a multiple of 4\), or a process count that divides 6"):
        D.per_rank_batch_size(6, 4)
    with pytest.raises(D.DistributedSetupError, match=r"use a global batch of 4 \(a multiple of 4\)"):
        D.per_rank_batch_size(2, 4)
    with pytest.raises(D.DistributedSetupError, match="must all be at least 1"):
        D.per_rank_batch_size(0, 2)


def test_init_needs_a_launcher_and_its_rendezvous(monkeypatch):
    for k in TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(D.DistributedSetupError, match=r"not started by a launcher.*torchrun --nproc-per-node N"):
        D.init_distributed("ddp", device="cpu")
    launch = D.detect_launch({k: TORCHRUN[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    with pytest.raises(D.DistributedSetupError, match=r"MASTER_ADDR, MASTER_PORT not set"):
        D.init_distributed("ddp", device="cpu", launch=launch)
    assert not torch.distributed.is_initialized()


def test_decoder_layers_and_adapter_keys():
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    model = fastpeft.get_peft_model(tiny_llama(layers=3), fastpeft.LoraConfig(**cfg))
    layers = D.decoder_layers(model)
    assert layers == list(model.get_base_model().model.layers)
    keys = D.adapter_state_keys(model)
    assert len([k for k in keys if ".lora_" in k]) == 3 * 2 * 2
    assert any("lm_head.modules_to_save.default" in k for k in keys)  # the trained copy, not the base head
    assert not any("base_layer" in k or "original_module" in k for k in keys)
    # without a process group the gather is the live tensors, and saving gives what save_pretrained gives
    gathered = D.gather_adapter_state_dict(model)
    assert sorted(gathered) == sorted(keys)
    assert all(torch.equal(gathered[k], model.state_dict()[k]) for k in keys)
    want = fastpeft.get_peft_model_state_dict(model)
    got = fastpeft.get_peft_model_state_dict(model, state_dict=gathered)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_adapter_keys_of_a_peft_model_are_its_trainable_parameters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert D.adapter_state_keys(model) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert D.is_main_process()
