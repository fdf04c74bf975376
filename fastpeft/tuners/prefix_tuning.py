"""Prefix Tuning (Li & Liang, 2021): learned keys and values prepended in every attention layer.

Hugging Face peft's ``PrefixTuningConfig`` and ``PrefixEncoder``: same fields, module names
(``embedding``, ``transform``) and checkpoint (``prompt_embeddings``: the flattened per-layer
prefix ``[num_virtual_tokens, num_layers * 2 * token_dim]``; with ``prefix_projection`` it is
the projection's output, so a loaded adapter is a plain table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastpeft.config import PeftType, PromptLearningConfig, register_config


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Config of Prefix Tuning (peft's ``PrefixTuningConfig``).

    Args:
        num_virtual_tokens: prefix length (> 0).
        prefix_projection: learn a ``[num_virtual_tokens, token_dim]`` table and project it with a
            2-layer tanh MLP to the per-layer keys/values (else learn the keys/values directly).
        encoder_hidden_size: hidden width of that MLP (default: ``token_dim``).
        init_weights: ``None`` (random) or ``"zero"`` (zero prefix / zero last projection).
    """

    _peft_type = PeftType.PREFIX_TUNING

    init_weights: Optional[str] = field(default=None)
    encoder_hidden_size: int = field(default=None)
    prefix_projection: bool = field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
        if self.encoder_hidden_size is not None and int(self.encoder_hidden_size) <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")


class PrefixEncoder(nn.Module):
    """Prefix Tuning's prefix encoder (peft's ``PrefixEncoder``).

    Input: indices ``[batch, num_virtual_tokens]``; output ``[batch, num_virtual_tokens,
    num_layers * 2 * token_dim]`` (for each layer, keys then values, heads-major).
    """

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        self.prefix_projection = bool(config.prefix_projection)
        d, layers, p = config.token_dim, config.num_layers, config.num_virtual_tokens
        out = layers * 2 * d
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(p, d)
            self.transform = nn.Sequential(
                nn.Linear(d, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, out)
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(p, out)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix)
        if hasattr(self, "transform"):
            x = self.transform(x)
        return x
