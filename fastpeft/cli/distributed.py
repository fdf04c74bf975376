"""``fastpeft train`` as one process of a ``torchrun`` / ``accelerate launch`` run (``--strategy ddp|fsdp2``).

Every rank builds the same model and the same shuffled stream of global micro-batches (same seed);
each takes its contiguous share of every micro-batch (:meth:`Ranks.shard`). The loss is normalised
by the target-token count of the *global* batch and scaled by the world size, so that DDP's and
FSDP2's gradient averaging yields the one-process gradient; the reported loss and token counts are
summed over ranks. Rank 0 alone prints (the other ranks' stdout goes to /dev/null and their
progress bars are off) and writes files; the adapter is gathered onto it first.

Checkpoints hold rank 0's training state plus one RNG state per rank; the optimizer state is the
full (unsharded) one: DDP's is identical on every rank, FSDP2's is assembled with
``torch.distributed.checkpoint``'s full-state-dict API and re-sharded on load. Every rank reads
the checkpoint on ``--resume``, so the output directory must be visible to all of them.

A process not started by a launcher, without ``--strategy``, is a plain one-process run
(:data:`SINGLE`): every method below is then the identity or the one-process operation.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

from fastpeft.cli.checkpoint import save_adapter, save_checkpoint
from fastpeft.cli.errors import TrainError

LAUNCH_HINT = ("`torchrun --nproc-per-node N -m fastpeft.cli.main train --strategy {s} ...` "
               "(or `accelerate launch --multi_gpu --num_processes N -m fastpeft.cli.main train --strategy {s} ...`)")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size and strategy (None: one process)."""

    rank: int = 0
    world_size: int = 1
    strategy: str | None = None
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data and reductions

    def shard(self, batch: list) -> list:
        """This rank's contiguous share of a global micro-batch (all of it in one process)."""
        if not self.distributed:
            return batch
        k = len(batch) // self.world_size
        return batch[self.rank * k:(self.rank + 1) * k]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def agreed_signal(self, signum: int | None) -> int | None:
        """The signal any rank received (the largest number if several), so that all stop at the same step."""
        if not self.distributed:
            return signum
        import torch
        import torch.distributed as dist
        t = torch.tensor([signum or 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    # ------------------------------------------------------------------ the model

    def wrap(self, model, device):
        """``model`` wrapped for the strategy (DDP wrapper; FSDP2 shards in place and returns it)."""
        if not self.distributed:
            return model
        from fastpeft.utils.distributed import wrap_model
        device_ids = [device.index] if device.type == "cuda" else None
        return wrap_model(model, self.strategy, **({"device_ids": device_ids} if self.strategy == "ddp" else {}))

    @contextlib.contextmanager
    def accumulating(self, model, last: bool):
        """Around the backward of one micro-batch: gradients are synchronised across ranks only on the
        ``last`` micro-batch of an optimizer step (the earlier ones accumulate locally)."""
        if not self.distributed or last:
            yield
        elif self.strategy == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def full_model(self, model):
        """Around evaluation: with FSDP2, the root's own parameters (embeddings, final norm, lm_head) stay
        gathered, since ``generate`` calls the inner model and bypasses the root's gathering hooks; the
        decoder layers gather themselves. Every rank must evaluate (the gathers are collectives)."""
        if self.strategy != "fsdp2":
            yield
            return
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    # ------------------------------------------------------------------ checkpoints

    def optimizer_state(self, model, opt) -> dict:
        """The full optimizer state (collective under FSDP2; rank 0 holds the result)."""
        if self.strategy != "fsdp2":
            return opt.state_dict()  # DDP: every rank holds the same full state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, opt, state: dict) -> None:
        """Undo :meth:`optimizer_state`: under FSDP2 each rank keeps its shard of the full state."""
        if self.strategy != "fsdp2":
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))

    def rng_states(self, capture):
        """``capture()`` here; distributed: a list of every rank's (RNG streams differ per rank)."""
        if not self.distributed:
            return capture()
        import torch.distributed as dist
        states = [None] * self.world_size
        dist.all_gather_object(states, capture())
        return states

    def own_rng_state(self, saved):
        """This rank's entry of what :meth:`rng_states` saved."""
        if not self.distributed:
            return saved
        if not isinstance(saved, list) or len(saved) != self.world_size:
            raise TrainError(f"--resume: the checkpoint's RNG states are not those of {self.world_size} processes; "
                             "resume with the launch that wrote it")
        return saved[self.rank]

    def save_adapter(self, model, dest: Path) -> Path:
        """The adapter (PEFT format) to ``dest``: gathered and written by rank 0 (collective)."""
        if not self.distributed:
            return save_adapter(model, dest)
        state = self._gathered_adapter(model)
        if self.is_main:
            save_adapter(self._inner(model), dest, state_dict=state)
        self.barrier()  # no rank goes on (or reads it) before it is complete
        return Path(dest)

    def save_checkpoint(self, model, training_state: dict, dest: Path) -> Path:
        """Adapter + ``training_state`` to ``dest``, written by rank 0 (collective)."""
        if not self.distributed:
            return save_checkpoint(model, training_state, dest)
        state = self._gathered_adapter(model)
        if self.is_main:
            save_checkpoint(self._inner(model), training_state, dest, state_dict=state)
        self.barrier()
        return Path(dest)

    @staticmethod
    def _inner(model):
        from fastpeft.utils.distributed import unwrap_model
        return unwrap_model(model)

    @staticmethod
    def _gathered_adapter(model) -> dict:
        from fastpeft.utils.distributed import gather_adapter_state_dict
        return gather_adapter_state_dict(model)

    def close(self) -> None:
        """Leave the process group (also after an error), so no gloo thread outlives the run."""
        if self.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Ranks()


