"""transformers-5 glue for the shared-prefix attention op: an ``AttentionInterface`` function
and the per-layer prefix registry it reads.

:func:`register_prefix_attention` installs :func:`prefix_attention_forward` under the name
``fastpeft_prefix``; :func:`enable_prefix_attention` switches a model to it and attaches a
:class:`PrefixKVRegistry`. Each attention layer then reads its ``(prefix_k, prefix_v)``
(``[KVH, P, D]``, shared by the batch) by ``module.layer_idx`` and calls
:func:`fastpeft.ops.prefix_attention.prefix_attention_for_structure`; all the math stays in
that op (which knows tensors only), this module knows modules and transformers.

Where a prefix comes from, per call: the model keyword ``fastpeft_prefix=`` (:data:`PREFIX_KWARG`,
a :class:`PrefixKVRegistry`; transformers forwards it to the attention function, so activation
checkpointing recomputes with the same prefix), else the registry attached to the layer.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastpeft.ops.prefix_attention import mask_structure, prefix_attention_for_structure

__all__ = [
    "PREFIX_ATTENTION_NAME",
    "PREFIX_KWARG",
    "REGISTRY_ATTR",
    "PrefixKVRegistry",
    "prefix_attention_forward",
    "register_prefix_attention",
    "enable_prefix_attention",
    "disable_prefix_attention",
    "attached_registry",
]

PREFIX_ATTENTION_NAME = "fastpeft_prefix"  # the AttentionInterface / attn_implementation name
PREFIX_KWARG = "fastpeft_prefix"  # per-call model keyword carrying a PrefixKVRegistry
REGISTRY_ATTR = "_fastpeft_prefix_registry"  # on the model and on each of its attention layers
_LAYERS_ATTR = "_fastpeft_prefix_layers"  # on the model: its attention layers, found once at enable
_PREV_IMPL_ATTR = "_fastpeft_prev_attn_implementation"


class PrefixKVRegistry:
    """Store of the shared prefix keys/values, keyed by ``layer_idx``.

    Each entry is ``(prefix_k, prefix_v)``, both ``[num_kv_heads, P, head_dim]`` (shared by the
    batch; they may carry autograd history, e.g. a prefix encoder's output, so set them for
    every forward). Layers without an entry run plain SDPA attention. ``backend`` and ``impl``
    are handed to the op (None: the current settings' ``backend`` / ``prefix_impl``, see
    ``fastpeft.ops.settings``).

    Two ways to reach the attention function: attached to the model's attention modules by
    :func:`enable_prefix_attention` (the per-model registry), or passed per call as the model
    keyword argument ``fastpeft_prefix=PrefixKVRegistry(kvs)`` (it then takes precedence).
    """

    def __init__(self, kvs: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                 backend: Optional[str] = None, impl: Optional[str] = None) -> None:
        self._kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_cache = None  # (weakref to the 4D mask, its _version, key, result)
        self.backend = backend
        self.impl = impl
        if kvs is not None:
            self.set_layers(kvs)

    def set(self, layer_idx: int, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        """Set layer ``layer_idx``'s prefix (``[KVH, P, D]`` each)."""
        if prefix_k.dim() != 3 or tuple(prefix_v.shape) != tuple(prefix_k.shape):
            raise ValueError(
                f"PrefixKVRegistry.set: layer {layer_idx}: prefix_k/prefix_v must both be [kv_heads, prefix_len, "
                f"head_dim], got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        self._kv[int(layer_idx)] = (prefix_k, prefix_v)

    def set_layers(self, kvs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace all entries: ``kvs[i]`` is layer ``i``'s ``(prefix_k, prefix_v)`` (None skips a layer)."""
        self.clear()
        for i, kv in enumerate(kvs):
            if kv is not None:
                self.set(i, kv[0], kv[1])

    def get(self, layer_idx) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The ``(prefix_k, prefix_v)`` of a layer, or None."""
        if layer_idx is None:
            return None
        return self._kv.get(int(layer_idx))

    def clear(self) -> None:
        """Drop every entry (and the autograd graphs they hold)."""
        self._kv.clear()
        self._mask_cache = None

    def __len__(self) -> int:
        return len(self._kv)

    @contextlib.contextmanager
    def active(self, kvs: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
        """``with registry.active(kvs): model(...)``: set the layers for one forward, then clear."""
        self.set_layers(kvs)
        try:
            yield self
        finally:
            self.clear()

    def structure(self, mask, T: int, S: int, causal: bool):
        """:func:`~fastpeft.ops.prefix_attention.mask_structure`, read once per mask: every layer
        of one forward gets the same mask tensor, so the others reuse the first one's answer."""
        if mask is None:
            return mask_structure(mask, T, S, causal)
        key = (mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask.device, T, S, causal)
        c = self._mask_cache
        if c is not None and c[0]() is mask and c[1] == mask._version and c[2] == key:
            return c[3]
        result = mask_structure(mask, T, S, causal)
        try:
            self._mask_cache = (weakref.ref(mask), mask._version, key, result)
        except TypeError:  # pragma: no cover - tensors support weak references
            self._mask_cache = None
        return result


def _registry_for_call(module: nn.Module, kwargs: dict) -> Optional[PrefixKVRegistry]:
    registry = kwargs.pop(PREFIX_KWARG, None)
    if registry is None:
        return getattr(module, REGISTRY_ATTR, None)
    if not isinstance(registry, PrefixKVRegistry):
        raise TypeError(f"prefix attention: {PREFIX_KWARG}= must be a PrefixKVRegistry, got {type(registry).__name__}")
    return registry


def prefix_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers-5 attention function (``AttentionInterface``) with a shared prefix per layer.

    Reads ``(prefix_k, prefix_v)`` for ``module.layer_idx`` from the per-call registry passed
    as the model keyword ``fastpeft_prefix=`` if any, else from the registry attached by
    :func:`enable_prefix_attention`; layers without one (or without a registry) run
    transformers' SDPA attention unchanged. ``query [B, H, T, D]``, ``key/value [B, KVH, S, D]``
    (the sequence only: the prefix is not in the cache and not in the mask). Returns
    ``([B, T, H, D], None)``.
    """
    registry = _registry_for_call(module, kwargs)
    entry = registry.get(getattr(module, "layer_idx", None)) if registry is not None else None
    if entry is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("fastpeft prefix attention does not support attention logit softcapping")
    prefix_k, prefix_v = entry
    if prefix_k.dtype != query.dtype or prefix_k.device != query.device:
        prefix_k, prefix_v = (t.to(device=query.device, dtype=query.dtype) for t in (prefix_k, prefix_v))
    T, S = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and 1 < T < S:
        # transformers only drops the mask here for a prefill into an empty static cache, whose
        # unfilled slots sit after the T real keys (sdpa's upper-left alignment): keep the T keys.
        key, value, S = key[:, :, :T], value[:, :, :T], T
    structure = registry.structure(attention_mask, T, S, causal)
    out = prefix_attention_for_structure(query, key, value, prefix_k, prefix_v, structure, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0, backend=registry.backend,
                                         impl=registry.impl)
    return out.transpose(1, 2).contiguous(), None


def register_prefix_attention(name: str = PREFIX_ATTENTION_NAME, fn=None) -> str:
    """Register :func:`prefix_attention_forward` (or ``fn``) with transformers under ``name``.

    Idempotent. Also registers transformers' ``sdpa_mask`` as that name's mask builder, so
    padding reaches the function (a custom name without a mask builder gets no mask at all).
    Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, prefix_attention_forward if fn is None else fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_layers(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that carry a ``layer_idx`` (its attention layers)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx")]


def attached_registry(model: nn.Module) -> Optional[PrefixKVRegistry]:
    """The registry :func:`enable_prefix_attention` attached to ``model``, or None (no module walk)."""
    return model.__dict__.get(REGISTRY_ATTR)


def enable_prefix_attention(model: nn.Module, registry: Optional[PrefixKVRegistry] = None,
                            name: str = PREFIX_ATTENTION_NAME) -> PrefixKVRegistry:
    """Route a transformers model's attention through the shared-prefix op.

    Registers the attention function, remembers the model's current implementation, calls
    ``model.set_attn_implementation(name)`` and attaches ``registry`` (a new one if None) to the
    model and to every module with a ``layer_idx`` (found once, here). Fill the registry
    (``registry.set_layers(...)`` or ``with registry.active(...)``) before each forward, or pass
    ``fastpeft_prefix=`` per call; the sequence's own mask and cache carry only the real tokens.
    To reproduce peft's prefix-tuning numbers exactly, also pass ``position_ids`` starting at
    ``P`` (peft's prefix occupies cache positions ``0..P-1``). Returns the registry.
    """
    registry = PrefixKVRegistry() if registry is None else registry
    register_prefix_attention(name)
    if _PREV_IMPL_ATTR not in model.__dict__:
        model.__dict__[_PREV_IMPL_ATTR] = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation(name)
    layers = model.__dict__.get(_LAYERS_ATTR) or attention_layers(model)
    for m in layers:
        setattr(m, REGISTRY_ATTR, registry)
    model.__dict__[_LAYERS_ATTR] = layers
    model.__dict__[REGISTRY_ATTR] = registry
    return registry


def disable_prefix_attention(model: nn.Module) -> None:
    """Undo :func:`enable_prefix_attention`: detach the registry and restore the previous implementation."""
    for m in model.__dict__.pop(_LAYERS_ATTR, None) or attention_layers(model):
        if hasattr(m, REGISTRY_ATTR):
            delattr(m, REGISTRY_ATTR)
    model.__dict__.pop(REGISTRY_ATTR, None)
    prev = model.__dict__.pop(_PREV_IMPL_ATTR, None)
    model.set_attn_implementation(prev or "sdpa")
