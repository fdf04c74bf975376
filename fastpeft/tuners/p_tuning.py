"""P-Tuning (Liu et al., 2021): virtual-token embeddings reparameterised by an MLP or LSTM encoder.

Hugging Face peft's ``PromptEncoderConfig`` and ``PromptEncoder``: same fields and module names
(``embedding``, ``mlp_head``, ``lstm_head``). The checkpoint holds the encoder's *output*
(``prompt_embeddings``, ``[num_virtual_tokens * num_transformer_submodules, token_dim]``), so a
loaded adapter (inference mode) is a plain embedding table without the encoder.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from fastpeft.config import PeftType, PromptLearningConfig, register_config


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The encoder that maps the virtual-token table to the prompt (peft's names)."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Config of P-Tuning (peft's ``PromptEncoderConfig``).

    Args:
        num_virtual_tokens: number of virtual tokens (> 0).
        encoder_reparameterization_type: ``"MLP"`` (3 linear layers with ReLU) or ``"LSTM"``
            (bidirectional LSTM then a 2-layer MLP).
        encoder_hidden_size: hidden width of the encoder (default: the model's hidden size).
        encoder_num_layers: LSTM layers (the MLP always has peft's fixed 2 hidden layers).
        encoder_dropout: dropout between LSTM layers.
    """

    _peft_type = PeftType.P_TUNING

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int = field(default=None)
    encoder_num_layers: int = field(default=2)
    encoder_dropout: float = field(default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                str(self.encoder_reparameterization_type).upper()
            )
        except ValueError:
            raise ValueError(
                f"Unknown encoder_reparameterization_type {self.encoder_reparameterization_type!r}; use 'MLP' or 'LSTM'."
            ) from None
        if self.encoder_hidden_size is not None and int(self.encoder_hidden_size) <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")
        if int(self.encoder_num_layers) <= 0:
            raise ValueError(f"encoder_num_layers must be positive, got {self.encoder_num_layers}.")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}.")


class PromptEncoder(nn.Module):
    """P-Tuning's prompt encoder (peft's ``PromptEncoder``).

    ``embedding`` is the ``[total_virtual_tokens, token_dim]`` table; in training mode an MLP
    (``mlp_head``) or an LSTM (``lstm_head``) followed by an MLP maps it to the prompt. In
    inference mode only ``embedding`` exists and already holds the encoder's output.
    Input: indices ``[batch, n]``; output ``[batch, n, token_dim]``.
    """

    def __init__(self, config: PromptEncoderConfig):
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.inference_mode = bool(config.inference_mode)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if self.inference_mode:
            return
        h = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.input_size, hidden_size=h, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, self.output_size))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    f"encoder_num_layers={config.encoder_num_layers} is ignored for the MLP encoder, which always "
                    "has 2 hidden layers (as in peft)."
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.input_size, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, self.output_size)
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        if not hasattr(self, "mlp_head"):  # inference mode: the table is the encoder's output
            return x
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)
