"""fastpeft.patch on Hugging Face peft prefix-tuned models: Prefix Tuning through the shared-prefix op.

Oracle: the same peft model unpatched (peft's per-batch prefix in a DynamicCache). Patched and
unpatched must give the same logits, loss and prefix-encoder gradients (reference backend on
CPU; the Triton kernels under TRITON_INTERPRET=1 on a 1-layer model), the same greedy
generate() tokens, and unpatch must restore peft's own path.
"""

import os

# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA (before triton is imported);
# on a CUDA machine the kernels run compiled and the interpreter-only tests skip.

import pytest
import torch

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from conftest import tiny_gpt2  # noqa: E402
from fastpeft.patch_loss import is_loss_patched  # noqa: E402
from fastpeft.prefix_attention_hf import REGISTRY_ATTR  # noqa: E402
from prefix_helpers import run_peft  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32 models
P = 5


def _base(model_type="llama", layers=2, seed=0):
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    if model_type == "qwen3":
        kw["head_dim"] = 8
    cls = transformers.AutoModelForCausalLM.from_config(cfg_cls(**kw))
    return cls.eval()


def _prefix_model(model_type="llama", layers=2, projection=False):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=24 if projection else None)
    pm = peft.get_peft_model(_base(model_type, layers), cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # a non-trivial prefix (peft initialises the embedding N(0, 1) already; be explicit)
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return pm


def _batch(B=3, T=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


def _step(pm, ids, mask):
    """logits, loss and the prefix-encoder gradients of one training forward/backward."""
    pm.zero_grad(set_to_none=True)
    keep = {"skip_logits": False} if is_loss_patched(pm) else {}  # the fused loss skips training logits
    out = pm(input_ids=ids, attention_mask=mask, labels=ids, **keep)
    (out.loss + (out.logits * torch.linspace(-1, 1, out.logits.shape[-1])).mean()).backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _compare(pm, ids, mask):
    ref_logits, ref_loss, ref_grads = _step(pm, ids, mask)
    report = fastpeft.patch(pm)
    try:
        logits, loss, grads = _step(pm, ids, mask)
    finally:
        fastpeft.unpatch(pm)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert set(grads) == set(ref_grads) and grads and all("prompt_encoder" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
        assert grads[n].abs().max() > 0, n
    return report


@pytest.mark.parametrize("projection", [False, True])
def test_patched_logits_and_prefix_grads_match_peft_reference(settings, projection):
    settings(backend="reference")
    pm = _prefix_model(projection=projection)
    ids, mask = _batch()
    report = _compare(pm, ids, mask)
    [entry] = report.patched
    assert entry.kind == "peft PrefixTuning (CAUSAL_LM) on LlamaForCausalLM"
    assert "2 layers" in entry.note and "KV cache" in entry.note
    assert "prefix" in str(report)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU models reach Triton only under TRITON_INTERPRET=1")
def test_patched_triton_kernels_match_peft_one_layer(monkeypatch, settings):
    """The Triton kernels (interpreter) behind the patched model, 1 layer: logits and grads equal peft's."""
    settings(backend="triton")
    import fastpeft.ops.prefix_attention as op

    calls = []
    fused = op.PrefixAttentionFunction.apply
    monkeypatch.setattr(op.PrefixAttentionFunction, "apply", lambda *a: calls.append(1) or fused(*a))
    pm = _prefix_model(layers=1)
    ids, mask = _batch(B=2, T=7)
    settings(backend="reference")  # the oracle: peft's path (no prefix op at all)
    ref_logits, ref_loss, ref_grads = _step(pm, ids, mask)
    assert not calls
    settings(backend="triton")
    fastpeft.patch(pm)
    try:
        logits, loss, grads = _step(pm, ids, mask)
    finally:
        fastpeft.unpatch(pm)
    assert len(calls) == 1  # the one layer took the fused kernel
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU models reach Triton only under TRITON_INTERPRET=1")
def test_patch_bakes_the_prefix_implementation_of_its_settings(monkeypatch, settings):
    """``patch(settings=...)`` carries ``prefix_impl`` into the route, as it carries the backend,
    whatever the global settings say: "sdpa" (asked for by name, it runs on CPU too) takes the
    concat + SDPA implementation, and patching again with the Triton backend and "kernel" switches
    the same model to the kernels; peft's logits and prefix gradients both times."""
    from fastpeft.ops.settings import get_settings
    import fastpeft.ops.prefix_attention as op

    sdpa_calls, kernel_calls = [], []
    sdpa, fused = op.prefix_attention_sdpa, op.PrefixAttentionFunction.apply
    monkeypatch.setattr(op, "prefix_attention_sdpa", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    monkeypatch.setattr(op.PrefixAttentionFunction, "apply", lambda *a: kernel_calls.append(1) or fused(*a))
    pm = _prefix_model(layers=1)
    ids, _ = _batch(B=2, T=7)  # no padding: where the sdpa implementation takes no mask tensor
    settings(backend="reference")
    ref_logits, _, ref_grads = _step(pm, ids, None)
    settings(backend="reference", prefix_impl="kernel")  # the global choice the patch overrides
    try:
        for backend, impl, counts in (("auto", "sdpa", (1, 0)), ("triton", "kernel", (1, 1))):
            fastpeft.patch(pm, settings=get_settings().replace(backend=backend, prefix_impl=impl))
            logits, _, grads = _step(pm, ids, None)
            assert (len(sdpa_calls), len(kernel_calls)) == counts, impl
            torch.testing.assert_close(logits, ref_logits, **TOL)
            for n in ref_grads:
                torch.testing.assert_close(grads[n], ref_grads[n], **TOL)
    finally:
        fastpeft.unpatch(pm)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models(settings, model_type):
    settings(backend="reference")
    pm = _prefix_model(model_type=model_type, layers=1)
    _compare(pm, *_batch(B=2, T=6))


def _greedy_oracle(pm, **kw):
    """Unpatched peft's greedy tokens, or, where peft cannot generate on this stack, those of
    fastpeft's own model on its KV-cache path with the same prefix weights; and why."""
    ref, reason = run_peft(lambda: pm.generate(**kw))
    if reason is None:
        return ref, None
    ours = fastpeft.get_peft_model(_base(), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ours.load_state_dict({n: p for n, p in pm.state_dict().items() if n.startswith("prompt_encoder.")}, strict=False)
    assert ours.prefix_attention_registry is None  # the KV-cache path
    return ours.eval().generate(**kw), reason


def test_patched_generate_equals_peft_greedy(monkeypatch, settings):
    """Greedy decoding: the cache holds only real tokens while every step sees the shared prefix."""
    settings(backend="reference")
    pm = _prefix_model()
    ids, mask = _batch()
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    ref, reason = _greedy_oracle(pm, input_ids=ids, attention_mask=mask, **kw)
    ref_nomask, _ = _greedy_oracle(pm, input_ids=ids[1:], **kw)

    import fastpeft.prefix_attention_hf as hf

    seen_kv = []
    orig = hf.prefix_attention_forward

    def spy(module, query, key, value, *a, **k):
        if module.layer_idx == 0 and k.get(hf.PREFIX_KWARG) is not None:
            seen_kv.append((query.shape[2], key.shape[2]))
        return orig(module, query, key, value, *a, **k)

    monkeypatch.setattr(hf, "prefix_attention_forward", spy)
    fastpeft.patch(pm)
    hf.register_prefix_attention()  # re-register so transformers calls the spy
    try:
        out = pm.generate(input_ids=ids, attention_mask=mask, **kw)
        out_nomask = pm.generate(input_ids=ids[1:], **kw)
    finally:
        fastpeft.unpatch(pm)
        monkeypatch.undo()
        hf.register_prefix_attention()
    assert torch.equal(out, ref) and torch.equal(out_nomask, ref_nomask)
    T = ids.shape[1]
    # prefill over the T prompt tokens, then one token per step against a cache of real tokens only
    assert seen_kv[:3] == [(T, T), (1, T + 1), (1, T + 2)]
    # and the prefix changes the generation (the test would catch a dropped prefix)
    with pm.disable_adapter():
        plain = pm.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not torch.equal(plain, ref)
    if reason is not None:
        pytest.skip(reason)  # fastpeft's side was checked against its KV-cache path instead


def test_unpatch_restores_peft_path_and_disable_adapter_works(settings):
    settings(backend="reference")
    pm = _prefix_model()
    ids, mask = _batch()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids, attention_mask=mask).logits
        impl = pm.base_model.config._attn_implementation
        before = {n: pm.__dict__.get(n) for n in ("forward", "generate", "prepare_inputs_for_generation")}
        fastpeft.patch(pm)
        fastpeft.patch(pm)  # idempotent
        assert "forward" in pm.__dict__ and pm.base_model.config._attn_implementation == "fastpeft_prefix"
        with pm.disable_adapter():  # peft swaps forward for the base model's: no prefix
            torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, base, atol=1e-6, rtol=0)
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, ref, **TOL)
        assert fastpeft.unpatch(pm) == ["base_model"]
        assert pm.base_model.config._attn_implementation == impl
        # peft's disable_adapter() leaves bound methods as instance attributes: exactly those come back
        assert {n: pm.__dict__.get(n) for n in before} == before
        assert not any(hasattr(m, REGISTRY_ATTR) for m in pm.modules())
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, ref, atol=0, rtol=0)
        assert fastpeft.unpatch(pm) == []


def test_patched_with_activation_checkpointing(settings):
    """Recomputation in backward sees the same prefix (it travels with the call, not in global state)."""
    settings(backend="reference")
    pm = _prefix_model()
    ids, mask = _batch()
    pm.train()
    ref_logits, _, ref_grads = _step(pm, ids, mask)
    pm.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fastpeft.patch(pm)
    try:
        logits, _, grads = _step(pm, ids, mask)
    finally:
        fastpeft.unpatch(pm)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL)


