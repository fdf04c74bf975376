"""One module per PEFT method; importing this package registers every tuner."""

from fastpeft.config import PeftType
from fastpeft.tuners.base import register_tuner
from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from fastpeft.tuners.bottleneck import AdapterFusionConfig, BottleneckConfig, BottleneckModel, HoulsbyConfig, PfeifferConfig

register_tuner(PeftType.LORA, LoraModel)
register_tuner(PeftType.ADAPTION_PROMPT, AdaptionPromptModel)
register_tuner(PeftType.BOTTLENECK, BottleneckModel)

__all__ = [
    "LoraConfig",
    "LoraModel",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "BottleneckConfig",
    "BottleneckModel",
    "HoulsbyConfig",
    "PfeifferConfig",
    "AdapterFusionConfig",
]
