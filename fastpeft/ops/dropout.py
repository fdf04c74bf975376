"""The dropout mask of the reference paths (shared by the LoRA-linear and QLoRA ops)."""

from __future__ import annotations

import torch

__all__ = ["reference_dropout_mask"]


def reference_dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A scaled keep-mask shaped like ``x``: ``bernoulli(1 - p) / (1 - p)``.

    The same draw as ``torch.nn.functional.dropout`` on CPU (``empty_like(x).bernoulli_(1 - p)``),
    so with the same seed the reference paths reproduce Hugging Face peft's outputs.
    """
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
