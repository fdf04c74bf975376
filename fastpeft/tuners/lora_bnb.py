"""LoRA on bitsandbytes 4-bit linear layers (QLoRA), peft-compatible.

:class:`Linear4bit` mirrors Hugging Face peft's ``lora.bnb.Linear4bit``: it keeps the
bitsandbytes ``Linear4bit`` as ``base_layer`` (its packed ``Params4bit`` weight and
``QuantState`` used as they are, never re-quantised for training) and per-adapter
``lora_A``/``lora_B`` in fp32, so module names, state-dict keys and checkpoints are the same
as peft's. Its forward runs the QLoRA op :func:`fastpeft.ops.nf4.bnb_linear4bit` (dequantise
inside the matmul: Triton on CUDA, the pure-PyTorch reference on CPU) for the first active
adapter and computes what bitsandbytes + peft compute (same casts; on the reference path the
same dropout draw, on the Triton path with an adapter in the compute dtype, e.g. under autocast,
the dropout mask of the LoRA-linear kernels, regenerated from a seed instead of stored).

Merging follows peft: dequantise, add ``scaling * B A``, quantise again with bitsandbytes
(lossy: a 4-bit weight cannot hold the update exactly, peft warns the same way).

bitsandbytes is only imported to re-quantise when merging; layers are recognised by their
class name and their weight's ``quant_state``.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional

import torch
from torch import nn

from fastpeft.ops.nf4 import bnb_linear4bit, dequantize_nf4
from fastpeft.tuners.base import BaseTunerLayer
from fastpeft.tuners.lora import LoraConfig, LoraLayer, register_lora_dispatcher

__all__ = ["Linear4bit", "dispatch_bnb_4bit", "is_bnb_linear4bit"]


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (or subclass: ``LinearNF4``, ``LinearFP4``)
    whose weight is quantised (has a ``quant_state``)."""
    names = {c.__name__ for c in type(module).__mro__}
    return "Linear4bit" in names and _quant_state(module) is not None


def _quant_state(base: nn.Module):
    w = getattr(base, "weight", None)
    qs = getattr(w, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


class Linear4bit(nn.Module, LoraLayer):
    """LoRA on a bitsandbytes ``Linear4bit`` base layer (QLoRA).

    Args are those of :class:`fastpeft.tuners.lora.Linear` (``r``, ``lora_alpha``,
    ``lora_dropout``, ``init_lora_weights``, ``use_rslora``); ``fan_in_fan_out`` must be False.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        self._init_lora(base_layer, int(base.in_features), int(base.out_features))
        self.fan_in_fan_out = False
        self._active_adapter = [adapter_name]
        # use_dora=True is refused by update_layer with a clear message (no DoRA on 4-bit bases)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora=use_dora)

    # ---- merging ---------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` ``[out, in]`` in the adapter's dtype (fp32)."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _requantize(self, sign: float, adapter: str, safe_merge: bool) -> None:
        import bitsandbytes as bnb  # the base layer is a bitsandbytes module: it is installed

        base = self.get_base_layer()
        weight = base.weight
        w = dequantize_nf4(weight.data, _quant_state(base)) + sign * self.get_delta_weight(adapter)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; the adapter seems broken.")
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        kwargs.pop("quant_state", None)  # a fresh state comes from quantising again
        base.weight = bnb.nn.Params4bit(w.to("cpu"), **kwargs).to(weight.device)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Add the adapters' ``scaling * B A`` into the 4-bit weight: dequantise, add, quantise
        again with bitsandbytes (as peft does; the result is rounded to 4 bits)."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.lora_A and a not in self.merged_adapters]
        for adapter in names:
            warnings.warn("Merging LoRA into a 4-bit weight re-quantises it: outputs change by rounding errors.")
            self._requantize(1.0, adapter, safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged adapters again (dequantise, subtract, quantise: lossy, like peft)."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                warnings.warn("Unmerging LoRA from a 4-bit weight re-quantises it: outputs change by rounding errors.")
                self._requantize(-1.0, adapter, False)

    # ---- forward ---------------------------------------------------------------------------
    def _lora_delta(self, x: torch.Tensor, adapter: str, out_dtype: torch.dtype) -> torch.Tensor:
        # peft's arithmetic: scaling * lora_B(lora_A(dropout(x))) in the adapter's dtype
        A = self.lora_A[adapter]
        cast = not torch.is_autocast_enabled()
        xin = x.to(A.weight.dtype) if cast else x
        out = self.lora_B[adapter](A(self.lora_dropout[adapter](xin))) * self.scaling[adapter]
        return out.to(out_dtype) if cast else out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active or args or kwargs:
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            for a in active:
                result = result + self._lora_delta(x, a, result.dtype)
            return result
        return self._qlora_forward(x, active, backend=None)

    def _qlora_forward(self, x: torch.Tensor, active: List[str], backend: Optional[str]) -> torch.Tensor:
        base = self.get_base_layer()
        first = active[0]
        drop = self.lora_dropout[first]
        result = bnb_linear4bit(
            x, base.weight.data, _quant_state(base), base.bias, getattr(base, "compute_dtype", None),
            self.lora_A[first].weight, self.lora_B[first].weight, self.scaling[first],
            dropout_p=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0, training=self.training,
            backend=backend,
        )
        for a in active[1:]:
            result = result + self._lora_delta(x, a, result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs: Any) -> Optional[nn.Module]:
    """LoRA dispatcher: a :class:`Linear4bit` for bitsandbytes 4-bit bases, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_bnb_linear4bit(base):
        if "Linear4bit" in {c.__name__ for c in type(base).__mro__}:
            raise ValueError(
                f"{type(base).__name__} has no quantised weight yet (no quant_state): bitsandbytes quantises "
                "it when the module is moved to a device; call model.to('cuda') (or 'cpu') before get_peft_model, "
                "or load the model with BitsAndBytesConfig(load_in_4bit=True)."
            )
        return None
    if kwargs.get("fan_in_fan_out"):
        warnings.warn("fan_in_fan_out=True but the target is a bitsandbytes Linear4bit; setting fan_in_fan_out=False.")
        kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = False
    return Linear4bit(target, adapter_name, **kwargs)


register_lora_dispatcher(dispatch_bnb_4bit)
