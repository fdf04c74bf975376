"""Let transformers' ``Trainer``, accelerate and TRL's ``SFTTrainer`` take fastpeft models and configs.

Those libraries recognise adapters with ``isinstance`` against Hugging Face peft's classes, so a
fastpeft model would be saved as a full ``model.safetensors``, never reloaded as an adapter on
resume, refused on a 4-bit base, and ``SFTTrainer(peft_config=fastpeft.LoraConfig(...))`` would
raise ``TypeError``. :func:`enable` changes exactly these attributes (:data:`CHANGES`), each
replacement calling the original for anything that is not fastpeft's:

* ``transformers.trainer_utils._is_peft_model``: also True for a fastpeft ``PeftModel``
  (signature columns, resume through ``load_adapter``, 4-bit validation, NEFTune);
* ``transformers.trainer.Trainer._save``: a fastpeft model is written with ``save_pretrained``
  (adapter_config.json + adapter_model.safetensors), plus the tokenizer and training args;
* ``accelerate.utils.modeling.is_peft_model``: also True for a fastpeft ``PeftModel`` (TRL's
  checks, accelerate's FSDP adapter-only state dicts);
* ``trl.trainer.sft_trainer.PeftConfig``: ``(peft.PeftConfig, fastpeft.PeftConfig)``, so the
  ``isinstance`` check of ``SFTTrainer`` accepts fastpeft configs;
* ``trl.trainer.sft_trainer.get_peft_model``: a fastpeft config is applied with
  :func:`fastpeft.get_peft_model`, a peft config with peft's.

The two check functions are also imported by name elsewhere (``from ..trainer_utils import
_is_peft_model``): in every loaded module of those three packages, a global of that name bound to
the original is rebound to the replacement (modules imported later bind the replacement
themselves). :func:`applied` lists every attribute changed now, those bindings included;
:func:`disable` puts every original back, in those bindings too.

When: fastpeft calls :func:`enable` the first time a fastpeft ``PeftConfig`` is created (every
``PeftModel`` starts from one; it imports ``transformers.trainer`` and, when installed, ``trl.trainer.sft_trainer``;
packages that are not installed are skipped). Call :func:`disable` to undo it; after that
fastpeft does not enable it again unless you call :func:`enable`. There is no import hook: nothing
here runs when other packages are imported.

This module imports fastpeft's API only inside the replacements, when those libraries call them
(``fastpeft.config`` imports this module and calls :func:`auto_enable`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["CHANGES", "Change", "enable", "disable", "applied", "auto_enable"]

logger = logging.getLogger("fastpeft")

_PACKAGES = ("transformers", "accelerate", "trl")


@dataclass(frozen=True)
class Change:
    """One attribute :func:`enable` replaces: ``module``'s (dotted) ``attribute`` becomes
    ``replacement(original)``; ``alias_name``: other modules import it by name, and their
    bindings are rebound too."""

    module: str
    attribute: str
    alias_name: bool
    replacement: Callable[[Any], Any]


# (module, dotted attribute) -> (original, replacement), for each entry of CHANGES applied now
_active: Dict[Tuple[str, str], Tuple[Any, Any]] = {}
_auto = True  # auto_enable() still allowed (False after disable())
_tried = False  # enable() ran once (auto_enable() does not retry packages that are not installed)
_busy = False  # enable() is importing (a fastpeft config created meanwhile must not recurse)


# ----------------------------------------------------------------------------- replacements
def _is_fastpeft_model(model: Any) -> bool:
    from fastpeft.peft_model import PeftModel

    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):  # DDP, compile
        if isinstance(candidate, PeftModel):
            return True
    return False


def _accept_fastpeft(original: Callable) -> Callable:
    @functools.wraps(original)
    def check(model, *args, **kwargs):
        return _is_fastpeft_model(model) or original(model, *args, **kwargs)

    return check


def _save_with_save_pretrained(original: Callable) -> Callable:
    @functools.wraps(original)
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_fastpeft_model(model):
            return original(self, output_dir, state_dict)
        import torch

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, is_main_process=True)
        tok = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    return _save


def _also_fastpeft_configs(original: Any) -> Any:
    from fastpeft.config import PeftConfig

    return (original, PeftConfig)  # isinstance() takes a tuple of classes


def _dispatch_get_peft_model(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_peft_model(model, peft_config, *args, **kwargs):
        from fastpeft.config import PeftConfig
        from fastpeft.mapping import get_peft_model as fastpeft_get_peft_model

        if isinstance(peft_config, PeftConfig):
            return fastpeft_get_peft_model(model, peft_config, *args, **kwargs)
        return original(model, peft_config, *args, **kwargs)

    return get_peft_model


CHANGES: Tuple[Change, ...] = (
    Change("transformers.trainer_utils", "_is_peft_model", True, _accept_fastpeft),
    Change("transformers.trainer", "Trainer._save", False, _save_with_save_pretrained),
    Change("accelerate.utils.modeling", "is_peft_model", True, _accept_fastpeft),
    Change("trl.trainer.sft_trainer", "PeftConfig", False, _also_fastpeft_configs),
    Change("trl.trainer.sft_trainer", "get_peft_model", False, _dispatch_get_peft_model),
)


# ----------------------------------------------------------------------------- apply / undo
def _owner(module: Any, dotted: str) -> Tuple[Any, str]:
    *path, leaf = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def _import(name: str) -> Optional[Any]:
    """The module, or None when its package is not installed (or cannot be imported)."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return None
    try:
        return importlib.import_module(name)
    except Exception as exc:  # e.g. a trl that does not fit the installed transformers
        logger.info("fastpeft.integrations: %s not changed (import failed: %s)", name, exc)
        return None


