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
  identity dropout, input in the base weight's dtype (any dtype under autocast), no extra forward arguments (e.g. peft's
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
they are reported as ``native`` and are only re-routed when ``backend`` or ``settings`` is given.

The backend and kernel plans are resolved once, by :func:`patch` (its ``settings`` and
``backend`` arguments, else :func:`fastpeft.get_settings`), and baked into the patched layers:
later :func:`fastpeft.use_settings` blocks do not change them (patch again to change them).

Routing is a table, :data:`ROUTES`: each :class:`Route` says which layers it matches, when a
matched layer is skipped and why, and which forward the patched layer runs (the first match wins).
A new layer type is a new entry. Before any route, layers whose forward never runs are skipped
(the ``out_proj`` LoRA inside ``nn.MultiheadAttention``, which reads ``out_proj.weight`` directly),
so the report counts only layers whose patched forward executes. A call that patches nothing
warns and says why (typically: called before ``get_peft_model``, or before TRL's ``SFTTrainer``
wrapped the model; :class:`fastpeft.PatchCallback` patches inside the trainer).

Under ``torch.autocast`` a patched LoRA layer takes the op whatever its input dtype, and the op's
reference path computes peft's autocast sequence (see :func:`fastpeft.ops.lora_linear.lora_linear`;
for QLoRA layers bitsandbytes' then peft's, see :func:`fastpeft.ops.nf4.bnb_linear4bit`).
AdaLoRA and DoRA adapters take their original forward under autocast: their ops do not round as
peft's autocast sequence does (DoRA's gradients differed by 7-10%), so they stay exact, unfused.

peft is never imported here: its layers are recognised by their class's module name.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastpeft.ops.backend import choose_backend, fallback_reason, requested_backend
from fastpeft.ops.dora import dora_linear
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.nf4 import bnb_linear4bit
from fastpeft.ops.settings import Settings, get_settings
from fastpeft.patch_loss import patch_loss, unpatch_loss
from fastpeft.patch_prefix import patch_prefix, unpatch_prefix

__all__ = ["patch", "unpatch", "PatchReport", "PatchedModule", "SkippedModule", "Route", "ROUTES"]

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
        settings: the :class:`fastpeft.Settings` baked into the patched layers (backend and
            Triton plans).
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
    settings: Optional[Settings] = None
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
            "settings": None if self.settings is None else dict(vars(self.settings)),
            "loss": self.loss,
        }

    def __str__(self) -> str:
        lines = [
            f"fastpeft.patch: {len(self.patched)} patched, {len(self.native)} native, "
            f"{len(self.skipped)} skipped; backend={self.backend}"
            + (f" ({self.backend_note})" if self.backend_note else "")
        ]
        if self.settings is not None:
            lines.append(f"  {self.settings}")
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


_HOOKS_REASON = "the layer or its base layer has forward hooks (e.g. accelerate offloading); bypassing them would break it"


def _all_adapters_unsupported(module: nn.Module, adapter_skip) -> Optional[str]:
    """The first adapter's reason when no adapter of the layer can use the op (None otherwise)."""
    adapters = list(module.lora_A.keys())
    if adapters and all(adapter_skip(module, a) is not None for a in adapters):
        return adapter_skip(module, adapters[0])
    return None


def _qlora_skip_reason(layer: "Layer") -> Optional[str]:
    module = layer.module
    if type(module).__name__ != "Linear4bit":
        return f"LoRA layer {type(module).__name__} on a 4-bit base: the QLoRA op covers peft's and fastpeft's Linear4bit"
    if _has_hooks(_base_of(module)) or _has_hooks(module):
        return _HOOKS_REASON
    return _all_adapters_unsupported(module, _qlora_adapter_skip_reason)


