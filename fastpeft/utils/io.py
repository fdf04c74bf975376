"""Atomic writes and checked reads of adapter files.

Every write goes to a temporary file in the destination directory and is renamed into
place with ``os.replace``, so a crash mid-save never leaves a truncated file behind.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional

import torch


def _atomic_replace(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_replace(path, write)


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save ``tensors`` as a safetensors file atomically (tensors made contiguous, shared storage cloned)."""
    from safetensors.torch import save_file

    clean = {}
    seen = {}
    for k, v in tensors.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen[key] = k
        clean[k] = v.contiguous()
    _atomic_replace(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def load_adapter_weights(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors`` (or a legacy ``.bin``) with a clear error if it is corrupt."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=device)
        except Exception as exc:  # safetensors raises SafetensorError / OSError variants
            raise ValueError(
                f"Could not read adapter weights from {path}: {exc}. The file is corrupt or truncated; "
                "save the adapter again (fastpeft writes it atomically) or restore it from a good copy."
            ) from None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"Could not read adapter weights from {path}: {exc}.") from None
