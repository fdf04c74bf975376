"""Prefix Tuning's one route, shared by fastpeft's own prompt-learning models and by
``fastpeft.patch`` on Hugging Face peft models.

What both need, written once here:

* **which cache keyword the model takes** (:func:`cache_kwarg`): transformers 5.24 renamed the
  model-forward argument ``past_key_values`` to ``cache`` (the old name still works with a
  FutureWarning until 5.40). The model's forward signature decides, read once when the model
  is wrapped or patched; outputs are read through :func:`output_cache`.
* **the prefix layout** (:func:`split_prefix_kv`): peft's prefix-encoder output
  ``[P, L * 2 * KVH * D]`` as per-layer views ``[KVH, P, D]``.
* **positions** (:func:`shift_positions`): peft's prefix occupies cache positions ``0..P-1``,
  so the real tokens start at ``P``; the fused route, with no prefix in the cache, shifts
  ``position_ids`` by ``P`` to give the same numbers.
* **whether the fused route fits a model** (:func:`check_fused_route`): a probe forward
  records what the model's attention layers hand to transformers' ``AttentionInterface``
  (one call per layer, q ``[B, H, T, D]``, k/v ``[B, KVH, T, D]``, ``layer_idx``); what a probe
  cannot see from shapes is in the short table :data:`UNSUPPORTED_ATTENTION_KWARGS`.
* **one prefix for one call** (:class:`PrefixRoute`): the per-call registry that rides in the
  model keyword ``fastpeft_prefix`` (so activation checkpointing recomputes with it).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from fastpeft.prefix_attention_hf import (
    PREFIX_KWARG,
    PrefixKVRegistry,
    register_prefix_attention,
)

__all__ = [
    "CACHE_KWARGS",
    "PREFIX_LAYOUT_EXCEPTIONS",
    "UNSUPPORTED_ATTENTION_KWARGS",
    "PrefixLayout",
    "PrefixRoute",
    "cache_kwarg",
    "check_fused_route",
    "output_cache",
    "past_length",
    "shift_positions",
    "split_prefix_kv",
]

# the model-forward cache keyword, newest name first (transformers >= 5.24, then 5.x before it)
CACHE_KWARGS = ("cache", "past_key_values")

# Attention-function keywords that change the math of the fused route in a way its shapes do
# not show (what the probe cannot infer), with why; the probe refuses a model passing any of
# them with a value.
UNSUPPORTED_ATTENTION_KWARGS = {
    "softcap": "attention logit softcapping (the shared-prefix op has none)",
    "s_aux": "attention sinks (an extra softmax term the shared-prefix op does not add)",
    "sinks": "attention sinks (an extra softmax term the shared-prefix op does not add)",
}

# Config fields that mean the layers' keys/values differ in shape, which peft's one-table prefix
# layout ([P, L * 2 * KVH * D]) cannot express, on either route (read from the config before any
# forward can run).
PREFIX_LAYOUT_EXCEPTIONS = {
    "global_head_dim": "some layers use another head_dim",
    "per_layer_config": "the layers are configured one by one",
    "num_kv_shared_layers": "some layers reuse another layer's keys/values",
}

_PROBE_ATTENTION_NAME = "fastpeft_prefix_probe"
_PROBE_TOKENS = 2


def _forward_parameters(module: nn.Module) -> Dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def cache_kwarg(module: nn.Module) -> Optional[str]:
    """The name under which ``module.forward`` takes a KV cache (``"cache"`` or
    ``"past_key_values"``), or None when it takes neither."""
    params = _forward_parameters(module)
    return next((name for name in CACHE_KWARGS if name in params), None)


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries (``.cache`` from transformers 5.24, ``.past_key_values``
    before), read without touching the deprecated alias."""
    for name in CACHE_KWARGS:
        keys = outputs.keys() if hasattr(outputs, "keys") else ()
        if name in keys:
            return outputs[name]
    return None