def _device_kind(args: argparse.Namespace) -> str:
    import torch
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def start_ranks(args: argparse.Namespace) -> Ranks:
    """Join the launch this process belongs to (process group started), or :data:`SINGLE`.

    Launched without ``--strategy`` means DDP. Refused with a :class:`TrainError` naming the fix:
    ``--strategy`` without a launcher, a ``--batch-size`` the ranks cannot split, a strategy the
    machine cannot run (NCCL without GPUs, more ranks than GPUs, no FSDP2 in this torch).
    """
    from fastpeft.utils import distributed as d
    try:
        launch = d.detect_launch()
        if launch is None:
            if args.strategy is not None:
                raise TrainError(f"--strategy {args.strategy} needs one process per device, but this process was "
                                 f"not started by a launcher: run {LAUNCH_HINT.format(s=args.strategy)}, "
                                 "or drop --strategy to train in one process")
            return SINGLE
        strategy = args.strategy or "ddp"
        try:
            d.per_rank_batch_size(args.batch_size, launch.world_size)
        except d.DistributedSetupError as exc:
            raise TrainError(f"--batch-size {args.batch_size} is the global micro-batch, split over the "
                             f"{launch.world_size} processes: {exc}") from None
        d.init_distributed(strategy, device=_device_kind(args), launch=launch)
    except d.DistributedSetupError as exc:
        raise TrainError(str(exc)) from None
    if args.strategy is None and launch.is_main:
        print(f"note: launched as {launch.world_size} processes without --strategy: using ddp")
    return Ranks(launch.rank, launch.world_size, strategy, launch.local_rank)


def check_rows(ranks: Ranks, n_rows: int, batch_size: int) -> None:
    """A distributed run needs full micro-batches (a short one would not split evenly over the ranks)."""
    if ranks.distributed and n_rows < batch_size:
        raise TrainError(f"{n_rows} training rows cannot fill one --batch-size {batch_size} micro-batch split over "
                         f"{ranks.world_size} processes: lower --batch-size, or add rows")
