"""Prefix Tuning through the shared-prefix attention op, for :func:`fastpeft.patch`.

Hugging Face peft runs Prefix Tuning by building, at every forward, a KV cache that holds the
prefix keys/values copied for each batch element (``[B, KVH, P, D]`` per layer), prepending
ones to the attention mask, and letting the model attend over the concatenation. After
``fastpeft.patch(model)`` on such a model (a peft ``PeftModelForCausalLM`` with
``PREFIX_TUNING`` on a decoder whose attention goes through transformers' ``AttentionInterface``)
the same numbers come from :func:`fastpeft.ops.prefix_attention.prefix_attention` instead:

* ``forward``: the prefix encoder runs once (``[P, L * 2 * KVH * D]``, not per batch element),
  its per-layer views ``[KVH, P, D]`` go to the attention layers as the model keyword
  ``fastpeft_prefix`` (so activation checkpointing recomputes with the same prefix), the
  attention mask and the KV cache hold only the real tokens, and position ids are shifted by
  ``P`` exactly as peft's are (its prefix occupies cache positions ``0..P-1``);
* ``generate``: the prefix is computed once per call; the cache holds the prompt and the
  generated tokens only, and every step attends to the shared prefix as well.

Only instance attributes of the peft model change (``forward``, ``prepare_inputs_for_generation``,
``generate``) plus the base model's attention implementation (``fastpeft_prefix``, which runs
transformers' SDPA for calls that carry no prefix, e.g. inside ``disable_adapter()``); parameters,
module names and checkpoints are untouched, and :func:`unpatch_prefix` restores everything.

fastpeft's own prompt-learning ``PeftModel`` takes the same route (:mod:`fastpeft.prefix_route`)
once the registry of :func:`fastpeft.prefix_attention_hf.enable_prefix_attention` is attached
to its base model; for those models this module only attaches it.

Which models qualify is decided by what they do, not by their type: see
:func:`fastpeft.prefix_route.check_fused_route` (a probe forward through a recording attention
function, plus a short table of attention features the op cannot honour).

One deliberate difference: with a sliding-window attention (Mistral's ``sliding_window``,
Qwen2's ``use_sliding_window``) the prefix stays visible to every token, whereas in peft's
cache it sits at positions ``0..P-1`` and slides out of the window of tokens more than
``window - P`` positions later. Below that length the two agree.

This module never imports peft; its models are recognised by their class's module name.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastpeft.prefix_attention_hf import PrefixKVRegistry, disable_prefix_attention, enable_prefix_attention
from fastpeft.prefix_route import PrefixRoute, cache_kwarg, check_fused_route

__all__ = ["find_prefix_model", "patch_prefix", "unpatch_prefix"]

_STATE_ATTR = "_fastpeft_prefix_patch_state"
_PATCHED_METHODS = ("forward", "prepare_inputs_for_generation", "generate")


def _peft_type(config) -> str:
    t = getattr(config, "peft_type", None)
    return str(getattr(t, "value", t))


def _task_type(config) -> str:
    t = getattr(config, "task_type", None)
    return str(getattr(t, "value", t))


def _is_peft_prompt_model(model: nn.Module) -> bool:
    return (type(model).__module__.startswith("peft.") and hasattr(model, "prompt_encoder")
            and hasattr(model, "peft_config") and hasattr(model, "active_peft_config"))


def _is_fastpeft_prompt_model(model: nn.Module) -> bool:
    return (type(model).__module__.startswith("fastpeft.") and hasattr(model, "prompt_encoder")
            and hasattr(type(model), "prefix_attention_registry"))


def find_prefix_model(model: nn.Module) -> Optional[str]:
    """``"peft"`` / ``"fastpeft"`` when ``model`` is that library's PeftModel with a Prefix
    Tuning adapter (any adapter, active or not), else None."""
    if _is_peft_prompt_model(model):
        lib = "peft"
    elif _is_fastpeft_prompt_model(model):
        lib = "fastpeft"
    else:
        return None
    configs = getattr(model, "peft_config", {}) or {}
    if any(_peft_type(c) == "PREFIX_TUNING" for c in configs.values()):
        return lib
    return None


def _prefix_adapters(model: nn.Module) -> Dict[str, Any]:
    return {name: c for name, c in model.peft_config.items() if _peft_type(c) == "PREFIX_TUNING"}


# ----------------------------------------------------------------------------- peft models
def _peft_prefix_flat(model: nn.Module) -> torch.Tensor:
    """The active adapter's prefix encoder output for one sequence, ``[P, L * 2 * KVH * D]``,
    as peft's ``get_prompt`` computes it (before its per-batch copy)."""
    cfg = model.active_peft_config
    adapter = model.active_adapter
    encoder = model.prompt_encoder[adapter]
    P = int(cfg.num_virtual_tokens)
    if cfg.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = model.prompt_tokens[adapter][:P].unsqueeze(0).to(encoder.embedding.weight.device)
        flat = encoder(tokens)[0]
    dtype = getattr(model, "base_model_torch_dtype", None)
    if dtype is not None:
        flat = flat.to(dtype)
    return flat


