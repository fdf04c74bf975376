"""One module per PEFT method; importing this package registers every tuner."""

from fastpeft.config import PeftType
from fastpeft.tuners.base import register_tuner
from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners import lora_bnb  # noqa: F401  (registers LoRA on bitsandbytes Linear4bit)

register_tuner(PeftType.LORA, LoraModel)

__all__ = ["LoraConfig", "LoraModel"]