def _dense_skip_reason(module: nn.Module, method: str, layer_class: str) -> Optional[str]:
    """Why a LoRA-form layer (``layer_class`` of ``method``) can never use the LoRA-linear op."""
    base = _base_of(module)
    if type(base).__name__ in _QUANTIZED_NAMES or getattr(getattr(base, "weight", None), "quant_state", None) is not None:
        return f"quantized base layer {_cls_path(base)} (the LoRA-linear op needs a dense weight; see the QLoRA op)"
    if type(module).__name__ != layer_class:
        return (f"{method} layer {type(module).__name__} on {type(base).__name__}: the fused op covers {method} on "
                "nn.Linear and Conv1D only")
    if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
        return f"base layer {_cls_path(base)} is neither torch.nn.Linear nor transformers' Conv1D"
    if _is_conv1d(base) and not getattr(module, "fan_in_fan_out", False):
        return "Conv1D base without fan_in_fan_out=True"
    if isinstance(base, nn.Linear) and getattr(module, "fan_in_fan_out", False):
        return "nn.Linear base with fan_in_fan_out=True (weight layout mismatch)"
    if _has_hooks(base) or _has_hooks(module):
        return _HOOKS_REASON
    return _all_adapters_unsupported(module, _adapter_skip_reason)


def _lora_skip_reason(layer: "Layer") -> Optional[str]:
    return _dense_skip_reason(layer.module, "LoRA", "Linear")


def _adalora_skip_reason(layer: "Layer") -> Optional[str]:
    return _dense_skip_reason(layer.module, "AdaLoRA", "SVDLinear")


def _frozen_4bit_skip_reason(layer: "Layer") -> Optional[str]:
    return "the layer has forward hooks (e.g. accelerate offloading); bypassing them would break it" \
        if _has_hooks(layer.module) else None


def _never_called_reason(layer: "Layer") -> Optional[str]:
    """Why this layer's forward never runs, so patching it would change nothing (None if it runs)."""
    if isinstance(layer.parent, nn.MultiheadAttention) and layer.name.rsplit(".", 1)[-1] == "out_proj":
        return ("out_proj of torch.nn.MultiheadAttention: MultiheadAttention reads out_proj.weight directly and "
                "never calls its forward (peft merges this LoRA into the weight inside MultiheadAttention.forward)")
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


def _plain_adapter(module: nn.Module, x: torch.Tensor, args, kwargs, adapter_skip) -> Optional[str]:
    """The active adapter when this call can use the op, else None."""
    if args or kwargs or module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    a = active[0]
    if adapter_skip(module, a) is not None:
        return None
    if getattr(module, "cast_input_dtype_enabled", True) is False:
        return None
    return a


def _dense_dtype_ok(module: nn.Module, x: torch.Tensor) -> bool:
    # Outside autocast the op wants x in the base weight's dtype (as nn.Linear does); under autocast
    # it casts like peft's layer does, so any input dtype goes.
    return x.dtype == _base_of(module).weight.dtype or torch.is_autocast_enabled(x.device.type)


def _dropout_p(module: nn.Module, adapter: str) -> float:
    drop = module.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


