"""Preparing a quantised (4-/8-bit) base model for adapter training.

:func:`prepare_model_for_kbit_training` is the equivalent of peft's function of the same name:
it freezes the base, keeps the quantised weights as they are, upcasts the remaining 16-bit
parameters (norms, embeddings, the LM head) to fp32 for stable training, and turns on gradient
checkpointing with gradients flowing into the input embeddings (needed because every base
weight is frozen, so the checkpointed segments would otherwise see no input requiring grad).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training", "is_quantized_param"]

_QUANTIZED_PARAM_CLASSES = ("Params4bit", "Int8Params")


def is_quantized_param(param: torch.Tensor) -> bool:
    """True for bitsandbytes' packed parameters (``Params4bit``, ``Int8Params``) and for integer
    tensors, which must never be cast."""
    return type(param).__name__ in _QUANTIZED_PARAM_CLASSES or not param.dtype.is_floating_point


def _is_kbit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)) or any(
        is_quantized_param(p) for p in model.parameters()
    )


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Get a quantised base model ready for LoRA/QLoRA training, in place, and return it.

    - every base parameter is frozen (adapters added afterwards are the only trainable ones);
    - fp16/bf16 parameters that are not quantised (layer norms, embeddings, ``lm_head``) are cast
      to fp32, as peft does, so their contribution to the loss is computed in full precision;
    - with ``use_gradient_checkpointing`` (default), gradient checkpointing is enabled (non-reentrant
      unless ``gradient_checkpointing_kwargs`` says otherwise) and the input embeddings' output
      requires grad, so checkpointed blocks still back-propagate into the adapters.

    Works on any model; on one without quantised weights it only freezes, upcasts half-precision
    parameters and sets up checkpointing.
    """
    kbit = _is_kbit(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and not is_quantized_param(param):
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        kwargs.update(gradient_checkpointing_kwargs or {})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if emb is not None:
                emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        # transformers >= 5.2x renamed it activation_checkpointing_enable (the old name warns).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model._fastpeft_kbit_prepared = kbit
    return model
