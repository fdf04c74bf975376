"""Saving and resuming for ``fastpeft train``.

Every save goes to a temporary name beside its destination and is renamed into place, so a
directory named ``checkpoint-<step>`` or ``adapter`` is always complete. A checkpoint holds:

- the adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``: loadable
  by ``fastpeft`` or ``peft`` as it is);
- ``training_state.pt``: optimizer, scheduler, every RNG state (python, numpy, torch CPU, CUDA
  when present; a list of them, one per rank, for a distributed run), the step, the data
  position, the losses so far and the pre-training eval.
  It holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from fastpeft.cli.errors import TrainError

STATE_FILE = "training_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# what a save killed half-way leaves: ".<name>.tmp-<random>" (being written),
# ".<name>.old-<pid>" (the previous copy, moved aside for the instant of the swap) and
# ".summary.json.<random>" (write_json's temporary file)
_LEFTOVER = re.compile(r"\.(checkpoint-\d+|adapter)\.(tmp|old)-.+|\.summary\.json\..+")


def _atomic_dir(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)``, then rename ``tmp_dir`` to ``dest`` (replacing an older ``dest``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _save_pretrained(model, tmp: Path, state_dict: dict | None) -> None:
    # a distributed run passes the adapter tensors gathered onto rank 0 (its own are shards)
    model.save_pretrained(str(tmp), **({} if state_dict is None else {"state_dict": state_dict}))


def save_adapter(model, dest: Path, state_dict: dict | None = None) -> Path:
    """Save the adapter (PEFT format) to ``dest`` atomically: write a temp dir, then rename into place.
    ``state_dict``: the adapter's tensors to write instead of the model's own (keyed like its state dict)."""
    return _atomic_dir(dest, lambda tmp: _save_pretrained(model, tmp, state_dict))


def save_checkpoint(model, training_state: dict, dest: Path, state_dict: dict | None = None) -> Path:
    """Save the adapter plus ``training_state`` (see the module docstring) to ``dest`` atomically."""
    import torch

    def write(tmp: Path) -> None:
        _save_pretrained(model, tmp, state_dict)
        torch.save(training_state, tmp / STATE_FILE)

    return _atomic_dir(dest, write)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the output directory


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the resumable checkpoints in ``out_dir``, oldest first."""
    found = []
    for p in Path(out_dir).iterdir() if Path(out_dir).is_dir() else ():
        m = _CHECKPOINT.fullmatch(p.name)
        if m and (p / STATE_FILE).is_file() and (p / ADAPTER_WEIGHTS).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(out_dir: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints (None: keep all)."""
    if keep is None:
        return
    found = checkpoint_dirs(out_dir)
    for _, p in found[:max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def remove_leftovers(out_dir: Path) -> list[str]:
    """Remove what killed saves left in ``out_dir`` (temporary names only); returns the names removed.

    A previous copy moved aside (``.<name>.old-*``) whose replacement never arrived is moved
    back instead: it is the last complete save of ``<name>``.
    """
    removed = []
    for p in sorted(Path(out_dir).iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m:
            continue
        if m.group(2) == "old" and not (p.parent / m.group(1)).exists():
            os.replace(p, p.parent / m.group(1))
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def check_output_dir(out_dir: Path) -> Path | None:
    """Create ``out_dir`` if needed and prove it writable with a probe file, before anything slow runs.

    Returns the topmost directory created here (None if ``out_dir`` existed), so that a failed
    start can remove what it made with :func:`remove_if_empty`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"--output-dir {out_dir} exists and is not a directory")
    created = None
    for p in (out_dir, *out_dir.parents):
        if p.exists():
            break
        created = p
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"cannot create --output-dir {out_dir} ({exc.strerror}); "
                         "pass a --output-dir you can write to") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_if_empty(out_dir, created)
        raise TrainError(f"--output-dir {out_dir} is not writable ({exc.strerror}); "
                         "fix its permissions or pass another --output-dir") from None
    return created


def remove_if_empty(out_dir: Path, created: Path | None) -> None:
    """Remove ``out_dir`` and its parents up to ``created`` while they are empty (``created``: what
    :func:`check_output_dir` made; None: nothing)."""
    if created is None:
        return
    p = Path(out_dir)
    while True:
        try:
            p.rmdir()  # only succeeds on an empty directory
        except OSError:
            return
        if p == created:
            return
        p = p.parent


# ----------------------------------------------------------------------------- RNG state


def capture_rng() -> dict:
    """Every RNG a training step draws from: python, numpy, torch CPU and (when present) CUDA."""
    import torch
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Undo :func:`capture_rng`: every generator continues where it was captured."""
    import torch
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            print(f"note: the checkpoint has CUDA RNG states for {len(state['cuda'])} devices, this machine "
                  f"{torch.cuda.device_count()}: dropout masks will differ from an uninterrupted run",
                  file=sys.stderr)


def load_training_state(ckpt: Path) -> dict:
    """Read ``<ckpt>/training_state.pt`` (tensors and plain values only)."""
    import torch
    try:
        return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and what to do
        raise TrainError(f"cannot read {Path(ckpt) / STATE_FILE} ({exc}); delete {ckpt} to resume from "
                         "the checkpoint before it") from None
