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
from fastpeft.tuners import (
    AdaLoraConfig,
    AdaLoraModel,
    LoraConfig,
    LoraModel,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    AdapterFusionConfig,
    AdaptionPromptConfig,
    AdaptionPromptModel,
    BottleneckConfig,
    BottleneckModel,
    HoulsbyConfig,
    IA3Config,
    IA3Model,
    PfeifferConfig,
)
from fastpeft.mapping import get_peft_model
from fastpeft.patch import PatchReport, patch, unpatch
from fastpeft.utils.kbit import prepare_model_for_kbit_training


def get_peft_model_state_dict(model: PeftModel, state_dict=None, adapter_name: str = "default"):
    """The adapter's tensors with peft's checkpoint keys (what ``save_pretrained`` writes)."""
    return model.get_adapter_state_dict(adapter_name)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict, adapter_name: str = "default"):
    """Load checkpoint tensors (peft keys) into ``adapter_name``, checking keys and shapes."""
    model.set_adapter_state_dict(peft_model_state_dict, adapter_name)


__all__ = [
    "__version__",
    "PeftConfig",
    "PeftType",
    "PromptLearningConfig",
    "TaskType",
    "LoraConfig",
    "LoraModel",
    "IA3Config",
    "IA3Model",
    "AdaLoraConfig",
    "AdaLoraModel",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEmbedding",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptEncoder",
    "PrefixTuningConfig",
    "PrefixEncoder",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "BottleneckConfig",
    "BottleneckModel",
    "HoulsbyConfig",
    "PfeifferConfig",
    "AdapterFusionConfig",
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
    "prepare_model_for_kbit_training",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]
