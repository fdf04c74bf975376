"""One module per PEFT method; importing this package registers every tuner."""

from fastpeft.config import PeftType
from fastpeft.tuners.base import register_tuner
from fastpeft.tuners.lora import LoraConfig, LoraModel

register_tuner(PeftType.LORA, LoraModel)

__all__ = ["LoraConfig", "LoraModel"]
