"""AdaLoRA: LoRA in SVD form whose ranks are pruned during training by an importance budget.

Each targeted linear layer learns ``delta W = B diag(E) A * scaling / ranknum`` with
``A`` (``lora_A``, ``[r, in]``, right singular vectors), ``E`` (``lora_E``, ``[r, 1]``, singular
values) and ``B`` (``lora_B``, ``[out, r]``, left singular vectors); ``r`` starts at
``init_r``. During training :meth:`AdaLoraModel.update_and_allocate` (call it after
``optimizer.step()``, before ``zero_grad()``) keeps smoothed importance scores
(sensitivity ``|p * grad|`` smoothed by ``beta1``, its uncertainty by ``beta2``) and, on a
cubic budget schedule between ``tinit`` and ``total_step - tfinal``, zeroes the least
important singular values until ``target_r`` ranks per layer remain on average. The chosen
ranks are recorded in ``config.rank_pattern`` and saved with the adapter; checkpoints hold only
the kept ranks, exactly as Hugging Face peft writes them, and loading resizes the layers first.

A forward with ``labels`` adds ``orth_reg_weight`` times the orthogonality penalty
``mean ||P^T P - I||_F`` over every ``A`` and ``B`` to ``outputs.loss`` (as peft does).

The layer's forward runs the LoRA-linear op (:func:`fastpeft.ops.lora_linear.lora_linear`)
with ``A * E`` as the down-projection and ``scaling / ranknum`` as the scale.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from fastpeft.config import PeftType, register_config
from fastpeft.ops.lora_linear import lora_delta, lora_linear
from fastpeft.tuners.base import BaseTunerLayer, default_modules, linear_fan_in_fan_out
from fastpeft.tuners.lora import LoraConfig, LoraModel
from fastpeft.utils.modules import get_submodules

# peft's defaults when target_modules is None
ADALORA_TARGET_MODULES = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


@register_config
@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (Hugging Face peft's ``AdaLoraConfig`` fields and defaults).

    Training has three phases: ``tinit`` warm-up steps at the full ``init_r``, then a cubic
    decrease of the total rank budget until step ``total_step - tfinal`` (a re-allocation every
    ``deltaT`` steps), then ``tfinal`` steps of fine-tuning at the final ranks.

    Args:
        init_r: initial rank of every adapted layer.
        target_r: average rank per layer after pruning (``0 <= target_r <= init_r``).
        tinit: warm-up steps before pruning starts.
        tfinal: final fine-tuning steps after pruning ends.
        deltaT: steps between two budget allocations.
        beta1: EMA factor of the sensitivity smoothing (in (0, 1)).
        beta2: EMA factor of the uncertainty quantification (in (0, 1)).
        orth_reg_weight: weight of the orthogonality regulariser added to the loss (>= 0).
        total_step: total number of training steps (required, > 0).
        rank_pattern: the allocator's result, ``{"<module>.lora_E": [kept?, ...]}``; written on
            save and used on load to shape the layers. Leave None when creating an adapter.
        lora_alpha, lora_dropout, target_modules, ...: as in :class:`fastpeft.LoraConfig`
            (``r`` is unused: use ``init_r``). The update is scaled by ``lora_alpha / ranknum``.
    """

    _peft_type = PeftType.ADALORA

    target_r: int = field(default=8, metadata={"help": "Target average rank"})
    init_r: int = field(default=12, metadata={"help": "Initial rank"})
    tinit: int = field(default=0)
    tfinal: int = field(default=0)
    deltaT: int = field(default=1)
    beta1: float = field(default=0.85)
    beta2: float = field(default=0.85)
    orth_reg_weight: float = field(default=0.5)
    total_step: Optional[int] = field(default=None)
    rank_pattern: Optional[dict] = field(default=None)

    def __post_init__(self) -> None:
        # LoraConfig validates rank_pattern as {regex: int}; AdaLoRA's is {module: [bool, ...]}
        rank_pattern, self.rank_pattern = self.rank_pattern, None
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA; set use_dora=False (or use LoraConfig(use_dora=True)).")
        super().__post_init__()
        self.rank_pattern = rank_pattern
        if self.r != 8:
            warnings.warn("AdaLoraConfig ignores `r`; the initial rank is `init_r` (set init_r instead).")
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"AdaLoraConfig.{name} must be an integer, got {value!r}")
        if self.init_r < 1:
            raise ValueError(f"AdaLoraConfig: init_r must be >= 1, got init_r={self.init_r}.")
        if self.target_r < 0:
            raise ValueError(f"AdaLoraConfig: target_r must be >= 0, got target_r={self.target_r}.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoraConfig: target_r={self.target_r} is larger than init_r={self.init_r}; AdaLoRA only prunes "
                "ranks, so the target must not exceed the initial rank. Lower target_r or raise init_r."
            )
        if self.total_step is None or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ValueError(
                f"AdaLoraConfig: total_step must be the number of training steps (an integer > 0), got {self.total_step!r}; "
                "the rank budget schedule needs it."
            )
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"AdaLoraConfig: tinit and tfinal must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"AdaLoraConfig: tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no steps "
                "for pruning (need tinit < total_step - tfinal). Decrease tinit/tfinal or increase total_step."
            )
        if self.deltaT < 1:
            raise ValueError(f"AdaLoraConfig: deltaT (steps between budget allocations) must be >= 1, got {self.deltaT}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"AdaLoraConfig: {name} is an EMA factor and must lie in (0, 1), got {value}.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig: orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise TypeError("AdaLoraConfig.rank_pattern must be a dict {module.lora_E: [bool, ...]} or None.")


class AdaLoraLayer(BaseTunerLayer):
    """Per-adapter SVD-form state: ``lora_A`` / ``lora_E`` / ``lora_B`` and the frozen ``ranknum``."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def _init_adalora(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self._ranknum_value: Dict[str, float] = {}  # python copy of ranknum (no device sync in forward)
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init_lora_weights) -> None:
        """Create (or re-create at rank ``r``) adapter ``adapter_name`` on this layer."""
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"AdaLoRA rank must be an integer >= 0, got {r!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        device = weight.device if weight.device.type != "meta" else None
        # same draw order as peft (A, E, B), so a seeded init_lora_weights=False matches it
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features).to(device=device, dtype=dtype))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1).to(device=device, dtype=dtype))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r).to(device=device, dtype=dtype))
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(r), device=device, dtype=dtype), requires_grad=False)
        self._ranknum_value[adapter_name] = float(r)
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        if init_lora_weights:
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self.set_adapter(self.active_adapters)

    def set_ranknum(self, adapter_name: str, value: float) -> None:
        with torch.no_grad():
            self.ranknum[adapter_name].fill_(float(value))
        self._ranknum_value[adapter_name] = float(self.ranknum[adapter_name].item())

    def _scale(self, adapter: str) -> float:
        # peft divides by (ranknum + 1e-5) computed in the parameter's dtype
        rn = self._ranknum_value.get(adapter)
        if rn is None:
            rn = float(self.ranknum[adapter].item())
        denom = float(torch.tensor(rn, dtype=self.ranknum[adapter].dtype) + 1e-5)
        return self.scaling[adapter] / denom

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._ranknum_value.pop(adapter_name, None)


class SVDLinear(nn.Module, AdaLoraLayer):
    """AdaLoRA on ``nn.Linear`` (or GPT-2's ``Conv1D`` with ``fan_in_fan_out=True``)."""

    native_fused_op = "lora_linear"  # fastpeft.patch reports these layers as native

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0, fan_in_fan_out: bool = False, init_lora_weights: Union[bool, str] = True, **kwargs: Any):
        super().__init__()
        weight = base_layer.weight
        if fan_in_fan_out:
            in_features, out_features = weight.shape
        else:
            out_features, in_features = weight.shape
        self._init_adalora(base_layer, in_features, out_features)
        self.get_base_layer().weight.requires_grad_(False)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B (A * E) * scaling / (ranknum + 1e-5)`` in the base weight's layout and dtype."""
        weight = self.get_base_layer().weight
        delta = (self.lora_B[adapter] @ (self.lora_A[adapter] * self.lora_E[adapter])) * self.scaling[adapter] / (self.ranknum[adapter] + 1e-5)
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Add the adapters' updates into the base weight (``safe_merge`` checks for NaN/inf first)."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.lora_A and a not in self.merged_adapters]
        base = self.get_base_layer()
        for adapter in names:
            with torch.no_grad():
                delta = self.get_delta_weight(adapter)
                if safe_merge:
                    merged = base.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; the adapter seems broken.")
                    base.weight.data = merged
                else:
                    base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's update from the base weight."""
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                with torch.no_grad():
                    base.weight.data -= self.get_delta_weight(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A and self.r[a] > 0]
        base = self.get_base_layer()
        fused_ok = bool(active) and not args and not kwargs and x.dtype == base.weight.dtype == self.lora_A[active[0]].dtype
        if fused_ok:
            first, rest = active[0], active[1:]
            drop = self.lora_dropout[first]
            weight = base.weight.t() if self.fan_in_fan_out else base.weight
            result = lora_linear(
                x, weight, base.bias, self.lora_A[first] * self.lora_E[first], self.lora_B[first], self._scale(first),
                dropout_p=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0, training=self.training,
            )
        else:
            rest = active
            result = self.base_layer(x, *args, **kwargs)
        for a in rest:
            xa = x.to(self.lora_A[a].dtype)
            result = result + lora_delta(xa, self.lora_A[a] * self.lora_E[a], self.lora_B[a], self._scale(a), self.lora_dropout[a]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()


class RankAllocator:
    """AdaLoRA's budget allocator (paper: https://openreview.net/forum?id=lq62uWRJjiY).

    Keeps, per adapter parameter, the smoothed sensitivity ``I = EMA_beta1(|p * grad|)`` and its
    uncertainty ``U = EMA_beta2(|ipt - I|)``; a singular triplet's score is ``s(E_i) +
    mean_j s(A_ij) + mean_k s(B_ki)`` with ``s = I * U``. On each allocation the triplets with
    the lowest scores, beyond the current budget, get ``E_i = 0``.
    """

    def __init__(self, tuner: "AdaLoraModel", config: AdaLoraConfig, adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.beta1 = config.beta1
        self.beta2 = config.beta2
        self.reset_ipt()
        layers = self._layers(tuner)
        self.init_bgt = sum(layer.lora_A[adapter_name].shape[0] for _, layer in layers)
        self.target_bgt = config.target_r * len(layers)

    def _layers(self, tuner: "AdaLoraModel") -> List[Tuple[str, SVDLinear]]:
        return [(n, l) for n, l in tuner.tuner_layers() if isinstance(l, AdaLoraLayer) and self.adapter_name in l.lora_A]

    def reset_ipt(self) -> None:
        """Forget the accumulated importance statistics."""
        self.ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_unc: Dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """``(total rank budget, whether to re-allocate)`` at training step ``step``."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (frac**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self, tuner: "AdaLoraModel") -> None:
        """Fold the current gradients into the smoothed sensitivity and uncertainty."""
        for name, layer in self._layers(tuner):
            for attr in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, attr)[self.adapter_name]
                key = f"{name}.{attr}.{self.adapter_name}"
                if p.grad is None:
                    raise RuntimeError(
                        f"AdaLoRA update_and_allocate: {key} has no gradient. Call model.base_model.update_and_allocate(step) "
                        "after loss.backward() (and optimizer.step()) but before optimizer.zero_grad()."
                    )
                with torch.no_grad():
                    if key not in self.exp_avg_ipt:
                        self.exp_avg_ipt[key] = torch.zeros_like(p)
                        self.exp_avg_unc[key] = torch.zeros_like(p)
                    ipt = (p * p.grad).abs()
                    self.ipt[key] = ipt
                    self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt
                    self.exp_avg_unc[key] = self.beta2 * self.exp_avg_unc[key] + (1 - self.beta2) * (ipt - self.exp_avg_ipt[key]).abs()

    def _score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, tuner: "AdaLoraModel", budget: int) -> Dict[str, List[bool]]:
        """Zero the least important singular values so that ``budget`` triplets remain; returns the rank pattern."""
        a = self.adapter_name
        triplet: Dict[str, Tuple[AdaLoraLayer, torch.Tensor]] = {}
        for name, layer in self._layers(tuner):
            score_a = torch.mean(self._score(f"{name}.lora_A.{a}"), dim=1, keepdim=True)  # [r, 1]
            score_b = torch.mean(self._score(f"{name}.lora_B.{a}"), dim=0, keepdim=False).view(-1, 1)  # [r, 1]
            score_e = self._score(f"{name}.lora_E.{a}")  # [r, 1]
            total = score_e.view(-1) + torch.cat([score_a, score_b], dim=1).sum(dim=1)
            triplet[f"{name}.lora_E.{a}"] = (layer, total.view(-1, 1))
        k = self.init_bgt - budget
        rank_pattern: Dict[str, List[bool]] = {}
        if k <= 0:
            threshold = -math.inf
        else:
            threshold = torch.kthvalue(torch.cat([t.view(-1) for _, t in triplet.values()]), k=k)[0].item()
        with torch.no_grad():
            for key, (layer, score) in triplet.items():
                pruned = score <= threshold
                layer.lora_E[a].masked_fill_(pruned, 0.0)
                rank_pattern[key] = (~pruned).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, tuner: "AdaLoraModel", global_step: int, force_mask: bool = False):
        """Update the scores (before the final phase) and re-allocate when the schedule says so."""
        if global_step < self.config.total_step - self.config.tfinal:
            self.update_ipt(tuner)
        budget, mask_now = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(tuner, budget) if (mask_now or force_mask) else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, tuner: "AdaLoraModel", rank_pattern: Dict[str, List[bool]]) -> None:
        """Re-apply a fixed rank pattern (the optimizer may have moved pruned singular values off zero)."""
        a = self.adapter_name
        with torch.no_grad():
            for name, layer in self._layers(tuner):
                key = f"{name}.lora_E.{a}"
                keep = rank_pattern.get(key, rank_pattern.get(f"{name}.lora_E"))
                if keep is None:
                    continue
                mask = torch.tensor(keep, dtype=torch.bool, device=layer.lora_E[a].device).unsqueeze(-1)
                layer.lora_E[a].masked_fill_(~mask, 0.0)


class AdaLoraModel(LoraModel):
    """The AdaLoRA tuner: injects :class:`SVDLinear` layers and allocates their ranks during training.

    Usually built through :func:`fastpeft.get_peft_model` with an :class:`AdaLoraConfig`. In the
    training loop call ``model.base_model.update_and_allocate(global_step)`` after
    ``optimizer.step()`` and before ``optimizer.zero_grad()``.
    """

    prefix = "lora_"

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default"):
        super().__init__(model, peft_config, adapter_name)
        config = self.peft_config[adapter_name]
        self.trainable_adapter_name: Optional[str] = None
        if config.inference_mode:
            for n, p in self.model.named_parameters():
                if f".{adapter_name}" in n:
                    p.requires_grad_(False)
        else:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self, config, adapter_name)
        self._orth_hook = self.model.register_forward_hook(self._add_orthogonal_regularizer)

    # --- injection ------------------------------------------------------------------------
    def _prepare_adapter_config(self, config: AdaLoraConfig, model_config: Dict[str, Any]) -> AdaLoraConfig:
        if config.target_modules is None:
            config.target_modules = default_modules(ADALORA_TARGET_MODULES, model_config, "AdaLoRA target modules",
                                                    "target_modules (e.g. ['q_proj', 'v_proj'])")
        return config

    def _check_new_adapter_config(self, config: AdaLoraConfig) -> None:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError(
                f"AdaLoraModel trains one adapter at a time, but adapters {trainable} are all trainable. "
                "Load or add the others with inference_mode=True."
            )

    def _create_and_replace(self, config: AdaLoraConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str) -> None:
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, config.init_r, config.lora_alpha, config.lora_dropout, config.init_lora_weights)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        fan_in_fan_out = linear_fan_in_fan_out(base, config.fan_in_fan_out)
        if fan_in_fan_out is None:
            raise ValueError(
                f"Target module {current_key!r} is a {type(base).__module__}.{type(base).__name__}, which AdaLoRA "
                "does not support in fastpeft. Supported: torch.nn.Linear and transformers' Conv1D; target other modules."
            )
        config.fan_in_fan_out = fan_in_fan_out
        new = SVDLinear(
            target, adapter_name, r=config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            fan_in_fan_out=config.fan_in_fan_out, init_lora_weights=config.init_lora_weights,
        )
        if adapter_name not in self.active_adapters:
            new.set_adapter(self.active_adapters)
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    # --- training -------------------------------------------------------------------------
    def orthogonal_regularizer(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """``mean over A and B of ||P P^T - I||_F`` (``A``: rows orthonormal; ``B``: columns orthonormal)."""
        adapter_name = adapter_name or self.trainable_adapter_name
        total = 0.0
        count = 0
        for _, layer in self.tuner_layers():
            if not isinstance(layer, AdaLoraLayer) or adapter_name not in layer.lora_A:
                continue
            for attr in ("lora_A", "lora_B"):
                p = getattr(layer, attr)[adapter_name]
                cov = p @ p.T if attr == "lora_A" else p.T @ p
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return total / count if count else torch.zeros(())

    def forward(self, *args: Any, **kwargs: Any):
        # through __call__, so the regulariser hook below runs (also when PeftModel calls the model directly)
        return self.model(*args, **kwargs)

    def _add_orthogonal_regularizer(self, module: nn.Module, args: Any, outputs: Any) -> Any:
        # forward hook on the wrapped model: a forward that computed a loss (labels given) gets
        # orth_reg_weight * regulariser added, as peft's AdaLoraModel.forward does
        loss = getattr(outputs, "loss", None)
        if self.trainable_adapter_name is not None and isinstance(loss, torch.Tensor):
            weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
            if weight < 0:
                raise ValueError(f"orth_reg_weight must be >= 0, got {weight}")
            outputs.loss = loss + weight * self.orthogonal_regularizer()
        return outputs

    def _unload_and_optionally_merge(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
        handle = self.__dict__.pop("_orth_hook", None)
        if handle is not None:
            handle.remove()
        return super()._unload_and_optionally_merge(merge, safe_merge, adapter_names)

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and prune ranks on the budget schedule.

        Call every training step after ``loss.backward()`` / ``optimizer.step()`` and before
        ``optimizer.zero_grad()``; ``tinit``, ``tfinal`` and ``deltaT`` are handled here. The
        current allocation is kept in ``peft_config[adapter].rank_pattern``.
        """
        if self.trainable_adapter_name is None:
            raise RuntimeError("update_and_allocate needs a trainable AdaLoRA adapter; this one was loaded with inference_mode=True.")
        config = self.peft_config[self.trainable_adapter_name]
        end = config.total_step - config.tfinal
        if global_step < end:
            _, rank_pattern = self.rankallocator.update_and_allocate(self, global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == end:
            _, rank_pattern = self.rankallocator.update_and_allocate(self, global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            self.rankallocator.reset_ipt()
        else:
            if config.rank_pattern:
                self.rankallocator.mask_using_rank_pattern(self, config.rank_pattern)

    def rank_counts(self, adapter_name: Optional[str] = None) -> Dict[str, int]:
        """``{module name: ranks kept}`` from the adapter's ``rank_pattern`` (or the layer ranks if none)."""
        adapter_name = adapter_name or self.trainable_adapter_name or self.active_adapters[0]
        pattern = self.peft_config[adapter_name].rank_pattern
        out: Dict[str, int] = {}
        for name, layer in self.tuner_layers():
            if not isinstance(layer, AdaLoraLayer) or adapter_name not in layer.lora_A:
                continue
            keep = None
            if pattern:
                keep = pattern.get(f"{name}.lora_E.{adapter_name}", pattern.get(f"{name}.lora_E"))
            out[name] = int(sum(bool(k) for k in keep)) if keep is not None else layer.r[adapter_name]
        return out

    # --- checkpoints ------------------------------------------------------------------------
    def resize_modules_by_rank_pattern(self, rank_pattern: Dict[str, Any], adapter_name: str) -> None:
        """Shrink each layer to the ranks its ``rank_pattern`` entry keeps (values and ``ranknum`` preserved)."""
        config = self.peft_config[adapter_name]
        for key, keep in rank_pattern.items():
            module_name = _module_of_rank_key(key, adapter_name)
            try:
                _, layer, _ = get_submodules(self.model, module_name)
            except AttributeError:
                raise ValueError(f"AdaLoRA rank_pattern names module {module_name!r}, which this model does not have.") from None
            if not isinstance(layer, AdaLoraLayer):
                raise ValueError(f"AdaLoRA rank_pattern names {module_name!r}, which is not an AdaLoRA layer.")
            idx = torch.as_tensor(keep, dtype=torch.bool).view(-1)
            if idx.numel() != layer.lora_A[adapter_name].shape[0]:
                if idx.numel() == 0 or int(idx.sum()) == layer.lora_A[adapter_name].shape[0]:
                    continue  # already resized
                raise ValueError(
                    f"AdaLoRA rank_pattern for {module_name!r} has {idx.numel()} entries but the layer has rank "
                    f"{layer.lora_A[adapter_name].shape[0]}; the pattern belongs to another init_r."
                )
            rank = int(idx.sum())
            with torch.no_grad():
                A = layer.lora_A[adapter_name][idx].clone()
                E = layer.lora_E[adapter_name][idx].clone()
                B = layer.lora_B[adapter_name][:, idx].clone()
                ranknum = float(layer.ranknum[adapter_name].item())
            trainable = layer.lora_A[adapter_name].requires_grad
            layer.update_layer(adapter_name, rank, config.lora_alpha, config.lora_dropout, config.init_lora_weights)
            with torch.no_grad():
                if rank > 0:
                    layer.lora_A[adapter_name].copy_(A)
                    layer.lora_E[adapter_name].copy_(E)
                    layer.lora_B[adapter_name].copy_(B)
                layer.set_ranknum(adapter_name, ranknum)  # the scale stays what training used
            for attr in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, attr)[adapter_name].requires_grad_(trainable)

    def _adapter_state_dict_for_save(self, adapter_name: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        # peft saves only the kept ranks and the rank_pattern with adapter names removed from its keys
        config = self.peft_config[adapter_name]
        if config.rank_pattern is None:
            return state_dict
        pattern = {k.replace(f".{adapter_name}", ""): v for k, v in config.rank_pattern.items()}
        config.rank_pattern = pattern
        out = dict(state_dict)
        for key, keep in pattern.items():
            module = key[: -len(".lora_E")] if key.endswith(".lora_E") else key.rsplit(".", 1)[0]
            idx = torch.as_tensor(keep, dtype=torch.bool).view(-1)
            rank = int(idx.sum())
            for attr in ("lora_E", "lora_A", "lora_B"):
                ck = f"base_model.model.{module}.{attr}"
                if ck not in out:
                    continue
                t = out[ck]
                dim = 1 if attr == "lora_B" else 0
                if t.shape[dim] != rank and t.shape[dim] == idx.numel():
                    out[ck] = t[:, idx] if attr == "lora_B" else t[idx]
        return out

    def _prepare_adapter_state_dict_load(self, adapter_name: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        config = self.peft_config[adapter_name]
        if config.rank_pattern is not None:
            self.resize_modules_by_rank_pattern(config.rank_pattern, adapter_name)
        return state_dict

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AdaLoraModel does not support add_weighted_adapter; convert to LoRA first.")


def _module_of_rank_key(key: str, adapter_name: str) -> str:
    # "<module>.lora_E.<adapter>" or "<module>.lora_E"
    parts = key.split(".")
    if parts[-1] == adapter_name and len(parts) >= 2 and parts[-2] == "lora_E":
        return ".".join(parts[:-2])
    if parts[-1] == "lora_E":
        return ".".join(parts[:-1])
    return ".".join(parts[:-2]) if adapter_name in parts[-1:] else ".".join(parts[:-1])
