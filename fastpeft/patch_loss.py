"""The fused LM-head loss for causal LMs: the model-level glue of :mod:`fastpeft.ops.linear_cross_entropy`.

When a transformers causal LM is called with ``labels``, its forward computes all the logits
``[batch, seq, vocab]`` and then transformers' ``ForCausalLMLoss`` upcasts them to fp32: the largest
tensors of a LoRA step. Here the causal LM's backbone (``model.model`` for Llama, Qwen2, Gemma...)
runs as usual to the final norm's output, and the LM head + cross-entropy run as one chunked op.
Loss and gradients are the unfused ones (tested to 1e-5 in fp32).

**Logits are not returned when training with labels.** With ``labels`` and the module in training
mode the output's ``logits`` is None, as with Liger-Kernel's fused loss; pass ``skip_logits=False``
to the forward to get them (computed from the same hidden states, which costs the memory the op
saves), and in eval mode they are returned unless ``skip_logits=True``. ``logits_to_keep`` slices
the hidden states before the loss, exactly as transformers does before the LM head. Without
``labels`` the model's own forward runs, untouched (generation, logits for metrics).

Which models: transformers causal LMs whose forward is the standard one (backbone, optional slice,
``lm_head``, then ``self.loss_function``) with no logit processing beyond what the op does:
Cohere's ``logit_scale`` multiplier, Granite's ``/ logits_scaling`` and Gemma 2/3's
``final_logit_softcapping``. This is read from the forward's source once per class, so a model
that does anything else to its logits (or adds an auxiliary loss, as MoE models do) is left to its
own forward, with the reason reported. The LM head must be a plain ``nn.Linear`` (tied to the
input embedding or not; frozen or trainable); a head wrapped by LoRA or ``modules_to_save`` is left
alone too.

Used by :func:`fastpeft.patch` (``fused_loss=True``, the default) for peft models and by fastpeft's
own ``PeftModelForCausalLM`` (``model.fused_loss = False`` turns it off).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastpeft.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["patch_loss", "unpatch_loss", "fused_loss_head", "fused_causal_lm_forward", "call_with_fused_loss",
           "is_loss_patched", "LossHead"]

_STATE_ATTR = "_fastpeft_loss_state"
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")

# Lines a standard causal-LM forward may hold between the backbone's output and its loss call
# (whitespace and comments removed), and what each one means for the op.
_SOFTCAP = "self.config.final_logit_softcapping"
_KNOWN_LINES = {
    "hidden_states = outputs.last_hidden_state": None,
    "hidden_states = outputs[0]": None,
    "hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)": None,
    "slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep": None,
    "logits = self.lm_head(hidden_states)": None,
    "logits = self.lm_head(hidden_states[:, slice_indices, :])": None,
    "loss = None": None,
    "if labels is not None:": None,
    "logits = logits * self.logit_scale": "cohere_scale",
    "logits = logits / self.config.logits_scaling": "granite_scale",
    f"if {_SOFTCAP} is not None:": "softcap",
    f"logits = logits / {_SOFTCAP}": "softcap",
    "logits = torch.tanh(logits)": "softcap",
    f"logits = logits * {_SOFTCAP}": "softcap",
}


@dataclasses.dataclass
class LossHead:
    """What the fused loss needs from one causal LM: its backbone, LM head and logit processing."""

    backbone: nn.Module
    lm_head: nn.Linear
    logit_scale: float = 1.0
    softcap: Optional[float] = None


@functools.lru_cache(maxsize=None)
def _forward_calls(cls: type, call: str) -> bool:
    """Whether ``cls.forward``'s source contains ``call`` (read once per class: this runs on every
    labelled forward)."""
    try:
        return call in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


@functools.lru_cache(maxsize=None)
def _forward_processing(cls: type) -> Tuple[Optional[frozenset], Optional[str]]:
    """The logit-processing steps of ``cls.forward`` (a frozenset of names), or None and why not."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None, f"{cls.__name__}.forward has no readable source"
    lines = [re.sub(r"#.*$", "", line).strip() for line in src.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("hidden_states = outputs")), None)
    end = next((i for i, line in enumerate(lines) if "self.loss_function(" in line), None)
    if start is None or end is None or end < start or "aux_loss" in src:
        return None, f"{cls.__name__}.forward is not the standard causal-LM forward (backbone, lm_head, loss_function)"
    steps = set()
    for line in lines[start:end]:
        line = re.sub(r"^(\w+)\s*:\s*[\w\[\], .|]+\s*=", r"\1 =", line)  # drop annotations
        if line and line not in _KNOWN_LINES:
            return None, f"{cls.__name__}.forward processes logits in a way the fused loss does not implement: {line!r}"
        if _KNOWN_LINES.get(line):
            steps.add(_KNOWN_LINES[line])
    if not any(line.startswith("logits = self.lm_head(") for line in lines[start:end]):
        return None, f"{cls.__name__}.forward does not call self.lm_head on the hidden states"
    return frozenset(steps), None


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a fastpeft / peft ``PeftModel`` (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fused_loss_head(causal_lm: nn.Module) -> Tuple[Optional[LossHead], Optional[str]]:
    """The :class:`LossHead` of a transformers causal LM, or None and the reason it cannot use the fused loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    steps, reason = _forward_processing(type(causal_lm))
    if steps is None:
        return None, reason
    if getattr(causal_lm, "loss_function", None) is not ForCausalLMLoss:
        return None, "the model's loss_function is not transformers' ForCausalLMLoss (config.loss_type)"
    prefix = getattr(causal_lm, "base_model_prefix", "model")
    backbone = getattr(causal_lm, prefix, None)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if not isinstance(backbone, nn.Module) or not _forward_calls(type(causal_lm), f"self.{prefix}("):
        return None, f"the forward does not run its backbone .{prefix} (base_model_prefix) as the standard one does"
    if type(head) is not nn.Linear:
        return None, f"the LM head is {type(head).__name__}, not a plain nn.Linear (LoRA or modules_to_save on lm_head)"
    if getattr(causal_lm, "_hf_hook", None) is not None or getattr(head, "_hf_hook", None) is not None:
        return None, "the model or its LM head has accelerate hooks (device_map offloading)"
    config = causal_lm.config
    scale = 1.0
    if "cohere_scale" in steps:
        scale *= float(causal_lm.logit_scale)
    if "granite_scale" in steps:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None) if "softcap" in steps else None
    return LossHead(backbone, head, scale, float(softcap) if softcap else None), None


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' ``logits_to_keep``: an int keeps the last k positions (0: all), a tensor indexes them."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def _output(causal_lm: nn.Module, loss, logits, outputs, return_dict):
    """The model's usual output: loss, logits (or None) and the backbone's cache / hidden states / attentions."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    carried = {f.name: getattr(outputs, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)
               if f.name not in ("loss", "logits")}  # "cache" on transformers >= 5.2x, "past_key_values" before
    result = CausalLMOutputWithPast(loss=loss, logits=logits, **carried)
    if return_dict is None:
        return_dict = getattr(causal_lm.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


def _post_logits(head: LossHead, hidden: torch.Tensor) -> torch.Tensor:
    """Full logits as the model's own forward makes them (only when the caller asks for them)."""
    logits = head.lm_head(hidden)
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def _named_arguments(causal_lm: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A call's arguments by name, as the model's forward would receive them (positional ones too)."""
    signature = inspect.signature(type(causal_lm).forward)
    bound = signature.bind(causal_lm, *args, **kwargs)
    call = {k: v for k, v in bound.arguments.items() if k != "self"}
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(p.name, {}))
    return call


def fused_causal_lm_forward(causal_lm: nn.Module, head: LossHead, args: tuple, kwargs: Dict[str, Any],
                            backend: Optional[str] = None):
    """``causal_lm(*args, **kwargs)`` with ``labels`` (or ``shift_labels``), the loss from the fused op.

    ``kwargs`` may hold ``skip_logits`` (None: skip the logits when training). Returns the model's
    ``CausalLMOutputWithPast`` (a tuple with ``return_dict=False``).
    """
    kwargs = dict(kwargs)
    skip_logits = kwargs.pop("skip_logits", None)
    call = _named_arguments(causal_lm, args, kwargs)
    labels = call.pop("labels", None)
    logits_to_keep = call.pop("logits_to_keep", 0)
    return_dict = call.pop("return_dict", None)
    loss_kw = {k: call.pop(k) for k in _LOSS_KWARGS if k in call}
    outputs = head.backbone(**call)
    hidden = _slice_to_keep(outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0],
                            logits_to_keep)
    shift_labels = loss_kw.get("shift_labels")
    targets = (labels if shift_labels is None else shift_labels).to(hidden.device)
    lm_head = head.lm_head
    loss = linear_cross_entropy(hidden, lm_head.weight, targets, lm_head.bias, shift=shift_labels is None,
                                ignore_index=loss_kw.get("ignore_index", -100),
                                num_items_in_batch=loss_kw.get("num_items_in_batch"),
                                logit_scale=head.logit_scale, softcap=head.softcap, backend=backend)
    skip = causal_lm.training if skip_logits is None else bool(skip_logits)
    logits = None if skip else _post_logits(head, hidden)
    return _output(causal_lm, loss, logits, outputs, return_dict)


def call_with_fused_loss(causal_lm: nn.Module, head: LossHead, kwargs: Dict[str, Any], backend: Optional[str] = None):
    """``causal_lm(**kwargs)`` through the module's ``__call__`` (so its hooks run: AdaLoRA's regulariser
    is a forward hook) with the fused loss as the forward, for this call only."""
    if "forward" in causal_lm.__dict__:
        raise RuntimeError("call_with_fused_loss: the model's forward is already replaced on the instance")
    causal_lm.__dict__["forward"] = lambda *a, **k: fused_causal_lm_forward(causal_lm, head, a, k, backend=backend)
    try:
        return causal_lm(**kwargs)
    finally:
        causal_lm.__dict__.pop("forward", None)


def _has_labels(causal_lm: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> bool:
    """True when a forward call carries ``labels`` (by keyword or position) or transformers' ``shift_labels``."""
    if kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None:
        return True
    if not args:
        return False
    try:
        bound = inspect.signature(type(causal_lm).forward).bind_partial(causal_lm, *args)
    except TypeError:
        return False
    return bound.arguments.get("labels") is not None


class _FusedLossForward:
    """Instance ``forward`` of a patched causal LM (a callable object, so the model deep-copies and pickles)."""

    def __init__(self, model: nn.Module):
        self._model_ref = model

    def __call__(self, *args, **kwargs):
        model = self._model_ref
        state = model.__dict__[_STATE_ATTR]
        original = functools.partial(type(model).forward, model)
        labelled = _has_labels(model, args, kwargs)
        head = fused_loss_head(model)[0] if labelled else None
        if head is None:
            kwargs.pop("skip_logits", None)
            return original(*args, **kwargs)
        return fused_causal_lm_forward(model, head, args, kwargs, backend=state["backend"])

    @property
    def __signature__(self) -> inspect.Signature:
        # transformers' generate() checks its model kwargs against ``inspect.signature(model.forward)``:
        # show the class forward's parameters (plus skip_logits), as the bound method would.
        sig = inspect.signature(functools.partial(type(self._model_ref).forward, self._model_ref))
        params = list(sig.parameters.values())
        if "skip_logits" not in sig.parameters:
            extra = inspect.Parameter("skip_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
            at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
            params.insert(at, extra)
        return sig.replace(parameters=params)

    def __reduce__(self):
        return (_FusedLossForward, (self._model_ref,))

    def __deepcopy__(self, memo):
        return _FusedLossForward(memo.get(id(self._model_ref), self._model_ref))


def patch_loss(model: nn.Module, backend: Optional[str] = None) -> Dict[str, str]:
    """Make ``model``'s causal LM compute its labelled loss with the fused op; returns what was done.

    ``model``: a fastpeft or peft ``PeftModel`` (its base causal LM is patched) or a transformers
    causal LM. Returns ``{"name", "kind", "note"}`` when patched, ``{"name", "kind", "reason"}`` when
    not (the model then keeps its own loss). Only the causal LM's instance ``forward`` changes.
    """
    causal_lm = _causal_lm(model)
    kind = f"loss of {type(causal_lm).__name__}"
    head, reason = fused_loss_head(causal_lm)
    if head is None:
        return {"name": "lm_head", "kind": kind, "reason": reason}
    state = causal_lm.__dict__.get(_STATE_ATTR)
    other = causal_lm.__dict__.get("forward")
    if state is None and other is not None:
        return {"name": "lm_head", "kind": kind, "reason": f"the model's forward is already replaced on the instance "
                f"({getattr(other, '__qualname__', type(other).__name__)}, e.g. TRL's fused LM head); it is left alone"}
    if state is not None:
        state["backend"] = backend
    else:
        causal_lm.__dict__[_STATE_ATTR] = {"backend": backend}
        causal_lm.forward = _FusedLossForward(causal_lm)
    extras = [f"logit_scale={head.logit_scale:g}"] if head.logit_scale != 1.0 else []
    extras += [f"softcap={head.softcap:g}"] if head.softcap else []
    note = "fused linear cross-entropy when called with labels (logits skipped in training; skip_logits=False keeps them)"
    return {"name": "lm_head", "kind": kind, "note": note + (f"; {', '.join(extras)}" if extras else "")}


def unpatch_loss(model: nn.Module) -> List[str]:
    """Restore the causal LM's own forward; returns ``["lm_head"]`` when something was restored."""
    causal_lm = _causal_lm(model)
    state = causal_lm.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return []
    causal_lm.__dict__.pop("forward", None)
    return ["lm_head"]


def is_loss_patched(model: nn.Module) -> bool:
    """True when :func:`patch_loss` is active on ``model``'s causal LM."""
    return _STATE_ATTR in _causal_lm(model).__dict__
