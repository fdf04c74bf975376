"""``fastpeft.patch(model)``: route the LoRA layers of a model to fastpeft's fused op.

Works on a fastpeft ``PeftModel`` and on a Hugging Face ``peft`` ``PeftModel`` (or any
``nn.Module`` holding their LoRA layers). For each LoRA layer on ``nn.Linear`` or GPT-2's
``Conv1D`` the instance's ``forward`` is replaced by one that calls
:func:`fastpeft.ops.lora_linear.lora_linear` (one fused op for base + LoRA branch, Triton on
CUDA) in the plain case and the layer's own forward otherwise, so every feature of the
library that built the layer keeps working:

* plain case (decided at each call): adapters enabled, not merged, exactly one active adapter
  present on the layer, no LoRA variant other than DoRA (which runs
  :func:`fastpeft.ops.dora.dora_linear`: the fused weight norm, then the LoRA-linear op) and no
  ``lora_bias`` for it, an ``nn.Dropout`` or
  identity dropout, input in the base weight's dtype, no extra forward arguments (e.g. peft's
  ``adapter_names`` mixed batches);
* anything else (merged weights, several active adapters, disabled adapters, ...) calls the
  original forward.

Only ``forward`` changes, on the instance: parameters, buffers, module names and the class
are untouched, so ``save_pretrained``, loading, merging (``merge_adapter``,
``merge_and_unload``), adapter switching and ``disable_adapter()`` keep working in either
library. :func:`unpatch` restores the original forwards.

bitsandbytes 4-bit bases (QLoRA): LoRA layers on a bitsandbytes ``Linear4bit`` (peft's
``lora.bnb.Linear4bit``, fastpeft's :class:`fastpeft.tuners.lora_bnb.Linear4bit`) are routed to
the QLoRA op :func:`fastpeft.ops.nf4.bnb_linear4bit` (dequantisation fused into the matmul, the
packed weight used as is), in the same plain case; frozen ``Linear4bit`` layers with no adapter
(outside any tuner layer) are routed to the same op without a LoRA branch, for inference
speed. On CPU the op's reference path reads bitsandbytes' CPU inference layout too, and never
repacks weights.

AdaLoRA: peft's ``SVDLinear`` on ``nn.Linear`` (or ``Conv1D`` with ``fan_in_fan_out``) is routed
to the same LoRA-linear op in the same plain case, with ``A * E * scaling / (ranknum + 1e-5)``
as the down-projection (formed with tensor ops, so no host sync, and ``A``, ``E`` get their
gradients through the product); rank pruning (``update_and_allocate``) and the orthogonality
regulariser read the same parameters and are unaffected.

Prefix Tuning (a peft ``PeftModelForCausalLM`` with ``PREFIX_TUNING`` on a Llama-family
model, or fastpeft's own prompt-learning model) is routed through the shared-prefix attention
op instead of a per-batch copy of the prefix in the KV cache: see :mod:`fastpeft.patch_prefix`
(a model type with no known attention layout raises a ``ValueError``).

Layers fastpeft cannot route (LoRA on embeddings or convolutions, 8-bit and other quantized
bases, other LoRA variants, base layers with accelerate hooks, other peft tuners) are left
untouched and listed in the :class:`PatchReport` with the reason. fastpeft's own LoRA layers already call the op;
they are reported as ``native`` and are only re-routed when ``backend`` is given.

peft is never imported here: its layers are recognised by their class's module name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastpeft.ops.backend import choose_backend, fallback_reason, requested_backend
from fastpeft.ops.dora import dora_linear
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.nf4 import bnb_linear4bit
from fastpeft.patch_loss import patch_loss, unpatch_loss
from fastpeft.patch_prefix import patch_prefix, unpatch_prefix

__all__ = ["patch", "unpatch", "PatchReport", "PatchedModule", "SkippedModule"]

logger = logging.getLogger("fastpeft")

_STATE_ATTR = "_fastpeft_patch_state"


@dataclass
class PatchedModule:
    name: str
    kind: str  # e.g. "peft lora.Linear on Linear"
    note: str = ""


@dataclass
class SkippedModule:
    name: str
    kind: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch` did.

    Attributes:
        backend: the backend the patched layers use (``"triton"``/``"reference"``; "auto"
            when chosen per call from the input's device).
        backend_note: why Triton is not used (None when it is).
        patched: layers whose forward now runs a fused op: LoRA layers (the LoRA-linear op, or
            the QLoRA op on bitsandbytes 4-bit bases) and frozen bitsandbytes ``Linear4bit``
            layers without an adapter (the QLoRA op without a LoRA branch).
        native: fastpeft LoRA layers, which run the op already (left as they are).
        skipped: LoRA / tuner layers left untouched, each with the reason.
        loss: whether the causal LM's labelled loss now runs the fused linear cross-entropy
            (``{"name", "kind", "note"}``) or why not (``"reason"``); None with ``fused_loss=False``.
    """

    backend: str
    backend_note: Optional[str] = None
    patched: List[PatchedModule] = field(default_factory=list)
    native: List[PatchedModule] = field(default_factory=list)
    skipped: List[SkippedModule] = field(default_factory=list)
    loss: Optional[Dict[str, str]] = None  # patch_loss's result: {"name", "kind", "note" or "reason"}

    @property
    def patched_names(self) -> List[str]:
        return [p.name for p in self.patched]

    @property
    def skipped_names(self) -> List[str]:
        return [s.name for s in self.skipped]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "backend": self.backend,
            "backend_note": self.backend_note,
            "patched": [vars(p) for p in self.patched],
            "native": [vars(p) for p in self.native],
            "skipped": [vars(s) for s in self.skipped],
            "loss": self.loss,
        }

    def __str__(self) -> str:
        lines = [
            f"fastpeft.patch: {len(self.patched)} patched, {len(self.native)} native, "
            f"{len(self.skipped)} skipped; backend={self.backend}"
            + (f" ({self.backend_note})" if self.backend_note else "")
        ]
        for p in self.patched:
            lines.append(f"  patched  {p.name}: {p.kind}" + (f" [{p.note}]" if p.note else ""))
        for p in self.native:
            lines.append(f"  native   {p.name}: {p.kind}" + (f" [{p.note}]" if p.note else ""))
        for s in self.skipped:
            lines.append(f"  skipped  {s.name}: {s.kind}: {s.reason}")
        if self.loss:
            lines.append(f"  loss     {self.loss['kind']}: {self.loss.get('note') or 'not fused: ' + self.loss['reason']}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- detection
def _cls_path(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__name__}"


def _library(module: nn.Module) -> Optional[str]:
    """"peft" or "fastpeft" for a tuner layer of that library, else None."""
    mod = type(module).__module__
    if mod.startswith("peft.tuners.") and hasattr(module, "base_layer"):
        return "peft"
    if mod.startswith("fastpeft.tuners.") and hasattr(module, "base_layer"):
        return "fastpeft"
    return None


def _is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling", "lora_dropout"))


def _is_adalora_layer(module: nn.Module) -> bool:
    """An AdaLoRA SVD layer (peft's ``SVDLinear`` family): ``lora_A``/``lora_E``/``lora_B`` parameters."""
    return all(hasattr(module, a) for a in ("lora_A", "lora_E", "lora_B", "ranknum", "scaling", "lora_dropout"))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (or ``LinearNF4``/``LinearFP4``) with a quantised weight."""
    return "Linear4bit" in {c.__name__ for c in type(module).__mro__} and _quant_state(module) is not None


def _quant_state(base: nn.Module):
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


_QUANTIZED_NAMES = {"Linear4bit", "Linear8bitLt", "QuantLinear", "HQQLinear", "EetqLinear", "Int8DynamicActivationInt4WeightLinear"}


def _base_of(module: nn.Module) -> nn.Module:
    base = module.base_layer
    while hasattr(base, "base_layer"):  # nested tuner layers
        base = base.base_layer
    return base


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        getattr(module, "_hf_hook", None) is not None
        or module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def _static_skip_reason(module: nn.Module) -> Optional[str]:
    """Why this LoRA layer can never use the op (None if it can, at least for some calls)."""
    base = _base_of(module)
    adalora = _is_adalora_layer(module)  # peft's SVDLinear: same checks, its own class name
    if _is_bnb_4bit(base) and not adalora:
        if type(module).__name__ != "Linear4bit":
            return f"LoRA layer {type(module).__name__} on a 4-bit base: the QLoRA op covers peft's and fastpeft's Linear4bit"
        if _has_hooks(base) or _has_hooks(module):
            return "the layer or its base layer has forward hooks (e.g. accelerate offloading); bypassing them would break it"
        adapters = list(module.lora_A.keys())
        plain = [a for a in adapters if _qlora_adapter_skip_reason(module, a) is None]
        return _qlora_adapter_skip_reason(module, adapters[0]) if adapters and not plain else None
    if type(base).__name__ in _QUANTIZED_NAMES or getattr(getattr(base, "weight", None), "quant_state", None) is not None:
        return f"quantized base layer {_cls_path(base)} (the LoRA-linear op needs a dense weight; see the QLoRA op)"
    if type(module).__name__ != ("SVDLinear" if adalora else "Linear"):
        method = "AdaLoRA" if adalora else "LoRA"
        return (f"{method} layer {type(module).__name__} on {type(base).__name__}: the fused op covers {method} on "
                "nn.Linear and Conv1D only")
    if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
        return f"base layer {_cls_path(base)} is neither torch.nn.Linear nor transformers' Conv1D"
    if _is_conv1d(base) and not getattr(module, "fan_in_fan_out", False):
        return "Conv1D base without fan_in_fan_out=True"
    if isinstance(base, nn.Linear) and getattr(module, "fan_in_fan_out", False):
        return "nn.Linear base with fan_in_fan_out=True (weight layout mismatch)"
    if _has_hooks(base) or _has_hooks(module):
        return "the layer or its base layer has forward hooks (e.g. accelerate offloading); bypassing them would break it"
    adapters = list(module.lora_A.keys())
    plain = [a for a in adapters if _adapter_skip_reason(module, a) is None]
    if adapters and not plain:
        return _adapter_skip_reason(module, adapters[0])
    return None


def _dora_magnitude(module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
    """DoRA's magnitude vector of ``adapter`` (peft's and fastpeft's layout), None if absent or odd."""
    store = getattr(module, "lora_magnitude_vector", None)
    if store is None or adapter not in store:
        return None
    weight = getattr(store[adapter], "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != module.lora_B[adapter].weight.shape[0]:
        return None
    return weight


def _adapter_skip_reason(module: nn.Module, adapter: str) -> Optional[str]:
    dora = bool(getattr(module, "use_dora", {}).get(adapter, False))
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if dora:
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"adapter {adapter!r} uses DoRA through {type(variant).__name__}, which the DoRA op does not implement"
        if _dora_magnitude(module, adapter) is None:
            return f"adapter {adapter!r} uses DoRA but has no [out_features] lora_magnitude_vector"
    elif variant is not None:
        return f"adapter {adapter!r} is a LoRA variant ({type(variant).__name__})"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return f"adapter {adapter!r} has a LoRA bias (lora_bias=True)"
    drop = module.lora_dropout[adapter] if adapter in module.lora_dropout else None
    if drop is not None and not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"adapter {adapter!r} uses dropout module {_cls_path(drop)}"
    lin = module.lora_A[adapter]
    if getattr(lin, "bias", None) is not None or getattr(module.lora_B[adapter], "bias", None) is not None:
        return f"adapter {adapter!r} has biases on lora_A/lora_B"
    return None


def _qlora_adapter_skip_reason(module: nn.Module, adapter: str) -> Optional[str]:
    """Why an adapter of a LoRA layer on a 4-bit base cannot use the QLoRA op (None if it can)."""
    if getattr(module, "use_dora", {}).get(adapter, False) or getattr(module, "lora_variant", {}).get(adapter) is not None:
        return f"adapter {adapter!r} is DoRA or another LoRA variant, which the QLoRA op does not implement"
    return _adapter_skip_reason(module, adapter)


# ----------------------------------------------------------------------------- forward
def _fallback(module: nn.Module, state: Dict[str, Any], x, args, kwargs):
    orig = state.get("orig_forward")
    if orig is not None:
        return orig(x, *args, **kwargs)
    return type(module).forward(module, x, *args, **kwargs)


def _plain_adapter(module: nn.Module, x: torch.Tensor, args, kwargs, qlora: bool = False) -> Optional[str]:
    """The active adapter when this call can use the op, else None."""
    if args or kwargs or module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    a = active[0]
    if (_qlora_adapter_skip_reason if qlora else _adapter_skip_reason)(module, a) is not None:
        return None
    if getattr(module, "cast_input_dtype_enabled", True) is False:
        return None
    if not qlora and x.dtype != _base_of(module).weight.dtype:
        return None
    return a


def _patched_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    state = self.__dict__[_STATE_ATTR]
    kind = state.get("kind", "lora")
    if kind == "nf4":  # a frozen bitsandbytes Linear4bit
        if args or kwargs:
            return _fallback(self, state, x, args, kwargs)
        return bnb_linear4bit(x, self.weight.data, _quant_state(self), self.bias, getattr(self, "compute_dtype", None),
                              backend=state["backend"])
    if kind == "adalora":
        return _adalora_forward(self, state, x, args, kwargs)
    adapter = _plain_adapter(self, x, args, kwargs, qlora=kind == "qlora")
    if adapter is None:
        return _fallback(self, state, x, args, kwargs)
    base = _base_of(self)
    if kind == "qlora":
        drop = self.lora_dropout[adapter]
        return bnb_linear4bit(
            x, base.weight.data, _quant_state(base), base.bias, getattr(base, "compute_dtype", None),
            self.lora_A[adapter].weight, self.lora_B[adapter].weight, float(self.scaling[adapter]),
            dropout_p=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0, training=self.training,
            backend=state["backend"],
        )
    weight = base.weight.t() if state["fan_in_fan_out"] else base.weight  # always [out, in]
    drop = self.lora_dropout[adapter]
    p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    if getattr(self, "use_dora", {}).get(adapter, False):
        return dora_linear(
            x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            _dora_magnitude(self, adapter), float(self.scaling[adapter]), dropout_p=p, training=self.training,
            backend=state["backend"],
        )
    return lora_linear(
        x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
        float(self.scaling[adapter]), dropout_p=p, training=self.training, backend=state["backend"],
    )


def _adalora_forward(self: nn.Module, state: Dict[str, Any], x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """peft's ``SVDLinear.forward`` through the LoRA-linear op, in the plain case (see the module doc)."""
    a = _plain_adapter(self, x, args, kwargs)
    if a is None or x.dtype != self.lora_A[a].dtype or x.dtype != self.lora_B[a].dtype:
        return _fallback(self, state, x, args, kwargs)
    base = _base_of(self)
    drop = self.lora_dropout[a]
    # peft: (drop(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5); the scale is folded into the
    # down-projection as a tensor, so a changed ranknum needs no host read
    down = (self.lora_A[a] * self.lora_E[a]) * (self.scaling[a] / (self.ranknum[a] + 1e-5))
    weight = base.weight.t() if state["fan_in_fan_out"] else base.weight
    return lora_linear(x, weight, base.bias, down, self.lora_B[a], 1.0,
                       dropout_p=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
                       training=self.training, backend=state["backend"])


class _PatchedForward:
    """Instance ``forward`` of a patched layer (a callable object, not a bound method, so the
    module still deep-copies and pickles)."""

    def __init__(self, module: nn.Module):
        self._module_ref = module

    def __call__(self, x, *args, **kwargs):
        return _patched_forward(self._module_ref, x, *args, **kwargs)

    def __reduce__(self):  # pickle: re-created by unpickling the module's state
        return (_PatchedForward, (self._module_ref,))

    def __deepcopy__(self, memo):
        return _PatchedForward(memo.get(id(self._module_ref), self._module_ref))


# ----------------------------------------------------------------------------- API
def _probe_tensor(model: nn.Module) -> Optional[torch.Tensor]:
    for prm in model.parameters():
        return prm
    return None


def patch(model: nn.Module, backend: Optional[str] = None, fused_loss: bool = True) -> PatchReport:
    """Route the LoRA layers of ``model`` to fastpeft's fused LoRA-linear op (the QLoRA op for
    LoRA on bitsandbytes 4-bit bases), and frozen bitsandbytes ``Linear4bit`` layers to the
    QLoRA op.

    Args:
        model: a fastpeft or Hugging Face peft ``PeftModel`` (or any module containing their
            LoRA layers). A Prefix Tuning model on a Llama-family base is routed to the
            shared-prefix attention op (:mod:`fastpeft.patch_prefix`).
        backend: ``"triton"`` or ``"reference"`` to force one for the patched layers (also
            re-routes fastpeft's own layers); None: automatic per call (Triton for CUDA
            tensors), honouring ``FASTPEFT_BACKEND``.
        fused_loss: a causal LM called with ``labels`` computes its loss with the fused linear
            cross-entropy (:mod:`fastpeft.patch_loss`; logits are then None in training mode).

    Returns:
        A :class:`PatchReport` listing patched, native and skipped layers (with reasons); it
        is also logged at INFO level on the ``fastpeft`` logger.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError / RuntimeError: an unknown backend, or ``"triton"`` where it cannot run
            (no triton, or CPU tensors without ``TRITON_INTERPRET=1``); Prefix Tuning on a model
            type with no known attention layout, or an adapter that does not fit its base model.

    Calling ``patch`` again updates the backend of already patched layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.patch expects a torch.nn.Module (a PeftModel), got {type(model).__name__}")
    explicit = requested_backend(backend) if backend is not None else None  # baked into the layers
    forced = requested_backend(backend)  # explicit, else FASTPEFT_BACKEND (read again at each call)
    probe = _probe_tensor(model)
    if forced is not None:
        shown = choose_backend(probe, backend=forced)  # raises when the forced backend cannot run
        label = shown if explicit is not None else f"{shown} (FASTPEFT_BACKEND)"
        note = None if shown == "triton" else f"forced {shown}"
    else:
        why = fallback_reason(probe) if probe is not None else "model has no parameters"
        shown = "triton" if why is None else "reference"
        label, note = f"auto ({shown} for this model's device)", why
    report = PatchReport(backend=label, backend_note=note)

    prefix = patch_prefix(model, explicit)
    if prefix is not None:
        if "reason" in prefix:
            report.skipped.append(SkippedModule(**prefix))
        else:
            report.patched.append(PatchedModule(**prefix))
    report.loss = patch_loss(model, explicit) if fused_loss else None  # fastpeft/patch_loss.py

    inside_tuner = set()
    for module in model.modules():
        if _library(module) is not None:
            inside_tuner.update(id(m) for m in module.modules())
    for name, module in model.named_modules():
        lib = _library(module)
        if lib is None:
            if _is_bnb_4bit(module) and id(module) not in inside_tuner:
                kind = f"bitsandbytes {type(module).__name__} (no adapter)"
                if _has_hooks(module):
                    report.skipped.append(SkippedModule(name, kind, "the layer has forward hooks (e.g. accelerate "
                                                        "offloading); bypassing them would break it"))
                else:
                    _install(module, explicit, "nf4")
                    report.patched.append(PatchedModule(name, kind, "QLoRA op without a LoRA branch (frozen 4-bit linear)"))
            continue
        parts = type(module).__module__.split(".")
        tuner = parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else parts[-1]
        if tuner.startswith("lora_"):  # fastpeft.tuners.lora_bnb -> lora (peft: peft.tuners.lora.bnb)
            tuner = "lora"
        kind = f"{lib} {tuner}.{type(module).__name__}"
        native_op = getattr(type(module), "native_fused_op", None) if lib == "fastpeft" else None
        if native_op and type(module).__name__ != "Linear":  # e.g. AdaLoRA's SVDLinear: not re-routable
            note = f"runs {native_op} already"
            if explicit is not None:
                note += f"; its backend follows FASTPEFT_BACKEND per call, not patch(backend={explicit!r})"
            report.native.append(PatchedModule(name, kind, note))
            continue
        if not _is_lora_layer(module):
            report.skipped.append(SkippedModule(name, kind, "not a LoRA layer (another tuner); the fused op covers LoRA"))
            continue
        reason = _static_skip_reason(module)
        base = _base_of(module)
        kind = f"{kind} on {type(base).__name__}"
        if reason is not None:
            report.skipped.append(SkippedModule(name, kind, reason))
            continue
        qlora = _is_bnb_4bit(base)
        if lib == "fastpeft" and explicit is None:
            report.native.append(PatchedModule(name, kind, "runs the QLoRA op already" if qlora else "runs the fused op already"))
            continue
        op = "qlora" if qlora else "adalora" if _is_adalora_layer(module) else "lora"
        _install(module, explicit, op)
        skip = _qlora_adapter_skip_reason if qlora else _adapter_skip_reason
        notes = [a for a in module.lora_A.keys() if skip(module, a) is not None]
        note = {"qlora": "QLoRA op (4-bit weight dequantised in the matmul); ",
                "adalora": "LoRA-linear op with A*E*scaling/ranknum as the down-projection; "}.get(op, "") + \
            "original forward when merged, disabled or several adapters are active"
        if notes:
            note += f"; adapters {notes} always use the original forward"
        report.patched.append(PatchedModule(name, kind, note))
    logger.info("%s", report)
    return report


def _install(module: nn.Module, backend: Optional[str], kind: str = "lora") -> None:
    state = module.__dict__.get(_STATE_ATTR)
    if state is not None:  # already patched: only update the backend
        state["backend"] = backend
        return
    module.__dict__[_STATE_ATTR] = {
        "backend": backend,
        "kind": kind,
        "fan_in_fan_out": kind in ("lora", "adalora") and (bool(getattr(module, "fan_in_fan_out", False))
                                                          or _is_conv1d(_base_of(module))),
        "orig_forward": module.__dict__.get("forward"),  # an instance forward set by someone else
    }
    module.forward = _PatchedForward(module)


def unpatch(model: nn.Module) -> List[str]:
    """Restore the original forward of every layer :func:`patch` changed; returns their names."""
    restored = unpatch_prefix(model)
    unpatch_loss(model)  # not a layer: not listed among the restored names
    for name, module in model.named_modules():
        state = module.__dict__.pop(_STATE_ATTR, None)
        if state is None:
            continue
        if state.get("orig_forward") is not None:
            module.forward = state["orig_forward"]
        else:
            module.__dict__.pop("forward", None)
        restored.append(name)
    return restored


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` (a LoRA layer) currently runs through :func:`patch`'s forward."""
    return _STATE_ATTR in module.__dict__
