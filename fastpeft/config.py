"""Adapter configs: ``PeftType``, ``TaskType``, the ``PeftConfig`` base and ``adapter_config.json``.

The JSON written here is Hugging Face PEFT's ``adapter_config.json``: the same field names and
values, so either library reads the other's file. Unknown fields in a file (written by a newer
peft, say) are dropped with a warning, never an error.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Type, Union

from fastpeft import integrations
from fastpeft.utils.io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class PeftType(str, enum.Enum):
    """The PEFT methods, with peft's names (the values appear in ``adapter_config.json``)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"  # fastpeft's own (peft has no bottleneck adapters)

    def __str__(self) -> str:  # json.dumps of a str-enum writes its value
        return self.value


class TaskType(str, enum.Enum):
    """Task types, with peft's names; each picks a :class:`fastpeft.PeftModel` wrapper."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _coerce_task_type(value: Any) -> Optional[TaskType]:
    if value is None or isinstance(value, TaskType):
        return value
    try:
        return TaskType(str(value).upper())
    except ValueError:
        raise ValueError(
            f"Unknown task_type {value!r}. Use one of: {', '.join(t.value for t in TaskType)} "
            "(or leave it None for a bare model)."
        ) from None


# peft_type -> config class; filled by each tuner module via register_config
PEFT_TYPE_TO_CONFIG: Dict[PeftType, Type["PeftConfig"]] = {}


def register_config(cls: Type["PeftConfig"]) -> Type["PeftConfig"]:
    """Class decorator: make ``cls`` the config of its ``peft_type``."""
    PEFT_TYPE_TO_CONFIG[cls._peft_type] = cls
    return cls


@dataclass
class PeftConfig:
    """Fields every adapter config has (peft's ``PeftConfig``).

    Args:
        task_type: what the wrapped model does (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), or None.
        inference_mode: load the adapter frozen (no trainable parameters).
        base_model_name_or_path: the base model the adapter was trained on (written on save).
        revision: the base model's revision, if any.
    """

    _peft_type = None  # set by subclasses (class attribute, not a dataclass field)

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "Task type"})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "PEFT method"})
    auto_mapping: Optional[dict] = field(default=None)
    peft_version: Optional[str] = field(default=None)
    base_model_name_or_path: Optional[str] = field(default=None)
    revision: Optional[str] = field(default=None)
    inference_mode: bool = field(default=False)

    def __post_init__(self) -> None:
        integrations.auto_enable()  # Trainer / accelerate / TRL accept fastpeft (fastpeft.integrations)
        self.task_type = _coerce_task_type(self.task_type)
        if self._peft_type is not None:
            if self.peft_type is not None and PeftType(str(self.peft_type)) != self._peft_type:
                raise ValueError(f"{type(self).__name__} has peft_type {self._peft_type}, got {self.peft_type}")
            self.peft_type = self._peft_type
        elif self.peft_type is not None:
            self.peft_type = PeftType(str(self.peft_type))

    # --- properties peft exposes --------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt-learning methods (prompt tuning, P-tuning, prefix tuning)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # --- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The config as a JSON-able dict (enum values as strings, sets as sorted lists)."""
        out = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def save_pretrained(self, save_directory: str, **extra: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a directory.")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(extra)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str) -> Dict[str, Any]:
        """Read an ``adapter_config.json`` into a dict, with a clear error for a broken file."""
        try:
            with open(path, "r", encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the adapter config is corrupt.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PeftConfig":
        """Build the right config class for ``data["peft_type"]`` (or ``cls``), dropping unknown keys with a warning."""
        data = dict(data)
        target = cls
        if cls._peft_type is None:
            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ValueError("The adapter config has no 'peft_type'; cannot tell which PEFT method it is for.")
            try:
                target = PEFT_TYPE_TO_CONFIG[PeftType(str(peft_type))]
            except (ValueError, KeyError):
                known = ", ".join(sorted(p.value for p in PEFT_TYPE_TO_CONFIG))
                raise ValueError(f"Unsupported peft_type {peft_type!r}; fastpeft supports: {known}.") from None
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            warnings.warn(
                f"Ignoring adapter_config.json fields that {target.__name__} does not know: {', '.join(unknown)}",
                stacklevel=3,
            )
        return target(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any) -> "PeftConfig":
        """Load a config from a directory holding ``adapter_config.json`` (or the file itself).

        Only local paths are supported (fastpeft never downloads at run time).
        """
        path = pretrained_model_name_or_path
        if subfolder:
            path = os.path.join(path, subfolder)
        file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} found at {path!r}. Pass the directory written by save_pretrained "
                "(fastpeft or Hugging Face peft)."
            )
        data = cls.from_json_file(file)
        data.update(kwargs)
        return cls.from_dict(data)


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base of the prompt-learning configs (prompt tuning, P-tuning, prefix tuning): peft's fields."""

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: int = field(default=None)
    num_transformer_submodules: Optional[int] = field(default=None)
    num_attention_heads: Optional[int] = field(default=None)
    num_layers: Optional[int] = field(default=None)
    modules_to_save: Optional[list] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(
                f"num_virtual_tokens must be a positive integer (the number of virtual tokens to learn), got {n!r}; "
                "e.g. num_virtual_tokens=20."
            )
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None (taken from the model), got {value!r}.")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not inspect.isclass(value):
        return _jsonable(asdict(value))
    return value
