"""Prompt Tuning (Lester et al., 2021): learned virtual-token embeddings prepended to the input.

Hugging Face peft's ``PromptTuningConfig`` and ``PromptEmbedding``, with the same fields,
module names (``prompt_encoder.<adapter>.embedding``) and checkpoint (``prompt_embeddings``).
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from fastpeft.config import PeftType, PromptLearningConfig, register_config


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start (peft's names)."""

    TEXT = "TEXT"  # the embeddings of a tokenised text, repeated/truncated to fit
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # embeddings of randomly drawn vocabulary tokens
    RANDOM = "RANDOM"  # nn.Embedding's default N(0, 1) initialisation

    def __str__(self) -> str:
        return self.value


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Config of Prompt Tuning (peft's ``PromptTuningConfig``).

    Args:
        num_virtual_tokens: number of virtual tokens prepended to every input (> 0).
        prompt_tuning_init: ``"RANDOM"`` (default), ``"SAMPLE_VOCAB"`` or ``"TEXT"``.
        prompt_tuning_init_text: the text whose token embeddings initialise the prompt (``TEXT`` only).
        tokenizer_name_or_path: tokenizer used to tokenise that text (``TEXT`` only; a local
            directory or a cached Hugging Face name: fastpeft never downloads).
        tokenizer_kwargs: extra keyword arguments for ``AutoTokenizer.from_pretrained`` (``TEXT`` only).
    """

    _peft_type = PeftType.PROMPT_TUNING

    prompt_tuning_init: Union[PromptTuningInit, str] = field(default=PromptTuningInit.RANDOM)
    prompt_tuning_init_text: Optional[str] = field(default=None)
    tokenizer_name_or_path: Optional[str] = field(default=None)
    tokenizer_kwargs: Optional[dict] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(str(self.prompt_tuning_init).upper())
        except ValueError:
            raise ValueError(
                f"Unknown prompt_tuning_init {self.prompt_tuning_init!r}; use one of "
                f"{', '.join(p.value for p in PromptTuningInit)}."
            ) from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs a tokenizer to turn prompt_tuning_init_text into token ids: "
                    "set tokenizer_name_or_path to the base model's tokenizer (a local directory or a cached name), "
                    "or use prompt_tuning_init='RANDOM' / 'SAMPLE_VOCAB'."
                )
            if self.prompt_tuning_init_text is None or self.prompt_tuning_init_text == "":
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose token embeddings "
                    "initialise the virtual tokens)."
                )
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it or switch to TEXT.")


def _load_tokenizer(config: PromptTuningConfig):
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as peft: never run remote code for the init text
    try:
        return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        where = "directory" if os.path.isdir(str(config.tokenizer_name_or_path)) else "name"
        raise ValueError(
            f"Could not load the tokenizer {config.tokenizer_name_or_path!r} (tokenizer_name_or_path, a {where}) for "
            f"prompt_tuning_init='TEXT': {exc}. Save the base model's tokenizer with save_pretrained and pass that "
            "directory."
        ) from exc


class PromptEmbedding(nn.Module):
    """The virtual-token embedding table of Prompt Tuning (peft's ``PromptEmbedding``).

    ``embedding`` has ``num_virtual_tokens * num_transformer_submodules`` rows of ``token_dim``.
    Input: indices ``[batch, n]``; output: embeddings ``[batch, n, token_dim]``.

    Args:
        config: a :class:`PromptTuningConfig` with ``token_dim`` and ``num_transformer_submodules`` filled in.
        word_embeddings: the base model's input embedding (used by the SAMPLE_VOCAB and TEXT inits).
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: Optional[nn.Module]):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = PromptTuningInit(config.prompt_tuning_init)
        if config.inference_mode or init == PromptTuningInit.RANDOM:
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={init.value} needs the base model's word embeddings, none were found.")
        if init == PromptTuningInit.SAMPLE_VOCAB:
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            tokenizer = _load_tokenizer(config)
            ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
            if not ids:
                raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenises to no tokens.")
            ids = (ids * math.ceil(total / len(ids)))[:total]
            if max(ids) >= word_embeddings.num_embeddings:
                raise ValueError(
                    f"The tokenizer {config.tokenizer_name_or_path!r} gives token id {max(ids)}, but the model's "
                    f"vocabulary has {word_embeddings.num_embeddings} rows: use the base model's own tokenizer."
                )
            token_ids = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            weight = word_embeddings(token_ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
