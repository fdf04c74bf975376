"""(IA)^3: learned per-channel scaling of keys, values and feed-forward activations.

``IA3Config``, the ``IA3`` linear layer and ``IA3Model`` mirror Hugging Face peft's ``ia3``
module: each targeted linear layer keeps its original as ``base_layer`` and holds one learned
vector per adapter in ``ia3_l`` (an ``nn.ParameterDict``). For an attention projection the
vector (shape ``[out, 1]``) scales the layer's output; for a *feed-forward* module (listed in
``feedforward_modules``) the vector (shape ``[1, in]``) scales the layer's input. Checkpoint
keys are peft's (``...k_proj.ia3_l``), so either library loads the other's adapters.

The scaling is elementwise, so it runs as plain PyTorch (there is no fused op to gain:
a merged adapter costs nothing at all, see :meth:`Linear.merge`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from fastpeft.config import PeftConfig, PeftType, register_config
from fastpeft.tuners.base import BaseTuner, BaseTunerLayer, default_modules, linear_fan_in_fan_out

# peft's defaults when target_modules / feedforward_modules are None
IA3_TARGET_MODULES = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULES = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@register_config
@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (Hugging Face peft's ``IA3Config`` fields and defaults).

    Args:
        target_modules: module-name suffixes (list), a full-match regex (str) or ``"all-linear"``;
            None picks peft's default for the model type.
        exclude_modules: names or a regex never to target.
        feedforward_modules: the targeted modules whose *input* is scaled (the paper's
            feed-forward rescaling); must be a subset of ``target_modules`` when both are lists.
            None picks peft's default for the model type.
        fan_in_fan_out: True for bases storing weights as (in, out), e.g. GPT-2's ``Conv1D``.
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: start the vectors at 1 (the identity). ``False`` draws them from a
            normal distribution (for tests).
    """

    _peft_type = PeftType.IA3

    target_modules: Optional[Union[List[str], str]] = field(default=None)
    exclude_modules: Optional[Union[List[str], str]] = field(default=None)
    feedforward_modules: Optional[Union[List[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    modules_to_save: Optional[List[str]] = field(default=None)
    init_ia3_weights: bool = field(default=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, (str, set, frozenset)):
                raise TypeError(f"IA3Config.{name} must be a list of names or a regex string, got {type(value).__name__}")
        if isinstance(self.feedforward_modules, (set, frozenset)) and isinstance(self.target_modules, (set, frozenset)):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"IA3Config: feedforward_modules {extra} are not in target_modules {sorted(self.target_modules)}; "
                    "feedforward_modules must be a subset of target_modules (add them to target_modules)."
                )


class IA3Layer(BaseTunerLayer):
    """Per-adapter (IA)^3 vectors shared by the (IA)^3 layer types."""

    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    def _init_ia3(self, base_layer: nn.Module, in_features: int, out_features: int, is_feedforward: bool) -> None:
        self._init_tuner_layer(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(self, adapter_name: str, init_ia3_weights: bool) -> None:
        """Create (or replace) adapter ``adapter_name``'s vector on this layer."""
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        device = weight.device if weight.device.type != "meta" else None
        vec = torch.randn(shape, dtype=dtype, device=device)
        if init_ia3_weights:
            vec.fill_(1.0)
        self.ia3_l[adapter_name] = nn.Parameter(vec)
        self.set_adapter(self.active_adapters)


class Linear(nn.Module, IA3Layer):
    """(IA)^3 on ``nn.Linear`` or GPT-2's ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool = False, fan_in_fan_out: bool = False, init_ia3_weights: bool = True, **kwargs: Any):
        super().__init__()
        weight = base_layer.weight
        if fan_in_fan_out:
            in_features, out_features = weight.shape
        else:
            out_features, in_features = weight.shape
        self._init_ia3(base_layer, in_features, out_features, is_feedforward)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, init_ia3_weights)

    def _weight_factor(self, adapter: str) -> torch.Tensor:
        # the vector broadcast against the stored weight ([out, in], or [in, out] with fan_in_fan_out)
        vec = self.ia3_l[adapter].data
        return vec.t() if self.fan_in_fan_out else vec

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Fold the vectors into the base weight (and, for output scaling, the bias)."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.ia3_l and a not in self.merged_adapters]
        base = self.get_base_layer()
        for adapter in names:
            factor = self._weight_factor(adapter)
            new_w = (base.weight.data * factor).to(base.weight.dtype)
            new_b = None
            if not self.is_feedforward and base.bias is not None:
                new_b = (base.bias.data * self.ia3_l[adapter].data.reshape(base.bias.shape)).to(base.bias.dtype)
            if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
                raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; the adapter seems broken.")
            base.weight.data = new_w
            if new_b is not None:
                base.bias.data = new_b
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Divide the merged vectors back out (exact up to rounding, unless a vector entry is ~0)."""
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.ia3_l:
                continue
            factor = self._weight_factor(adapter)
            if (factor.abs() < 1e-6).any():
                warnings.warn(f"(IA)^3 adapter {adapter!r} has entries near 0: unmerging cannot restore those weights exactly.")
            base.weight.data = (base.weight.data / (factor + 1e-8)).to(base.weight.dtype)
            if not self.is_feedforward and base.bias is not None:
                vec = self.ia3_l[adapter].data.reshape(base.bias.shape)
                base.bias.data = (base.bias.data / (vec + 1e-8)).to(base.bias.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = None
        for adapter in self.active_adapters:
            if adapter in self.ia3_l:
                vec = self.ia3_l[adapter].flatten()
                scale = vec if scale is None else scale * vec
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class IA3Model(BaseTuner):
    """The (IA)^3 tuner: injects :class:`Linear` layers that scale activations.

    Usually built through :func:`fastpeft.get_peft_model` with an :class:`IA3Config`.
    """

    prefix = "ia3_"

    def _prepare_adapter_config(self, config: IA3Config, model_config: Dict[str, Any]) -> IA3Config:
        if config.target_modules is None:
            config.target_modules = default_modules(
                IA3_TARGET_MODULES, model_config, "(IA)^3 target modules",
                "target_modules (e.g. ['k_proj', 'v_proj', 'down_proj']) and feedforward_modules (e.g. ['down_proj'])")
        if config.feedforward_modules is None:
            config.feedforward_modules = default_modules(
                IA3_FEEDFORWARD_MODULES, model_config, "(IA)^3 feedforward modules",
                "feedforward_modules (a subset of target_modules, e.g. ['down_proj'], or [] for none)")
        return config

    @staticmethod
    def _is_feedforward(config: IA3Config, key: str) -> bool:
        ff = config.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, key) is not None
        # peft's rule: a plain suffix test (so "mlp.c_proj" matches "h.0.mlp.c_proj")
        return any(key.endswith(name) for name in (ff or ()))

    def _create_and_replace(self, config: IA3Config, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str) -> None:
        is_ff = self._is_feedforward(config, current_key)
        if isinstance(target, IA3Layer):
            target.update_layer(adapter_name, config.init_ia3_weights)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        fan_in_fan_out = linear_fan_in_fan_out(base, config.fan_in_fan_out)
        if fan_in_fan_out is None:
            raise ValueError(
                f"Target module {current_key!r} is a {type(base).__module__}.{type(base).__name__}, which (IA)^3 "
                "does not support in fastpeft. Supported: torch.nn.Linear and transformers' Conv1D; "
                "target other modules."
            )
        config.fan_in_fan_out = fan_in_fan_out
        new = Linear(target, adapter_name, is_feedforward=is_ff, fan_in_fan_out=config.fan_in_fan_out, init_ia3_weights=config.init_ia3_weights)
        if adapter_name not in self.active_adapters:
            new.set_adapter(self.active_adapters)
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    def _unload_and_optionally_merge(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
        if merge and (getattr(self.model, "is_loaded_in_8bit", False) or getattr(self.model, "is_loaded_in_4bit", False)):
            raise ValueError("Cannot merge (IA)^3 layers into a quantized (4-/8-bit) base model; use unload() instead.")
        return super()._unload_and_optionally_merge(merge, safe_merge, adapter_names)
