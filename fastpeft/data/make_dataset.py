"""Generate the task shipped with ``fastpeft train`` (``train.jsonl``, ``eval.jsonl`` next to this file).

The task: reverse the order of a short list of words, as chat rows::

    {"messages": [{"role": "system", "content": "Answer with the words only."},
                  {"role": "user", "content": "Reverse the order of the words: cat dog sun"},
                  {"role": "assistant", "content": "sun dog cat"}]}

The answer is exact, so the held-out exact match is a clean measure; SmolLM2-135M-Instruct
gets it wrong (it chats about the words, or echoes them), and a LoRA run of a few dozen steps
learns it. The short system turn replaces SmolLM2's default system prompt (about 20 tokens).

Every word is a single token for SmolLM2's tokenizer (with and without a leading space), so
rows stay short (about 35 tokens with the chat template), which keeps the default run to a few
minutes on CPU. Held-out rows are word lists that never appear in the training rows.

The output is deterministic (fixed seed, sorted keys); regenerate with::

    python fastpeft/data/make_dataset.py            # writes fastpeft/data/{train,eval}.jsonl
    python fastpeft/data/make_dataset.py --check    # verify the committed files are up to date
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

WORDS = (
    "cat dog sun tree book fish bird milk rain star ship king road door moon wolf rock gold salt corn "
    "bear leaf hat cup pen box key map egg bus car bed ring sock coat rose lion pig owl fox bee ant"
).split()
SYSTEM = "Answer with the words only."
PROMPT = "Reverse the order of the words: {}"
SEED = 1234
N_TRAIN = 480
N_EVAL = 32
MIN_WORDS, MAX_WORDS = 3, 4


def _rows(rng: random.Random, n: int, seen: set) -> list:
    rows = []
    while len(rows) < n:
        k = rng.randint(MIN_WORDS, MAX_WORDS)
        words = tuple(rng.sample(WORDS, k))
        if words in seen:
            continue
        seen.add(words)
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT.format(" ".join(words))},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def build(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple:
    """Return ``(train_rows, eval_rows)``; eval word lists are disjoint from train ones."""
    rng = random.Random(seed)
    seen: set = set()
    ev = _rows(rng, n_eval, seen)
    tr = _rows(rng, n_train, seen)
    return tr, ev


def _dumps(rows: list) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--check", action="store_true", help="exit 1 if the files differ from what would be written")
    a = p.parse_args(argv)
    tr, ev = build()
    files = {a.out / "train.jsonl": _dumps(tr), a.out / "eval.jsonl": _dumps(ev)}
    if a.check:
        stale = [str(f) for f, text in files.items() if not f.is_file() or f.read_text(encoding="utf-8") != text]
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    for f, text in files.items():
        _write(f, text)
        print(f"wrote {f} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
