"""torch.distributed plumbing for training fastpeft (or peft) models on several processes.

One process per device, started by ``torchrun --nproc-per-node N`` or ``accelerate launch``;
both export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.

- :func:`detect_launch` reads that environment (None when the process was not launched so);
- :func:`check_strategy` and :func:`per_rank_batch_size` refuse what cannot work on this machine
  (NCCL without GPUs, more ranks than GPUs, a batch the ranks cannot split evenly, FSDP2 missing
  from the installed torch) with an error naming the fix, before any process group exists;
- :func:`init_distributed` starts the process group: NCCL on CUDA, gloo on CPU;
- :func:`wrap_model` wraps for ``ddp`` (``DistributedDataParallel``) or ``fsdp2`` (``fully_shard``
  on every decoder layer, then on the root). 4-bit bitsandbytes bases shard too: their packed
  ``Params4bit`` weights are split like any other parameter (load them with
  ``bnb_4bit_quant_storage`` set to the compute dtype, the layout FSDP+QLoRA setups use), and
  bitsandbytes restores each layer's quantisation state from the module after the all-gather;
- :func:`gather_adapter_state_dict` / :func:`save_adapter` assemble the full adapter tensors on
  rank 0 and write them in PEFT's format.

No fastpeft-specific tuner code lives here: everything works on peft models as well.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "STRATEGIES",
    "DistributedSetupError",
    "LaunchInfo",
    "detect_launch",
    "check_strategy",
    "per_rank_batch_size",
    "init_distributed",
    "wrap_model",
    "unwrap_model",
    "decoder_layers",
    "adapter_state_keys",
    "gather_adapter_state_dict",
    "save_adapter",
    "is_main_process",
]

STRATEGIES = ("ddp", "fsdp2")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedSetupError(RuntimeError):
    """A distributed run that cannot work as asked on this machine; the message names the fix."""


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in a multi-process launch."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun" or "accelerate"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch(env: Optional[Mapping[str, str]] = None) -> Optional[LaunchInfo]:
    """The launch this process belongs to, from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun
    and by accelerate launch, which runs torchrun), or None for a plain ``python`` run.

    Raises :class:`DistributedSetupError` for a half-set environment (some variables missing or not
    integers, a rank outside the world), which would otherwise hang at the rendezvous.
    """
    env = os.environ if env is None else env
    present = [k for k in _LAUNCH_VARS if k in env]
    if not present:
        return None
    missing = [k for k in _LAUNCH_VARS if k not in env]
    if missing:
        raise DistributedSetupError(
            f"{', '.join(present)} set but {', '.join(missing)} not: start the processes with "
            "`torchrun --nproc-per-node N ...` or `accelerate launch ...`, which set all of "
            f"{', '.join(_LAUNCH_VARS)} (or unset them to run in one process)."
        )
    try:
        rank, world, local_rank = (int(env[k]) for k in _LAUNCH_VARS)
    except ValueError:
        values = ", ".join(f"{k}={env[k]!r}" for k in _LAUNCH_VARS)
        raise DistributedSetupError(f"{values}: these must be integers; launch with torchrun or accelerate launch.") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < world:
        raise DistributedSetupError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}: need 0 <= RANK, LOCAL_RANK < WORLD_SIZE; "
            "launch with torchrun or accelerate launch instead of setting them by hand."
        )
    launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
    return LaunchInfo(rank=rank, local_rank=local_rank, world_size=world, launcher=launcher)


def _fully_shard_fn():
    """torch's FSDP2 ``fully_shard`` (public since torch 2.6; ``_composable`` before), or None."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


def _require_fully_shard():
    fully_shard = _fully_shard_fn()
    if fully_shard is None:
        raise DistributedSetupError(
            f"--strategy fsdp2 needs torch's fully_shard (torch >= 2.6); torch {torch.__version__} lacks it: "
            "upgrade torch, or use --strategy ddp."
        )
    return fully_shard