def _lora_forward(self: nn.Module, state: Dict[str, Any], x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """A LoRA ``Linear`` (DoRA included) on ``nn.Linear`` / ``Conv1D``: the LoRA-linear (or DoRA) op."""
    a = _plain_adapter(self, x, args, kwargs, _adapter_skip_reason)
    if a is None or not _dense_dtype_ok(self, x):
        return _fallback(self, state, x, args, kwargs)
    base = _base_of(self)
    weight = base.weight.t() if state["fan_in_fan_out"] else base.weight  # always [out, in]
    A, B, s, p = self.lora_A[a].weight, self.lora_B[a].weight, float(self.scaling[a]), _dropout_p(self, a)
    if getattr(self, "use_dora", {}).get(a, False):
        if torch.is_autocast_enabled(x.device.type):  # the DoRA op does not follow peft's autocast casts
            return _fallback(self, state, x, args, kwargs)
        return dora_linear(x, weight, base.bias, A, B, _dora_magnitude(self, a), s, dropout_p=p,
                           training=self.training, settings=state["settings"])
    return lora_linear(x, weight, base.bias, A, B, s, dropout_p=p, training=self.training, settings=state["settings"])


def _qlora_forward(self: nn.Module, state: Dict[str, Any], x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """A LoRA ``Linear4bit``: the QLoRA op (the packed 4-bit weight dequantised in the matmul)."""
    a = _plain_adapter(self, x, args, kwargs, _qlora_adapter_skip_reason)
    if a is None:
        return _fallback(self, state, x, args, kwargs)
    base = _base_of(self)
    return bnb_linear4bit(
        x, base.weight.data, _quant_state(base), base.bias, getattr(base, "compute_dtype", None),
        self.lora_A[a].weight, self.lora_B[a].weight, float(self.scaling[a]),
        dropout_p=_dropout_p(self, a), training=self.training, settings=state["settings"],
    )


def _adalora_forward(self: nn.Module, state: Dict[str, Any], x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """peft's ``SVDLinear.forward`` through the LoRA-linear op, in the plain case (see the module doc).

    Under autocast peft multiplies ``dropout(x) @ (A * E).T @ B.T`` in the autocast dtype and scales
    afterwards; the fused form folds the scale into the down-projection first, so it would round
    differently: autocast calls take the original forward."""
    a = _plain_adapter(self, x, args, kwargs, _adapter_skip_reason)
    if (a is None or x.dtype != self.lora_A[a].dtype or x.dtype != self.lora_B[a].dtype
            or torch.is_autocast_enabled(x.device.type)):
        return _fallback(self, state, x, args, kwargs)
    base = _base_of(self)
    # peft: (drop(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5); the scale is folded into the
    # down-projection as a tensor, so a changed ranknum needs no host read
    down = (self.lora_A[a] * self.lora_E[a]) * (self.scaling[a] / (self.ranknum[a] + 1e-5))
    weight = base.weight.t() if state["fan_in_fan_out"] else base.weight
    return lora_linear(x, weight, base.bias, down, self.lora_B[a], 1.0, dropout_p=_dropout_p(self, a),
                       training=self.training, settings=state["settings"])


def _frozen_4bit_forward(self: nn.Module, state: Dict[str, Any], x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """A frozen bitsandbytes ``Linear4bit`` (no adapter): the QLoRA op without a LoRA branch."""
    if args or kwargs:
        return _fallback(self, state, x, args, kwargs)
    return bnb_linear4bit(x, self.weight.data, _quant_state(self), self.bias, getattr(self, "compute_dtype", None),
                          settings=state["settings"])


def _patched_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    state = self.__dict__[_STATE_ATTR]
    return state["route"].forward(self, state, x, args, kwargs)


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


# ----------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class Layer:
    """One module of the model, as the routes see it."""

    name: str
    module: nn.Module
    parent: Optional[nn.Module]
    library: Optional[str]  # "peft" / "fastpeft" for a tuner layer, else None
    inside_tuner: bool  # a submodule of some tuner layer (e.g. its base layer)


@dataclass(frozen=True)
class Route:
    """How :func:`patch` handles one layer type.

    Attributes:
        name: a label for ``repr`` and logs.
        matches: ``Layer -> bool``, the layer type this route takes (the first match in
            :data:`ROUTES` wins).
        skip_reason: ``Layer -> str | None``, why a matched layer can never use the op (None:
            patch it; per-call conditions are the forward's, which falls back to the original).
        forward: ``(module, state, x, args, kwargs) -> Tensor``, the patched forward (the route
            is kept in the layer's patch state, so its functions must be module-level for the
            patched model to pickle).
        note: the :class:`PatchedModule` note of a patched layer.
        adapter_skip: ``(module, adapter) -> str | None`` for routes over LoRA adapters: adapters
            that always take the original forward are listed in the note.
        native_note: the note of fastpeft's own layers of this type, which call the op already
            (they are re-routed only when ``patch`` is given a ``backend`` or ``settings``).
    """

    name: str
    matches: Callable[[Layer], bool]
    skip_reason: Callable[[Layer], Optional[str]]
    forward: Callable[..., torch.Tensor]
    note: str
    adapter_skip: Optional[Callable[[nn.Module, str], Optional[str]]] = None
    native_note: str = "runs the fused op already"


def _is_qlora_layer(layer: Layer) -> bool:
    m = layer.module
    return layer.library is not None and _is_lora_layer(m) and not _is_adalora_layer(m) and _is_bnb_4bit(_base_of(m))


def _is_adalora_tuner_layer(layer: Layer) -> bool:
    return layer.library is not None and _is_adalora_layer(layer.module)


def _is_lora_tuner_layer(layer: Layer) -> bool:
    return layer.library is not None and _is_lora_layer(layer.module)


def _is_frozen_4bit_linear(layer: Layer) -> bool:
    return layer.library is None and not layer.inside_tuner and _is_bnb_4bit(layer.module)


_PER_CALL = "original forward when merged, disabled or several adapters are active"

# First match wins: QLoRA before LoRA (both have lora_A/lora_B), AdaLoRA before LoRA (SVDLinear has them too).
ROUTES: Tuple[Route, ...] = (
    Route("qlora", _is_qlora_layer, _qlora_skip_reason, _qlora_forward,
          "QLoRA op (4-bit weight dequantised in the matmul); " + _PER_CALL, _qlora_adapter_skip_reason,
          native_note="runs the QLoRA op already"),
    Route("adalora", _is_adalora_tuner_layer, _adalora_skip_reason, _adalora_forward,
          "LoRA-linear op with A*E*scaling/ranknum as the down-projection; " + _PER_CALL + ", or under autocast",
          _adapter_skip_reason),
    Route("lora", _is_lora_tuner_layer, _lora_skip_reason, _lora_forward, _PER_CALL, _adapter_skip_reason),
    Route("frozen 4-bit linear", _is_frozen_4bit_linear, _frozen_4bit_skip_reason, _frozen_4bit_forward,
          "QLoRA op without a LoRA branch (frozen 4-bit linear)"),
)


def _route_for(layer: Layer) -> Optional[Route]:
    return next((r for r in ROUTES if r.matches(layer)), None)


def _layers(model: nn.Module) -> List[Layer]:
    """Every module of ``model`` with its parent, library and whether it sits inside a tuner layer."""
    inside_tuner = set()
    for module in model.modules():
        if _library(module) is not None:
            inside_tuner.update(id(m) for m in module.modules() if m is not module)
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    return [Layer(name, m, parents.get(id(m)), _library(m), id(m) in inside_tuner) for name, m in model.named_modules()]


def _kind(layer: Layer) -> str:
    """How the report names a layer: ``"peft lora.Linear on Linear"``, ``"bitsandbytes Linear4bit (no adapter)"``."""
    if layer.library is None:
        return f"bitsandbytes {type(layer.module).__name__} (no adapter)"
    parts = type(layer.module).__module__.split(".")
    tuner = parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else parts[-1]
    if tuner.startswith("lora_"):  # fastpeft.tuners.lora_bnb -> lora (peft: peft.tuners.lora.bnb)
        tuner = "lora"
    kind = f"{layer.library} {tuner}.{type(layer.module).__name__}"
    return f"{kind} on {type(_base_of(layer.module)).__name__}" if _is_lora_layer(layer.module) else kind


def _native_only_note(layer: Layer, explicit: bool) -> Optional[str]:
    """fastpeft's own non-``Linear`` tuner layers that call an op themselves (e.g. AdaLoRA's
    SVDLinear): reported native, never re-routed."""
    native_op = getattr(type(layer.module), "native_fused_op", None) if layer.library == "fastpeft" else None
    if not native_op or type(layer.module).__name__ == "Linear":
        return None
    note = f"runs {native_op} already"
    if explicit:
        note += "; it follows fastpeft.get_settings() per call, not patch()'s backend / settings"
    return note


def _route_layer(layer: Layer, explicit: bool, settings: Settings, report: "PatchReport") -> None:
    """Patch one layer through its route, or record why not, in ``report``."""
    native = _native_only_note(layer, explicit)
    if native is not None:
        report.native.append(PatchedModule(layer.name, _kind(layer), native))
        return
    route = _route_for(layer)
    if route is None:
        if layer.library is not None:
            report.skipped.append(SkippedModule(layer.name, _kind(layer),
                                                "not a LoRA layer (another tuner); the fused op covers LoRA"))
        return
    reason = _never_called_reason(layer) or route.skip_reason(layer)
    if reason is not None:
        report.skipped.append(SkippedModule(layer.name, _kind(layer), reason))
    elif layer.library == "fastpeft" and not explicit:
        report.native.append(PatchedModule(layer.name, _kind(layer), route.native_note))
    else:
        _install(layer.module, settings, route)
        note = route.note
        if route.adapter_skip is not None:
            always = [a for a in layer.module.lora_A.keys() if route.adapter_skip(layer.module, a) is not None]
            note += f"; adapters {always} always use the original forward" if always else ""
        report.patched.append(PatchedModule(layer.name, _kind(layer), note))


def _warn_if_nothing_patched(model: nn.Module, report: "PatchReport") -> None:
    if report.patched or report.native:
        return
    if report.skipped:
        first = report.skipped[0]
        why = (f"all {len(report.skipped)} adapter layers were skipped (first: {first.name}: {first.reason}); "
               "see the returned PatchReport")
    else:
        why = ("no LoRA, AdaLoRA, Prefix Tuning or bitsandbytes 4-bit layers found: call fastpeft.patch after "
               "get_peft_model (with TRL's SFTTrainer(peft_config=...), after the trainer has wrapped the model: "
               "fastpeft.patch(trainer.model)), or pass callbacks=[fastpeft.PatchCallback()] to the trainer")
    warnings.warn(f"fastpeft.patch changed nothing in {type(model).__name__}: {why}", stacklevel=3)


# ----------------------------------------------------------------------------- API
def _probe_tensor(model: nn.Module) -> Optional[torch.Tensor]:
    for prm in model.parameters():
        return prm
    return None


def patch(model: nn.Module, backend: Optional[str] = None, fused_loss: bool = True, *,
          settings: Optional[Settings] = None) -> PatchReport:
    """Route the LoRA layers of ``model`` to fastpeft's fused LoRA-linear op (the QLoRA op for
    LoRA on bitsandbytes 4-bit bases), and frozen bitsandbytes ``Linear4bit`` layers to the
    QLoRA op.

    Args:
        model: a fastpeft or Hugging Face peft ``PeftModel`` (or any module containing their
            LoRA layers). A Prefix Tuning model on a Llama-family base is routed to the
            shared-prefix attention op (:mod:`fastpeft.patch_prefix`).
        backend: ``"triton"`` or ``"reference"`` to force one for the patched layers (also
            re-routes fastpeft's own layers; ``"auto"``: per call from the input's device);
            None: ``settings.backend``.
        settings: the :class:`fastpeft.Settings` the patched layers use (also re-routes
            fastpeft's own layers); None: :func:`fastpeft.get_settings` now. Resolved once
            and baked into the layers and the prefix route (its ``backend`` and
            ``prefix_impl``), with ``backend`` overriding its backend.
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

    Calling ``patch`` again updates the settings of already patched layers. A call that patches
    nothing (no adapter layers yet, or every one skipped) emits a ``UserWarning`` saying why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.patch expects a torch.nn.Module (a PeftModel), got {type(model).__name__}")
    explicit = backend is not None or settings is not None  # re-route fastpeft's own layers too
    resolved = settings if settings is not None else get_settings()
    if backend is not None:
        requested_backend(backend)  # an unknown name raises here, naming the allowed ones
        resolved = resolved.replace(backend=backend)
    forced = resolved.forced_backend()
    probe = _probe_tensor(model)
    if forced is not None:
        shown = choose_backend(probe, backend=forced)  # raises when the forced backend cannot run
        label = shown if explicit else f"{shown} (fastpeft settings)"
        note = None if shown == "triton" else f"forced {shown}"
    else:
        why = fallback_reason(probe, backend="auto") if probe is not None else "model has no parameters"
        shown = "triton" if why is None else "reference"
        label, note = f"auto ({shown} for this model's device)", why
    report = PatchReport(backend=label, backend_note=note, settings=resolved)

    prefix = patch_prefix(model, resolved.backend, resolved.prefix_impl)
    if prefix is not None:
        if "reason" in prefix:
            report.skipped.append(SkippedModule(**prefix))
        else:
            report.patched.append(PatchedModule(**prefix))
    report.loss = patch_loss(model, resolved.backend) if fused_loss else None  # fastpeft/patch_loss.py

    for layer in _layers(model):
        _route_layer(layer, explicit, resolved, report)
    _warn_if_nothing_patched(model, report)
    logger.info("%s", report)
    return report


def _install(module: nn.Module, settings: Settings, route: Route) -> None:
    state = module.__dict__.get(_STATE_ATTR)
    if state is not None:  # already patched: only update the settings
        state["settings"] = settings
        return
    transposed = hasattr(module, "base_layer") and (bool(getattr(module, "fan_in_fan_out", False))
                                                    or _is_conv1d(_base_of(module)))
    module.__dict__[_STATE_ATTR] = {
        "settings": settings,
        "route": route,
        "fan_in_fan_out": transposed,  # the base weight is stored [in, out] (Conv1D)
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