def past_length(cache: Any) -> int:
    """Number of tokens already in a cache (a transformers ``Cache`` or legacy tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def shift_positions(kwargs: Dict[str, Any], ref: torch.Tensor, num_virtual_tokens: int, cache_name: str) -> None:
    """peft's positions, in place: given ``position_ids`` + P, else ``P + past + arange(T)``.

    ``ref`` is ``input_ids`` or ``inputs_embeds`` (its dim 1 is T); ``cache_name`` is the
    keyword under which ``kwargs`` may hold the cache (:func:`cache_kwarg`).
    """
    pos = kwargs.get("position_ids")
    if pos is not None:
        kwargs["position_ids"] = pos + num_virtual_tokens
        return
    past = past_length(kwargs.get(cache_name))
    kwargs["position_ids"] = (torch.arange(past, past + ref.shape[1], device=ref.device) + num_virtual_tokens).unsqueeze(0)


def split_prefix_kv(past: torch.Tensor, num_layers: int, num_kv_heads: int,
                    head_dim: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(prefix_k, prefix_v)`` views ``[KVH, P, D]`` of a shared prefix-encoder output.

    ``past`` is ``[P, num_layers * 2 * num_kv_heads * head_dim]`` (peft's PrefixEncoder output
    for one sequence, i.e. its ``[batch, P, ...]`` output without the batch). The layout is
    peft's: viewed as ``[P, num_layers * 2, KVH, D]``, entry ``2 * l`` is layer ``l``'s keys and
    ``2 * l + 1`` its values. No copy: the views keep the autograd history of ``past``.
    """
    if past.dim() == 3 and past.shape[0] == 1:
        past = past[0]
    if past.dim() != 2 or past.shape[1] != num_layers * 2 * num_kv_heads * head_dim:
        raise ValueError(
            f"split_prefix_kv: expected [prefix_len, {num_layers} * 2 * {num_kv_heads} * {head_dim} = "
            f"{num_layers * 2 * num_kv_heads * head_dim}], got {tuple(past.shape)}")
    P = past.shape[0]
    x = past.view(P, num_layers * 2, num_kv_heads, head_dim).permute(1, 2, 0, 3)  # [2L, KVH, P, D]
    return [(x[2 * l], x[2 * l + 1]) for l in range(num_layers)]


class PrefixLayout(NamedTuple):
    """Per-layer prefix shape: ``num_layers`` layers of ``kv_heads`` heads of ``head_dim``."""

    num_layers: int
    kv_heads: int
    head_dim: int


def adapter_layout(config: Any) -> Tuple[PrefixLayout, int]:
    """A Prefix Tuning config's (fastpeft's or peft's) layout and ``num_transformer_submodules``."""
    heads, token_dim = int(config.num_attention_heads), int(config.token_dim)
    layout = PrefixLayout(int(config.num_layers), heads, token_dim // heads)
    return layout, int(getattr(config, "num_transformer_submodules", 1) or 1)


# ----------------------------------------------------------------------------- the probe
class _AttentionCall(NamedTuple):
    layer_idx: Optional[int]
    query_shape: Tuple[int, ...]
    key_shape: Tuple[int, ...]
    unsupported: Tuple[str, ...]  # UNSUPPORTED_ATTENTION_KWARGS present with a value


def _probe_attention_calls(base: nn.Module) -> List[_AttentionCall]:
    """Run ``base`` once on a 2-token input with a recording attention function (its output is
    zeros of the right shape: only what reaches attention matters, and no backend refuses it)."""
    calls: List[_AttentionCall] = []

    def record(module, query, key, value, attention_mask, **kwargs):
        bad = tuple(k for k in UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(k) is not None)
        calls.append(_AttentionCall(getattr(module, "layer_idx", None), tuple(query.shape), tuple(key.shape), bad))
        batch, heads, length = query.shape[:3]
        return query.new_zeros(batch, length, heads, value.shape[-1]), None

    register_prefix_attention(_PROBE_ATTENTION_NAME, record)
    previous = getattr(base.config, "_attn_implementation", None) or "sdpa"
    base.set_attn_implementation(_PROBE_ATTENTION_NAME)
    try:
        device = next(base.parameters()).device
        with torch.no_grad():
            base(input_ids=torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device=device), use_cache=False)
    finally:
        base.set_attn_implementation(previous)
    return calls


def _probe_problem(calls: List[_AttentionCall]) -> Optional[str]:
    """Why the recorded attention calls do not fit the fused route, or None."""
    if not calls:
        return "its attention layers do not go through transformers' AttentionInterface"
    indices = [c.layer_idx for c in calls]
    if None in indices or sorted(indices) != list(range(len(calls))):
        return f"its attention calls are not one per layer_idx 0..L-1 (got layer_idx {indices})"
    for c in calls:
        if c.unsupported:
            return f"layer {c.layer_idx} uses " + "; ".join(UNSUPPORTED_ATTENTION_KWARGS[k] for k in c.unsupported)
        (_, h, t, d), (_, kvh, s, kd) = c.query_shape, c.key_shape
        if len(c.query_shape) != 4 or d != kd or kvh == 0 or h % kvh or (t, s) != (_PROBE_TOKENS, _PROBE_TOKENS):
            return (f"layer {c.layer_idx} hands attention q {c.query_shape}, k {c.key_shape}, not q [B, H, T, D] "
                    "with k/v [B, KVH, T, D] over the sequence's own tokens")
    if len({c.key_shape[1:] for c in calls}) != 1:
        return "its layers differ in key/value shape"
    return None


