"""The loss of ``fastpeft train``: next-token cross-entropy over completion tokens.

Training and evaluation both go through :func:`batch_loss`, so a different loss computation
(e.g. a fused linear + cross-entropy that never materialises the logits) is one function to change.
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


def completion_loss(logits, labels):
    """(sum of next-token cross-entropy over target positions, number of target positions)."""
    import torch.nn.functional as F
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def batch_loss(model, batch: dict, device, use_bf16: bool):
    """Forward one collated batch; (summed completion loss, number of target tokens)."""
    with autocast(device, use_bf16):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
    return completion_loss(logits, batch["labels"])
