"""LoRA: ``LoraConfig``, the LoRA linear layer and ``LoraModel`` (the tuner).

The layer mirrors Hugging Face peft's ``lora.Linear``: it keeps the original module as
``base_layer`` and per-adapter ``lora_A``/``lora_B`` (``nn.Linear`` without bias),
``lora_dropout`` and ``scaling``. Its forward runs the fused op
:func:`fastpeft.ops.lora_linear.lora_linear` for the first active adapter, which picks the
Triton kernel on CUDA and the reference path on CPU.

Other base-layer types (e.g. bitsandbytes ``Linear4bit``) plug in through
:func:`register_lora_dispatcher`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.config import PeftConfig, PeftType, register_config
from fastpeft.ops.dora import dora_delta, dora_linear, dora_weight_norm
from fastpeft.ops.lora_linear import lora_delta, lora_linear
from fastpeft.tuners.base import BaseTuner, BaseTunerLayer, default_modules, linear_fan_in_fan_out
from fastpeft.utils.constants import DEFAULT_LORA_TARGET_MODULES
from fastpeft.utils.modules import pattern_key


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (Hugging Face peft's ``LoraConfig`` fields and defaults).

    Args:
        r: LoRA rank (> 0).
        target_modules: module-name suffixes (list), a full-match regex (str), or ``"all-linear"``
            (every linear layer but the output head). None: the default for the model type.
        exclude_modules: names or a regex never to target.
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA branch input.
        fan_in_fan_out: True when the base layer stores its weight as (in, out), e.g. GPT-2's Conv1D.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases train (and are saved).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: a no-op at start), ``"gaussian"``
            (A normal with std 1/r, B zero) or ``False`` (random A and B, for tests).
        layers_to_transform: only these block indices; ``layers_pattern`` names the block list.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha`` keyed by a
            regex on the module name.
        use_dora: weight-decomposed LoRA (DoRA): a learned magnitude per output feature times the
            row-normalised ``W + s B A`` (saved as peft's ``lora_magnitude_vector``). Linear and
            Conv1D bases; the weight norm runs as a fused kernel on CUDA.
        lora_bias: a trainable bias on ``lora_B`` (not supported).
    """

    _peft_type = PeftType.LORA

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    target_modules: Optional[Union[List[str], str]] = field(default=None)
    exclude_modules: Optional[Union[List[str], str]] = field(default=None)
    lora_alpha: int = field(default=8)
    lora_dropout: float = field(default=0.0)
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "lora_only"] = field(default="none")
    use_rslora: bool = field(default=False)
    modules_to_save: Optional[List[str]] = field(default=None)
    init_lora_weights: Union[bool, str] = field(default=True)
    layers_to_transform: Optional[Union[List[int], int]] = field(default=None)
    layers_pattern: Optional[Union[List[str], str]] = field(default=None)
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = field(default=None)
    megatron_core: Optional[str] = field(default="megatron.core")
    trainable_token_indices: Optional[Any] = field(default=None)
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[Any] = field(default=None)
    corda_config: Optional[Any] = field(default=None)
    use_dora: bool = field(default=False)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16)
    layer_replication: Optional[List[List[int]]] = field(default=None)
    lora_bias: bool = field(default=False)
    target_parameters: Optional[List[str]] = field(default=None)
    ensure_weight_tying: bool = field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}. Typical values: 8, 16, 64.")
        for key, val in (self.rank_pattern or {}).items():
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {val!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() != "gaussian":
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by fastpeft; use True, False or 'gaussian'."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only works together with layers_to_transform; set layers_to_transform too.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string.")
        unsupported = {
            "lora_bias": self.lora_bias,
            "use_qalora": self.use_qalora,
            "layer_replication": self.layer_replication,
            "target_parameters": self.target_parameters,
            "trainable_token_indices": self.trainable_token_indices,
            "megatron_config": self.megatron_config,
            "eva_config": self.eva_config,
            "corda_config": self.corda_config,
        }
        for name, value in unsupported.items():
            if value:
                raise NotImplementedError(f"LoraConfig({name}=...) is not supported by fastpeft yet; leave it at its default.")
        if self.loftq_config:
            raise NotImplementedError("LoftQ initialisation is not supported by fastpeft; leave loftq_config empty.")


# Like peft's ``peft.tuners.lora.dora.ENABLE_DORA_CACHING``: when True, DoRA layers in eval mode
# reuse their weight norm while W, A and B are unchanged (faster generation). Off by default.
ENABLE_DORA_CACHING = False


