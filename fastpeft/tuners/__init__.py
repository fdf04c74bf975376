"""One module per PEFT method; importing this package registers every tuner and config."""

from fastpeft.config import PeftType
from fastpeft.tuners.base import register_tuner
from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners import lora_bnb  # noqa: F401  (registers LoRA on bitsandbytes Linear4bit)
from fastpeft.tuners.ia3 import IA3Config, IA3Model
from fastpeft.tuners.adalora import AdaLoraConfig, AdaLoraModel
from fastpeft.tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from fastpeft.tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from fastpeft.tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from fastpeft.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from fastpeft.tuners.bottleneck import AdapterFusionConfig, BottleneckConfig, BottleneckModel, HoulsbyConfig, PfeifferConfig

register_tuner(PeftType.LORA, LoraModel)
register_tuner(PeftType.IA3, IA3Model)
register_tuner(PeftType.ADALORA, AdaLoraModel)
register_tuner(PeftType.ADAPTION_PROMPT, AdaptionPromptModel)
register_tuner(PeftType.BOTTLENECK, BottleneckModel)

__all__ = [
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
]
