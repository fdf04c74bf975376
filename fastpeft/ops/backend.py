"""Backend choice shared by every fused op.

Rules (see DESIGN.md):

* ``FASTPEFT_BACKEND=reference|triton`` forces a backend (unset or ``auto``: automatic).
* Automatic: a CUDA tensor with triton importable runs the Triton kernel, anything else
  runs the pure-PyTorch reference path.
* A CPU tensor only reaches a Triton kernel when ``TRITON_INTERPRET=1`` is set and the
  caller forces ``triton``; without the interpreter a forced ``triton`` on CPU raises.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """The backend asked for by argument or by ``FASTPEFT_BACKEND`` (None: automatic)."""
    value = backend if backend is not None else os.environ.get("FASTPEFT_BACKEND", "")
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"Unknown fastpeft backend {value!r}; use one of {BACKENDS} "
            "(or leave FASTPEFT_BACKEND unset for automatic choice)."
        )
    return value


def choose_backend(*tensors: Optional[torch.Tensor], backend: Optional[str] = None) -> str:
    """Pick ``"triton"`` or ``"reference"`` for an op over ``tensors``.

    Raises ``RuntimeError`` when ``triton`` is forced but cannot run (triton missing, or a
    CPU tensor without ``TRITON_INTERPRET=1``): a forced choice never silently falls back.
    """
    forced = requested_backend(backend)
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("FASTPEFT_BACKEND=triton but triton is not installed (pip install triton).")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "FASTPEFT_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
                "(the Triton interpreter); otherwise use a CUDA device or the reference backend."
            )
        return "triton"
    return "triton" if (on_cuda and triton_available()) else "reference"


def fallback_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why the automatic choice would not use Triton for these tensors (None if it would)."""
    if requested_backend() == "reference":
        return "FASTPEFT_BACKEND=reference"
    if not triton_available():
        return "triton is not installed"
    if not any(t is not None and t.is_cuda for t in tensors):
        # automatic choice never interprets kernels on CPU (choose_backend); forcing does
        hint = " (FASTPEFT_BACKEND=triton runs the kernels in the interpreter)" if interpreting() else ""
        return "tensors are on CPU (reference path)" + hint
    return None
