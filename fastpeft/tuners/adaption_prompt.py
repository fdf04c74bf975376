"""LLaMA-Adapter (adaption prompts): ``AdaptionPromptConfig``, ``AdaptedAttention``, ``AdaptionPromptModel``.

LLaMA-Adapter (Zhang et al., 2023, https://arxiv.org/abs/2303.16199) learns ``adapter_len``
prompt vectors in each of the top ``adapter_layers`` attention layers. Every query of the layer
also attends (in a separate softmax) over the prompt's keys/values, and that extra attention
output is scaled by a gate initialised to zero, so the model is unchanged at the start of
training::

    k_p, v_p = k_proj(P), v_proj(P)                  # P: [1, adapter_len, hidden]; no RoPE on the prompt
    q        = RoPE(q_proj(h))                        # the layer's own rotated queries
    extra    = gate * softmax(q k_p^T / sqrt(head_dim)) v_p
    out      = attention(h) + o_proj(extra)           # o_proj's weight only (see below)

Compatibility with Hugging Face peft (0.21): the parameters and checkpoint keys are peft's
(``base_model.model.model.layers.N.self_attn.adaption_prompt`` of shape
``[1, adapter_len, hidden]`` and ``...self_attn.adaption_gate`` of shape ``[1]``), the
``adapter_config.json`` fields are peft's (``adapter_len``, ``adapter_layers``,
``target_modules="self_attn"``), and outputs equal peft's for the same weights. One deliberate
difference: when ``o_proj`` has a bias, peft adds that bias a second time through the prompt
branch (so its model is *not* unchanged at init); fastpeft applies ``o_proj`` without its bias to
the prompt branch. No Llama/Mistral/Qwen2 checkpoint has an ``o_proj`` bias, so the two agree
in practice.

fastpeft keeps every adapter in the wrapper (``adaption_prompt`` / ``adaption_gate`` are
``nn.ParameterDict`` keyed by adapter name, like the other tuners) instead of swapping modules in
and out as peft does; checkpoint keys drop the adapter name as peft's do. The layer's query
states are captured from ``q_proj``'s output during the wrapped attention's own forward (a
temporary forward hook) instead of being recomputed, which saves one ``q_proj`` matmul per
adapted layer; when the attention does not call ``q_proj`` the queries are recomputed.

Supported models: Llama-family attention in transformers 5 (``model_type`` in
:data:`SUPPORTED_MODEL_TYPES`: modules with ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``head_dim`` and rotary ``position_embeddings``). Not mergeable (the prompt branch is attention,
not a weight delta): ``merge_and_unload`` raises, ``unload`` removes the adapter.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.config import PeftConfig, PeftType, register_config
from fastpeft.tuners.base import BaseTuner, BaseTunerLayer
from fastpeft.utils.modules import get_submodules

# model_type -> default name of the attention submodule (peft's TRANSFORMERS_MODEL_CONFIG target_modules)
SUPPORTED_MODEL_TYPES: Dict[str, str] = {
    "llama": "self_attn",
    "mistral": "self_attn",
    "mixtral": "self_attn",
    "qwen2": "self_attn",
}


@register_config
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of a LLaMA-Adapter (peft's ``AdaptionPromptConfig`` fields).

    Args:
        adapter_len: number of learned prompt tokens per adapted layer (>= 1).
        adapter_layers: how many attention layers, counted from the top, get a prompt
            (1 <= adapter_layers <= number of layers).
        target_modules: name of the attention submodule in each decoder layer
            (None: ``"self_attn"`` for the supported Llama-family models).
    """

    _peft_type = PeftType.ADAPTION_PROMPT

    target_modules: Optional[str] = field(default=None, metadata={"help": "Name of the attention submodules"})
    adapter_len: int = field(default=None, metadata={"help": "Number of adapter tokens to insert"})
    adapter_layers: int = field(default=None, metadata={"help": "Number of adapter layers (from the top)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"AdaptionPromptConfig needs {name}; e.g. AdaptionPromptConfig(adapter_len=10, adapter_layers=30).")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdaptionPromptConfig.{name} must be a positive integer, got {value!r}.")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(
                f"AdaptionPromptConfig.target_modules is the name of the attention submodule (a string such as "
                f"'self_attn'), got {self.target_modules!r}."
            )

    @property
    def is_adaption_prompt(self) -> bool:
        return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(nn.Module, BaseTunerLayer):
    """Wraps a Llama-family attention module (``base_layer``) and adds gated adaption prompts.

    Per adapter: ``adaption_prompt[name]`` (``[1, adapter_len, hidden]``, standard normal init,
    as the official code and peft) and ``adaption_gate[name]`` (``[1]``, zero init). Several
    active adapters add their prompt branches.
    """

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    other_param_names = ("adapter_len",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, adapter_len: int, hidden_size: int):
        super().__init__()
        for attr in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
            if not hasattr(base_layer, attr):
                raise TypeError(
                    f"LLaMA-Adapter needs a Llama-style attention module with q_proj/k_proj/v_proj/o_proj and head_dim; "
                    f"{type(base_layer).__name__} has no {attr!r}. Set AdaptionPromptConfig.target_modules to the "
                    "attention submodule of a supported model."
                )
        self._init_tuner_layer(base_layer)
        self.hidden_size = hidden_size
        self.head_dim = int(base_layer.head_dim)
        self.num_heads = base_layer.q_proj.out_features // self.head_dim
        self.num_kv_heads = base_layer.k_proj.out_features // self.head_dim
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.adapter_len: Dict[str, int] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, adapter_len)

    @property
    def weight(self) -> torch.Tensor:  # attention modules have no single weight
        return self.base_layer.q_proj.weight

    def _param_dtype_device(self):
        w = self.base_layer.q_proj.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # adapters train in fp32 on half-precision bases
        device = w.device if w.device.type != "meta" else torch.device("cpu")
        return dtype, device

    def update_layer(self, adapter_name: str, adapter_len: int) -> None:
        """Create adapter ``adapter_name``: normal-initialised prompt, zero gate."""
        dtype, device = self._param_dtype_device()
        self.adapter_len[adapter_name] = adapter_len
        self.adaption_prompt[adapter_name] = nn.Parameter(torch.empty(1, adapter_len, self.hidden_size, device=device, dtype=dtype).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        self.set_adapter(self.active_adapters)

    # --- forward ----------------------------------------------------------------------------
    def _queries(self, hidden_states: torch.Tensor, q_out: Optional[torch.Tensor], position_embeddings) -> torch.Tensor:
        attn = self.base_layer
        if q_out is None:
            q_out = attn.q_proj(hidden_states)
        bsz, q_len = hidden_states.shape[:2]
        q = q_out.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        if position_embeddings is None:
            raise ValueError(
                "LLaMA-Adapter needs the rotary position_embeddings the decoder layer passes to attention "
                "(transformers >= 4.48 Llama-family models); none were given."
            )
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin

    def _prompt_branch(self, adapter: str, query: torch.Tensor) -> torch.Tensor:
        """``gate * softmax(q k_p^T / sqrt(d)) v_p`` for one adapter, as ``[B, T, H*D]``."""
        attn = self.base_layer
        weight_dtype = attn.k_proj.weight.dtype if attn.k_proj.weight.dtype.is_floating_point else query.dtype
        prompt = self.adaption_prompt[adapter].to(weight_dtype)
        bsz, _, q_len, _ = query.shape
        length = prompt.shape[1]
        key = attn.k_proj(prompt).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = attn.v_proj(prompt).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        dtype = query.dtype
        scores = torch.matmul(query, key.transpose(2, 3).to(dtype)) / math.sqrt(self.head_dim)
        gate = self.adaption_gate[adapter]
        probs = gate.to(dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        out = torch.matmul(probs, value.to(dtype))  # [B, H, T, D]
        return out.transpose(1, 2).reshape(bsz, q_len, -1)

    def _signature(self) -> inspect.Signature:
        sig = self.__dict__.get("_base_signature")
        if sig is None:
            sig = inspect.signature(self.base_layer.forward)
            self.__dict__["_base_signature"] = sig
        return sig

    def forward(self, *args: Any, **kwargs: Any):
        active = [a for a in self.active_adapters if a in self.adaption_prompt]
        if self.disable_adapters or not active:
            return self.base_layer(*args, **kwargs)
        bound = self._signature().bind_partial(*args, **kwargs).arguments
        extra_kwargs = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
        hidden_states = bound.get("hidden_states", args[0] if args else None)
        position_embeddings = bound.get("position_embeddings", extra_kwargs.get("position_embeddings"))
        if kwargs.get("output_attentions"):
            raise NotImplementedError("LLaMA-Adapter does not return attention weights (output_attentions=True).")

        captured: List[torch.Tensor] = []

        def _capture(module, inputs, output):
            if not captured:
                captured.append(output)

        handle = self.base_layer.q_proj.register_forward_hook(_capture)
        try:
            outputs = self.base_layer(*args, **kwargs)
        finally:
            handle.remove()
        q_out = captured[0] if captured and captured[0].shape[:2] == hidden_states.shape[:2] else None
        attn_output = outputs[0] if isinstance(outputs, tuple) else outputs
        query = self._queries(hidden_states, q_out, position_embeddings)
        extra = None
        for adapter in active:
            branch = self._prompt_branch(adapter, query)
            extra = branch if extra is None else extra + branch
        o_proj = self.base_layer.o_proj
        projected = o_proj(extra.to(o_proj.weight.dtype) if o_proj.weight.dtype.is_floating_point else extra)
        bias = getattr(o_proj, "bias", None)
        if bias is not None:
            projected = projected - bias  # the prompt branch gets o_proj's weight only (zero effect at gate 0)
        result = (attn_output + projected).to(attn_output.dtype)
        if isinstance(outputs, tuple):
            return (result,) + tuple(outputs[1:])
        return result

    def __repr__(self) -> str:
        return "adaption_prompt." + super().__repr__()


class AdaptionPromptModel(BaseTuner):
    """The LLaMA-Adapter tuner: wraps the top ``adapter_layers`` attention modules in :class:`AdaptedAttention`.

    Used through :func:`fastpeft.get_peft_model` with an :class:`AdaptionPromptConfig`; offers
    the interface :class:`fastpeft.PeftModel` needs (``peft_config``, ``set_adapter``,
    ``delete_adapter``, ``enable/disable_adapter_layers``, ``adapter_key_map``). Several adapters
    may be loaded; one or more are active at a time.
    """

    prefix = "adaption_"
    layer_cls = AdaptedAttention

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        if not isinstance(config, AdaptionPromptConfig):
            raise TypeError(f"AdaptionPromptModel needs an AdaptionPromptConfig, got {type(config).__name__}.")

    def _prepare_adapter_config(self, config: AdaptionPromptConfig, model_config: Dict[str, Any]) -> AdaptionPromptConfig:
        model_type = model_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LLaMA-Adapter (adaption prompt) supports Llama-family attention ({', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
                f"this model's model_type is {model_type!r}. Use another method (e.g. LoRA) for it."
            )
        if config.target_modules is None:
            config.target_modules = SUPPORTED_MODEL_TYPES[model_type]
        return config

    def inject_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Wrap the top ``adapter_layers`` attention modules (or add the adapter to existing wrappers)."""
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        config = self._prepare_adapter_config(config, _config_dict(model))
        self.peft_config[adapter_name] = config
        name = config.target_modules
        keys = [k for k, _ in model.named_modules() if (k == name or k.endswith("." + name)) and not self._inside_tuner_internals(model, k)]
        if not keys:
            raise ValueError(
                f"No attention submodule named {name!r} in the model; set AdaptionPromptConfig.target_modules to the "
                "attention module's name in each decoder layer (e.g. 'self_attn')."
            )
        if config.adapter_layers > len(keys):
            raise ValueError(
                f"AdaptionPromptConfig(adapter_layers={config.adapter_layers}) asks for more adapter layers than the model "
                f"has ({len(keys)} attention modules named {name!r}). Use adapter_layers <= {len(keys)}."
            )
        hidden = _hidden_size(model)
        for key in keys[-config.adapter_layers:]:
            parent, target, child = get_submodules(model, key)
            if isinstance(target, AdaptedAttention):
                target.update_layer(adapter_name, config.adapter_len)
            else:
                setattr(parent, child, AdaptedAttention(target, adapter_name, config.adapter_len, hidden))
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for n, p in model.named_parameters():
                if n.endswith(f".{adapter_name}") and self.prefix in n:
                    p.requires_grad_(False)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activate ``adapter_name`` (or several, whose prompt branches add)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"Adapter {n!r} not found; loaded adapters: {list(self.peft_config)}")
        for _, layer in self.tuner_layers():
            layer.set_adapter(names)
        self.active_adapter = names[0] if len(names) == 1 else names

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_NO_MERGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError(_NO_MERGE)


_NO_MERGE = (
    "LLaMA-Adapter cannot be merged into the base weights: its prompts add an attention branch, not a weight "
    "delta. Keep the adapter loaded for inference, or call unload() to get the base model back."
)


def _config_dict(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    if hidden is None:
        raise ValueError("LLaMA-Adapter needs model.config.hidden_size to size the adaption prompts.")
    return int(hidden)
