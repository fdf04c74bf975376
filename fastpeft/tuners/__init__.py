"""One module per PEFT method; importing this package registers every tuner."""

from fastpeft.config import PeftType
from fastpeft.tuners.base import register_tuner
from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.tuners.ia3 import IA3Config, IA3Model
from fastpeft.tuners.adalora import AdaLoraConfig, AdaLoraModel

register_tuner(PeftType.LORA, LoraModel)
register_tuner(PeftType.IA3, IA3Model)
register_tuner(PeftType.ADALORA, AdaLoraModel)

__all__ = ["LoraConfig", "LoraModel", "IA3Config", "IA3Model", "AdaLoraConfig", "AdaLoraModel"]