class DoraMagnitude(nn.Module):
    """DoRA's magnitude vector of one adapter, kept as ``.weight`` (peft's ``DoraLinearLayer`` state)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class LoraLayer(BaseTunerLayer):
    """Per-adapter LoRA state shared by every LoRA layer type."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora")
    # layer types whose forward implements DoRA set this (a subclass overriding forward must set it itself)
    supports_dora = False

    def _init_lora(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.use_dora: Dict[str, bool] = {}
        self.use_rslora: Dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA; added to adapter_layer_names once used
        self._dora_merged_norm: Dict[str, torch.Tensor] = {}
        self._dora_norm_cache: Dict[str, tuple] = {}  # adapter -> (weights' identity and versions, norm)
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init_lora_weights, use_rslora: bool, use_dora: bool = False) -> None:
        """Create (or replace) adapter ``adapter_name`` on this layer (``use_dora``: add a DoRA magnitude)."""
        if use_dora and not _layer_supports_dora(self):
            raise ValueError(
                f"use_dora=True is not supported for {type(self).__name__} layers (base "
                f"{type(self.get_base_layer()).__name__}); DoRA works on nn.Linear and Conv1D bases. Set use_dora=False."
            )
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = self._initial_scaling(adapter_name)
        self.use_dora[adapter_name] = bool(use_dora)
        self._dora_norm_cache.pop(adapter_name, None)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_base(adapter_name)
        if use_dora:
            self._init_dora(adapter_name)
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.set_adapter(self.active_adapters)

    def _init_dora(self, adapter_name: str) -> None:
        """Magnitude = the current row norms of ``W + s B A`` (so the adapted layer starts unchanged)."""
        if "lora_magnitude_vector" not in self.adapter_layer_names:
            self.adapter_layer_names = tuple(self.adapter_layer_names) + ("lora_magnitude_vector",)
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        norm = dora_weight_norm(self._base_weight(), A, B, self.scaling[adapter_name])
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(device=A.device, dtype=A.dtype))

    def _base_weight(self) -> torch.Tensor:
        w = self.get_base_layer().weight
        return w.t() if getattr(self, "fan_in_fan_out", False) else w  # always [out, in]

    def _dora_norm(self, adapter: str, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """DoRA's detached weight norm; cached in eval mode when :data:`ENABLE_DORA_CACHING` is set.

        The cache key holds each tensor's storage address and autograd version counter (bumped by
        in-place updates such as optimizer steps and ``load_state_dict``), so repeated eval forwards
        with unchanged weights (generation) skip the extra read of ``W``. Edits through ``.data``
        bypass the version counter: clear the cache (``layer._dora_norm_cache.clear()``) after them.
        """
        if self.training or not ENABLE_DORA_CACHING:
            self._dora_norm_cache.clear()
            return dora_weight_norm(weight, A, B, self.scaling[adapter])
        try:
            key = tuple((t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in (weight, A, B))
        except RuntimeError:  # inference tensors have no version counter: no caching
            return dora_weight_norm(weight, A, B, self.scaling[adapter])
        key = key + (float(self.scaling[adapter]),)
        hit = self._dora_norm_cache.get(adapter)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = dora_weight_norm(weight, A, B, self.scaling[adapter])
        self._dora_norm_cache[adapter] = (key, norm)
        return norm

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_norm_cache.pop(adapter_name, None)
        self._dora_merged_norm.pop(adapter_name, None)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights is False:
            return  # nn.Linear's default init for both: a non-zero update (tests use it)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # adapters train in fp32 on half-precision bases (peft's autocast_adapter_dtype)
        for attr in ("lora_A", "lora_B"):
            getattr(self, attr)[adapter_name].to(device=weight.device if weight.device.type != "meta" else None, dtype=dtype)

    def _initial_scaling(self, adapter: str) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        r = self.r[adapter]
        return self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora.get(adapter, False) else r)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set ``adapter``'s scaling to ``scale`` times its initial one (peft's ``set_scale``)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter on this layer by ``scale``."""
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Divide the active adapters' scaling by ``scale``; ``None`` restores the initial scaling."""
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] = self._initial_scaling(adapter) if scale is None else self.scaling[adapter] / scale

    def _dropout_p(self, adapter: str) -> float:
        drop = self.lora_dropout[adapter]
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


