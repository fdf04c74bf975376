"""Backend choice shared by every fused op.

Rules (the README's "Backends" section says the same):

* ``Settings.backend`` (``fastpeft.get_settings()``; from ``FASTPEFT_BACKEND`` read once at
  import, or ``fastpeft.use_settings(backend=...)``) or an op's ``backend=`` argument forces
  ``reference`` or ``triton`` (``auto``: automatic).
* Automatic: a CUDA tensor with triton importable runs the Triton kernel, anything else
  runs the pure-PyTorch reference path.
* A CPU tensor only reaches a Triton kernel when ``TRITON_INTERPRET=1`` is set and the
  caller forces ``triton``; without the interpreter a forced ``triton`` on CPU raises.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastpeft.kernels._common import interpreting
from fastpeft.ops.settings import get_settings

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


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """The backend asked for by argument, else by the current settings (None: automatic)."""
    value = backend if backend is not None else get_settings().backend
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"Unknown fastpeft backend {value!r}; use one of {BACKENDS} "
            "(or 'auto' / FASTPEFT_BACKEND unset for automatic choice)."
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
            raise RuntimeError("backend 'triton' is forced but triton is not installed (pip install triton).")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "backend 'triton' with CPU tensors needs TRITON_INTERPRET=1 "
                "(the Triton interpreter); otherwise use a CUDA device or the reference backend."
            )
        return "triton"
    return "triton" if (on_cuda and triton_available()) else "reference"


def fallback_reason(*tensors: Optional[torch.Tensor], backend: Optional[str] = None) -> Optional[str]:
    """Why the choice for ``backend`` (default: the current settings') would not use Triton for
    these tensors (None if it would)."""
    if requested_backend(backend) == "reference":
        return "backend forced to reference"
    if not triton_available():
        return "triton is not installed"
    if not any(t is not None and t.is_cuda for t in tensors):
        # automatic choice never interprets kernels on CPU (choose_backend); forcing does
        hint = " (backend 'triton' runs the kernels in the interpreter)" if interpreting() else ""
        return "tensors are on CPU (reference path)" + hint
    return None
