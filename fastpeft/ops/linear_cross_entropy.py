"""The fused linear cross-entropy op: ``loss = CE(post(hidden @ W^T + b), targets)`` without the logits.

A causal LM's last step turns hidden states ``[tokens, H]`` into logits ``[tokens, V]`` and takes
their cross-entropy. Done plainly, the logits, their fp32 upcast, the softmax and its gradient are
each ``tokens x V`` (400 MB per 2048 tokens in fp32 at V=49152, 1 GB at Llama-3's 128k): the
largest items of a LoRA step. This op walks the tokens in chunks; for each chunk it forms that
chunk's logits, its losses and the gradient of the loss with respect to those logits, then at once
turns that gradient into the chunk's hidden-state gradient (and accumulates the LM-head weight and
bias gradients when they are trainable). So no more than one chunk of logits is alive, the
gradients are ready when the forward returns, and backward only scales them by ``grad_output``.

``post`` is what transformers' causal LMs do to logits: an optional multiplier (Cohere's
``logit_scale``; Granite divides by ``logits_scaling``, so pass ``1 / logits_scaling``), then the
optional final-logit softcapping of Gemma 2/3, ``softcap * tanh(z / softcap)``.

Reductions follow transformers' ``ForCausalLMLoss``: ``"mean"`` over the targets that are not
``ignore_index`` (NaN when there are none, like ``torch.nn.functional.cross_entropy``), or
``sum / num_items_in_batch`` when ``num_items_in_batch`` is given (Trainer's gradient-accumulation
fix); ``"sum"`` sums. :func:`causal_targets` shifts labels the way transformers does.

Backends (see :mod:`fastpeft.ops.backend`): the matmuls are the library's (cuBLAS on CUDA);
the per-chunk softmax, loss and logit gradient run in ``reference`` (PyTorch, fp32 on one chunk)
or ``triton`` (:func:`fastpeft.kernels.linear_cross_entropy.cross_entropy_rows_`, which reads the
chunk once per pass and writes the gradient over the logits in the logits' dtype). The loss and
the softmax statistics are accumulated in fp32; no fp32 copy of the full logits is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from fastpeft.ops.backend import choose_backend

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "causal_targets", "LinearCrossEntropy",
           "default_chunk_tokens"]

# One chunk of fp32 logits holds about this many elements (32 MiB): small next to the weights,
# large enough that each chunk's matmul runs at full speed.
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class _Post:
    """How logits are transformed before the loss, and the loss's reduction."""

    scale: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    reduction: str = "mean"
    chunk_tokens: int = 0
    backend: Optional[str] = None