def test_gpt2_takes_the_fused_route_by_capability(monkeypatch, settings):
    """No list of model types: GPT-2's attention passes the probe (one AttentionInterface call per
    layer with the op's layout), and the patched model gives peft's logits and gradients."""
    settings(backend="reference")
    pm = peft.get_peft_model(tiny_gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ids, mask = _batch()
    report = _compare(pm.eval(), ids % pm.config.vocab_size, mask)
    assert [e.kind for e in report.patched] == ["peft PrefixTuning (CAUSAL_LM) on GPT2LMHeadModel"]


def _peft_prefix_on(cfg):
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))


def test_prefix_without_position_ids_is_a_clear_error():
    import transformers

    pm = _peft_prefix_on(transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match=r"model type 'bloom'.*takes no position_ids.*without fastpeft.patch"):
        fastpeft.patch(pm)
    assert "forward" not in pm.__dict__  # nothing half-patched


def test_attention_outside_attention_interface_is_a_clear_error():
    """The probe sees no AttentionInterface call (Falcon's attention is its own code)."""
    import transformers

    pm = _peft_prefix_on(transformers.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, new_decoder_architecture=True,
                                                   num_kv_heads=2))
    impl = pm.get_base_model().config._attn_implementation
    with pytest.raises(ValueError, match=r"model type 'falcon'.*no attention layout.*AttentionInterface"):
        fastpeft.patch(pm)
    assert "forward" not in pm.__dict__ and pm.get_base_model().config._attn_implementation == impl


