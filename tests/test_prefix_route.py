"""fastpeft.prefix_route: the cache keyword is chosen by what the model takes, on any supported
transformers (``past_key_values`` before 5.24, ``cache`` from 5.24), and fastpeft's own calls
never use the deprecated name: no FutureWarning, and the base model never receives it.

Covered: fastpeft's Prefix Tuning on the KV-cache path (causal Llama and seq2seq T5, forward and
generate), on the fused path (forward and generate), and a patched peft Prefix model.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import fastpeft
from conftest import tiny_llama, tiny_t5
from fastpeft.prefix_attention_hf import disable_prefix_attention, enable_prefix_attention
from fastpeft.prefix_route import CACHE_KWARGS, cache_kwarg, output_cache

P = 3


@contextlib.contextmanager
def _no_deprecated_cache_use(model):
    """Record every keyword the transformers model's forward receives and every warning about
    the cache's name; fail if the deprecated name was used where the model takes the new one."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield seen
        finally:
            handle.remove()
    taken = cache_kwarg(model)
    assert seen, "the model was never called"
    others = [n for n in CACHE_KWARGS if n != taken]
    assert not [kw for kw in seen if kw & set(others)], f"called with {others}; the model takes {taken!r}"
    bad = [str(w.message) for w in caught
           if issubclass(w.category, FutureWarning) and any(n in str(w.message) for n in CACHE_KWARGS)]
    assert not bad, bad


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def test_cache_kwarg_follows_the_signature():
    import transformers

    model = tiny_llama()
    assert cache_kwarg(model) in CACHE_KWARGS
    new = "cache" in __import__("inspect").signature(type(model).forward).parameters
    assert cache_kwarg(model) == ("cache" if new else "past_key_values")

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, past_key_values=None):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    assert cache_kwarg(torch.nn.Linear(2, 2)) is None
    out = model(input_ids=torch.tensor([[3, 4]]), use_cache=True)
    assert isinstance(output_cache(out), transformers.Cache) and output_cache(out).get_seq_length() == 2


@pytest.mark.parametrize("fused", [False, True], ids=["kv-cache", "fused"])
def test_fastpeft_causal_prefix_uses_the_models_cache_name(monkeypatch, fused, settings):
    settings(backend="reference")
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    base = model.get_base_model()
    if fused:
        enable_prefix_attention(base)
    ids, mask = _inputs()
    walks = []
    walk = base.modules
    base.modules = lambda *a, **k: walks.append(1) or walk(*a, **k)  # the registry is found without a walk
    try:
        with _no_deprecated_cache_use(base):
            out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)
            out.loss.backward()
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        del base.modules
        if fused:
            disable_prefix_attention(base)
    assert not walks
    # the cache the model returns: the real tokens (fused) or the prefix and the tokens (KV-cache path)
    assert output_cache(out).get_seq_length() == ids.shape[1] + (0 if fused else P)
    assert gen.shape == (2, ids.shape[1] + 3)
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().max() > 0


def test_fastpeft_seq2seq_prefix_uses_the_models_cache_name():
    model = fastpeft.get_peft_model(tiny_t5(), fastpeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    ids, mask = _inputs()
    base = model.get_base_model()
    with _no_deprecated_cache_use(base):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.logits.shape[:2] == (2, 4) and gen.shape[0] == 2


def test_patched_peft_prefix_uses_the_models_cache_name(monkeypatch, settings):
    peft = pytest.importorskip("peft")
    settings(backend="reference")
    pm = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ids, mask = _inputs()
    fastpeft.patch(pm)
    try:
        with _no_deprecated_cache_use(pm.get_base_model()):
            out = pm(input_ids=ids, attention_mask=mask, use_cache=True)
            pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        fastpeft.unpatch(pm)
    assert output_cache(out).get_seq_length() == ids.shape[1]  # the prefix is not in the cache


def test_ops_prefix_attention_knows_tensors_only():
    """The transformers glue lives in fastpeft.prefix_attention_hf; the op imports no model code."""
    import ast
    import inspect as _inspect

    import fastpeft.ops.prefix_attention as op

    tree = ast.parse(_inspect.getsource(op))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    allowed = ("torch", "math", "typing", "__future__", "fastpeft.ops.", "fastpeft.kernels.")
    outside = {m for m in imported if not any(m == a.rstrip(".") or m.startswith(a) for a in allowed)}
    assert not outside, outside
    for name in ("enable_prefix_attention", "register_prefix_attention", "PrefixKVRegistry", "prefix_attention_forward"):
        assert not hasattr(op, name), name
