"""Shared by the QLoRA tests: a tiny Llama checkpoint and its 4-bit load through transformers +
bitsandbytes on CPU (hidden sizes are multiples of the 4-bit blocksize, 64)."""

from __future__ import annotations

import warnings

import torch


def save_tiny_llama(path, layers: int = 2, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def load_4bit(path, quant_type: str = "nf4", double_quant: bool = True, quant_storage=None, device_map="cpu"):
    """The checkpoint at ``path`` loaded 4-bit (BitsAndBytesConfig) on CPU; ``quant_storage``: the
    dtype packing the 4-bit codes (bitsandbytes' default uint8; FSDP setups use the compute dtype)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                           **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map=device_map)
