"""``PeftModel`` and its task wrappers: adapters on a transformers model, save/load, generate.

The object tree is Hugging Face peft's: ``PeftModel.base_model`` is the tuner (``LoraModel``),
whose ``.model`` is the transformers model, so parameter names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``) and the
checkpoint keys written by :meth:`PeftModel.save_pretrained` (adapter name removed) match
peft's exactly.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from fastpeft.patch_loss import call_with_fused_loss, fused_loss_head, is_loss_patched
from fastpeft.config import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, PeftConfig, PeftType, TaskType
from fastpeft.prompt_learning import PromptLearningMixin
from fastpeft.tuners.base import PEFT_TYPE_TO_TUNER, BaseTuner, register_tuner  # noqa: F401
from fastpeft.utils.io import atomic_save_safetensors, load_adapter_weights
from fastpeft.utils.modules import ModulesToSaveWrapper

class PeftModel(PromptLearningMixin, nn.Module):
    """A transformers model with one or more adapters (Hugging Face peft's ``PeftModel`` API).

    Args:
        model: the base transformers model (weights are modified in place by injection).
        peft_config: the adapter's config (e.g. :class:`fastpeft.LoraConfig`).
        adapter_name: name of this first adapter (``"default"``).
        autocast_adapter_dtype: keep adapter weights in fp32 on fp16/bf16 bases (as peft does).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True, **kwargs: Any):
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a fastpeft PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self._is_prompt_learning = peft_config.is_prompt_learning
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_or_path(model)
        if self._is_prompt_learning:
            self._peft_config = {adapter_name: peft_config}
            self.base_model = model
            self.add_adapter(adapter_name, peft_config)
        else:
            self._peft_config = None
            tuner_cls = _tuner_for(peft_config)
            self.base_model = tuner_cls(model, {adapter_name: peft_config}, adapter_name)
        if _is_checkpointing(model):
            _enable_input_require_grads(model)

    # --- attributes -----------------------------------------------------------------------
    @property
    def peft_config(self) -> Dict[str, PeftConfig]:
        """``{adapter name: config}`` of every loaded adapter."""
        if self._is_prompt_learning:
            return self._peft_config
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: Dict[str, PeftConfig]) -> None:
        if self._is_prompt_learning:
            self._peft_config = value
        else:
            self.base_model.peft_config = value

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]]

    @property
    def active_adapters(self) -> List[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The transformers model inside (with the adapter layers injected)."""
        return self.base_model if self._is_prompt_learning else self.base_model.model

    # --- parameters ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """``(trainable, total)`` parameter counts (4-bit packed weights counted as peft does)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = p.ds_numel
            if p.__class__.__name__ == "Params4bit":
                n = n * 2 * (p.element_size() if hasattr(p, "element_size") else 1)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: ... || all params: ... || trainable%: ...`` (peft's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

    # --- adapters -------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (not made active; call :meth:`set_adapter`)."""
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"Cannot add a {peft_config.peft_type} adapter to a {self.peft_type} model; "
                "fastpeft holds adapters of one method per model."
            )
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_or_path(self.get_base_model())
        if self._is_prompt_learning:
            self._add_prompt_learning_adapter(adapter_name, peft_config)
            return
        if adapter_name in self.peft_config and adapter_name != self.active_adapter:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name.")
        self.base_model.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(self.base_model.model, adapter_name)
        except Exception:
            del self.base_model.peft_config[adapter_name]
            raise

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (LoRA: its parameters train, the others freeze;
        prompt learning: as peft, every prompt encoder keeps its own trainability)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; loaded adapters: {list(self.peft_config)}")
        self.active_adapter = adapter_name
        if self._is_prompt_learning:
            # as peft: the prompt encoders keep their trainability (only the active one is in the graph)
            for module in self.base_model.modules():
                if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                    module.set_adapter(adapter_name)
        else:
            self.base_model.set_adapter(adapter_name)
            if self.peft_config[adapter_name].inference_mode:
                for n, p in self.named_parameters():
                    if f".{adapter_name}." in n or n.endswith(f".{adapter_name}"):
                        p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` and its parameters."""
        if self._is_prompt_learning:
            raise NotImplementedError("Deleting prompt-learning adapters is not supported.")
        self.base_model.delete_adapter(adapter_name)
        self.active_adapter = self.base_model.active_adapter

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes the base model's outputs."""
        if self._is_prompt_learning:
            old = self._prompt_learning_disabled
            self._prompt_learning_disabled = True
            try:
                yield
            finally:
                self._prompt_learning_disabled = old
            return
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    _prompt_learning_disabled = False

    # --- forward / generate ---------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            if args:
                raise TypeError("Pass the inputs of a prompt-learning model as keywords (input_ids=..., attention_mask=...).")
            return self._prompt_forward_encoder(
                kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None), kwargs.pop("inputs_embeds", None),
                kwargs.pop("labels", None), kwargs, head="feature",
            )
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        """Generate with the active adapter (transformers' ``generate``)."""
        return self.get_base_model().generate(*args, **kwargs)

    def _enable_checkpointing(self, method: str, *args: Any, **kwargs: Any) -> None:
        base = self.get_base_model()
        fn = getattr(base, method, None)
        if fn is None:  # older transformers: only gradient_checkpointing_enable
            fn = base.gradient_checkpointing_enable
            if "activation_checkpointing_kwargs" in kwargs:
                kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
        fn(*args, **kwargs)
        _enable_input_require_grads(base)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Enable activation (gradient) checkpointing on the base model, with input grads so frozen embeddings still backprop."""
        self._enable_checkpointing("activation_checkpointing_enable", *args, **kwargs)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (transformers' older name)."""
        name = "activation_checkpointing_enable" if hasattr(self.get_base_model(), "activation_checkpointing_enable") else "gradient_checkpointing_enable"
        if name == "activation_checkpointing_enable" and "gradient_checkpointing_kwargs" in kwargs:
            kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
        self._enable_checkpointing(name, *args, **kwargs)

    # --- state dicts ------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str = "default",
                               state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The tensors of one adapter with peft's checkpoint keys (adapter name removed).

        ``state_dict``: a full state dict of this model to take the tensors from instead of the live
        parameters (e.g. the gathered one from ``accelerator.get_state_dict`` under FSDP/DeepSpeed,
        where each process only holds shards).
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; loaded adapters: {list(self.peft_config)}")
        if self._is_prompt_learning:
            return self._prompt_learning_state_dict(adapter_name, state_dict)
        full = self.state_dict() if state_dict is None else state_dict
        out = {ck: full[mk] for ck, mk in self.base_model.adapter_key_map(adapter_name, prefix="base_model.").items()}
        for ck, mk in self.base_model.extra_state_key_map(adapter_name, prefix="base_model.").items():
            out[ck] = full[mk]
        for name, module in self.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for k, v in module.modules_to_save[adapter_name].state_dict().items():
                    live_key = f"{name}.modules_to_save.{adapter_name}.{k}"
                    out[f"{name}.{k}"] = full[live_key] if state_dict is not None and live_key in full else v
        return self.base_model._adapter_state_dict_for_save(adapter_name, out)

    def set_adapter_state_dict(self, state_dict: Dict[str, torch.Tensor], adapter_name: str = "default", source: str = "") -> None:
        """Load checkpoint tensors (peft keys) into adapter ``adapter_name``, checking every key and shape.

        Raises ``ValueError`` naming the module when a tensor is missing, unexpected or of the
        wrong shape: the usual sign of an adapter trained on another base model.
        """
        if self._is_prompt_learning:
            self._load_prompt_learning_state_dict(state_dict, adapter_name, source)
            return
        state_dict = self.base_model._prepare_adapter_state_dict_load(adapter_name, dict(state_dict))
        key_map = dict(self.base_model.adapter_key_map(adapter_name, prefix="base_model."))
        key_map.update(self.base_model.extra_state_key_map(adapter_name, prefix="base_model."))
        for name, module in self.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for k in module.modules_to_save[adapter_name].state_dict():
                    key_map[f"{name}.{k}"] = f"{name}.modules_to_save.{adapter_name}.{k}"
        params = dict(self.state_dict(keep_vars=True))
        base_name = self.peft_config[adapter_name].base_model_name_or_path
        where = f" ({source})" if source else ""
        hint = (
            f" The adapter was probably trained on another base model (its config names {base_name!r})."
            if base_name
            else " The adapter was probably trained on another base model."
        )
        unexpected = sorted(k for k in state_dict if k not in key_map)
        if unexpected:
            raise ValueError(
                f"Adapter weights{where} have {len(unexpected)} tensors that match no module of this model, "
                f"e.g. {unexpected[:3]}.{hint}"
            )
        missing = sorted(k for k in key_map if k not in state_dict)
        if missing:
            raise ValueError(
                f"Adapter weights{where} lack {len(missing)} tensors this model expects, e.g. {missing[:3]}.{hint}"
            )
        with torch.no_grad():
            for ck, tensor in state_dict.items():
                target = params[key_map[ck]]
                if tuple(target.shape) != tuple(tensor.shape):
                    module = key_map[ck].rsplit(".", 2)[0]
                    raise ValueError(
                        f"Shape mismatch for {ck}{where}: the file has {tuple(tensor.shape)}, module {module!r} of this "
                        f"model needs {tuple(target.shape)}.{hint}"
                    )
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    # --- save / load ----------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[Sequence[str]] = None,
        is_main_process: bool = True,
        state_dict: Optional[Dict[str, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format).

        The ``default`` adapter goes into ``save_directory``, any other into
        ``save_directory/<adapter_name>`` (as peft does). Files are written atomically.
        ``state_dict`` (a full state dict of this model, e.g. gathered under FSDP) is read instead
        of the live parameters; ``is_main_process=False`` writes nothing.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a directory.")
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"Cannot save adapter {n!r}: loaded adapters are {list(self.peft_config)}")
        if not is_main_process:
            return
        from fastpeft import __version__

        for name in names:
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out_dir, exist_ok=True)
            tensors = self.get_adapter_state_dict(name, state_dict=state_dict)
            atomic_save_safetensors(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt", "fastpeft_version": __version__})
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(out_dir)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> "PeftModel":
        """Load an adapter saved by fastpeft or Hugging Face peft onto ``model``.

        Args:
            model: the base transformers model the adapter was trained on.
            model_id: local directory holding ``adapter_config.json`` and the weights.
            adapter_name: name to give the adapter.
            is_trainable: load for further training (else frozen, inference mode).
        """
        model_id = os.fspath(model_id)
        subfolder = kwargs.pop("subfolder", None)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        config.inference_mode = not is_trainable
        task = config.task_type
        target_cls = cls
        if cls is PeftModel and task is not None:
            target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(TaskType(task), PeftModel)
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        peft_model._load_weights_into(model_id if subfolder is None else os.path.join(model_id, subfolder), adapter_name)
        if not is_trainable:
            peft_model.eval()
            for p in peft_model.parameters():
                p.requires_grad_(False)
        return peft_model

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        """Load a saved adapter into this model under ``adapter_name`` (not made active).

        If ``adapter_name`` already exists its weights are replaced (what Trainer's resume does);
        the saved config must then be of the same method.
        """
        model_id = os.fspath(model_id)
        subfolder = kwargs.pop("subfolder", None)
        path = model_id if subfolder is None else os.path.join(model_id, subfolder)
        config = PeftConfig.from_pretrained(path)
        config.inference_mode = not is_trainable
        if adapter_name in self.peft_config:
            if config.peft_type != self.peft_config[adapter_name].peft_type:
                raise ValueError(
                    f"Adapter {adapter_name!r} is {self.peft_config[adapter_name].peft_type} but {path!r} holds "
                    f"a {config.peft_type} adapter; load it under another adapter_name."
                )
            self._load_weights_into(path, adapter_name)
        else:
            self.add_adapter(adapter_name, config)
            try:
                self._load_weights_into(path, adapter_name)
            except Exception:
                if self._is_prompt_learning:
                    self._remove_prompt_adapter(adapter_name)
                else:
                    self.delete_adapter(adapter_name)
                raise
        if not is_trainable:
            for n, p in self.named_parameters():
                if f".{adapter_name}." in n or n.endswith(f".{adapter_name}"):
                    p.requires_grad_(False)
        elif adapter_name in self.active_adapters and not self._is_prompt_learning:
            self.base_model.set_adapter(self.active_adapters)

    def _load_weights_into(self, path: str, adapter_name: str) -> None:
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
            if os.path.isfile(legacy):
                file = legacy
            else:
                raise FileNotFoundError(f"No {WEIGHTS_NAME} in {path!r}; is this an adapter directory written by save_pretrained?")
        weights = load_adapter_weights(file)
        self.set_adapter_state_dict(weights, adapter_name, source=file)


def _tuner_for(config: PeftConfig) -> Type[BaseTuner]:
    import fastpeft.tuners  # noqa: F401  (registers the tuners)

    try:
        return PEFT_TYPE_TO_TUNER[PeftType(config.peft_type)]
    except KeyError:
        raise ValueError(f"No fastpeft tuner for peft_type {config.peft_type}; supported: {sorted(p.value for p in PEFT_TYPE_TO_TUNER)}") from None


def _name_or_path(model: nn.Module) -> Optional[str]:
    value = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return value or None


def _is_checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(model)):
            return bool(getattr(model, attr))
    return False


def _enable_input_require_grads(model: nn.Module) -> None:
    fn = getattr(model, "enable_input_require_grads", None)
    if callable(fn):
        try:
            fn()
        except (NotImplementedError, AttributeError):
            pass


def _call_kwargs(**kwargs: Any) -> Dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


class PeftModelForCausalLM(PeftModel):
    """PeftModel for decoder-only language models (``task_type="CAUSAL_LM"``).

    Called with ``labels`` (not prompt learning), the loss comes from the fused linear
    cross-entropy (:mod:`fastpeft.patch_loss`): the logits are never formed in full, and in training
    mode the output's ``logits`` is None unless ``skip_logits=False`` is passed. Set
    ``model.fused_loss = False`` for the model's own loss and logits.
    """

    fused_loss: bool = True

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)  # the fused loss's switch; the base model does not know it
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            kwargs.update(_call_kwargs(output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict))
            return self._prompt_forward_causal_lm(input_ids, attention_mask, inputs_embeds, labels, kwargs)
        call = _call_kwargs(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                            return_dict=return_dict)
        call.update(kwargs)
        base = self.get_base_model()
        head = self._fused_loss_head(base, call)
        if head is not None:
            return call_with_fused_loss(base, head, dict(call, skip_logits=skip_logits))
        if skip_logits is not None and is_loss_patched(base):
            call["skip_logits"] = skip_logits  # the patched base forward reads it
        return base(**call)

    def _fused_loss_head(self, base: nn.Module, call: Dict[str, Any]):
        """The fused loss's view of ``base`` when this call should use it (labels given, switched on), else None."""
        if not self.fused_loss or (call.get("labels") is None and call.get("shift_labels") is None):
            return None
        if "forward" in base.__dict__:  # fastpeft.patch routes it already, or another library's head (TRL's)
            return None
        return fused_loss_head(base)[0]

    def generate(self, *args: Any, **kwargs: Any):
        """Generate with the active adapter (transformers' ``generate``; greedy output equals peft's)."""
        if self._is_prompt_learning:
            return self._prompt_generate_causal_lm(*args, **kwargs)
        return self.get_base_model().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            return self._prompt_prepare_inputs_causal_lm(*args, **kwargs)
        if self._is_prompt_learning:
            return self._base_prepare_inputs_for_generation(*args, **kwargs)
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for encoder-decoder models (``task_type="SEQ_2_SEQ_LM"``)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None, decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            kwargs.update(_call_kwargs(output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict))
            return self._prompt_forward_seq2seq_lm(
                input_ids, attention_mask, inputs_embeds, decoder_input_ids, decoder_attention_mask, decoder_inputs_embeds, labels, kwargs
            )
        return self.get_base_model()(
            **_call_kwargs(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                decoder_inputs_embeds=decoder_inputs_embeds,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            ),
            **kwargs,
        )

    def generate(self, *args: Any, **kwargs: Any):
        """Generate with the active adapter (transformers' ``generate``; greedy output equals peft's)."""
        if self._is_prompt_learning:
            if args:
                raise TypeError("Pass input_ids to generate() of a prompt-learning seq2seq model as a keyword (input_ids=...).")
            return self._prompt_generate_seq2seq_lm(**kwargs)
        return self.get_base_model().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            return self._prompt_prepare_inputs_seq2seq_lm(*args, **kwargs)
        if self._is_prompt_learning:
            return self._base_prepare_inputs_for_generation(*args, **kwargs)
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class _ClassifierHeadMixin:
    _head_names = ("classifier", "score")

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any):
        if hasattr(peft_config, "modules_to_save"):
            heads = [h for h in self._head_names]
            if peft_config.modules_to_save is None:
                peft_config.modules_to_save = heads
            else:
                peft_config.modules_to_save = list(peft_config.modules_to_save) + [h for h in heads if h not in peft_config.modules_to_save]
        super().__init__(model, peft_config, adapter_name, **kwargs)


class PeftModelForSequenceClassification(_ClassifierHeadMixin, PeftModel):
    """PeftModel for sequence classification (``task_type="SEQ_CLS"``); the head trains in full."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            kwargs.update(_call_kwargs(output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict))
            return self._prompt_forward_encoder(input_ids, attention_mask, inputs_embeds, labels, kwargs, head="sequence")
        return self.get_base_model()(
            **_call_kwargs(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict),
            **kwargs,
        )


class PeftModelForTokenClassification(_ClassifierHeadMixin, PeftModel):
    """PeftModel for token classification (``task_type="TOKEN_CLS"``); the head trains in full."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            kwargs.update(_call_kwargs(output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict))
            return self._prompt_forward_encoder(input_ids, attention_mask, inputs_embeds, labels, kwargs, head="token")
        return self.get_base_model()(
            **_call_kwargs(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict),
            **kwargs,
        )


class PeftModelForQuestionAnswering(PeftModel):
    """PeftModel for extractive QA (``task_type="QUESTION_ANS"``)."""


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for encoders producing hidden states (``task_type="FEATURE_EXTRACTION"``)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning and not self._prompt_learning_disabled:
            kwargs.update(_call_kwargs(output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict))
            return self._prompt_forward_encoder(input_ids, attention_mask, inputs_embeds, None, kwargs, head="feature")
        return self.get_base_model()(
            **_call_kwargs(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict),
            **kwargs,
        )


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: Dict[TaskType, Type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