def check_fused_route(base: nn.Module, adapters: Dict[str, Any], who: str = "fastpeft.patch") -> PrefixLayout:
    """Check that ``base`` can run Prefix Tuning through the shared-prefix attention function
    and that every Prefix Tuning config in ``adapters`` (name -> config) fits it.

    Capability, not model type: ``base`` must take ``position_ids`` (the route shifts them),
    have ``set_attn_implementation`` (transformers >= 5), and a probe forward must show one
    ``AttentionInterface`` call per layer with the layout the op reads and none of
    :data:`UNSUPPORTED_ATTENTION_KWARGS`. Returns the model's :class:`PrefixLayout`; raises a
    ``ValueError`` naming the reason otherwise.
    """
    cfg = getattr(base, "config", None)
    model_type = getattr(cfg, "model_type", None)
    where = f"{who}: Prefix Tuning on model type {model_type!r} ({type(base).__name__})"
    keep = "Use the model without fastpeft.patch (the KV-cache prefix path) for this architecture."
    if not hasattr(base, "set_attn_implementation"):
        raise ValueError(f"{where}: no set_attn_implementation(); the shared-prefix attention needs transformers >= 5. {keep}")
    if "position_ids" not in _forward_parameters(base):
        raise ValueError(f"{where}: its forward takes no position_ids, which the shared-prefix route shifts by the "
                         f"prefix length. {keep}")
    try:
        calls = _probe_attention_calls(base)
    except (ValueError, TypeError, NotImplementedError) as err:  # e.g. the model refuses custom attention
        raise ValueError(f"{where}: a probe forward through a custom attention function failed ({err}). {keep}") from err
    problem = _probe_problem(calls)
    if problem is not None:
        raise ValueError(f"{where} has no attention layout the shared-prefix attention knows: {problem}. {keep}")
    _, kvh, _, d = calls[0].key_shape
    layout = PrefixLayout(len(calls), kvh, d)
    for name, config in adapters.items():
        got, submodules = adapter_layout(config)
        if (got, submodules) != (layout, 1):
            raise ValueError(
                f"{who}: Prefix Tuning adapter {name!r} has num_layers={got.num_layers}, num_attention_heads="
                f"{got.kv_heads}, token_dim={got.kv_heads * got.head_dim} (head_dim {got.head_dim}), "
                f"num_transformer_submodules={submodules}; the base model {type(base).__name__} needs "
                f"num_layers={layout.num_layers}, {layout.kv_heads} key/value heads of {layout.head_dim} and one "
                "transformer submodule. Was the adapter built for another base model?")
    return layout


# ----------------------------------------------------------------------------- one call
class PrefixRoute:
    """The fused route for one model: its cache keyword, backend, prefix-attention implementation
    (``impl``: ``"kernel"`` / ``"sdpa"`` / ``"auto"``, None = ``Settings.prefix_impl`` per call)
    and (when probed) layout, fixed when it is built.

    :meth:`prepare` turns one call's keyword arguments into the fused route's: positions
    shifted by the prefix length, and the shared per-layer prefix in ``fastpeft_prefix``.
    The mask and the cache stay those of the real tokens.
    """

    def __init__(self, cache_name: str, backend: Optional[str] = None, layout: Optional[PrefixLayout] = None,
                 impl: Optional[str] = None) -> None:
        self.cache_name = cache_name
        self.backend = backend
        self.impl = impl
        self.layout = layout  # the model's (check_fused_route); None: the adapter config's

    def registry(self, flat: torch.Tensor, config: Any) -> PrefixKVRegistry:
        """A per-call registry over the prefix-encoder output ``flat`` ``[P, L * 2 * KVH * D]``."""
        layout = self.layout if self.layout is not None else adapter_layout(config)[0]
        return PrefixKVRegistry(split_prefix_kv(flat, *layout), backend=self.backend, impl=self.impl)

    def prepare(self, kwargs: Dict[str, Any], ref: Optional[torch.Tensor], num_virtual_tokens: int,
                registry: PrefixKVRegistry) -> Dict[str, Any]:
        """Shift positions and attach ``registry`` in place; returns ``kwargs``."""
        if ref is None:
            raise ValueError("fastpeft prefix route: pass input_ids or inputs_embeds")
        shift_positions(kwargs, ref, num_virtual_tokens, self.cache_name)
        kwargs[PREFIX_KWARG] = registry
        return kwargs