def check_strategy(strategy: str, device: str, local_rank: int = 0) -> str:
    """Refuse a strategy/device pair that cannot run here; return the process-group backend to use
    (``"nccl"`` for ``device="cuda"``, ``"gloo"`` for ``"cpu"``)."""
    if strategy not in STRATEGIES:
        raise DistributedSetupError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    if not dist.is_available():
        raise DistributedSetupError(
            f"--strategy {strategy} needs torch.distributed, which this torch build lacks: install a torch "
            "wheel from pytorch.org (they include it), or train in one process without --strategy."
        )
    if strategy == "fsdp2":
        _require_fully_shard()
    if device not in ("cpu", "cuda"):
        raise DistributedSetupError(f"Unknown device {device!r} for distributed training: use 'cuda' or 'cpu'.")
    if device == "cpu":
        return "gloo"
    if not torch.cuda.is_available():
        raise DistributedSetupError(
            f"--strategy {strategy} on CUDA (NCCL) needs GPUs, but torch sees none "
            f"(torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
            "run on a GPU machine, or pass device 'cpu' to train on CPU with the gloo backend."
        )
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise DistributedSetupError(
            f"LOCAL_RANK {local_rank} but only {gpus} GPU(s) visible: NCCL needs one GPU per process, so "
            f"launch at most --nproc-per-node {gpus} (or check CUDA_VISIBLE_DEVICES)."
        )
    if not dist.is_nccl_available():
        raise DistributedSetupError(
            "This torch build has no NCCL backend: install a CUDA torch wheel with NCCL, or train on CPU (gloo)."
        )
    return "nccl"


def per_rank_batch_size(global_batch_size: int, world_size: int, grad_accum_steps: int = 1) -> int:
    """The per-process micro-batch size for a global batch split over ``world_size`` ranks and
    ``grad_accum_steps`` accumulation steps; raises when it does not split evenly (ranks would
    otherwise see different batch sizes and the loss would not be a one-process run's)."""
    if global_batch_size < 1 or world_size < 1 or grad_accum_steps < 1:
        raise DistributedSetupError(
            f"batch size {global_batch_size}, world size {world_size} and gradient accumulation "
            f"{grad_accum_steps} must all be at least 1."
        )
    parts = world_size * grad_accum_steps
    if global_batch_size % parts:
        lower = global_batch_size - global_batch_size % parts
        fix = "a global batch of " + " or ".join(str(b) for b in (lower, lower + parts) if b)
        raise DistributedSetupError(
            f"global batch size {global_batch_size} does not split over {world_size} processes x "
            f"{grad_accum_steps} accumulation step(s) ({parts} equal micro-batches): use {fix} "
            f"(a multiple of {parts}), or a process count that divides {global_batch_size}."
        )
    return global_batch_size // parts


