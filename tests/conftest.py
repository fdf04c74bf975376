"""Shared fixtures: tiny randomly initialised transformers models (fast on 2 CPU cores)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# TRITON_INTERPRET=1 must be set before triton is imported (triton.jit decides at decoration
# time whether a kernel runs in the CPU interpreter). CPU tensors still use the reference path
# unless a test forces backend="triton". On a CUDA machine the kernels run compiled (tests
# marked ``gpu``) and the interpreter tests skip themselves.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")

# fp32 tolerance for "same outputs as peft", written once (issue: atol 1e-5)
FP32_ATOL = 1e-5


def tiny_llama(seed: int = 0, layers: int = 2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_bert_tokens(seed: int = 0, num_labels: int = 5):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForTokenClassification(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def lora_train_step(model, ids, seed: int = 0):
    """Logits and LoRA gradients of one training-mode forward/backward (seeded, so dropout masks
    repeat across the models being compared)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    # the fused LM-head loss (fastpeft's models, fastpeft.patch) skips the logits unless asked
    from fastpeft.patch_loss import is_loss_patched

    fused = is_loss_patched(model) or getattr(model, "fused_loss", False)
    out = model(input_ids=ids, labels=ids, **({"skip_logits": False} if fused else {}))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    return out.logits.detach(), grads


def count_calls(monkeypatch, owner, name: str, record=lambda args, kwargs: backend_of(kwargs)):
    """Wrap ``owner.<name>`` (an op a layer calls) so every call appends ``record(args, kwargs)``
    (by default the backend it runs with, :func:`backend_of`) to the returned list, then runs
    the real op: proves a forward was routed through it."""
    calls, real = [], getattr(owner, name)

    def counting(*a, **k):
        calls.append(record(a, k))
        return real(*a, **k)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.fixture
def settings():
    """The one way tests change fastpeft's settings (backend, Triton plans).

    ``settings(backend="triton", lora_impl="fused")`` makes the current settings (what
    ``fastpeft.get_settings()`` returns, used by every op not given explicit values) those of
    the moment with the overrides applied, and returns them; call it again to change them
    within the test. The settings from before the test are restored after it, whether it
    passed or failed.
    """
    from fastpeft.ops.settings import get_settings, set_settings

    before = get_settings()

    def apply(**overrides):
        new = get_settings().replace(**overrides)
        set_settings(new)
        return new

    yield apply
    set_settings(before)


def backend_of(kwargs) -> str:
    """The backend an op call uses: its ``backend=`` keyword, else its ``settings=``' backend
    (what patched layers pass), else the current settings'."""
    from fastpeft.ops.settings import get_settings

    if kwargs.get("backend") is not None:
        return kwargs["backend"]
    return (kwargs.get("settings") or get_settings()).backend


class TokenRows(torch.utils.data.Dataset):
    """``n`` causal-LM rows for Trainer tests: ids ``(i .. i+length-1) % 100 + 1``, labels = ids."""

    def __init__(self, n: int, length: int):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.arange(i, i + self.length) % 100 + 1
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (2, 9), generator=g)


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (w0..w119 + UNK/PAD/EOS), for TRL and
    Trainer tests that need a real ``PreTrainedTokenizerFast`` without a hub download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"[UNK]": 120, "[PAD]": 121, "[EOS]": 122})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
