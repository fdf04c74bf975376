"""Module surgery shared by the tuners: find, replace and wrap submodules."""

from __future__ import annotations

import copy
import difflib
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn


def get_submodules(model: nn.Module, key: str) -> Tuple[nn.Module, nn.Module, str]:
    """``(parent, target, child_name)`` for the dotted module name ``key``."""
    parent_name, _, child_name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, getattr(parent, child_name), child_name


def closest_module_names(model: nn.Module, wanted: Iterable[str], limit: int = 8) -> List[str]:
    """Leaf module-name suffixes of ``model`` closest to the ``wanted`` names (for error messages)."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
    found: List[str] = []
    for w in wanted:
        for c in difflib.get_close_matches(str(w), suffixes, n=3, cutoff=0.4):
            if c not in found:
                found.append(c)
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        found = linear
    return found[:limit]


def layer_index_of(key: str, layers_pattern: Optional[Sequence[str]] = None) -> Optional[int]:
    """The transformer-block index in a module name (``model.layers.3.mlp`` -> 3), as peft finds it."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m is not None else None


def pattern_key(patterns: Iterable[str], key: str) -> Optional[str]:
    """The first pattern of ``rank_pattern``/``alpha_pattern`` that matches module name ``key``."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable copy per adapter (peft's ``modules_to_save``).

    Saved keys are the wrapped module's own keys (``score.weight``), as peft writes them.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: Optional[str] = None
        self._disabled = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    @property
    def weight(self):  # some transformers code reads head.weight (e.g. tied embeddings checks)
        return self._current().weight

    def _current(self) -> nn.Module:
        if self._disabled or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            copy_ = copy.deepcopy(self.original_module)
            copy_.requires_grad_(True)
            self.modules_to_save[adapter_name] = copy_
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        self._active_adapter = adapter_name
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)

    def enable_adapters(self, enabled: bool) -> None:
        self._disabled = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.modules_to_save), None)

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)


def set_modules_to_save(model: nn.Module, names: Optional[Sequence[str]], adapter_name: str) -> List[str]:
    """Wrap every module whose name ends with one of ``names`` in a :class:`ModulesToSaveWrapper`."""
    if not names:
        return []
    wrapped = []
    keys = [k for k, _ in model.named_modules()]
    for key in keys:
        if ".modules_to_save." in key or key.endswith(".original_module") or ".original_module." in key:
            continue
        if not any(key == n or key.endswith("." + n) for n in names):
            continue
        parent, target, child = get_submodules(model, key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(adapter_name)
        else:
            setattr(parent, child, ModulesToSaveWrapper(target, adapter_name))
        wrapped.append(key)
    return wrapped