def init_distributed(strategy: str, device: Optional[str] = None, launch: Optional[LaunchInfo] = None,
                     timeout_s: float = 1800.0, init_method: Optional[str] = None) -> LaunchInfo:
    """Start the default process group for a torchrun/accelerate launch and return its
    :class:`LaunchInfo`. ``device`` defaults to ``"cuda"`` when GPUs are visible, else ``"cpu"``;
    on CUDA each process is bound to GPU ``LOCAL_RANK``. ``init_method`` defaults to the launcher's
    ``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``); ``file://...`` avoids a TCP port.
    Idempotent: an existing group is kept."""
    launch = launch or detect_launch()
    if launch is None:
        raise DistributedSetupError(
            f"--strategy {strategy} needs one process per device, but this process was not started by a "
            "launcher (RANK/WORLD_SIZE/LOCAL_RANK unset): run `torchrun --nproc-per-node N -m ...` or "
            "`accelerate launch ...`, or drop --strategy to train in one process."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = check_strategy(strategy, device, launch.local_rank)
    if dist.is_initialized():
        return launch
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if init_method is None and missing:
        raise DistributedSetupError(
            f"{', '.join(missing)} not set: torchrun and accelerate launch set the rendezvous address; "
            "start the processes with one of them."
        )
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return launch


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (``fully_shard`` wraps in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated transformer blocks of a (peft-wrapped) transformers model: modules whose class
    is named in some submodule's ``_no_split_modules`` (``LlamaDecoderLayer``, ...), outermost first;
    failing that, the children of the longest ``nn.ModuleList``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers: List[nn.Module] = []
    inside: Optional[str] = None  # the name of the last layer taken: its submodules come next
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        if type(m).__name__ in names:
            layers.append(m)
            inside = name
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap_model(model: nn.Module, strategy: str, device_ids: Optional[List[int]] = None, **kwargs) -> nn.Module:
    """Wrap ``model`` for data-parallel training; call after adapters are added (and after
    ``fastpeft.patch``). ``ddp``: ``DistributedDataParallel(model, device_ids, **kwargs)``, only
    trainable (adapter) gradients are all-reduced. ``fsdp2``: ``fully_shard(layer, **kwargs)`` on each
    decoder layer, then on the root, so each layer's parameters (4-bit weights included) are
    gathered just before it runs and freed after; returns the same (now sharded) module."""
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    if strategy != "fsdp2":
        raise DistributedSetupError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    fully_shard = _require_fully_shard()
    layers = decoder_layers(model)
    if not layers:
        raise DistributedSetupError(
            f"Found no decoder layers to shard in {type(model).__name__} (no _no_split_modules, no ModuleList): "
            "shard it yourself with fully_shard, or use --strategy ddp."
        )
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


class _KeyRecorder(dict):
    """A state dict that records which keys a reader looked up."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: Dict[str, None] = {}

    def __getitem__(self, key):
        self.read[key] = None
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read[key] = None
        return super().__contains__(key)


def adapter_state_keys(model: nn.Module, adapter_name: str = "default") -> List[str]:
    """The model state-dict keys a save of ``adapter_name`` reads: those the model's
    ``get_adapter_state_dict`` looks up (fastpeft models), else the trainable parameters (a peft
    model's adapters; pass their keys yourself for anything else)."""
    from fastpeft.peft_model import PeftModel  # here: peft_model itself imports fastpeft.utils

    model = unwrap_model(model)
    state = model.state_dict()
    if isinstance(model, PeftModel):
        recorder = _KeyRecorder(state)
        model.get_adapter_state_dict(adapter_name, state_dict=recorder)
        return [k for k in recorder.read if k in state]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in state if k in trainable]


def gather_adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                              keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """The full (unsharded) adapter tensors, on CPU, keyed like ``model.state_dict()``, on rank 0;
    an empty dict on the other ranks. Collective: every rank must call it. Only the adapter's
    tensors are gathered (``keys``, default :func:`adapter_state_keys`), never the base weights.

    Pass the result to ``model.save_pretrained(dir, state_dict=..., is_main_process=rank == 0)``
    (fastpeft and peft both accept it), or use :func:`save_adapter`."""
    model = unwrap_model(model)
    state = model.state_dict()
    keys = list(adapter_state_keys(model, adapter_name) if keys is None else keys)
    main = is_main_process()
    out: Dict[str, torch.Tensor] = {}
    for key in keys:  # the same order on every rank: each full_tensor() is a collective
        t = state[key]
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if main:
            out[key] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default", **kwargs) -> None:
    """Gather ``adapter_name`` onto rank 0 and write it there in PEFT's format
    (``adapter_config.json`` + ``adapter_model.safetensors``); the other ranks write nothing.
    Collective; ends with a barrier so no rank reads the directory before it is complete."""
    model = unwrap_model(model)
    state = gather_adapter_state_dict(model, adapter_name)
    main = is_main_process()
    model.save_pretrained(save_directory, state_dict=state if main else None, is_main_process=main,
                          selected_adapters=[adapter_name], **kwargs)
    if dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
