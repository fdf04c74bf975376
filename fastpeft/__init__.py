"""fastpeft: Hugging Face PEFT's API and checkpoints, with fused Triton kernels.

Quick start::

    from fastpeft import LoraConfig, get_peft_model
    model = get_peft_model(base_model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    ...  # train
    model.save_pretrained("my-adapter")   # adapter_config.json + adapter_model.safetensors
"""

__version__ = "0.1.0"

from fastpeft.config import PeftConfig, PeftType, PromptLearningConfig, TaskType
from fastpeft.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from fastpeft import tuners as _tuners
from fastpeft.tuners import *  # noqa: F401,F403  (every method's Config/Model: see fastpeft.tuners.__all__)
from fastpeft.mapping import get_peft_model
from fastpeft.ops.settings import Settings, get_settings, set_settings, use_settings
from fastpeft import integrations
from fastpeft.patch import PatchReport, patch, unpatch
from fastpeft.utils.kbit import prepare_model_for_kbit_training


def __getattr__(name: str):
    # Trainer callbacks import transformers' Trainer stack: only when asked for
    if name in ("AdaLoraCallback", "PatchCallback"):
        from fastpeft import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")


def get_peft_model_state_dict(model: PeftModel, state_dict=None, adapter_name: str = "default"):
    """The adapter's tensors with peft's checkpoint keys (what ``save_pretrained`` writes).

    ``state_dict``: a full state dict of ``model`` to read from instead of its live parameters
    (e.g. one gathered under FSDP)."""
    return model.get_adapter_state_dict(adapter_name, state_dict=state_dict)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict, adapter_name: str = "default"):
    """Load checkpoint tensors (peft keys) into ``adapter_name``, checking keys and shapes."""
    model.set_adapter_state_dict(peft_model_state_dict, adapter_name)


__all__ = [
    "__version__",
    "PeftConfig",
    "PeftType",
    "PromptLearningConfig",
    "TaskType",
    *_tuners.__all__,
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "get_peft_model",
    "patch",
    "unpatch",
    "PatchReport",
    "Settings",
    "get_settings",
    "set_settings",
    "use_settings",
    "prepare_model_for_kbit_training",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "AdaLoraCallback",
    "PatchCallback",
    "integrations",
]
