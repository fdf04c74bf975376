"""Bottleneck adapters (Houlsby, Pfeiffer) and AdapterFusion.

A bottleneck adapter is a small residual MLP inserted after a transformer sub-layer::

    h  <- h + scaling * W_up( act( W_down( dropout(h) ) ) )      W_down: hidden -> hidden / reduction_factor

Hugging Face peft has no bottleneck adapters. fastpeft follows the config names of the AdapterHub
``adapters`` library (``mh_adapter``, ``output_adapter``, ``reduction_factor``,
``non_linearity``, ``init_weights``, ``scaling``, ``leave_out``; the AdapterFusion names ``query``,
``key``, ``value``, ``value_before_softmax``, ``value_initialized``, ``residual_before``) but
writes peft-style checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``). It does
not read AdapterHub's own checkpoint files.

Usage
-----
::

    model = fastpeft.get_peft_model(base, fastpeft.HoulsbyConfig(reduction_factor=16, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()          # only the adapters (and modules_to_save) train
    ...                                          # train (own loop, transformers.Trainer, TRL)
    model.save_pretrained("out")                 # out/adapter_config.json + out/adapter_model.safetensors
    model = fastpeft.PeftModel.from_pretrained(fresh_base, "out")  # a newly loaded base model

Presets
-------
* :class:`HoulsbyConfig` (AdapterHub's ``DoubleSeqBnConfig``): an adapter after the attention block
  (``mh_adapter=True``) and one after the feed-forward block (``output_adapter=True``), ``swish``.
* :class:`PfeifferConfig` (AdapterHub's ``SeqBnConfig``): after the feed-forward block only, ``relu``.

Placement (``target_modules=None``)
-----------------------------------
The adapter transforms the *output of a sub-layer, before the residual connection* (Houlsby et
al., 2019). fastpeft wraps the sub-layer module and passes its output (the first element when it
returns a tuple) through the adapter:

==============================  =======================================  ==================================
model_type                      ``mh_adapter`` (after attention)         ``output_adapter`` (after FFN)
==============================  =======================================  ==================================
llama, mistral, qwen2, qwen3,   ``model.layers.N.self_attn`` (its        ``model.layers.N.mlp``
gemma, gemma2, phi3             output, before ``residual + ...``)
gpt2                            ``transformer.h.N.attn``                 ``transformer.h.N.mlp``
bert, roberta, xlm-roberta,     ``...layer.N.attention.output.dense``    ``...layer.N.output.dense``
electra                         (before dropout, skip and LayerNorm)     (before dropout, skip and LayerNorm)
==============================  =======================================  ==================================

For BERT-style (post-LayerNorm) models this is AdapterHub's placement (after the projection,
before ``LayerNorm(h + input)``) except that the dropout of the projection is applied after the
adapter rather than before; the two agree in eval mode. AdapterHub's ``original_ln_before`` /
``original_ln_after`` / ``residual_before_ln`` variants and adapter-internal layer norms are not
implemented. For other models pass ``target_modules`` (a list of module-name suffixes or a
full-match regex) naming the sub-layers whose outputs get an adapter; the resolved regex is
written to ``adapter_config.json``.

Initialisation (``init_weights``)
---------------------------------
``"mam"`` (default): ``W_down`` Kaiming-uniform, ``W_up`` and both biases zero, so the model is
exactly unchanged at the start of training. ``"bert"`` (AdapterHub's default): both weights
``N(0, 0.02)``, biases zero (near identity). ``"houlsby"``: both weights truncated normal with
std 1e-2, biases zero (near identity).

AdapterFusion
-------------
``model.add_fusion(["a", "b"], fusion_config=AdapterFusionConfig(...))`` adds, at every module
carrying adapters ``a`` and ``b``, an attention over the adapters' outputs (Pfeiffer et al., 2021)::

    d_i   = W_up_i(act(W_down_i(h)))                   # each fused adapter's output, without its residual
    p     = softmax_i( <Q h, K d_i> / T )
    h    <- h + sum_i p_i V d_i

``Q``/``K`` start as ``N(0, 0.02)`` (so ``p`` starts near uniform) and ``V`` as the identity
(``value_initialized=True``): a new fusion starts as the average of its adapters' updates, and a
fusion of one adapter equals that adapter. ``model.set_adapter(fusion_name)`` activates it and
makes only the fusion weights trainable (the fused adapters stay frozen).
``model.fusion_regularization_loss()`` gives AdapterHub's ``sum((I - V)^2)`` regulariser to add to
the loss if wanted.

Checkpoint format
-----------------
``save_pretrained`` writes, per adapter, ``adapter_config.json`` with ``"peft_type": "BOTTLENECK"``
and the fields of :class:`BottleneckConfig`, plus ``adapter_model.safetensors`` with, for every
wrapped module ``<m>`` (its name inside the transformers model, e.g. ``model.layers.0.self_attn``)::

    base_model.model.<m>.adapter_down.weight   [hidden / reduction_factor, hidden]
    base_model.model.<m>.adapter_down.bias     [hidden / reduction_factor]
    base_model.model.<m>.adapter_up.weight     [hidden, hidden / reduction_factor]
    base_model.model.<m>.adapter_up.bias       [hidden]

plus the ``modules_to_save`` tensors when present (e.g. ``base_model.model.classifier.weight``,
named as fastpeft's ``PeftModel`` saves them for every method). A fusion is saved like an adapter: its config has
``"fusion_of": ["a", "b"]`` and ``"fusion_config": {...}``, its file holds
``base_model.model.<m>.adapter_fusion.{query,key,value}.{weight,bias}`` (``[hidden, hidden]`` /
``[hidden]``) for each module. Load the fused adapters first (under the same names), then the
fusion with ``model.load_adapter(path, fusion_name)``. Adapter names never appear in the keys.

Folder layout (peft's): ``save_pretrained(dir)`` writes the adapter named ``"default"`` to ``dir``
itself and every other adapter or fusion to ``dir/<name>/`` (e.g. ``dir/a``, ``dir/b``,
``dir/a,b``). The fusion's config also carries the (unused) bottleneck fields with their defaults.

Bottleneck adapters cannot be merged into the base weights (the non-linearity): ``merge_and_unload``
raises, ``unload`` removes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.config import PeftConfig, PeftType, register_config
from fastpeft.tuners.base import BaseTuner, BaseTunerLayer, check_target_module_exists
from fastpeft.utils.modules import layer_index_of, set_modules_to_save

# model_type -> (regex of attention sub-layers, regex of feed-forward sub-layers); full match on module names
DEFAULT_PLACEMENT: Dict[str, tuple] = {
    **{t: (r".*\.layers\.\d+\.self_attn", r".*\.layers\.\d+\.mlp") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "gpt2": (r".*\.h\.\d+\.attn", r".*\.h\.\d+\.mlp"),
    **{t: (r".*\.layer\.\d+\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense") for t in ("bert", "roberta", "xlm-roberta", "electra")},
}

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "linear": lambda x: x,
}

_INIT_WEIGHTS = ("mam", "bert", "houlsby")


@dataclass
class AdapterFusionConfig:
    """Hyper-parameters of an AdapterFusion layer (AdapterHub's names).

    Args:
        query / key / value: learn a ``hidden x hidden`` projection for the query (the sub-layer
            output), the keys and the values (the fused adapters' outputs); False uses them as they are.
        value_before_softmax: apply ``V`` to each adapter output before mixing (True) or to the mix.
        value_initialized: start ``V`` as the identity (True) or ``N(0, 0.02)``.
        residual_before: add the sub-layer output to each adapter output before the attention
            (AdapterHub's option) instead of once after it.
        softmax_temperature: ``T`` in ``softmax(scores / T)`` (fixed; AdapterHub's annealing is not implemented).
    """

    query: bool = True
    key: bool = True
    value: bool = True
    value_before_softmax: bool = True
    value_initialized: bool = True
    residual_before: bool = False
    softmax_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not float(self.softmax_temperature) > 0:
            raise ValueError(f"AdapterFusionConfig.softmax_temperature must be > 0, got {self.softmax_temperature}.")


@register_config
@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (AdapterHub's ``BnConfig`` names; default: Pfeiffer placement).

    Args:
        mh_adapter: an adapter after the attention block.
        output_adapter: an adapter after the feed-forward block.
        reduction_factor: bottleneck size is ``hidden_size / reduction_factor``; must divide the hidden size.
        non_linearity: ``relu``, ``swish``/``silu``, ``gelu``, ``gelu_new``, ``tanh``, ``sigmoid``,
            ``leakyrelu`` or ``linear``.
        init_weights: ``"mam"`` (up-projection zero: exactly no effect at init), ``"bert"`` or
            ``"houlsby"`` (small random weights: near identity).
        scaling: factor on the adapter's output.
        dropout: dropout on the adapter's input.
        leave_out: block indices that get no adapter.
        target_modules: override the placement: module-name suffixes (list) or a full-match regex
            (str) of the sub-layers whose outputs get an adapter. None: from ``mh_adapter`` /
            ``output_adapter`` and the model type (see the module docstring).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        fusion_of: set by :meth:`BottleneckModel.add_fusion`: this config describes an
            AdapterFusion over these adapters rather than an adapter.
        fusion_config: the fusion's :class:`AdapterFusionConfig` as a dict (with ``fusion_of``).
    """

    _peft_type = PeftType.BOTTLENECK

    mh_adapter: bool = field(default=False)
    output_adapter: bool = field(default=True)
    reduction_factor: int = field(default=16)
    non_linearity: str = field(default="relu")
    init_weights: str = field(default="mam")
    scaling: float = field(default=1.0)
    dropout: float = field(default=0.0)
    leave_out: List[int] = field(default_factory=list)
    target_modules: Optional[Union[List[str], str]] = field(default=None)
    modules_to_save: Optional[List[str]] = field(default=None)
    fusion_of: Optional[List[str]] = field(default=None)
    fusion_config: Optional[Dict[str, Any]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        rf = self.reduction_factor
        if not isinstance(rf, int) or isinstance(rf, bool) or rf < 1:
            raise ValueError(
                f"reduction_factor must be a positive integer dividing the hidden size (e.g. 16), got {rf!r}."
            )
        if str(self.non_linearity).lower() not in _ACTIVATIONS:
            raise ValueError(f"Unknown non_linearity {self.non_linearity!r}; use one of: {', '.join(_ACTIVATIONS)}.")
        if self.init_weights not in _INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {_INIT_WEIGHTS}, got {self.init_weights!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.fusion_of is not None:
            if len(self.fusion_of) < 1 or len(set(self.fusion_of)) != len(self.fusion_of):
                raise ValueError(f"fusion_of must name distinct adapters, got {self.fusion_of!r}.")
            self.fusion_config = dataclasses.asdict(AdapterFusionConfig(**(self.fusion_config or {})))
        elif self.target_modules is None and not (self.mh_adapter or self.output_adapter):
            raise ValueError("A bottleneck adapter needs mh_adapter=True and/or output_adapter=True (or explicit target_modules).")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.leave_out is None:
            self.leave_out = []
        self.leave_out = sorted(int(i) for i in self.leave_out)

    @property
    def is_fusion(self) -> bool:
        """True when this config describes an AdapterFusion (``fusion_of`` set)."""
        return self.fusion_of is not None


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby adapters (AdapterHub ``DoubleSeqBnConfig``): after attention and after the feed-forward block."""

    mh_adapter: bool = field(default=True)
    output_adapter: bool = field(default=True)
    non_linearity: str = field(default="swish")


@dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer adapters (AdapterHub ``SeqBnConfig``): after the feed-forward block only."""

    mh_adapter: bool = field(default=False)
    output_adapter: bool = field(default=True)
    non_linearity: str = field(default="relu")


class AdapterFusionLayer(nn.Module):
    """Attention over several adapters' outputs at one position (see the module docstring)."""

    def __init__(self, hidden_size: int, config: AdapterFusionConfig):
        super().__init__()
        self.config = config
        self.query = nn.Linear(hidden_size, hidden_size) if config.query else None
        self.key = nn.Linear(hidden_size, hidden_size) if config.key else None
        self.value = nn.Linear(hidden_size, hidden_size) if config.value else None
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        if self.value is not None and config.value_initialized:
            with torch.no_grad():
                self.value.weight.copy_(torch.eye(hidden_size))

    def forward(self, hidden: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        values = torch.stack(list(outputs), dim=-2)  # [..., N, H]
        if cfg.residual_before:
            values = values + hidden.unsqueeze(-2)
        query = self.query(hidden) if self.query is not None else hidden
        keys = self.key(values) if self.key is not None else values
        if self.value is not None and cfg.value_before_softmax:
            values = self.value(values)
        scores = torch.matmul(keys, query.unsqueeze(-1)).squeeze(-1)  # [..., N]
        probs = torch.softmax(scores.float() / cfg.softmax_temperature, dim=-1).to(values.dtype)
        context = torch.matmul(probs.unsqueeze(-2), values).squeeze(-2)
        if self.value is not None and not cfg.value_before_softmax:
            context = self.value(context)
        if not cfg.residual_before:
            context = context + hidden
        return context


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps a sub-layer (``base_layer``) and passes its output through bottleneck adapters / fusions.

    Active adapters are applied in order (AdapterHub's ``Stack``); an active fusion mixes its
    adapters (see :class:`AdapterFusionLayer`).
    """

    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_fusion")
    other_param_names = ("reduction_factor", "scaling", "non_linearity", "adapter_dropout", "fusion_of")

    def __init__(self, base_layer: nn.Module, hidden_size: int):
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.hidden_size = hidden_size
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.reduction_factor: Dict[str, int] = {}
        self.scaling: Dict[str, float] = {}
        self.non_linearity: Dict[str, str] = {}
        self.fusion_of: Dict[str, List[str]] = {}
        self._active_adapter = []

    @property
    def weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        if hasattr(base, "weight"):
            return base.weight
        return next(p for p in base.parameters())

    def _dtype_device(self):
        ref = next((p for p in self.get_base_layer().parameters() if p.dtype.is_floating_point), None)
        dtype = ref.dtype if ref is not None else torch.float32
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # adapters train in fp32 on half-precision bases
        device = ref.device if ref is not None and ref.device.type != "meta" else torch.device("cpu")
        return dtype, device

    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str = "") -> None:
        """Create adapter ``adapter_name`` on this layer."""
        rf = config.reduction_factor
        if self.hidden_size % rf != 0:
            raise ValueError(
                f"reduction_factor={rf} does not divide the hidden size {self.hidden_size} of module {module_name!r}; "
                f"pick a divisor of {self.hidden_size} (e.g. {_divisor_hint(self.hidden_size, rf)})."
            )
        bottleneck = self.hidden_size // rf
        dtype, device = self._dtype_device()
        down = nn.Linear(self.hidden_size, bottleneck)
        up = nn.Linear(bottleneck, self.hidden_size)
        _init_adapter(down, up, config.init_weights)
        self.adapter_down[adapter_name] = down.to(device=device, dtype=dtype)
        self.adapter_up[adapter_name] = up.to(device=device, dtype=dtype)
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reduction_factor[adapter_name] = rf
        self.scaling[adapter_name] = float(config.scaling)
        self.non_linearity[adapter_name] = str(config.non_linearity).lower()
        self.set_adapter(self.active_adapters)

    def update_fusion(self, fusion_name: str, adapter_names: List[str], fusion_config: AdapterFusionConfig) -> None:
        """Create fusion ``fusion_name`` over ``adapter_names`` (all present on this layer)."""
        dtype, device = self._dtype_device()
        self.adapter_fusion[fusion_name] = AdapterFusionLayer(self.hidden_size, fusion_config).to(device=device, dtype=dtype)
        self.fusion_of[fusion_name] = list(adapter_names)
        self.set_adapter(self.active_adapters)

    def _delta(self, adapter: str, h: torch.Tensor) -> torch.Tensor:
        x = self.adapter_dropout[adapter](h)
        act = _ACTIVATIONS[self.non_linearity[adapter]]
        return self.adapter_up[adapter](act(self.adapter_down[adapter](x))) * self.scaling[adapter]

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the active adapters / fusion to a sub-layer output."""
        active = [a for a in self.active_adapters if a in self.adapter_down or a in self.adapter_fusion]
        if self.disable_adapters or not active:
            return hidden
        dtype = self.adapter_up[self._first_adapter(active[0])].weight.dtype
        h = hidden.to(dtype)
        for name in active:
            if name in self.adapter_fusion:
                outputs = [self._delta(a, h) for a in self.fusion_of[name]]
                h = self.adapter_fusion[name](h, outputs)
            else:
                h = h + self._delta(name, h)
        return h.to(hidden.dtype)

    def _first_adapter(self, name: str) -> str:
        return self.fusion_of[name][0] if name in self.adapter_fusion else name

    def forward(self, *args: Any, **kwargs: Any):
        outputs = self.base_layer(*args, **kwargs)
        if isinstance(outputs, tuple):
            return (self.adapt(outputs[0]),) + tuple(outputs[1:])
        return self.adapt(outputs)

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """The bottleneck-adapter tuner (Houlsby / Pfeiffer) with AdapterFusion.

    Used through :func:`fastpeft.get_peft_model` with a :class:`BottleneckConfig` (or
    :class:`HoulsbyConfig` / :class:`PfeifferConfig`). See the module docstring for placement,
    fusion and the checkpoint format.
    """

    prefix = "adapter_"
    layer_cls = BottleneckLayer

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"BottleneckModel needs a BottleneckConfig, got {type(config).__name__}.")

    def _prepare_adapter_config(self, config: BottleneckConfig, model_config: Dict[str, Any]) -> BottleneckConfig:
        if config.is_fusion or config.target_modules is not None:
            return config
        model_type = model_config.get("model_type")
        if model_type not in DEFAULT_PLACEMENT:
            raise ValueError(
                f"No default bottleneck-adapter placement for model_type {model_type!r} (known: "
                f"{', '.join(sorted(DEFAULT_PLACEMENT))}). Pass target_modules naming the attention and/or "
                "feed-forward sub-layers whose outputs should get an adapter."
            )
        attn, ffn = DEFAULT_PLACEMENT[model_type]
        parts = ([attn] if config.mh_adapter else []) + ([ffn] if config.output_adapter else [])
        config.target_modules = "|".join(f"(?:{p})" for p in parts)
        return config

    def _check_target_module_exists(self, config: BottleneckConfig, key: str) -> bool:
        if not check_target_module_exists(config, key):
            return False
        if config.leave_out:
            idx = layer_index_of(key)
            if idx is not None and idx in config.leave_out:
                return False
        return True

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        layer = BottleneckLayer(target, _hidden_size_of(target, self.model, current_key))
        layer.update_layer(adapter_name, config, current_key)
        layer.set_adapter(self.active_adapters)
        setattr(parent, target_name, layer)

    def inject_adapter(self, model: nn.Module, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        if not config.is_fusion:
            super().inject_adapter(model, adapter_name)
            return
        missing = [a for a in config.fusion_of if a not in self.peft_config or self.peft_config[a].is_fusion]
        if missing:
            raise ValueError(
                f"AdapterFusion {adapter_name!r} fuses {config.fusion_of}, but {missing} are not loaded bottleneck "
                "adapters. Add or load those adapters (under these names) before the fusion."
            )
        fusion_cfg = AdapterFusionConfig(**config.fusion_config)
        layers = [(n, l) for n, l in self.tuner_layers() if any(a in l.adapter_down for a in config.fusion_of)]
        for name, layer in layers:
            lacking = [a for a in config.fusion_of if a not in layer.adapter_down]
            if lacking:
                raise ValueError(
                    f"Cannot fuse {config.fusion_of}: module {name!r} has adapters {[a for a in config.fusion_of if a not in lacking]} "
                    f"but not {lacking}. Fused adapters must sit at the same modules (same mh_adapter/output_adapter/leave_out)."
                )
        for _, layer in layers:
            layer.update_fusion(adapter_name, list(config.fusion_of), fusion_cfg)
        # a fusion gets its own trainable copy of modules_to_save (e.g. the classifier head)
        set_modules_to_save(model, sorted(set(config.modules_to_save or [])), adapter_name)
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for n, p in model.named_parameters():
                if f".{adapter_name}." in n:
                    p.requires_grad_(False)

    # --- fusion API ---------------------------------------------------------------------------
    def add_fusion(self, adapter_names: Sequence[str], fusion_name: Optional[str] = None, fusion_config: Optional[Union[AdapterFusionConfig, dict]] = None) -> str:
        """Add an AdapterFusion over the loaded adapters ``adapter_names``; returns its name.

        The fusion is not made active: call ``set_adapter(fusion_name)`` to use and train it (only
        its weights train). ``fusion_name`` defaults to the adapter names joined by commas, as in
        AdapterHub.
        """
        names = list(adapter_names)
        if isinstance(adapter_names, str) or not names:
            raise ValueError("add_fusion needs a list of adapter names, e.g. model.add_fusion(['a', 'b']).")
        name = fusion_name or ",".join(names)
        if name in self.peft_config:
            raise ValueError(f"An adapter or fusion named {name!r} already exists; pick another fusion_name.")
        if isinstance(fusion_config, AdapterFusionConfig):
            fusion_config = dataclasses.asdict(fusion_config)
        first = self.peft_config.get(names[0])
        config = BottleneckConfig(
            fusion_of=names,
            fusion_config=fusion_config,
            task_type=getattr(first, "task_type", None),
            modules_to_save=getattr(first, "modules_to_save", None),
            base_model_name_or_path=getattr(first, "base_model_name_or_path", None),
        )
        self.peft_config[name] = config
        try:
            self.inject_adapter(self.model, name)
        except Exception:
            del self.peft_config[name]
            raise
        return name

    def fusion_regularization_loss(self, fusion_name: Optional[str] = None) -> torch.Tensor:
        """AdapterHub's regulariser ``sum over layers of ||I - V||^2`` for the fusion's value matrices.

        ``fusion_name`` defaults to the active fusion. Add it (times a small factor) to the loss.
        """
        if fusion_name is None:
            fusion_name = next((a for a in self.active_adapters if self.peft_config[a].is_fusion), None)
            if fusion_name is None:
                raise ValueError("No active fusion; pass fusion_name or call set_adapter(<fusion name>) first.")
        total = None
        for _, layer in self.tuner_layers():
            fusion = layer.adapter_fusion[fusion_name] if fusion_name in layer.adapter_fusion else None
            if fusion is None or fusion.value is None:
                continue
            w = fusion.value.weight
            term = (torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError(f"{fusion_name!r} is not a fusion with value matrices.")
        return total

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter or fusion (an adapter used by a fusion can only go after the fusion)."""
        users = [n for n, c in self.peft_config.items() if c.is_fusion and adapter_name in c.fusion_of]
        if users:
            raise ValueError(f"Adapter {adapter_name!r} is used by fusion(s) {users}; delete those first.")
        super().delete_adapter(adapter_name)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_NO_MERGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError(_NO_MERGE)


_NO_MERGE = (
    "Bottleneck adapters cannot be merged into the base weights (they contain a non-linearity). Keep them "
    "loaded for inference, or call unload() to get the base model back."
)


def _init_adapter(down: nn.Linear, up: nn.Linear, how: str) -> None:
    if how == "mam":
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
    elif how == "bert":
        nn.init.normal_(down.weight, std=0.02)
        nn.init.normal_(up.weight, std=0.02)
    else:  # houlsby
        nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
    nn.init.zeros_(down.bias)
    nn.init.zeros_(up.bias)


def _hidden_size_of(module: nn.Module, model: nn.Module, key: str) -> int:
    out = getattr(module, "out_features", None)
    if isinstance(out, int):
        return out
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot tell the output size of module {key!r}; target a module with out_features or a model with config.hidden_size.")


def _divisor_hint(hidden: int, rf: int) -> int:
    divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
    return min(divisors, key=lambda d: (abs(d - rf), d))