def _routed(model: nn.Module) -> bool:
    """This call goes through the shared-prefix op (active adapter is a prefix, adapters enabled)."""
    if getattr(model, "_adapters_disabled", False):
        return False
    return _peft_type(model.active_peft_config) == "PREFIX_TUNING"


def _call_registry(model: nn.Module, state: Dict[str, Any]) -> PrefixKVRegistry:
    return state["route"].registry(_peft_prefix_flat(model), model.active_peft_config)


def _drop_token_type_ids(kwargs: Dict[str, Any]) -> None:
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
    kwargs.pop("token_type_ids", None)


def _peft_forward(model, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                  output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    state = model.__dict__[_STATE_ATTR]
    if not _routed(model):
        return state["orig"]["forward"](
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            task_ids=task_ids, **kwargs)
    _drop_token_type_ids(kwargs)
    state["route"].prepare(kwargs, input_ids if input_ids is not None else inputs_embeds,
                           int(model.active_peft_config.num_virtual_tokens), _call_registry(model, state))
    # the mask and the cache (if the caller passes one) cover the real tokens only
    return model.base_model(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        **kwargs)


def _peft_prepare_inputs_for_generation(model, *args, task_ids=None, **kwargs):
    state = model.__dict__[_STATE_ATTR]
    registry = state.get("generating")
    if registry is None or not _routed(model):
        return state["orig"]["prepare_inputs_for_generation"](*args, task_ids=task_ids, **kwargs)
    model_kwargs = model.base_model_prepare_inputs_for_generation(*args, **kwargs)
    ref = model_kwargs.get("input_ids")
    if ref is None:
        ref = model_kwargs.get("inputs_embeds")
    _drop_token_type_ids(model_kwargs)
    return state["route"].prepare(model_kwargs, ref, int(model.active_peft_config.num_virtual_tokens), registry)


def _peft_generate(model, *args, **kwargs):
    state = model.__dict__[_STATE_ATTR]
    if not _routed(model):
        return state["orig"]["generate"](*args, **kwargs)
    with torch.no_grad():
        state["generating"] = _call_registry(model, state)  # the prefix once per generate call
    try:
        return state["orig"]["generate"](*args, **kwargs)
    finally:
        state["generating"] = None


_IMPLS = {
    "forward": _peft_forward,
    "prepare_inputs_for_generation": _peft_prepare_inputs_for_generation,
    "generate": _peft_generate,
}


class _PatchedMethod:
    """Instance attribute standing in for a method of the patched model (deep-copies and pickles)."""

    def __init__(self, model: nn.Module, name: str):
        self._model = model
        self._name = name

    def __call__(self, *args, **kwargs):
        return _IMPLS[self._name](self._model, *args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature (Trainer, generate) sees the original method's
        return inspect.signature(getattr(type(self._model), self._name).__get__(self._model))

    def __reduce__(self):
        return (_PatchedMethod, (self._model, self._name))

    def __deepcopy__(self, memo):
        return _PatchedMethod(memo.get(id(self._model), self._model), self._name)


# ----------------------------------------------------------------------------- API
def patch_prefix(model: nn.Module, backend: Optional[str], impl: Optional[str] = None) -> Optional[Dict[str, str]]:
    """Route ``model``'s Prefix Tuning through the shared-prefix op; None if it has no prefix.

    Returns ``{"name", "kind", "note"}`` for the patch report (``{"name", "kind", "reason"}``
    when the model is left as it is: task types other than causal LM). Raises ``ValueError``
    when the base model fails :func:`fastpeft.prefix_route.check_fused_route` (its attention
    does not have the layout the op reads, or the adapter does not fit it). ``impl`` is the
    prefix attention's implementation (``Settings.prefix_impl``; None: the settings of each
    call). Patching again only updates ``backend`` and ``impl``.
    """
    lib = find_prefix_model(model)
    if lib is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model.base_model
    kind = f"{lib} PrefixTuning ({_task_type(model.active_peft_config)}) on {type(base).__name__}"
    cls_name = type(model).__name__
    if cls_name != "PeftModelForCausalLM":
        return {"name": "base_model", "kind": kind,
                "reason": (f"shared-prefix attention is routed for {lib}'s PeftModelForCausalLM only; {cls_name} keeps "
                           "the KV-cache prefix")}
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        layout = check_fused_route(base, _prefix_adapters(model))
        state = _patch_peft(model, base, backend, layout) if lib == "peft" else _patch_fastpeft(base, backend)
        state["num_layers"] = layout.num_layers
        model.__dict__[_STATE_ATTR] = state
    target = state["route"] if lib == "peft" else state["registry"]
    target.backend, target.impl = backend, impl
    L = state["num_layers"]
    if lib == "fastpeft":
        return {"name": "base_model", "kind": kind,
                "note": f"shared-prefix attention registry on {L} layers (fastpeft's forward fills it)"}
    return {"name": "base_model", "kind": kind,
            "note": (f"shared-prefix attention on {L} layers: prefix computed once per call, never copied per batch "
                     "element nor stored in the KV cache")}


def _patch_fastpeft(base: nn.Module, backend: Optional[str]) -> Dict[str, Any]:
    """fastpeft's own model routes itself once a registry is attached (its forward fills it)."""
    registry = enable_prefix_attention(base)
    registry.backend = backend
    return {"lib": "fastpeft", "base": base, "registry": registry}


def _patch_peft(model: nn.Module, base: nn.Module, backend: Optional[str], layout) -> Dict[str, Any]:
    state = {"lib": "peft", "base": base, "generating": None,
             "route": PrefixRoute(cache_kwarg(base) or "past_key_values", backend, layout),
             # the class's methods (an instance attribute may be peft's disable_adapter() swap)
             "orig": {n: getattr(type(model), n).__get__(model) for n in _PATCHED_METHODS},
             "orig_instance": {n: model.__dict__[n] for n in _PATCHED_METHODS if n in model.__dict__}}
    enable_prefix_attention(base)  # the attention function; prefixes arrive per call
    for n in _PATCHED_METHODS:
        model.__dict__[n] = _PatchedMethod(model, n)
    return state


def unpatch_prefix(model: nn.Module) -> List[str]:
    """Undo :func:`patch_prefix` (restore the methods and the attention implementation)."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return []
    for n in _PATCHED_METHODS if state["lib"] == "peft" else ():
        model.__dict__.pop(n, None)
        if n in state["orig_instance"]:
            model.__dict__[n] = state["orig_instance"][n]
    disable_prefix_attention(state["base"])
    return ["base_model"]
