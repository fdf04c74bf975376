"""What every injected-adapter method shares: the layer mixin and the model-level tuner.

A tuner (``LoraModel``, ``IA3Model``, ...) wraps the transformers model as ``self.model`` and
replaces each targeted submodule with a *tuner layer*: a module that keeps the original as
``base_layer`` and holds per-adapter parameters in ``nn.ModuleDict``/``nn.ParameterDict``
attributes named by ``adapter_layer_names``. This is Hugging Face peft's structure, so the
state-dict keys (``...q_proj.lora_A.default.weight``) and the checkpoint keys (adapter name
removed) are the same in both libraries.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastpeft.config import PeftConfig, PeftType
from fastpeft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from fastpeft.utils.modules import (
    ModulesToSaveWrapper,
    closest_module_names,
    get_submodules,
    layer_index_of,
    set_modules_to_save,
)


# peft_type -> tuner class; each tuner module registers itself (see fastpeft/tuners/__init__.py)
PEFT_TYPE_TO_TUNER: Dict[PeftType, type] = {}


def register_tuner(peft_type: PeftType, tuner_cls: type) -> None:
    """Make ``tuner_cls`` the tuner that :class:`fastpeft.PeftModel` builds for ``peft_type``."""
    PEFT_TYPE_TO_TUNER[PeftType(peft_type)] = tuner_cls


class BaseTunerLayer:
    """Mixin of every tuner layer: active adapters, merge bookkeeping, enable/disable.

    Subclasses set ``adapter_layer_names`` (attributes holding trainable per-adapter
    parameters) and ``other_param_names`` (per-adapter hyper-parameters, e.g. ``r``).
    """

    adapter_layer_names: Tuple[str, ...] = ()
    other_param_names: Tuple[str, ...] = ()

    _active_adapter: Union[str, List[str]] = "default"
    _disable_adapters: bool = False
    merged_adapters: List[str]

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._active_adapter = ["default"]
        self._disable_adapters = False
        self.merged_adapters = []

    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped module (a tuner layer may wrap another)."""
        base = self
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def active_adapters(self) -> List[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    @property
    def active_adapter(self) -> Union[str, List[str]]:
        return self._active_adapter

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def adapters(self) -> List[str]:
        """Names of the adapters this layer holds."""
        names: List[str] = []
        for attr in self.adapter_layer_names:
            for k in getattr(self, attr).keys():
                if k not in names:
                    names.append(k)
        return names

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters of this layer on or off (off: the base layer alone; merged adapters are unmerged)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for attr in self.adapter_layer_names:
                getattr(self, attr).requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_names`` active: their parameters train, the others are frozen."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for attr in self.adapter_layer_names:
            layer = getattr(self, attr)
            for key, sub in layer.items():  # nn.Module or nn.Parameter: both take requires_grad_
                sub.requires_grad_(key in adapter_names)
        self._active_adapter = list(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s parameters from this layer."""
        for attr in self.adapter_layer_names + self.other_param_names:
            store = getattr(self, attr, None)
            if store is not None and adapter_name in store:
                del store[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining:
                remaining = self.adapters()[:1]
            if remaining:
                self.set_adapter(remaining)
            else:
                self._active_adapter = []

    # merge API, implemented per method
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support merging")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support unmerging")


class BaseTuner(nn.Module):
    """Model-level tuner: injects tuner layers into ``model`` for each adapter config.

    Subclasses define ``prefix`` (the parameter-name prefix, e.g. ``"lora_"``),
    ``_create_and_replace`` and optionally ``_prepare_adapter_config``.
    """

    prefix: str = ""
    layer_cls: type = BaseTunerLayer

    def __init__(self, model: nn.Module, peft_config: Union[PeftConfig, Dict[str, PeftConfig]], adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: Dict[str, PeftConfig] = {}
        self.active_adapter: Union[str, List[str]] = adapter_name
        if isinstance(peft_config, PeftConfig):
            peft_config = {adapter_name: peft_config}
        self.peft_config.update(peft_config)
        self.inject_adapter(self.model, adapter_name)
        # peft sets this so transformers' integrations see an adapter-carrying model
        self.model.peft_config = self.peft_config

    # --- plumbing -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any):
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> List[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def tuner_layers(self) -> Iterable[Tuple[str, BaseTunerLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, BaseTunerLayer):
                yield name, module

    # --- injection ------------------------------------------------------------------------
    def _prepare_adapter_config(self, config: PeftConfig, model_config: Dict[str, Any]) -> PeftConfig:
        return config

    def _check_target_module_exists(self, config: PeftConfig, key: str) -> bool:
        return check_target_module_exists(config, key)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        raise NotImplementedError

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        pass

    def inject_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Replace every targeted submodule of ``model`` with a tuner layer for ``adapter_name``."""
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        model_config = _adapter_model_config(model)
        config = self._prepare_adapter_config(config, model_config)
        targets = getattr(config, "target_modules", None)
        expanded_all_linear = isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
        resolve_all_linear(config, model)
        self.peft_config[adapter_name] = config
        modules_to_save = set(getattr(config, "modules_to_save", None) or [])

        matched: List[str] = []
        keys = [key for key, _ in model.named_modules()]
        for key in keys:
            if not key or self._inside_tuner_internals(model, key):
                continue
            if any(key == m or key.endswith("." + m) or ("." + m + ".") in ("." + key + ".") for m in modules_to_save):
                continue
            if not self._check_target_module_exists(config, key):
                continue
            parent, target, target_name = get_submodules(model, key)
            self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            matched.append(key)

        if not matched:
            wanted = config.target_modules if hasattr(config, "target_modules") else None
            wanted_list = [wanted] if isinstance(wanted, str) else list(wanted or [])
            hint = closest_module_names(model, wanted_list)
            extra = ""
            if getattr(config, "layers_to_transform", None) is not None:
                extra = f" with layers_to_transform={config.layers_to_transform}"
            raise ValueError(
                f"Target modules {wanted_list} not found in the base model{extra}. "
                f"Module names that look close: {hint}. Set target_modules to names that exist "
                "(a list of name suffixes, a regex, or 'all-linear')."
            )
        if expanded_all_linear:  # user-given names (e.g. IA3's "mlp.c_proj") are saved as given, like peft
            compact_target_modules(config, model, matched)
        set_modules_to_save(model, sorted(modules_to_save), adapter_name)
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable(model)
        if getattr(config, "inference_mode", False):
            for n, p in model.named_parameters():
                if adapter_name in n:
                    p.requires_grad_(False)

    @staticmethod
    def _inside_tuner_internals(model: nn.Module, key: str) -> bool:
        # never wrap the parameters of an existing tuner layer, nor a modules_to_save copy
        parts = key.split(".")
        for i in range(1, len(parts)):
            parent = model.get_submodule(".".join(parts[:i]))
            if isinstance(parent, (BaseTunerLayer, ModulesToSaveWrapper)):
                return True
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but the active adapters' parameters (and biases as ``config.bias`` says)."""
        for n, p in model.named_parameters():
            if self.prefix not in n and ".modules_to_save." not in n:
                p.requires_grad_(False)
        for name, layer in self.tuner_layers():
            layer.set_adapter(layer.active_adapters)
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(module._active_adapter)
        for adapter in self.active_adapters:
            bias = getattr(self.peft_config[adapter], "bias", "none")
            if bias == "all":
                for n, p in model.named_parameters():
                    if (n == "bias" or n.endswith(".bias")) and ".original_module." not in n:
                        p.requires_grad_(True)
            elif bias.endswith("_only"):
                for _, layer in self.tuner_layers():
                    b = getattr(layer.get_base_layer(), "bias", None)
                    if b is not None:
                        b.requires_grad_(True)
            elif bias != "none":
                raise ValueError(f"bias must be 'none', 'all' or '{self.prefix}only', got {bias!r}")

    # --- adapter management ---------------------------------------------------------------
    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activate ``adapter_name`` (or several) in every tuner layer and modules_to_save wrapper."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"Adapter {n!r} not found; loaded adapters: {list(self.peft_config)}")
        for _, layer in self.tuner_layers():
            if layer.merged:
                layer.unmerge()
            layer.set_adapter([n for n in names if n in layer.adapters()] or names)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names[0] if names[0] in module.modules_to_save else None)
        self.active_adapter = names[0] if len(names) == 1 else names

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)
            elif isinstance(module, ModulesToSaveWrapper):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for _, layer in self.tuner_layers():
            if layer.merged:
                layer.unmerge()
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer and from ``peft_config``."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; loaded adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for _, layer in self.tuner_layers():
            layer.delete_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(adapter_name)
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
            self.active_adapter = remaining[0] if len(remaining) == 1 else remaining

    # --- merging --------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = False) -> None:
        """Add the active (or named) adapters' updates into the base weights, in place."""
        for _, layer in self.tuner_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Subtract previously merged updates from the base weights."""
        for _, layer in self.tuner_layers():
            layer.unmerge()

    def _unload_and_optionally_merge(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
        for key, layer in list(self.tuner_layers()):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            parent, target, name = get_submodules(self.model, key)
            setattr(parent, name, target.get_base_layer())
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, name = get_submodules(self.model, key)
                setattr(parent, name, module._current() if merge else module.original_module)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model."""
        return self._unload_and_optionally_merge(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the original base model."""
        return self._unload_and_optionally_merge(False)

    # --- checkpoint keys --------------------------------------------------------------------
    def adapter_key_map(self, adapter_name: str, prefix: str = "") -> Dict[str, str]:
        """``{checkpoint key: model key}`` for every adapter tensor of ``adapter_name``.

        Model keys carry the adapter name (``q_proj.lora_A.default.weight``); checkpoint keys
        do not (``q_proj.lora_A.weight``), as in peft.
        """
        mapping: Dict[str, str] = {}
        for name, layer in self.tuner_layers():
            base = f"{prefix}model.{name}" if name else f"{prefix}model"
            for attr in layer.adapter_layer_names:
                store = getattr(layer, attr)
                if adapter_name not in store:
                    continue
                item = store[adapter_name]
                if isinstance(item, nn.Parameter) or isinstance(item, torch.Tensor):
                    mapping[f"{base}.{attr}"] = f"{base}.{attr}.{adapter_name}"
                else:
                    for k in item.state_dict().keys():
                        mapping[f"{base}.{attr}.{k}"] = f"{base}.{attr}.{adapter_name}.{k}"
        return mapping

    def _adapter_state_dict_for_save(self, adapter_name: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hook: adjust the checkpoint tensors of ``adapter_name`` before they are returned/saved
        (e.g. AdaLoRA keeps only the ranks its rank_pattern kept). Default: unchanged."""
        return state_dict

    def _prepare_adapter_state_dict_load(self, adapter_name: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hook: prepare the model (and the tensors) before checkpoint tensors are loaded into
        ``adapter_name`` (e.g. AdaLoRA resizes its layers to the saved rank_pattern). Default: unchanged."""
        return state_dict

    def extra_state_key_map(self, adapter_name: str, prefix: str = "") -> Dict[str, str]:
        """``{checkpoint key: model key}`` of tensors saved besides the adapter's own (learnable biases).

        With ``bias="all"`` peft saves every ``*.bias`` of the model, adapter names removed
        (so a ``modules_to_save`` copy's bias appears as ``classifier.modules_to_save.bias``); this
        reproduces that key set exactly.
        """
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        out: Dict[str, str] = {}
        if bias == "all":
            others = [a for a in self.peft_config if a != adapter_name]
            for n, _ in self.model.named_parameters():
                if not n.endswith(".bias") and n != "bias":
                    continue
                if any(f".{o}." in n for o in others):
                    continue
                key = f"{prefix}model.{n}"
                out[key.replace(f".{adapter_name}.", ".")] = key
        elif bias.endswith("_only"):
            for name, layer in self.tuner_layers():
                if getattr(layer.get_base_layer(), "bias", None) is not None:
                    key = f"{prefix}model.{name}.base_layer.bias"
                    out[key] = key
        return out


def _adapter_model_config(model: nn.Module) -> Dict[str, Any]:
    """peft's ``model_config`` for ``_prepare_adapter_config``: the whole model config as a dict
    (``{"model_type": "custom"}`` for a model without one, as peft does)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {"model_type": "custom"}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def check_target_module_exists(config: PeftConfig, key: str) -> bool:
    """Does module name ``key`` match ``config.target_modules`` (peft's rules)?

    A string is a full-match regex; a list matches names equal to an entry or ending with
    ``"." + entry``; ``layers_to_transform`` / ``layers_pattern`` restrict to some blocks;
    ``exclude_modules`` wins over everything.
    """
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    found = key in targets or any(key.endswith("." + t) for t in targets)
    layers = getattr(config, "layers_to_transform", None)
    if found and layers is not None and not (isinstance(layers, list) and len(layers) == 0):
        idx = layer_index_of(key, getattr(config, "layers_pattern", None))
        if idx is None:
            return False
        wanted = [layers] if isinstance(layers, int) else list(layers)
        found = idx in wanted
    return found


def resolve_all_linear(config: PeftConfig, model: nn.Module) -> None:
    """Expand ``target_modules="all-linear"`` into the model's linear layers minus the output head."""
    targets = getattr(config, "target_modules", None)
    if not (isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(name)
        elif isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__:
            names.add(name)
    exclude = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        exclude.update(n for n, m in model.named_modules() if m is out)
    elif str(getattr(config, "task_type", "")) == "SEQ_CLS":
        for head in SEQ_CLS_HEAD_NAMES:
            mod = getattr(model, head, None)
            if mod is not None:
                exclude.update(n for n, m in model.named_modules() if m is mod)
                break
    for prefix, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            for suffix, _ in module.named_modules():
                if suffix:
                    exclude.add(f"{prefix}.{suffix}")
    config.target_modules = names - exclude


def compact_target_modules(config: PeftConfig, model: nn.Module, matched: List[str]) -> None:
    """Replace a set of full module names by the shortest suffixes that select exactly the same modules."""
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, (set, frozenset)):
        return
    leaves = sorted({m.rsplit(".", 1)[-1] for m in matched})
    all_names = [k for k, _ in model.named_modules()]
    selected = {k for k in all_names if any(k == l or k.endswith("." + l) for l in leaves) and not BaseTuner._inside_tuner_internals(model, k)}
    config.target_modules = set(leaves) if selected == set(matched) else set(matched)


def default_modules(table: Dict[str, Sequence[str]], model_config: Dict[str, Any], what: str, fix: str) -> set:
    """``table[model_type]`` as a set: a method's default modules for the base model's type.

    Raises a ``ValueError`` ("No default {what} for model type ...; set {fix}.") for a model type
    the table does not know."""
    model_type = model_config.get("model_type")
    if model_type not in table:
        raise ValueError(f"No default {what} for model type {model_type!r}; set {fix}.")
    return set(table[model_type])


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_fan_in_fan_out(base: nn.Module, fan_in_fan_out: bool) -> Optional[bool]:
    """The ``fan_in_fan_out`` a plain linear base layer needs, or ``None`` if ``base`` is not one.

    ``nn.Linear`` (not a quantised subclass) needs ``False``, a ``Conv1D`` needs ``True``; when the
    config says otherwise a warning says so and the corrected value is returned (as peft does).
    """
    if isinstance(base, nn.Linear) and type(base).__name__ not in ("Linear4bit", "Linear8bitLt"):
        if fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the target is nn.Linear; setting fan_in_fan_out=False.")
        return False
    if is_conv1d(base):
        if not fan_in_fan_out:
            warnings.warn("The target is a Conv1D (GPT-2 style, weight stored (in, out)); setting fan_in_fan_out=True.")
        return True
    return None
