"""fastpeft's backend and kernel-plan choices: one immutable object, read from the environment once.

:class:`Settings` holds every switch the ops consult (which backend, which Triton plan). The
process-wide current value is built from the environment **once, when this module is imported**
(:meth:`Settings.from_env`); changing ``os.environ`` afterwards changes nothing. Code changes it
explicitly instead:

* :func:`use_settings` - ``with fastpeft.use_settings(backend="reference"): ...`` (restored on exit,
  also when the block raises);
* :func:`set_settings` - replace the current value (returns the previous one);
* per call - every op takes the single values it needs (``backend=``, ``impl=``; the LoRA, DoRA
  and QLoRA linears also a whole ``settings=``), defaulting to :func:`get_settings`;
  ``fastpeft.patch(model, settings=...)`` resolves them once and bakes them into the patched
  layers.

Environment variables (read at import):

=======================  ==================  ======================================================
variable                 field               values (default first)
=======================  ==================  ======================================================
``FASTPEFT_BACKEND``     ``backend``         ``auto`` (CUDA tensors: Triton, else reference),
                                             ``reference``, ``triton``
``FASTPEFT_LORA_IMPL``   ``lora_impl``       ``split``, ``kernels``, ``epilogue``, ``fused``
                                             (see ``ops.lora_linear.lora_impl``)
``FASTPEFT_NF4_IMPL``    ``nf4_impl``        ``auto`` (GPU: dequant, interpreter: fused), ``fused``,
                                             ``dequant`` (see ``ops.nf4.nf4_impl``)
``FASTPEFT_NF4_PAIR``    ``nf4_pair``        ``1`` / ``0`` (the NF4 GEMM's one-load-per-byte path)
``FASTPEFT_NF4_GEMV``    ``nf4_gemv``        ``triton`` (code table in registers where it
                                             compiles), ``triton_l1`` (the L1 table), ``cuda``
                                             (the M = 1 decoding GEMV)
``FASTPEFT_PREFIX_IMPL`` ``prefix_impl``     ``auto`` (CUDA, 16-bit, no padding, cuDNN takes it:
                                             ``sdpa``, else ``kernel``), ``kernel``, ``sdpa``
                                             (see ``ops.prefix_attention.choose_prefix_impl``)
=======================  ==================  ======================================================

This module imports nothing from fastpeft: the ops (and ``fastpeft.patch``) read it, never the
other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Mapping, Optional, Tuple

__all__ = ["Settings", "get_settings", "set_settings", "use_settings", "ENV_VARS",
           "BACKEND_CHOICES", "LORA_IMPLS", "NF4_IMPLS", "NF4_GEMVS", "PREFIX_IMPLS"]

BACKEND_CHOICES = ("auto", "reference", "triton")
LORA_IMPLS = ("split", "kernels", "epilogue", "fused")
NF4_IMPLS = ("auto", "fused", "dequant")
NF4_GEMVS = ("triton", "triton_l1", "cuda")
PREFIX_IMPLS = ("auto", "kernel", "sdpa")

# field -> environment variable read by Settings.from_env
ENV_VARS = {
    "backend": "FASTPEFT_BACKEND",
    "lora_impl": "FASTPEFT_LORA_IMPL",
    "nf4_impl": "FASTPEFT_NF4_IMPL",
    "nf4_pair": "FASTPEFT_NF4_PAIR",
    "nf4_gemv": "FASTPEFT_NF4_GEMV",
    "prefix_impl": "FASTPEFT_PREFIX_IMPL",
}
_CHOICES = {"backend": BACKEND_CHOICES, "lora_impl": LORA_IMPLS, "nf4_impl": NF4_IMPLS, "nf4_gemv": NF4_GEMVS,
            "prefix_impl": PREFIX_IMPLS}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _where(name: str) -> str:
    return f"Settings.{name} (environment variable {ENV_VARS[name]})"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The backend and Triton-plan choices of fastpeft's ops (immutable; see the module doc).

    Attributes:
        backend: ``"auto"`` (Triton for CUDA tensors, the reference path otherwise),
            ``"reference"`` or ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``).
        lora_impl: the LoRA-linear Triton plan, ``"split"`` (cuBLAS GEMMs + Triton mask
            kernels), ``"kernels"``, ``"epilogue"`` (LoRA products in Triton GEMM epilogues; also
            the 4-bit layer's ``"dequant"`` plan, see ``ops.nf4.QLoraLinearTriton``) or
            ``"fused"`` (one-kernel forward).
        nf4_impl: the QLoRA Triton plan for training-size matmuls, ``"auto"`` (``"dequant"`` on a
            GPU, ``"fused"`` under the Triton interpreter), ``"fused"`` or ``"dequant"``.
        nf4_pair: the NF4 forward GEMM loads each packed byte once (both nibbles) when True.
        nf4_gemv: the M = 1 decoding GEMV: ``"triton"`` (the one-row Triton GEMV with its code
            table in registers, read by ``prmt`` byte permutes, wherever it compiles: CUDA, a
            table exact in fp16), ``"triton_l1"`` (the same GEMV reading a 2 KB byte-pair table
            through L1, the interpreter's path) or ``"cuda"`` (``csrc/``, where it builds).
        prefix_impl: how the fused (non-reference) shared-prefix attention runs: ``"kernel"`` (the
            Triton kernels), ``"sdpa"`` (the prefix concatenated before the sequence keys, then
            PyTorch's SDPA without a mask where the batch has no padding) or ``"auto"`` (``"sdpa"``
            on CUDA for 16-bit, unpadded batches that cuDNN's attention takes, the predicted winner;
            ``"kernel"`` everywhere else).

    Strings are stripped and lower-cased; a value outside the allowed ones raises ``ValueError``
    naming the field, its environment variable and the allowed values.
    """

    backend: str = "auto"
    lora_impl: str = "split"
    nf4_impl: str = "auto"
    nf4_pair: bool = True
    nf4_gemv: str = "triton"
    prefix_impl: str = "auto"

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{_where(name)} must be a string, one of {choices}; got {value!r}")
            norm = value.strip().lower()
            if norm not in choices:
                raise ValueError(f"{_where(name)} = {value!r} is not allowed; use one of {choices}")
            object.__setattr__(self, name, norm)
        if not isinstance(self.nf4_pair, bool):
            raise TypeError(f"{_where('nf4_pair')} must be a bool (True / False); got {self.nf4_pair!r}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Settings from ``FASTPEFT_*`` variables of ``environ`` (default ``os.environ``); unset
        or empty variables keep the defaults. Raises ``ValueError`` naming a bad variable."""
        env = os.environ if environ is None else environ
        values = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var, "").strip()
            if raw:
                values[name] = _parse_bool(var, raw) if name == "nf4_pair" else raw
        return cls(**values)

    def replace(self, **overrides) -> "Settings":
        """A copy with ``overrides`` applied (validated); unknown names raise ``TypeError``."""
        unknown = sorted(set(overrides) - set(ENV_VARS))
        if unknown:
            raise TypeError(f"unknown fastpeft setting(s) {unknown}; the settings are {tuple(ENV_VARS)}")
        return dataclasses.replace(self, **overrides)

    def forced_backend(self) -> Optional[str]:
        """``"reference"`` / ``"triton"`` when forced, None for automatic choice."""
        return None if self.backend == "auto" else self.backend


def _parse_bool(var: str, raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{var}={raw!r} is not a boolean; use one of {_TRUE + _FALSE}")


# The process-wide current value: the environment as it was when fastpeft was imported.
_current: Settings = Settings.from_env()


def get_settings() -> Settings:
    """The current settings (what ops use when not given ``settings=`` / single values)."""
    return _current


def set_settings(settings: Settings) -> Settings:
    """Make ``settings`` the current value for the whole process; returns the previous one."""
    global _current
    if not isinstance(settings, Settings):
        raise TypeError(f"set_settings expects a fastpeft.Settings, got {type(settings).__name__}")
    previous, _current = _current, settings
    return previous


@contextlib.contextmanager
def use_settings(settings: Optional[Settings] = None, **overrides) -> Iterator[Settings]:
    """Within the block, the current settings are ``settings`` (default: the current ones) with
    ``overrides`` applied, e.g. ``use_settings(backend="reference", lora_impl="fused")``.

    The previous value is restored on exit, also when the block raises. Yields the settings in
    force. The value is process-wide (not per thread), like the environment it replaces.
    """
    base = get_settings() if settings is None else settings
    new = base.replace(**overrides) if overrides else base
    previous = set_settings(new)
    try:
        yield new
    finally:
        set_settings(previous)

