"""The transformers-5 shared-prefix attention function on a tiny random LlamaForCausalLM.

Oracle: what peft does for Prefix Tuning: the prefix expanded per batch element and put in a
DynamicCache, ones prepended to the attention mask, plain SDPA attention (so the real
tokens sit at positions P..P+T-1). fastpeft's path keeps the prefix shared in a registry and
the mask/cache to the real tokens; with position_ids starting at P the logits and the prefix
gradients must match, on the reference backend, on the Triton kernels (interpreter) and on the
``sdpa`` implementation (the prefix concatenated, then PyTorch's SDPA; autograd-native, so on CPU).
"""

import os

# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA (before triton is imported);
# on a CUDA machine the kernels run compiled and the interpreter-only tests skip.

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastpeft.ops.prefix_attention import mask_structure  # noqa: E402
from fastpeft.prefix_attention_hf import (  # noqa: E402
    REGISTRY_ATTR,
    PrefixKVRegistry,
    disable_prefix_attention,
    enable_prefix_attention,
    prefix_attention_forward,
)
from fastpeft.prefix_route import cache_kwarg, split_prefix_kv  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32 model
BACKENDS = ["reference", "sdpa", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU models reach the Triton kernels only under TRITON_INTERPRET=1"))]
# what each BACKENDS entry sets: "sdpa" is the fused path's concat + SDPA implementation
SETTINGS = {"reference": dict(backend="reference"), "triton": dict(backend="triton"),
            "sdpa": dict(backend="auto", prefix_impl="sdpa")}


def _count_calls(monkeypatch):
    """Count the fused kernel's and the sdpa implementation's calls: {"triton": n, "sdpa": n}."""
    import fastpeft.ops.prefix_attention as op

    calls = {"triton": 0, "sdpa": 0}
    fused_apply, sdpa = op.PrefixAttentionFunction.apply, op.prefix_attention_sdpa

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(op.PrefixAttentionFunction, "apply", count("triton", fused_apply))
    monkeypatch.setattr(op, "prefix_attention_sdpa", count("sdpa", sdpa))
    return calls
L, H, KVH, D, P = 2, 4, 2, 16, 5


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=H * D, intermediate_size=96, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KVH, head_dim=D, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _batch(B=2, T=11, left_pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left_pad:
        mask[0, :4] = 0  # left padding, as for generation
        mask[-1, :2] = 0
    return ids, mask


def _prefix(seed=2):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(P, L * 2 * KVH * D, generator=g)  # a PrefixEncoder's output for one sequence
    return flat


def _peft_style_logits(model, ids, mask, flat):
    """peft's path: per-batch prefix in a DynamicCache + ones prepended to the mask."""
    B, T = ids.shape
    past = flat.unsqueeze(0).expand(B, -1, -1).view(B, P, L * 2, KVH, D).permute(2, 0, 3, 1, 4).split(2)
    cache = DynamicCache()
    for layer, kv in enumerate(past):
        cache.update(kv[0], kv[1], layer)
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    return model(input_ids=ids, attention_mask=full_mask, use_cache=False, **{cache_kwarg(model): cache}).logits


def _fastpeft_logits(model, registry, ids, mask, flat):
    B, T = ids.shape
    pos = torch.arange(P, P + T).unsqueeze(0).expand(B, -1)
    with registry.active(split_prefix_kv(flat, L, KVH, D)):
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left_pad", [True, False])
def test_logits_and_prefix_grads_match_peft_style_cache(monkeypatch, backend, left_pad, settings):
    settings(**SETTINGS[backend])
    model = _model()
    ids, mask = _batch(left_pad=left_pad)
    flat = _prefix()

    flat_ref = flat.clone().requires_grad_(True)
    ref = _peft_style_logits(model, ids, mask, flat_ref)
    (ref * torch.linspace(-1, 1, ref.shape[-1])).sum().backward()

    calls = _count_calls(monkeypatch)
    registry = enable_prefix_attention(model)
    try:
        assert model.config._attn_implementation == "fastpeft_prefix"
        flat_ours = flat.clone().requires_grad_(True)
        ours = _fastpeft_logits(model, registry, ids, mask, flat_ours)
        # every layer took the fused kernel / the sdpa implementation, as set
        assert calls == {name: (L if backend == name else 0) for name in ("triton", "sdpa")}
        (ours * torch.linspace(-1, 1, ours.shape[-1])).sum().backward()
    finally:
        disable_prefix_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert len(registry) == 0  # the context cleared the layers
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(flat_ours.grad, flat_ref.grad, **TOL)
    # the prefix matters
    assert (ours - model(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


def test_layers_without_prefix_run_plain_sdpa():
    model = _model()
    ids, mask = _batch()
    plain = model(input_ids=ids, attention_mask=mask).logits
    registry = enable_prefix_attention(model)
    try:
        same = model(input_ids=ids, attention_mask=mask).logits  # empty registry
        torch.testing.assert_close(same, plain, atol=0, rtol=0)
        # a prefix on layer 1 only changes the output
        k, v = split_prefix_kv(_prefix(), L, KVH, D)[1]
        registry.set(1, k, v)
        changed = model(input_ids=ids, attention_mask=mask).logits
        assert (changed - plain).abs().max() > 1e-3
    finally:
        disable_prefix_attention(model)


def test_mask_structure_reads_causal_padding_and_falls_back_to_dense():
    B, T, S = 2, 4, 6
    kpm = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    tri = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    kind, causal, got = mask_structure((tri & kpm[:, None, :])[:, None], T, S, True)
    assert (kind, causal) == ("fused", True) and torch.equal(got, kpm)
    kind, causal, got = mask_structure(kpm[:, None, None, :].expand(B, 1, T, S), T, S, True)
    assert (kind, causal) == ("fused", False) and torch.equal(got, kpm)
    kind, causal, got = mask_structure(tri.expand(B, 1, T, S), T, S, True)
    assert (kind, causal, got) == ("fused", True, None)  # no padding: no mask for the kernel
    assert mask_structure(None, T, S, False) == ("fused", False, None)
    window = tri & ~torch.ones(T, S, dtype=torch.bool).tril(S - T - 2)  # sliding window of 2
    kind, dense = mask_structure(window.expand(B, 1, T, S), T, S, True)
    assert kind == "dense" and torch.equal(dense, window.expand(B, 1, T, S))
    additive = torch.zeros(B, 1, T, S).masked_fill(~(tri & kpm[:, None, :])[:, None], torch.finfo(torch.float32).min)
    kind, causal, got = mask_structure(additive, T, S, True)
    assert (kind, causal) == ("fused", True) and torch.equal(got, kpm)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mask_structure(tri.expand(B, 1, T, S), T, S + 1, True)


def test_dense_mask_path_matches_reference_on_concatenation():
    """A sliding-window mask goes to the reference with the prefix prepended as always-visible."""
    from fastpeft.ops.prefix_attention import prefix_attention_reference

    class Attn(torch.nn.Module):
        layer_idx, is_causal = 0, True

    B, T, S = 2, 5, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g), torch.randn(B, KVH, S, D, generator=g),
               torch.randn(B, KVH, S, D, generator=g))
    pk, pv = torch.randn(KVH, P, D, generator=g), torch.randn(KVH, P, D, generator=g)
    window = torch.ones(T, S, dtype=torch.bool).tril() & ~torch.ones(T, S, dtype=torch.bool).tril(-3)
    mod = Attn()
    reg = PrefixKVRegistry()
    reg.set(0, pk, pv)
    setattr(mod, REGISTRY_ATTR, reg)
    out, _ = prefix_attention_forward(mod, q, k, v, window.expand(B, 1, T, S), scaling=0.25)
    # oracle: softmax over the explicit concatenation with the window mask and an all-visible prefix
    kc = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // KVH, 1)
    vc = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(H // KVH, 1)
    full = torch.cat([torch.ones(T, P, dtype=torch.bool), window], 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=full, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL)
    assert prefix_attention_reference is not None


def test_split_prefix_kv_layout_and_errors():
    flat = torch.arange(P * L * 2 * KVH * D, dtype=torch.float32).view(P, -1)
    kvs = split_prefix_kv(flat, L, KVH, D)
    view = flat.view(P, L * 2, KVH, D)
    for layer, (k, v) in enumerate(kvs):
        assert k.shape == (KVH, P, D)
        assert torch.equal(k, view[:, 2 * layer].transpose(0, 1))
        assert torch.equal(v, view[:, 2 * layer + 1].transpose(0, 1))
    with pytest.raises(ValueError, match="split_prefix_kv"):
        split_prefix_kv(flat[:, :-1], L, KVH, D)
    with pytest.raises(ValueError, match="kv_heads, prefix_len"):
        PrefixKVRegistry().set(0, kvs[0][0], kvs[0][1][:, :2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left_pad", [True, False])
def test_cached_decoding_matches_peft_style_cache(monkeypatch, settings, backend, left_pad):
    """Prefill then single-token steps with a KV cache (T < S; with and without left padding, the
    latter the sdpa implementation's lower-right causal path): same logits as peft's path."""
    settings(**SETTINGS[backend])
    calls = _count_calls(monkeypatch)
    model = _model()
    ids, mask = _batch(left_pad=left_pad)
    flat = _prefix()
    B, T = ids.shape
    steps = 3

    # peft's path first (plain sdpa, prefix in the cache, ones prepended to the mask)
    past = flat.unsqueeze(0).expand(B, -1, -1).view(B, P, L * 2, KVH, D).permute(2, 0, 3, 1, 4).split(2)
    cache_ref = DynamicCache()
    for layer, kv in enumerate(past):
        cache_ref.update(kv[0], kv[1], layer)
    mask_ref = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    refs, inputs, step_ids = [], [], ids
    for _ in range(steps):
        ref = model(input_ids=step_ids, attention_mask=mask_ref, use_cache=True, **{cache_kwarg(model): cache_ref}).logits
        refs.append(ref)
        inputs.append(step_ids)
        step_ids = ref[:, -1:].argmax(-1)
        mask_ref = torch.cat([mask_ref, torch.ones(B, 1, dtype=mask.dtype)], dim=1)

    registry = enable_prefix_attention(model)
    cache_ours, mask_ours, start = DynamicCache(), mask, 0
    try:
        with registry.active(split_prefix_kv(flat, L, KVH, D)):
            for step_ids, ref in zip(inputs, refs):
                n = step_ids.shape[1]
                pos = torch.arange(P + start, P + start + n).unsqueeze(0).expand(B, -1)
                ours = model(input_ids=step_ids, attention_mask=mask_ours, position_ids=pos, use_cache=True,
                             **{cache_kwarg(model): cache_ours}).logits
                torch.testing.assert_close(ours, ref, **TOL)
                start += n
                mask_ours = torch.cat([mask_ours, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        assert cache_ours.get_seq_length() == T + steps - 1  # the cache holds only the real tokens
        assert calls == {name: (steps * L if backend == name else 0) for name in ("triton", "sdpa")}
        assert cache_ref.get_seq_length() == P + T + steps - 1
    finally:
        disable_prefix_attention(model)


def test_per_call_prefix_keyword_takes_precedence_and_carries_backend(monkeypatch, settings):
    """fastpeft_prefix=PrefixKVRegistry(kvs, backend=...) overrides the attached registry; wrong types fail clearly."""
    import fastpeft.ops.prefix_attention as op

    settings(backend="auto")
    calls = []
    fused = op.PrefixAttentionFunction.apply
    monkeypatch.setattr(op.PrefixAttentionFunction, "apply", lambda *a: calls.append(1) or fused(*a))

    class Attn(torch.nn.Module):
        layer_idx, is_causal = 0, True

    B, T = 2, 6
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g), torch.randn(B, KVH, T, D, generator=g),
               torch.randn(B, KVH, T, D, generator=g))
    kvs = [(torch.randn(KVH, P, D, generator=g), torch.randn(KVH, P, D, generator=g))]
    mod = Attn()
    setattr(mod, REGISTRY_ATTR, PrefixKVRegistry([(kvs[0][0] + 1, kvs[0][1])]))  # a different prefix
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    out, _ = prefix_attention_forward(mod, q, k, v, None, fastpeft_prefix=PrefixKVRegistry(kvs, backend="triton"))
    assert calls == [1]  # the per-call backend reached the op (automatic would pick the reference on CPU)
    ref = op.prefix_attention_reference(q, k, v, *kvs[0])
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL)
    with pytest.raises(TypeError, match="fastpeft_prefix= must be a PrefixKVRegistry"):
        prefix_attention_forward(mod, q, k, v, None, fastpeft_prefix=kvs)
