"""transformers ``Trainer`` callbacks for fastpeft (and Hugging Face peft) models.

Imported on first use (``fastpeft.AdaLoraCallback``), so ``import fastpeft`` does not import
the Trainer stack.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

__all__ = ["AdaLoraCallback", "PatchCallback"]

logger = logging.getLogger("fastpeft")


def _adalora_tuner(model):
    """The AdaLoRA tuner (``model.base_model``) of a fastpeft or peft model, unwrapping DDP."""
    model = getattr(model, "module", model)
    tuner = getattr(model, "base_model", None)
    if tuner is None or not callable(getattr(tuner, "update_and_allocate", None)):
        raise TypeError(
            f"AdaLoraCallback needs an AdaLoRA PeftModel (get_peft_model(base, AdaLoraConfig(...))), got "
            f"{type(model).__name__} whose base_model has no update_and_allocate; remove the callback for other methods"
        )
    return tuner


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA's rank allocation inside transformers' ``Trainer``.

    AdaLoRA must call ``model.base_model.update_and_allocate(global_step)`` after every optimizer
    step and before the gradients are zeroed (the importance scores read ``|p * grad|``). The
    Trainer has no such hook for PEFT models; this callback makes that call from
    ``on_optimizer_step``, once per optimizer step (so once per ``gradient_accumulation_steps``
    micro-batches), with the 0-based step index peft's examples use. Works with fastpeft's and
    peft's AdaLoRA models::

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[fastpeft.AdaLoraCallback()])

    At the start of training it warns when the adapter's ``total_step`` differs from the run's
    ``max_steps`` (the pruning schedule would end too early or never finish).
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = _adalora_tuner(model)
        for name, config in getattr(tuner, "peft_config", {}).items():
            total = getattr(config, "total_step", None)
            if total is not None and state.max_steps and total != state.max_steps:
                logger.warning(
                    "AdaLoRA adapter %r has total_step=%s but this run trains %s optimizer steps; the rank "
                    "schedule (tinit/tfinal) is laid out over total_step. Set AdaLoraConfig(total_step=%s) to match.",
                    name, total, state.max_steps, state.max_steps,
                )
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        _adalora_tuner(model).update_and_allocate(state.global_step)
        return control


class PatchCallback(TrainerCallback):
    """Runs :func:`fastpeft.patch` on the model a ``Trainer`` / TRL ``SFTTrainer`` trains.

    With ``SFTTrainer(model, peft_config=peft.LoraConfig(...))`` the LoRA layers only exist once the
    trainer has wrapped the model, inside its constructor; calling ``fastpeft.patch`` on the model
    you passed in finds nothing. This callback patches ``trainer.model`` at the end of the
    trainer's construction (``on_init_end``, so evaluation before training runs patched too) and,
    should the model have been replaced since, again at ``on_train_begin``::

        trainer = trl.SFTTrainer(model=base, args=args, train_dataset=ds,
                                 peft_config=peft.LoraConfig(r=16, target_modules="all-linear"),
                                 callbacks=[fastpeft.PatchCallback()])
        trainer.train()

    Args:
        backend: passed to :func:`fastpeft.patch` (None: automatic, Triton for CUDA tensors).

    Attributes:
        report: the :class:`fastpeft.PatchReport` of the last patch (None before), also logged.
    """

    def __init__(self, backend=None):
        self.backend = backend
        self.report = None
        self._patched = None  # the module patched last (patching again is a no-op)

    def _patch(self, model):
        model = getattr(model, "module", model)  # DDP / accelerate wrappers
        if model is None or model is self._patched:
            return
        from fastpeft.patch import patch

        self.report = patch(model, backend=self.backend)
        self._patched = model
        logger.info("PatchCallback: %s", self.report)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._patch(model)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._patch(model)
        return control
