"""On-demand loader of the CUDA NF4 GEMV (``csrc/nf4_gemv.cu``, M = 1 decoding).

Built with ``torch.utils.cpp_extension.load`` the first time it is needed, only where CUDA
is present (a CUDA device, torch built with CUDA, and nvcc). A failed build is remembered and
reported by :func:`unavailable_reason`; callers then use the Triton GEMV.

Which GEMV decodes is chosen by ``Settings.nf4_gemv`` (``fastpeft.get_settings()``; from
``FASTPEFT_NF4_GEMV`` read once at import): ``triton`` (default) or ``cuda``. The
default stays Triton until ``benchmarks/qlora_matmul.py`` shows the CUDA kernel faster on the
target GPU (the benchmark times both).
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Optional

import torch

from fastpeft.ops.settings import get_settings

__all__ = ["available", "unavailable_reason", "supports", "vector_aligned", "gemv", "build", "source_dir", "requested"]

_error: Optional[str] = None


def source_dir() -> str:
    """Directory holding ``nf4_gemv.cu`` / ``.cpp`` / ``.h`` (the ``fastpeft.csrc`` package)."""
    import fastpeft.csrc as csrc

    return os.path.dirname(os.path.abspath(csrc.__file__))


def requested(gemv: Optional[str] = None) -> bool:
    """True when ``gemv`` (default: the current settings' ``nf4_gemv``) asks for the CUDA GEMV."""
    return (gemv if gemv is not None else get_settings().nf4_gemv).strip().lower() == "cuda"


def unavailable_reason() -> Optional[str]:
    """Why the CUDA GEMV cannot be used here (None when it can, or has not been tried)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA device / torch without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME)"
    return _error


@functools.lru_cache(maxsize=1)
def build():
    """Compile (once per process; torch caches the build on disk) and return the extension."""
    from torch.utils.cpp_extension import load

    d = source_dir()
    return load(
        name="fastpeft_nf4_gemv",
        sources=[os.path.join(d, "nf4_gemv.cpp"), os.path.join(d, "nf4_gemv.cu")],
        extra_include_paths=[d],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=False,
    )


def available(gemv: Optional[str] = None) -> bool:
    """True when asked for (``gemv`` or the current ``nf4_gemv`` is ``"cuda"``), CUDA is present
    and the build works."""
    global _error
    if not requested(gemv) or unavailable_reason() is not None:
        return False
    try:
        build()
    except Exception as exc:  # pragma: no cover - needs CUDA
        _error = f"building csrc/nf4_gemv failed: {exc}"
        return False
    return True


def vector_aligned(packed: torch.Tensor) -> bool:
    """True when the kernel's 16-byte (``uint4``) loads of ``packed`` are aligned: its start is
    16-byte aligned (rows then are, as K % 32 == 0). A non-contiguous weight is copied by
    :func:`gemv` into a fresh (aligned) allocation; a view into the middle of a buffer may not be."""
    return not packed.is_contiguous() or packed.data_ptr() % 16 == 0


def supports(x: torch.Tensor, state, packed: Optional[torch.Tensor] = None) -> bool:
    """Shapes, dtypes and alignment the CUDA GEMV handles: one row, K and blocksize multiples of
    32, the packed weight 16-byte aligned (``packed``, when given; else the caller must check
    :func:`vector_aligned`). Callers use the Triton GEMV otherwise."""
    K = state.shape[1]
    return (
        x.is_cuda and x.dim() == 2 and x.shape[0] == 1
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and K % 32 == 0 and state.blocksize % 32 == 0
        and (packed is None or vector_aligned(packed))
    )


def gemv(x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """``x @ dequant(W)^T`` for ``x`` ``[1, K]`` on CUDA; returns ``[1, N]`` in ``x.dtype``."""
    if not x.is_cuda:
        raise RuntimeError("the CUDA NF4 GEMV got a CPU tensor; use the reference backend on CPU")
    if not vector_aligned(packed):
        raise ValueError("the CUDA NF4 GEMV needs a 16-byte-aligned packed weight (its uint4 loads); "
                         "pass packed.clone() or use the Triton GEMV (nf4_cuda.supports checks this)")
    ext = build()
    N, K = state.shape
    dev = x.device
    code = state.code.to(device=dev, dtype=torch.float32).contiguous()
    if state.nested:
        out = ext.nf4_gemv(
            x.reshape(-1).contiguous(), packed.reshape(-1).contiguous(), code, state.absmax.to(dev).contiguous(),
            state.nested_code.to(device=dev, dtype=torch.float32).contiguous(),
            state.nested_absmax.to(device=dev, dtype=torch.float32).contiguous(),
            state.offset.to(device=dev, dtype=torch.float32).reshape(1).contiguous(),
            N, K, state.blocksize, state.nested_blocksize,
        )
    else:
        out = ext.nf4_gemv(
            x.reshape(-1).contiguous(), packed.reshape(-1).contiguous(), code,
            state.absmax.to(device=dev, dtype=torch.float32).contiguous(), None, None, None,
            N, K, state.blocksize, state.nested_blocksize,
        )
    return out.reshape(1, N)
