"""Prompt learning (Prompt Tuning, P-Tuning, Prefix Tuning) inside :class:`fastpeft.PeftModel`.

The behaviour is Hugging Face peft's, step by step, so logits, generated tokens and checkpoints
agree between the two libraries:

* the model keeps the transformers model as ``base_model`` (no tuner) and adds
  ``prompt_encoder`` (``ModuleDict``: adapter -> :class:`PromptEmbedding` /
  :class:`PromptEncoder` / :class:`PrefixEncoder`) and ``word_embeddings`` (the base model's
  input embedding), so parameter names match peft's;
* Prompt Tuning / P-Tuning prepend ``num_virtual_tokens`` embeddings to ``inputs_embeds``
  (ones prepended to the attention mask, ``-100`` to causal-LM labels, zeros to token type ids,
  explicit ``position_ids`` dropped with a warning);
* Prefix Tuning hands the per-layer keys/values to the model as a transformers 5 cache
  (``DynamicCache``; ``EncoderDecoderCache`` with an empty cross-attention cache for
  encoder-decoders), ones prepended to the attention mask, ``position_ids`` shifted by the
  prefix length;
* the checkpoint holds ``prompt_embeddings``: the encoder's *output* (for P-Tuning and
  projected prefixes), plus any ``modules_to_save`` (classifier heads).

The cache keyword is the one the base model's forward takes (``cache`` from transformers
5.24, ``past_key_values`` before), read once when the first adapter is added.

Fused prefix attention: when a prefix-attention registry is attached to the base model (see
:meth:`PromptLearningMixin.prefix_attention_registry`), Prefix Tuning on a decoder-only model
skips the cache injection and hands the *shared* per-layer prefix ``[KVH, P, D]`` to the
attention layers per call, through :class:`fastpeft.prefix_route.PrefixRoute` (the route
``fastpeft.patch`` gives peft's models too). Generated tokens still go through the normal cache.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from fastpeft.config import PeftConfig, PeftType, TaskType
from fastpeft.prefix_attention_hf import PrefixKVRegistry, attached_registry
from fastpeft.prefix_route import PREFIX_LAYOUT_EXCEPTIONS, PrefixRoute, cache_kwarg
from fastpeft.utils.modules import ModulesToSaveWrapper, set_modules_to_save


def _text_config_dict(model: nn.Module) -> Dict[str, Any]:
    """The text model's config as a dict (``text_config`` of a multimodal config), with the
    aliases its ``attribute_map`` resolves filled in; ``{}`` for a model without a config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    source = cfg
    if "text_config" in data and isinstance(data["text_config"], dict):
        data = data["text_config"]
        source = getattr(cfg, "text_config", None)
    # aliases a config resolves through its attribute_map (e.g. DistilBERT's hidden_size -> dim)
    for alias in list(getattr(source, "attribute_map", None) or {}) + ["num_hidden_layers"]:
        if data.get(alias) is None:
            value = getattr(source, alias, None)
            if value is not None:
                data[alias] = value
    return data


def _first(data: Dict[str, Any], keys: Tuple[str, ...]) -> Optional[Any]:
    for k in keys:
        if data.get(k) is not None:
            return data[k]
    return None