def _apply(change: Change) -> None:
    key = (change.module, change.attribute)
    if key in _active:
        return
    module = _import(change.module)
    if module is None:
        return
    owner, leaf = _owner(module, change.attribute)
    original = owner.__dict__.get(leaf) if isinstance(owner, type) else getattr(owner, leaf, None)
    if original is None:
        logger.info("fastpeft.integrations: %s.%s not found; not changed", *key)
        return
    replacement = change.replacement(original)
    setattr(owner, leaf, replacement)
    _active[key] = (original, replacement)
    if change.alias_name:
        for alias_module in _bound_to(leaf, original):
            setattr(alias_module, leaf, replacement)


def _bound_to(name: str, value: Any) -> List[Any]:
    """Loaded modules of the three packages whose global ``name`` is ``value``."""
    found = []
    for mod_name, module in list(sys.modules.items()):
        if module is not None and mod_name.split(".")[0] in _PACKAGES and getattr(module, "__dict__", {}).get(name) is value:
            found.append(module)
    return found


def enable() -> List[str]:
    """Apply :data:`CHANGES` (idempotent; see the module docstring). Returns :func:`applied`."""
    global _auto, _busy, _tried
    _auto, _tried = True, True
    if _busy:
        return applied()
    _busy = True
    try:
        for change in CHANGES:
            _apply(change)
    finally:
        _busy = False
    logger.info("fastpeft.integrations: changed %s", ", ".join(applied()) or "nothing (packages not installed)")
    return applied()


def auto_enable() -> None:
    """What ``PeftConfig.__post_init__`` calls: :func:`enable` once, unless :func:`disable` was called."""
    if _auto and not _tried:
        enable()


def disable() -> List[str]:
    """Put every original back (also where other modules imported a replacement by name) and stop
    fastpeft from enabling again; returns what was restored."""
    global _auto
    _auto = False
    restored = applied()
    by_key = {(c.module, c.attribute): c for c in CHANGES}
    for key, (original, replacement) in _active.items():
        owner, leaf = _owner(sys.modules[key[0]], key[1])
        setattr(owner, leaf, original)
        if by_key[key].alias_name:
            for module in _bound_to(leaf, replacement):
                setattr(module, leaf, original)
    _active.clear()
    return restored


def applied() -> List[str]:
    """``"module.attribute"`` for every attribute changed now (aliases included)."""
    names = []
    for (mod_name, dotted), (_, replacement) in _active.items():
        names.append(f"{mod_name}.{dotted}")
        if "." not in dotted:
            names += sorted(f"{m.__name__}.{dotted}" for m in _bound_to(dotted, replacement) if m.__name__ != mod_name)
    return names
