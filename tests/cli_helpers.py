"""Tiny models and data for the `fastpeft train` tests: a word-level tokenizer, a random Llama
saved as a transformers checkpoint, and a task a LoRA learns in a few steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

LETTERS = list("abcdefgh")
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = LETTERS + ["copy", "reverse", "next", ":", "user", "assistant", "system"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llama(d: Path, hidden: int = 32) -> Path:
    """A tiny random LlamaForCausalLM + the word-level tokenizer saved as a transformers checkpoint.

    initializer_range=0.3: with the default 0.02 the frozen lm_head of a 32-wide model caps logits
    near 0.6 after the final norm, so no adapter could fit any task.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def task_rows(n: int, seed: int):
    """A task a LoRA on a frozen random model learns in a few steps: "next : c" -> "d e" (the two following letters)."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        i = r.randrange(len(LETTERS) - 2)
        rows.append({"prompt": f"next : {LETTERS[i]}", "completion": f"{LETTERS[i + 1]} {LETTERS[i + 2]}"})
    return rows


def run_files(d: Path):
    """(model dir, train.jsonl, eval.jsonl) of a tiny run under ``d``: 64 task rows to train on, 4 to
    evaluate (the resume and distributed tests share them)."""
    model = save_tiny_llama(d / "model")
    train = write_rows(d / "train.jsonl", task_rows(64, 1))
    ev = write_rows(d / "eval.jsonl", task_rows(4, 2))
    return model, train, ev