class Linear(nn.Module, LoraLayer):
    """LoRA (and DoRA) on ``nn.Linear`` (or on GPT-2's ``Conv1D`` with ``fan_in_fan_out=True``)."""

    supports_dora = True

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        weight = base_layer.weight
        if fan_in_fan_out:
            in_features, out_features = weight.shape
        else:
            out_features, in_features = weight.shape
        self._init_lora(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora=use_dora)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout and dtype."""
        weight = self.get_base_layer().weight
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        compute_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) and weight.device.type == "cpu" else a.dtype
        delta = (b.to(compute_dtype) @ a.to(compute_dtype)) * self.scaling[adapter]
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Add the adapters' ``scaling * B A`` into the base weight (``safe_merge`` checks for NaN/inf first)."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.lora_A and a not in self.merged_adapters]
        base = self.get_base_layer()
        self._dora_norm_cache.clear()
        for adapter in names:
            delta = self.get_delta_weight(adapter)
            if self.use_dora.get(adapter, False):
                merged = self._dora_merged_weight(adapter, delta)
            else:
                merged = base.weight.data + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; the adapter seems broken.")
            base.weight.data = merged
            self.merged_adapters.append(adapter)

    def _dora_factor(self, adapter: str, norm: torch.Tensor) -> torch.Tensor:
        # m / ||W + s B A|| as a column [out, 1] (a row [1, out] for fan_in_fan_out weights)
        factor = (self.lora_magnitude_vector[adapter].weight.detach().float() / norm.float()).view(-1, 1)
        return factor.t() if self.fan_in_fan_out else factor

    def _dora_merged_weight(self, adapter: str, delta: torch.Tensor) -> torch.Tensor:
        # DoRA merge: W' = m / ||W + s B A|| * (W + s B A); the norm is kept for unmerge
        norm = dora_weight_norm(self._base_weight(), self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter])
        self._dora_merged_norm[adapter] = norm
        weight = self.get_base_layer().weight.data
        return (self._dora_factor(adapter, norm) * (weight.float() + delta.float())).to(weight.dtype)

    def unmerge(self) -> None:
        """Subtract every merged adapter's update from the base weight."""
        base = self.get_base_layer()
        self._dora_norm_cache.clear()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            if self.use_dora.get(adapter, False) and adapter in self._dora_merged_norm:
                norm = self._dora_merged_norm.pop(adapter)
                weight = base.weight.data
                restored = weight.float() / self._dora_factor(adapter, norm) - self.get_delta_weight(adapter).float()
                base.weight.data = restored.to(weight.dtype)
            else:
                base.weight.data -= self.get_delta_weight(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        dora = [a for a in active if self.use_dora.get(a, False)]
        base = self.get_base_layer()
        # one DoRA adapter alone runs the fused DoRA op; DoRA among several adapters follows peft's
        # sequential rule (each DoRA term rescales the running output)
        dora_unfusable = bool(dora) and len(active) > 1
        if self.merged or not active or args or kwargs or dora_unfusable:
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            for a in active:
                if self.use_dora.get(a, False):
                    result = result + self._dora_extra(a, x, result).to(result.dtype)
                else:
                    result = result + lora_delta(x.to(self.lora_A[a].weight.dtype), self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], self.lora_dropout[a]).to(result.dtype)
            return result
        first, rest = active[0], active[1:]
        A = self.lora_A[first].weight
        B = self.lora_B[first].weight
        if dora:
            weight = self._base_weight()
            return dora_linear(
                x, weight, base.bias, A, B, self.lora_magnitude_vector[first].weight, self.scaling[first],
                dropout_p=self._dropout_p(first), training=self.training, weight_norm=self._dora_norm(first, weight, A, B),
            )
        result = lora_linear(
            x,
            self._base_weight(),
            base.bias,
            A,
            B,
            self.scaling[first],
            dropout_p=self._dropout_p(first),
            training=self.training,
        )
        for a in rest:
            result = result + lora_delta(x.to(self.lora_A[a].weight.dtype), self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], self.lora_dropout[a]).to(result.dtype)
        return result

    def _dora_extra(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # peft's DoRA term on top of the running output ``result`` (dropout: on a fresh x W^T instead)
        A = self.lora_A[adapter].weight
        B = self.lora_B[adapter].weight
        xa = x.to(A.dtype)
        weight = self._base_weight()
        drop = self.lora_dropout[adapter]
        if isinstance(drop, nn.Identity) or not self.training:
            dx = xa
            bias = self.get_base_layer().bias
            base_nb = result - bias if bias is not None else result
        else:
            dx = drop(xa)
            base_nb = F.linear(dx.to(weight.dtype), weight)
        norm = self._dora_norm(adapter, weight, A, B)
        scale = self.lora_magnitude_vector[adapter].weight.float() / norm
        return dora_delta(dx, base_nb, A, B, scale, self.scaling[adapter])

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ---- dispatch: which LoRA layer wraps which base module --------------------------------
LoraDispatcher = Callable[..., Optional[nn.Module]]
_DISPATCHERS: List[LoraDispatcher] = []


def register_lora_dispatcher(fn: LoraDispatcher, first: bool = True) -> LoraDispatcher:
    """Register ``fn(target, adapter_name, lora_config, **kwargs) -> module | None``.

    Dispatchers are tried in order; the first to return a module wins. Used to add LoRA
    layers for other base types (e.g. bitsandbytes ``Linear4bit``).
    """
    if fn not in _DISPATCHERS:
        _DISPATCHERS.insert(0 if first else len(_DISPATCHERS), fn)
    return fn


def dispatch_default(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs: Any) -> Optional[nn.Module]:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    fan_in_fan_out = linear_fan_in_fan_out(base, bool(kwargs.get("fan_in_fan_out")))
    if fan_in_fan_out is None:
        return None
    if fan_in_fan_out != bool(kwargs.get("fan_in_fan_out")):
        kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = fan_in_fan_out
    return Linear(target, adapter_name, **kwargs)


register_lora_dispatcher(dispatch_default, first=False)


class LoraModel(BaseTuner):
    """The LoRA tuner: wraps a transformers model and injects :class:`Linear` layers.

    Usually built through :func:`fastpeft.get_peft_model`.
    """

    prefix = "lora_"

    def _prepare_adapter_config(self, config: LoraConfig, model_config: Dict[str, Any]) -> LoraConfig:
        if config.target_modules is None:
            config.target_modules = default_modules(DEFAULT_LORA_TARGET_MODULES, model_config, "LoRA target modules",
                                                    "target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
        return config

    def adapter_key_map(self, adapter_name: str, prefix: str = "") -> Dict[str, str]:
        """peft's checkpoint keys; DoRA's magnitude is saved as ``...lora_magnitude_vector`` (no ``.weight``)."""
        mapping = super().adapter_key_map(adapter_name, prefix)
        suffix = ".lora_magnitude_vector.weight"
        return {(k[: -len(".weight")] if k.endswith(suffix) else k): v for k, v in mapping.items()}

    def _create_and_replace(self, config: LoraConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str) -> None:
        rank_key = pattern_key((config.rank_pattern or {}).keys(), current_key)
        alpha_key = pattern_key((config.alpha_pattern or {}).keys(), current_key)
        r = config.rank_pattern[rank_key] if rank_key else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key else config.lora_alpha
        kwargs = dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            fan_in_fan_out=config.fan_in_fan_out,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights, config.use_rslora, use_dora=config.use_dora)
            return
        for dispatcher in _DISPATCHERS:
            new = dispatcher(target, adapter_name, config, **kwargs)
            if new is not None:
                break
        else:
            raise ValueError(
                f"Target module {current_key!r} is a {type(target).__module__}.{type(target).__name__}, which LoRA "
                "does not support. Supported: torch.nn.Linear, transformers' Conv1D"
                + (", bitsandbytes Linear4bit" if len(_DISPATCHERS) > 1 else "")
                + ". Target other modules (e.g. target_modules='all-linear')."
            )
        if config.use_dora and not _layer_supports_dora(new):
            raise ValueError(
                f"use_dora=True is not supported for {current_key!r} ({type(new).__name__} on a "
                f"{type(new.get_base_layer()).__name__}); DoRA works on nn.Linear and Conv1D bases. Set use_dora=False "
                "or target other modules."
            )
        if adapter_name not in self.active_adapters:
            new.set_adapter(self.active_adapters)
            new.requires_grad_(False)
        setattr(parent, target_name, new)


def _layer_supports_dora(layer: nn.Module) -> bool:
    # a subclass that overrides forward must declare supports_dora itself
    for klass in type(layer).__mro__:
        if "supports_dora" in klass.__dict__:
            return bool(klass.__dict__["supports_dora"])
        if "forward" in klass.__dict__ and klass is not type(layer).__mro__[-1]:
            return False
    return False
