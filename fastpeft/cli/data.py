"""Data for ``fastpeft train``: JSONL rows, tokenisation with completion-only labels, batching.

A row is ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role", "content"}, ...]}``.
The loss covers completion tokens only (assistant turns for chat rows); prompt and padding
positions get label -100. Prompt/completion rows go through the tokenizer's chat template
when it has one (as a user turn and an assistant turn), else they are plain text:
``prompt`` then ``completion`` + EOS.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from fastpeft.cli.errors import TrainError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIN = DATA_DIR / "train.jsonl"
DEFAULT_EVAL = DATA_DIR / "eval.jsonl"
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized row: full ids and labels for training, prompt ids and reference text for exact match."""
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str
    prompt_text: str


# ----------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> list[dict]:
    """Read and validate a JSONL dataset; errors (bad UTF-8, bad JSON, bad rows) name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"data file not found: {path} (pass an existing JSONL file)")
    rows = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so a decoding error knows its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TrainError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                 "re-save the file as UTF-8") from None
            if not line.strip():
                continue
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


def load_rows(data: Path | None, eval_data: Path | None, seed: int, eval_examples: int | None):
    """(train rows, eval rows, train path, a description of where the eval rows came from).

    Eval rows: ``eval_data``; else the shipped eval set with the shipped training data; else
    10% (at most 50 rows) held out of ``data`` with a ``seed``-fixed permutation.
    """
    train_path = data or DEFAULT_TRAIN
    train_rows = read_jsonl(train_path)
    if eval_data is not None:
        eval_rows, eval_src = read_jsonl(eval_data), str(eval_data)
    elif data is None:
        eval_rows, eval_src = read_jsonl(DEFAULT_EVAL), str(DEFAULT_EVAL)
    else:
        if len(train_rows) < 2:
            raise TrainError(f"{train_path} has {len(train_rows)} row(s): too few to hold some out; pass --eval-data")
        k = min(50, max(1, len(train_rows) // 10))
        perm = random.Random(seed).sample(range(len(train_rows)), len(train_rows))
        eval_rows = [train_rows[i] for i in perm[:k]]
        train_rows = [train_rows[i] for i in sorted(perm[k:])]
        eval_src = f"{k} rows held out of {train_path}"
    if eval_examples is not None:
        eval_rows = eval_rows[:eval_examples]
    return train_rows, eval_rows, train_path, eval_src


# ----------------------------------------------------------------------------- tokenising


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


def _encode_chat(tok, messages: list[dict]) -> Example:
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
    prompt_text = messages[-2]["content"] if len(messages) > 1 else ""
    return Example(ids, labels, ids[:start], messages[-1]["content"], prompt_text)


def _encode_plain(tok, row: dict) -> Example:
    prompt_ids = tok(row["prompt"])["input_ids"]
    comp = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Example(prompt_ids + comp, [IGNORE_INDEX] * len(prompt_ids) + comp, prompt_ids,
                   row["completion"], row["prompt"])


def encode_row(tok, row: dict, use_chat: bool, max_length: int) -> Example | None:
    """Tokenize one row; returns None when truncation leaves no target token."""
    if "messages" in row:
        if not use_chat:
            raise TrainError("chat ('messages') rows need a tokenizer with a chat template "
                             "(and no --no-chat-template)")
        ex = _encode_chat(tok, row["messages"])
    elif use_chat:
        ex = _encode_chat(tok, [{"role": "user", "content": row["prompt"]},
                                {"role": "assistant", "content": row["completion"]}])
    else:
        ex = _encode_plain(tok, row)
    ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
    if all(l == IGNORE_INDEX for l in ex.labels):
        return None
    return ex


def encode_rows(tok, rows: list[dict], use_chat: bool, max_length: int, what: str) -> list[Example]:
    """Tokenize ``rows``, dropping (with a note) those truncation leaves without a target token."""
    out = [e for e in (encode_row(tok, r, use_chat, max_length) for r in rows) if e is not None]
    if len(out) < len(rows):
        print(f"note: {len(rows) - len(out)} {what} rows dropped (no completion token left within "
              f"--max-length {max_length})", file=sys.stderr)
    if not out:
        raise TrainError(f"no usable {what} rows: every completion was cut off by --max-length {max_length}")
    return out


# ----------------------------------------------------------------------------- batching


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


class BatchStream:
    """Endless shuffled micro-batches: a new permutation every epoch, the ragged tail dropped.

    Its position (the shuffling generator's state at the start of the current epoch, plus the
    offset into that epoch's order) is part of every checkpoint, so a resumed run sees the
    same batches as an uninterrupted one.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        import torch
        self.examples, self.batch_size = examples, batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        import torch
        self._epoch_start = self._gen.get_state()
        self._order = torch.randperm(len(self.examples), generator=self._gen).tolist()
        self._offset = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[Example]:
        while True:
            idx = self._order[self._offset:self._offset + self.batch_size]
            if idx and (len(idx) == self.batch_size or len(self._order) < self.batch_size):
                self._offset += self.batch_size
                return [self.examples[j] for j in idx]
            self._new_epoch()  # epoch done (or only a ragged tail left): reshuffle

    def state_dict(self) -> dict:
        """The data position: where in which shuffle the next batch starts."""
        return {"epoch_start_rng": self._epoch_start.clone(), "offset": self._offset, "rows": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a stream over the same examples."""
        if state["rows"] != len(self.examples):
            raise TrainError(f"--resume: the checkpoint was trained on {state['rows']} rows, this data has "
                             f"{len(self.examples)}; resume with the same --data and --max-length")
        self._gen.set_state(state["epoch_start_rng"])
        self._new_epoch()
        self._offset = state["offset"]