def prepare_prompt_learning_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Fill ``num_layers``, ``token_dim``, ``num_attention_heads``, ``num_transformer_submodules``
    and ``encoder_hidden_size`` from the model's config (as peft does), checking them.

    Prefix Tuning on grouped-query attention stores keys/values for the KV heads only
    (``token_dim = num_key_value_heads * head_dim``), as peft does.
    """
    data = _text_config_dict(model)
    model_type = data.get("model_type", type(model).__name__)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if config.num_layers is None:
        value = _first(data, ("num_hidden_layers", "num_layers", "n_layer"))
        if value is None:
            raise ValueError(f"Cannot tell the number of layers of {model_type!r}; set num_layers in the {type(config).__name__}.")
        config.num_layers = int(value)
    if config.token_dim is None:
        value = _first(data, ("hidden_size", "n_embd", "d_model"))
        if value is None:
            raise ValueError(f"Cannot tell the hidden size of {model_type!r}; set token_dim in the {type(config).__name__}.")
        config.token_dim = int(value)
    if config.num_attention_heads is None:
        value = _first(data, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
        if value is None:
            raise ValueError(
                f"Cannot tell the number of attention heads of {model_type!r}; set num_attention_heads in the "
                f"{type(config).__name__}."
            )
        config.num_attention_heads = int(value)
    if config.peft_type == PeftType.PREFIX_TUNING:
        odd = [f"{k}: {why}" for k, why in PREFIX_LAYOUT_EXCEPTIONS.items() if data.get(k)]
        if odd:
            raise ValueError(
                f"Prefix Tuning has no known attention layout for model type {model_type!r}: its layers differ in "
                f"key/value shape ({'; '.join(odd)}). Use Prompt Tuning or P-Tuning, or LoRA, for this model."
            )
        if data.get("num_key_value_heads") is not None:  # grouped-query attention: prefix for the KV heads
            head_dim = data.get("head_dim") or config.token_dim // config.num_attention_heads
            config.token_dim = int(head_dim) * int(data["num_key_value_heads"])
            config.num_attention_heads = int(data["num_key_value_heads"])
        if config.token_dim % config.num_attention_heads:
            raise ValueError(
                f"token_dim {config.token_dim} is not divisible by num_attention_heads {config.num_attention_heads}; "
                "Prefix Tuning needs whole heads."
            )
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return config


def find_word_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The base model's token embedding (``get_input_embeddings()``, else peft's vocab-size search)."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None:
            return emb
    except (AttributeError, NotImplementedError):
        pass
    vocab = _text_config_dict(model).get("vocab_size")
    for name, p in model.named_parameters():
        if vocab is not None and p.dim() == 2 and p.shape[0] == vocab:
            return model.get_submodule(name.rsplit(".", 1)[0])
    return None


def _batch_size(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("Pass input_ids or inputs_embeds.")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def _prefix_ones(batch_size: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch_size, n, device=like.device, dtype=like.dtype)


class PromptLearningMixin:
    """Prompt-learning half of :class:`fastpeft.PeftModel` (see the module docstring)."""

    # --- setup -----------------------------------------------------------------------------
    def _add_prompt_learning_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        from fastpeft.tuners.p_tuning import PromptEncoder
        from fastpeft.tuners.prefix_tuning import PrefixEncoder
        from fastpeft.tuners.prompt_tuning import PromptEmbedding

        n = peft_config.num_virtual_tokens
        if n is None or isinstance(n, bool) or int(n) <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}.")
        if "prompt_encoder" in self._modules and adapter_name in self.prompt_encoder:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name.")
        model = self.base_model
        if peft_config.peft_type == PeftType.PREFIX_TUNING:
            self._check_prefix_supported(model)  # before reading dims: the layout question is the real one
        prepare_prompt_learning_config(peft_config, model)
        self._peft_config[adapter_name] = peft_config
        try:
            if "prompt_encoder" not in self._modules:
                self.prompt_encoder = nn.ModuleDict()
                self.prompt_tokens: Dict[str, torch.Tensor] = {}
            backbone_name = None
            for name, child in model.named_children():
                child.requires_grad_(False)
                if backbone_name is None and _is_pretrained(child):
                    backbone_name = name
            for p in model.parameters(recurse=False):
                p.requires_grad_(False)
            self.transformer_backbone_name = backbone_name
            self._record_cache_kwarg(model, backbone_name)
            if self._modules.get("word_embeddings") is None:
                self.word_embeddings = find_word_embeddings(model)
            if peft_config.peft_type == PeftType.PROMPT_TUNING:
                encoder = PromptEmbedding(peft_config, self.word_embeddings)
            elif peft_config.peft_type == PeftType.P_TUNING:
                encoder = PromptEncoder(peft_config)
            elif peft_config.peft_type == PeftType.PREFIX_TUNING:
                encoder = PrefixEncoder(peft_config)
            else:
                raise ValueError(f"{peft_config.peft_type} is not a prompt-learning method fastpeft knows.")
            device = next(model.parameters()).device
            self.prompt_encoder[adapter_name] = encoder.to(device)
            self.prompt_tokens[adapter_name] = torch.arange(n * peft_config.num_transformer_submodules).long()
            heads = set_modules_to_save(model, peft_config.modules_to_save, adapter_name)
            if heads and self.__dict__.get("cls_layer_name") is None:
                self.cls_layer_name = heads[0].split(".")[0]
            if not hasattr(self, "_base_prepare_inputs_for_generation") and hasattr(model, "prepare_inputs_for_generation"):
                self._base_prepare_inputs_for_generation = model.prepare_inputs_for_generation
            if peft_config.inference_mode:
                self.prompt_encoder[adapter_name].requires_grad_(False)
        except Exception:
            self._peft_config.pop(adapter_name, None)
            if hasattr(self, "prompt_encoder") and adapter_name in self.prompt_encoder:
                del self.prompt_encoder[adapter_name]
            raise

    def _remove_prompt_adapter(self, adapter_name: str) -> None:
        """Drop a (half-built) prompt-learning adapter, e.g. after a failed load."""
        if adapter_name == self.active_adapter:
            raise ValueError(f"Cannot remove the active adapter {adapter_name!r}.")
        self._peft_config.pop(adapter_name, None)
        if "prompt_encoder" in self._modules and adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.__dict__.get("prompt_tokens", {}).pop(adapter_name, None)
        for module in self.base_model.modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]

    def _check_prefix_supported(self, model: nn.Module) -> None:
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ValueError("Prefix Tuning does not work with gradient checkpointing (the prefix lives in the KV cache); disable it.")
        if cache_kwarg(model) is not None:
            return
        if any(_is_pretrained(child) and cache_kwarg(child) is not None for child in model.children()):
            return
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"Prefix Tuning has no known attention layout for model type {model_type!r}: neither "
            f"{type(model).__name__}.forward nor its backbone takes a KV cache (cache= or past_key_values=), "
            "which carries the prefix. Use Prompt Tuning or P-Tuning for this model."
        )

    def _record_cache_kwarg(self, model: nn.Module, backbone_name: Optional[str]) -> None:
        """Read once which keyword carries the cache: the model's own (``cache`` or
        ``past_key_values``), else its backbone's (a task head without one runs the backbone)."""
        if "_cache_kwarg" in self.__dict__:
            return
        own = cache_kwarg(model)
        backbone = model.get_submodule(backbone_name) if backbone_name else None
        self._head_takes_cache = own is not None
        self._cache_kwarg = own or (cache_kwarg(backbone) if backbone is not None else None) or "past_key_values"

    # --- prompts ---------------------------------------------------------------------------
    def _active_encoder(self) -> Tuple[PeftConfig, nn.Module]:
        return self.active_peft_config, self.prompt_encoder[self.active_adapter]

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The tensor saved as ``prompt_embeddings``: the encoder's output for every virtual token."""
        config = self.peft_config[adapter_name]
        encoder = self.prompt_encoder[adapter_name]
        if config.inference_mode:
            return encoder.embedding.weight.detach().cpu()
        tokens = self.prompt_tokens[adapter_name].unsqueeze(0).to(encoder.embedding.weight.device)
        if config.peft_type == PeftType.PREFIX_TUNING:
            tokens = tokens[:, : config.num_virtual_tokens]
        with torch.no_grad():
            out = encoder(tokens)
        return out[0].detach().cpu()

    def _prefix_flat(self) -> torch.Tensor:
        """The active prefix for one sequence, ``[P, num_layers * 2 * token_dim]`` in the model's dtype."""
        config, encoder = self._active_encoder()
        if config.inference_mode:
            flat = encoder.embedding.weight
        else:
            tokens = self.prompt_tokens[self.active_adapter][: config.num_virtual_tokens].to(encoder.embedding.weight.device)
            flat = encoder(tokens.unsqueeze(0))[0]
        dtype = _base_dtype(self.base_model)
        return flat.to(dtype) if dtype is not None else flat

    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> Any:
        """Virtual-token embeddings ``[batch, n, token_dim]`` or, for Prefix Tuning, the prefix cache."""
        config, encoder = self._active_encoder()
        if config.peft_type == PeftType.PREFIX_TUNING:
            return self._prefix_cache(batch_size)
        if config.inference_mode:
            prompts = encoder.embedding.weight.unsqueeze(0)
        else:
            tokens = self.prompt_tokens[self.active_adapter].unsqueeze(0).to(encoder.embedding.weight.device)
            prompts = encoder(tokens)
        return prompts.expand(batch_size, -1, -1)

    def _prefix_cache(self, batch_size: int):
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.active_peft_config
        p, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        flat = self._prefix_flat().view(p, layers * 2, heads, config.token_dim // heads)
        if config.num_transformer_submodules == 2:
            # peft's encoder-decoder layout: the table is repeated and read four entries per layer
            # (self-attention k, v, cross-attention k, v), so decoder layer i takes entries 4i, 4i+1
            # of the doubled table; the cross-attention part is then dropped (the encoder output
            # fills that cache). Reproduced exactly so checkpoints mean the same in both libraries.
            flat = torch.cat([flat, flat], dim=1)
        kv = flat.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # [2L|4L, B, H, P, D]
        if config.num_transformer_submodules == 2:
            chunks = [tuple(kv[4 * i + j] for j in range(4)) for i in range(layers)]
            cache = EncoderDecoderCache(chunks)
            cache.cross_attention_cache = DynamicCache()
            for key in list(getattr(cache, "is_updated", {}).keys()):
                cache.is_updated[key] = False
            return cache
        per_layer = [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
        return DynamicCache(per_layer)

    # --- fused prefix attention hook ---------------------------------------------------------
    @property
    def prefix_attention_registry(self):
        """The shared-prefix registry attached by ``fastpeft.patch`` /
        ``fastpeft.ops.prefix_attention.enable_prefix_attention`` on the base model, or None.

        When set (decoder-only Prefix Tuning), forward and generate give the attention layers
        the batch-shared prefix ``[KVH, P, D]`` per layer through the registry instead of a
        per-batch copy in the KV cache.
        """
        return attached_registry(self.base_model)

    def _fused_route(self, attached: PrefixKVRegistry) -> Tuple[PrefixRoute, PrefixKVRegistry]:
        """The shared-prefix route of this model (its cache keyword, the attached registry's
        backend and implementation) and this call's prefix as a per-call registry."""
        route = PrefixRoute(self._cache_kwarg, attached.backend, impl=attached.impl)
        return route, route.registry(self._prefix_flat(), self.active_peft_config)

    # --- checkpoints -----------------------------------------------------------------------
    def _prompt_learning_state_dict(self, adapter_name: str,
                                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """peft's checkpoint tensors of a prompt-learning adapter. ``state_dict`` (a full state
        dict of this model, e.g. gathered under FSDP) supplies the classifier heads and an
        inference-mode table; a trainable encoder's output is computed from the live encoder."""
        full = state_dict or {}
        table_key = f"prompt_encoder.{adapter_name}.embedding.weight"
        if self.peft_config[adapter_name].inference_mode and table_key in full:
            out = {"prompt_embeddings": full[table_key].detach().cpu()}
        else:
            out = {"prompt_embeddings": self.get_prompt_embedding_to_save(adapter_name)}
        for name, module in self.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for k, v in module.modules_to_save[adapter_name].state_dict().items():
                    live_key = f"{name}.modules_to_save.{adapter_name}.{k}"
                    out[f"{name}.{k}"] = full.get(live_key, v)
        return out

    def _load_prompt_learning_state_dict(self, state_dict: Dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
        where = f" ({source})" if source else ""
        config = self.peft_config[adapter_name]
        encoder = self.prompt_encoder[adapter_name]
        if "prompt_embeddings" not in state_dict:
            raise ValueError(f"Adapter weights{where} have no 'prompt_embeddings' tensor; they are not a {config.peft_type} checkpoint.")
        heads: Dict[str, torch.Tensor] = {}
        for name, module in self.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for k, v in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    heads[f"{name}.{k}"] = v
        unexpected = sorted(k for k in state_dict if k != "prompt_embeddings" and k not in heads)
        if unexpected:
            raise ValueError(
                f"Adapter weights{where} have tensors that match no module of this model: {unexpected[:3]}. "
                "Was the adapter trained for another task type or base model?"
            )
        missing = sorted(k for k in heads if k not in state_dict)
        if missing:
            raise ValueError(f"Adapter weights{where} lack {missing[:3]} (the trained classifier head).")
        has_encoder = any(hasattr(encoder, a) for a in ("mlp_head", "lstm_head", "transform"))
        if has_encoder:
            raise ValueError(
                f"{config.peft_type} checkpoints{where} hold the encoder's output, not its weights, so they load "
                "for inference only: load with is_trainable=False (inference_mode=True)."
            )
        tensor = state_dict["prompt_embeddings"]
        target = encoder.embedding.weight
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"Shape mismatch for prompt_embeddings{where}: the file has {tuple(tensor.shape)}, this model needs "
                f"{tuple(target.shape)} (num_virtual_tokens={config.num_virtual_tokens}, token_dim={config.token_dim}, "
                f"num_layers={config.num_layers}). The adapter was probably trained on another base model "
                f"(its config names {config.base_model_name_or_path!r})."
            )
        with torch.no_grad():
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            for k, param in heads.items():
                if tuple(param.shape) != tuple(state_dict[k].shape):
                    raise ValueError(
                        f"Shape mismatch for {k}{where}: the file has {tuple(state_dict[k].shape)}, this model needs "
                        f"{tuple(param.shape)} (another number of labels?)."
                    )
                param.copy_(state_dict[k].to(device=param.device, dtype=param.dtype))

    # --- shared forward pieces ---------------------------------------------------------------
    def _adjust_prompt_kwargs(self, config: PeftConfig, kwargs: Dict[str, Any], drop_token_type_ids: bool) -> None:
        if kwargs.get("position_ids") is not None:
            if config.peft_type == PeftType.PREFIX_TUNING:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                warnings.warn("position_ids are not supported with prompt learning (virtual tokens shift them); ignoring them.")
                kwargs["position_ids"] = None
        if drop_token_type_ids and kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are not supported with prompt learning; ignoring them.")
            kwargs["token_type_ids"] = None

    def _prompt_embeds(self, input_ids, inputs_embeds, batch_size: int):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch_size).to(inputs_embeds.dtype)
        return prompts, inputs_embeds

    # --- causal LM ---------------------------------------------------------------------------
    def _prompt_forward_causal_lm(self, input_ids, attention_mask, inputs_embeds, labels, kwargs):
        config = self.active_peft_config
        b = _batch_size(input_ids, inputs_embeds)
        registry = self.prefix_attention_registry if config.peft_type == PeftType.PREFIX_TUNING else None
        if registry is not None:
            return self._prefix_forward_fused(registry, input_ids, attention_mask, inputs_embeds, labels, kwargs)
        if attention_mask is not None:
            attention_mask = torch.cat((_prefix_ones(b, config.num_virtual_tokens, attention_mask), attention_mask), dim=1)
        self._adjust_prompt_kwargs(config, kwargs, drop_token_type_ids=True)
        kwargs["attention_mask"] = attention_mask
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs[self._cache_kwarg] = self.get_prompt(b)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        prompts, inputs_embeds = self._prompt_embeds(input_ids, inputs_embeds, b)
        if labels is not None:
            labels = torch.cat((torch.full((b, config.num_virtual_tokens), -100, device=labels.device, dtype=labels.dtype), labels), dim=1)
        return self.base_model(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), labels=labels, **kwargs)

    def _prefix_forward_fused(self, registry, input_ids, attention_mask, inputs_embeds, labels, kwargs):
        """Prefix Tuning through the shared-prefix attention op (no prefix in the cache or the mask).

        Positions start at ``num_virtual_tokens`` as in peft's cache path, so the numbers agree.
        """
        route, call_registry = self._fused_route(registry)
        route.prepare(kwargs, input_ids if input_ids is not None else inputs_embeds,
                      self.active_peft_config.num_virtual_tokens, call_registry)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    def _prompt_prepare_inputs_causal_lm(self, *args: Any, task_ids=None, **kwargs: Any) -> Dict[str, Any]:
        from transformers import Cache

        config = self.active_peft_config
        if config.peft_type == PeftType.PREFIX_TUNING and kwargs.get("use_cache") is False:
            # no cache between steps: every step runs the whole sequence behind a fresh prefix (the
            # prefix cache handed to the previous step comes back filled; reusing it broke peft here)
            kwargs.pop(self._cache_kwarg, None)
        model_kwargs = self._base_prepare_inputs_for_generation(*args, **kwargs)
        cache = model_kwargs.get(self._cache_kwarg)
        ids = model_kwargs.get("input_ids")
        if cache is not None and ids is not None:
            seq_len = cache[0][0].shape[-2] if isinstance(cache, (tuple, list)) else cache.get_seq_length()
            if seq_len >= ids.shape[1]:
                model_kwargs["input_ids"] = ids = ids[:, -1:]
        registry = self.prefix_attention_registry if config.peft_type == PeftType.PREFIX_TUNING else None
        if registry is not None:
            return model_kwargs  # the fused forward adds the prefix (generate routes through self.forward)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            if isinstance(mask, dict):
                if len(mask) != 1:
                    raise ValueError(f"Expected one attention mask during generation, got {len(mask)}.")
                mask = next(iter(mask.values()))
            if mask.dim() != 2:
                raise ValueError(
                    "Prompt learning generation needs a 2D attention mask; use the default dynamic cache "
                    "(cache_implementation=None), not a static/compiled cache."
                )
            model_kwargs["attention_mask"] = torch.cat((_prefix_ones(ids.shape[0], config.num_virtual_tokens, mask), mask), dim=1)
        self._adjust_prompt_kwargs(config, model_kwargs, drop_token_type_ids=True)
        needs_prompt = cache is None or (isinstance(cache, Cache) and not cache.get_seq_length())
        if needs_prompt and config.peft_type == PeftType.PREFIX_TUNING:
            model_kwargs[self._cache_kwarg] = self.get_prompt(ids.shape[0])
        elif needs_prompt:
            embeds = self.word_embeddings(ids)
            prompts = self.get_prompt(ids.shape[0]).to(embeds.dtype)
            model_kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
            model_kwargs["input_ids"] = None
        if config.peft_type != PeftType.PREFIX_TUNING:
            model_kwargs.pop("cache_position", None)
        elif model_kwargs.get("cache_position") is not None and model_kwargs["cache_position"][0] == 0:
            model_kwargs["cache_position"] = model_kwargs["cache_position"] + config.num_virtual_tokens
        return model_kwargs

    def _prompt_generate_causal_lm(self, *args: Any, **kwargs: Any):
        base = self.base_model
        if self._prompt_learning_disabled:
            return base.generate(*args, **kwargs)
        registry = self.prefix_attention_registry if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING else None
        base.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        original_forward = None
        if registry is not None:
            # decoding reuses the cache for generated tokens; the prefix comes from the registry each step
            original_forward = base.forward
            route, call_registry = self._fused_route(registry)  # the prefix once per generate call
            p = self.active_peft_config.num_virtual_tokens

            @functools.wraps(original_forward)  # generate() validates kwargs against this signature
            def forward(*f_args, **f_kwargs):
                ids = f_kwargs.get("input_ids")
                route.prepare(f_kwargs, ids if ids is not None else f_kwargs.get("inputs_embeds"), p, call_registry)
                return original_forward(*f_args, **f_kwargs)

            base.forward = forward
        try:
            return base.generate(*args, **kwargs)
        finally:
            if original_forward is not None:
                del base.forward
            del base.prepare_inputs_for_generation

    # --- seq2seq LM --------------------------------------------------------------------------
    def _prompt_forward_seq2seq_lm(self, input_ids, attention_mask, inputs_embeds, decoder_input_ids, decoder_attention_mask, decoder_inputs_embeds, labels, kwargs):
        config = self.active_peft_config
        p = config.num_virtual_tokens
        b = _batch_size(input_ids, inputs_embeds)
        if decoder_attention_mask is not None and config.peft_type == PeftType.PREFIX_TUNING:
            decoder_attention_mask = torch.cat((_prefix_ones(b, p, decoder_attention_mask), decoder_attention_mask), dim=1)
        self._adjust_prompt_kwargs(config, kwargs, drop_token_type_ids=True)
        kwargs.update(decoder_attention_mask=decoder_attention_mask, labels=labels)
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs[self._cache_kwarg] = self.get_prompt(b)
            return self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds, **kwargs,
            )
        prompts, inputs_embeds = self._prompt_embeds(input_ids, inputs_embeds, b)
        if attention_mask is not None:
            attention_mask = torch.cat((_prefix_ones(b, p, attention_mask), attention_mask), dim=1)
        return self.base_model(
            inputs_embeds=torch.cat((prompts[:, :p], inputs_embeds), dim=1), attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds, **kwargs,
        )

    def _prompt_generate_seq2seq_lm(self, **kwargs: Any):
        base = self.base_model
        if self._prompt_learning_disabled:
            return base.generate(**kwargs)
        config = self.active_peft_config
        if "input_ids" not in kwargs:
            raise ValueError("generate() with a prompt-learning adapter needs input_ids=...")
        self._adjust_prompt_kwargs(config, kwargs, drop_token_type_ids=True)
        base.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        try:
            if config.peft_type == PeftType.PREFIX_TUNING:
                return base.generate(**kwargs)
            kwargs = dict(kwargs)
            if kwargs.pop("encoder_outputs", None) is not None:
                warnings.warn("encoder_outputs cannot be combined with prompt tuning in generate(); ignoring them.")
            input_ids = kwargs.pop("input_ids")
            kwargs.pop("task_ids", None)
            b = input_ids.shape[0]
            prompts, embeds = self._prompt_embeds(input_ids, None, b)
            kwargs["inputs_embeds"] = torch.cat((prompts[:, : config.num_virtual_tokens], embeds), dim=1)
            if kwargs.get("attention_mask") is not None:
                mask = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat((_prefix_ones(b, config.num_virtual_tokens, mask), mask), dim=1)
            return base.generate(**kwargs)
        finally:
            del base.prepare_inputs_for_generation

    def _prompt_prepare_inputs_seq2seq_lm(self, *args: Any, task_ids=None, **kwargs: Any) -> Dict[str, Any]:
        from transformers import Cache

        config = self.active_peft_config
        model_kwargs = self._base_prepare_inputs_for_generation(*args, **kwargs)
        if config.peft_type == PeftType.PREFIX_TUNING:
            cache = model_kwargs.get(self._cache_kwarg)
            first = kwargs.get("is_first_iteration")
            if first is None:
                first = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
            if first:
                model_kwargs[self._cache_kwarg] = self.get_prompt(model_kwargs["decoder_input_ids"].shape[0])
        return model_kwargs

    # --- classification / feature extraction --------------------------------------------------
    def _prompt_forward_encoder(self, input_ids, attention_mask, inputs_embeds, labels, kwargs, head: str):
        config = self.active_peft_config
        p = config.num_virtual_tokens
        b = _batch_size(input_ids, inputs_embeds)
        if attention_mask is not None:
            attention_mask = torch.cat((_prefix_ones(b, p, attention_mask), attention_mask), dim=1)
        self._adjust_prompt_kwargs(config, kwargs, drop_token_type_ids=False)
        kwargs["attention_mask"] = attention_mask
        if labels is not None:
            kwargs["labels"] = labels
        if config.peft_type == PeftType.PREFIX_TUNING:
            return self._prefix_forward_encoder(input_ids, inputs_embeds, kwargs, b, head)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((torch.zeros(b, p, device=tt.device, dtype=tt.dtype), tt), dim=1).long()
        if head == "token" and labels is not None:  # keep labels aligned with the logits (peft would fail here)
            kwargs["labels"] = torch.cat((torch.full((b, p), -100, device=labels.device, dtype=labels.dtype), labels), dim=1)
        prompts, inputs_embeds = self._prompt_embeds(input_ids, inputs_embeds, b)
        return self.base_model(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), **kwargs)

    def _prefix_forward_encoder(self, input_ids, inputs_embeds, kwargs, batch_size: int, head: str):
        kwargs.update(input_ids=input_ids, inputs_embeds=inputs_embeds)
        kwargs[self._cache_kwarg] = self.get_prompt(batch_size)
        if self._head_takes_cache:
            return self.base_model(**kwargs)
        # the task head's forward takes no cache: run the backbone, then the head (as peft does)
        labels = kwargs.pop("labels", None)
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.base_model.config, "use_return_dict", True)
        kwargs["return_dict"] = True
        backbone = self.base_model.get_submodule(self.transformer_backbone_name)
        outputs = backbone(**kwargs)
        names = [n for n, _ in self.base_model.named_children()]
        if head == "token":
            hidden = outputs[0]
        else:
            hidden = outputs[1] if len(outputs) > 1 else outputs[0]
        if "dropout" in names:
            hidden = self.base_model.dropout(hidden)
        if head == "feature":
            return outputs
        logits = self.base_model.get_submodule(self.cls_layer_name)(hidden)
        loss = _classification_loss(self.base_model, logits, labels, token_level=head == "token")
        from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

        cls = TokenClassifierOutput if head == "token" else SequenceClassifierOutput
        out = cls(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()


def _classification_loss(model: nn.Module, logits: torch.Tensor, labels: Optional[torch.Tensor], token_level: bool):
    if labels is None:
        return None
    num_labels = model.num_labels
    if token_level:
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    config = model.config
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else nn.functional.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _is_pretrained(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PreTrainedModel)


def _base_dtype(model: nn.Module) -> Optional[torch.dtype]:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None
