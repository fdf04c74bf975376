"""One module per PEFT method; importing this package registers every tuner."""

from fastpeft.config import PeftType
from fastpeft.tuners.base import register_tuner
from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel

register_tuner(PeftType.LORA, LoraModel)
register_tuner(PeftType.ADAPTION_PROMPT, AdaptionPromptModel)

__all__ = ["LoraConfig", "LoraModel", "AdaptionPromptConfig", "AdaptionPromptModel"]
