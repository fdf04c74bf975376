"""``get_peft_model``: wrap a transformers model with an adapter (peft's entry point)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from fastpeft.config import PeftConfig, TaskType
from fastpeft.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None, **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``.

    Returns the task wrapper for ``peft_config.task_type`` (e.g. ``PeftModelForCausalLM``) or a
    plain :class:`PeftModel`. Only the adapter's parameters (and ``modules_to_save``) train.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a fastpeft config such as LoraConfig, got {type(peft_config).__name__}")
    if mixed:
        raise NotImplementedError("Mixed adapter types (mixed=True) are not supported by fastpeft.")
    if hasattr(model, "peft_config"):
        warnings.warn("This model already carries adapters (it has a peft_config); wrapping it again nests adapters.")
    if revision is not None:
        peft_config.revision = revision
    task = peft_config.task_type
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(TaskType(task), PeftModel) if task is not None else PeftModel
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
