"""Make transformers' ``Trainer``, accelerate and TRL treat fastpeft models as PEFT models.

transformers recognises adapters with ``isinstance(model, peft.PeftModel)`` (``_is_peft_model``;
accelerate and TRL use ``is_peft_model``) and
saves anything else that is not a ``PreTrainedModel`` as a full ``model.safetensors`` state dict.
For a fastpeft model that would mean: no adapter files on save, no adapter reload on resume, and
a refusal to train 4-bit bases. :func:`install_trainer_support` teaches it otherwise:

* every ``_is_peft_model`` / ``is_peft_model`` in transformers, accelerate and TRL also answers
  True for :class:`fastpeft.PeftModel` (signature columns, resume via ``load_adapter``,
  quantized-base validation, NEFTune, TRL's fused LM head on ``get_base_model()``);
* ``Trainer._save`` writes fastpeft models with ``save_pretrained`` (adapter_config.json +
  adapter_model.safetensors), plus the tokenizer and training args as usual.

It runs when a fastpeft ``PeftModel`` is built: modules already imported are patched at once,
later ones right after their import (an import hook on those three packages), so fastpeft
never pays for importing the Trainer itself.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any, Optional

_PREFIXES = ("transformers.", "accelerate.", "trl.")
_CHECK_NAMES = ("_is_peft_model", "is_peft_model")
_hook_installed = False


def _is_fastpeft_model(model: Any) -> bool:
    from fastpeft.peft_model import PeftModel

    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    return isinstance(model, PeftModel) or isinstance(inner, PeftModel)


def _patch_module(name: str) -> None:
    """Wrap the module's PEFT-model checks so they also accept fastpeft models."""
    module = sys.modules.get(name)
    if module is None:
        return
    for attr in _CHECK_NAMES:
        original = module.__dict__.get(attr)
        if callable(original) and not getattr(original, "_fastpeft", False):

            def check(model, *args, _orig=original, **kwargs):
                return _is_fastpeft_model(model) or _orig(model, *args, **kwargs)

            check._fastpeft = True
            check.__doc__ = original.__doc__
            setattr(module, attr, check)
    if name == "transformers.trainer":
        trainer_cls = getattr(module, "Trainer", None)
        if trainer_cls is not None and not getattr(trainer_cls._save, "_fastpeft", False):
            trainer_cls._save = _wrap_save(trainer_cls._save)


def _wrap_save(original):
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

    _save._fastpeft = True
    return _save


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Patches the Trainer modules right after they are first imported."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_PREFIXES):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader
                original_exec = loader.exec_module

                def exec_module(module, _orig=original_exec, _name=fullname):
                    _orig(module)
                    _patch_module(_name)

                loader.exec_module = exec_module
                return spec
        return None


def install_trainer_support() -> None:
    """Idempotently teach transformers' Trainer about fastpeft models (see module docstring)."""
    global _hook_installed
    for name in [n for n in list(sys.modules) if n.startswith(_PREFIXES)]:
        _patch_module(name)
    if not _hook_installed:
        sys.meta_path.insert(0, _PostImportHook())
        _hook_installed = True