def causal_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' causal shift: position ``t`` predicts ``labels[..., t + 1]``; the last predicts nothing."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so that a chunk of fp32 logits stays near 32 MiB (a multiple of 16, at least 16)."""
    return max(16, (_CHUNK_ELEMENTS // max(vocab, 1)) // 16 * 16)


def _transform_reference(x: torch.Tensor, post: _Post) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 ``z`` from one chunk of raw logits, and the tanh (for the softcap's derivative)."""
    z = x.float()
    if post.scale != 1.0:
        z = z * post.scale
    if not post.softcap:
        return z, None
    t = torch.tanh(z / post.softcap)
    return t * post.softcap, t


def _chunk_reference(x: torch.Tensor, targets: torch.Tensor, grad_scale: Optional[torch.Tensor], post: _Post):
    """Per-row fp32 losses of one chunk of raw logits and, with ``grad_scale``, the logits' gradient (fp32)."""
    z, t = _transform_reference(x, post)
    valid = targets != post.ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)
    losses = torch.where(valid, lse - z.gather(1, safe).squeeze(1), 0.0)
    if grad_scale is None:
        return losses, None
    g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, reusing z's storage
    g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
    g.mul_((valid.to(g.dtype) * grad_scale).unsqueeze(1))
    if t is not None:
        g.mul_(1.0 - t * t)
    if post.scale != 1.0:
        g.mul_(post.scale)
    return losses, g


def _chunk_losses(x: torch.Tensor, targets: torch.Tensor, grad_scale: Optional[torch.Tensor], post: _Post, backend: str):
    """Dispatch one chunk to the Triton kernel (gradient written over ``x``) or the reference."""
    if backend == "triton":
        from fastpeft.kernels.linear_cross_entropy import cross_entropy_rows_

        losses = cross_entropy_rows_(x, targets, grad_scale, post.scale, post.softcap, post.ignore_index)
        return losses, (x if grad_scale is not None else None)
    return _chunk_reference(x, targets, grad_scale, post)


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Out-of-range targets would read past a row in the kernel: refuse them (one host sync per call)."""
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(f"linear_cross_entropy: targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                         f"got values in [{int(valid.min())}, {int(valid.max())}]")


def _denominator(targets: torch.Tensor, post: _Post, num_items_in_batch) -> torch.Tensor:
    """The fp32 divisor of the summed loss: 1, the count of valid targets, or ``num_items_in_batch``."""
    if post.reduction == "sum":
        return torch.ones((), device=targets.device, dtype=torch.float32)
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=targets.device).to(torch.float32)
    return (targets != post.ignore_index).sum().to(torch.float32)


def _fused_pass(hidden, weight, bias, targets, denom, post: _Post, need: Tuple[bool, bool, bool]):
    """Loss and (as ``need`` says: hidden, weight, bias) gradients, one chunk of logits at a time."""
    backend = choose_backend(hidden, weight, backend=post.backend)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = post.chunk_tokens or default_chunk_tokens(vocab)
    any_grad = any(need)
    grad_scale = (1.0 / denom).reshape(1) if any_grad else None
    grad_h = torch.empty_like(hidden) if need[0] else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need[1] else None
    grad_b = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if need[2] else None
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, n_tokens, chunk):
        h = hidden[start:start + chunk]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        losses, g = _chunk_losses(logits, targets[start:start + chunk], grad_scale, post, backend)
        total += losses.sum()
        del logits
        if g is None:
            continue
        g = g.to(weight.dtype)
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[start:start + chunk])
        if grad_w is not None:
            grad_w += (g.t() @ h).float()
        if grad_b is not None:
            grad_b += g.float().sum(0)
        del g
    return total / denom, grad_h, grad_w, grad_b


class LinearCrossEntropy(torch.autograd.Function):
    """Autograd for :func:`linear_cross_entropy`: gradients are computed in the forward and saved.

    ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``targets`` ``[N]``
    (already shifted), ``denom`` the fp32 divisor. Returns the fp32 scalar loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denom, post: _Post):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, grad_h, grad_w, grad_b = _fused_pass(hidden, weight, bias, targets, denom, post, need)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same graph; its gradients are "
                               "computed once in the forward (call the op again instead of retain_graph=True)")
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dtype)  # in place: no second buffer
                 for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None, None


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, cast to its dtype up front (as ``F.linear`` would), so the op runs in one dtype."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _prepare(hidden, weight, bias, labels, shift, ignore_index, reduction, num_items_in_batch):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if reduction == "sum" and num_items_in_batch is not None:
        raise ValueError("linear_cross_entropy: num_items_in_batch divides a summed loss; use reduction='mean' with it")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "do not fit (expected hidden [..., H] and weight [V, H])")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be [V={weight.shape[0]}]")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"linear_cross_entropy: hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share "
                         "a dtype (as for F.linear); under autocast the op casts them itself")
    targets = causal_targets(labels, ignore_index) if shift else labels
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} do not match hidden states "
                         f"{tuple(hidden.shape)} (one label per position)")
    targets = targets.reshape(-1).to(device=hidden.device, dtype=torch.long)
    _check_targets(targets, weight.shape[0], ignore_index)
    return hidden.reshape(-1, hidden.shape[-1]), targets


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    shift: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_tokens: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Cross-entropy of ``post(hidden @ weight^T + bias)`` against ``labels``, never forming all the logits.

    Args:
        hidden: ``[..., H]`` hidden states (e.g. the final norm's output, ``[B, T, H]``).
        weight: ``[V, H]`` LM-head weight (frozen, trainable, or tied to the input embedding:
            gradients reach it through autograd like any other use of the tensor).
        labels: ``[...]`` class ids matching ``hidden``'s leading dims, ``ignore_index`` for none.
        bias: optional ``[V]`` LM-head bias.
        shift: apply transformers' causal shift (position ``t`` predicts ``labels[..., t+1]``).
        ignore_index, reduction, num_items_in_batch: as transformers' ``ForCausalLMLoss``
            (``"mean"`` over valid targets, or ``sum / num_items_in_batch`` when given; ``"sum"``).
        logit_scale: multiplies the logits first (Cohere ``logit_scale``, Granite ``1/logits_scaling``).
        softcap: final-logit softcapping (Gemma 2/3 ``final_logit_softcapping``), or None.
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`, ~32 MiB of fp32 logits).
        backend: ``"reference"`` / ``"triton"`` for the per-chunk loss (default: Triton on CUDA).

    Returns:
        The fp32 scalar loss. When gradients are needed they are computed during this call (one
        extra ``[N, H]`` buffer for the hidden states, and an fp32 ``[V, H]`` one if the weight trains).
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    flat_hidden, targets = _prepare(hidden, weight, bias, labels, shift, ignore_index, reduction, num_items_in_batch)
    post = _Post(float(logit_scale), float(softcap) if softcap else None, int(ignore_index), reduction,
                 int(chunk_tokens or 0), backend)
    denom = _denominator(targets, post, num_items_in_batch)
    device_type = hidden.device.type
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        with torch.autocast(device_type, enabled=False):
            return LinearCrossEntropy.apply(flat_hidden, weight, bias, targets, denom, post)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        return _fused_pass(flat_hidden, weight, bias, targets, denom, post, (False, False, False))[0]


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    shift: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """The unfused computation, written the way transformers' causal LMs do it (the test oracle).

    Forms all the logits, upcasts them to fp32, and calls ``torch.nn.functional.cross_entropy``.
    """
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    targets = causal_targets(labels, ignore_index) if shift else labels
    logits, targets = logits.float().reshape(-1, weight.shape[0]), targets.reshape(-1).to(logits.device)
    if num_items_in_batch is not None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