def test_attention_softcapping_is_in_the_exception_table():
    """Gemma 2's logit softcapping has the op's shapes, so only the table of exceptions can refuse it."""
    import transformers

    pm = _peft_prefix_on(transformers.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=8, attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match=r"model type 'gemma2'.*layer 0 uses attention logit softcapping"):
        fastpeft.patch(pm)


def test_prefix_adapter_not_fitting_base_is_a_clear_error():
    pm = _prefix_model()
    pm.peft_config["default"].num_layers = 3
    with pytest.raises(ValueError, match=r"num_layers=3.*needs num_layers=2"):
        fastpeft.patch(pm)


def test_patched_adapter_loaded_for_inference(settings, tmp_path):
    """An adapter loaded with PeftModel.from_pretrained (inference_mode: the saved prefix is used as is)."""
    settings(backend="reference")
    trained = _prefix_model(projection=True)
    trained.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(_base(), str(tmp_path))
    assert pm.active_peft_config.inference_mode
    ids, mask = _batch()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ref, trained(input_ids=ids, attention_mask=mask).logits, **TOL)
        fastpeft.patch(pm)
        try:
            out = pm(input_ids=ids, attention_mask=mask).logits
        finally:
            fastpeft.unpatch(pm)
    torch.testing.assert_close(out, ref, **TOL)


