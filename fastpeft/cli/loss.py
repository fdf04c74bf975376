"""The loss of ``fastpeft train``: next-token cross-entropy over completion tokens.

Training and evaluation both go through :func:`batch_loss`. The model computes the loss from the
labels itself, summed (``num_items_in_batch=1``): fastpeft's causal-LM wrapper does it with the
fused linear cross-entropy (one chunk of logits alive at a time) unless ``--no-fused-loss`` turned
``model.fused_loss`` off; then transformers' loss runs on the full logits. Both sum the same
next-token cross-entropy over the target (completion) tokens.
"""

from __future__ import annotations

import contextlib

from fastpeft.cli.data import IGNORE_INDEX


def autocast(device, use_bf16: bool):
    """bf16 autocast on ``device`` when ``use_bf16``, else a no-op context."""
    import torch
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model, batch: dict, device, use_bf16: bool):
    """Forward one collated batch; (summed completion loss, number of target tokens)."""
    labels = batch["labels"].to(device)
    with autocast(device, use_bf16):
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    labels=labels, num_items_in_batch=1)  # a divisor of 1: the summed loss
    return out.loss.float(), int((labels[:, 1:] != IGNORE_INDEX).sum())