def test_patched_peft_prefix_trains_under_trainer(monkeypatch, tmp_path, settings):
    """transformers.Trainer on the patched peft model: loss goes down, only the prefix encoder changes."""
    import inspect

    from transformers import Trainer, TrainingArguments

    settings(backend="reference")
    import fastpeft.ops.prefix_attention as op

    calls = []
    ref_op = op.prefix_attention_reference
    monkeypatch.setattr(op, "prefix_attention_reference", lambda *a, **k: calls.append(1) or ref_op(*a, **k))
    pm = _prefix_model()
    fastpeft.patch(pm)
    assert "input_ids" in inspect.signature(pm.forward).parameters
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(1, 16, (8,), generator=g)} for _ in range(8)]  # a small vocabulary: learnable
    data = [{"input_ids": r["input_ids"], "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": r["input_ids"]} for r in rows]
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=0.3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    try:
        trainer.train()
    finally:
        fastpeft.unpatch(pm)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.03
    assert calls and len(calls) >= 12 * 2  # every step's two layers went through the prefix op
    for n, p in pm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_other_peft_task_types_are_reported_and_left_alone():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    base = transformers.LlamaForSequenceClassification(cfg).eval()
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    ids, mask = _batch()
    with torch.no_grad():
        ref, reason = run_peft(lambda: pm(input_ids=ids, attention_mask=mask).logits)
        report = fastpeft.patch(pm)
        assert not report.patched and len(report.skipped) == 1
        assert "PeftModelForCausalLM only" in report.skipped[0].reason and "KV-cache prefix" in report.skipped[0].reason
        assert "forward" not in pm.__dict__ and pm.base_model.config._attn_implementation != "fastpeft_prefix"
        if reason is None:
            torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, ref, atol=0, rtol=0)
    assert fastpeft.unpatch(pm) == []
    if reason is not None:
        pytest.skip(reason)  # fastpeft's side (reported and left alone) was checked


@pytest.mark.skipif(not hasattr(fastpeft, "PrefixTuningConfig"), reason="fastpeft's prompt-learning tuners not merged")
def test_patch_routes_fastpeft_prefix_model(monkeypatch, settings):
    """fastpeft.patch on fastpeft's own prefix model attaches the registry its forward fills: same numbers."""
    settings(backend="reference")
    import fastpeft.ops.prefix_attention as op

    calls = []
    ref_op = op.prefix_attention_reference
    monkeypatch.setattr(op, "prefix_attention_reference", lambda *a, **k: calls.append(1) or ref_op(*a, **k))
    pm = fastpeft.get_peft_model(_base(), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ids, mask = _batch()
    ref_logits, ref_loss, ref_grads = _step(pm, ids, mask)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref_gen = pm.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not calls
    report = fastpeft.patch(pm)
    try:
        assert [p.kind for p in report.patched] == ["fastpeft PrefixTuning (CAUSAL_LM) on LlamaForCausalLM"]
        logits, loss, grads = _step(pm, ids, mask)
        assert len(calls) == 2  # both layers through the prefix op
        gen = pm.generate(input_ids=ids, attention_mask=mask, **kw)
    finally:
        assert fastpeft.unpatch(pm) == ["base_model"]
    assert pm.prefix_attention_registry is None
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL)
    assert torch.equal(gen, ref_gen)
