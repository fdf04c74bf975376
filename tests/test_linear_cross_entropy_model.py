"""The fused loss inside models: fastpeft's PeftModelForCausalLM and peft models under fastpeft.patch.

Every check compares against the model's own (unfused) loss in fp32 to 1e-5: the loss, the LoRA
gradients, and the LM head's / tied embedding's gradients when they train.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_ATOL

import fastpeft
from fastpeft.patch_loss import fused_loss_head, is_loss_patched

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _tiny(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **TINY))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **TINY))
    if kind == "gemma2":  # tied head, final-logit softcapping small enough to bend the logits
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **TINY))
    if kind == "cohere":  # logit_scale multiplier
        return tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.5, **TINY))
    if kind == "granite":  # logits / logits_scaling
        return tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=4.0, **TINY))
    raise ValueError(kind)


def _batch(seed: int = 0, vocab: int = 96, B: int = 2, T: int = 13):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _step(model, train_head: bool = False, **call):
    model.zero_grad(set_to_none=True)
    out = model(**call)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(got, want):
    (out_got, g_got), (out_want, g_want) = got, want
    torch.testing.assert_close(out_got.loss, out_want.loss, atol=FP32_ATOL, rtol=1e-5)
    assert g_got.keys() == g_want.keys() and g_got
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], atol=FP32_ATOL, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _fastpeft_lora(kind: str, train_head: bool = False):
    model = fastpeft.get_peft_model(_tiny(kind), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    init_lora_weights=False, task_type="CAUSAL_LM"))
    if train_head:  # the LM head trains in full (tied models: the input embedding too)
        model.get_base_model().get_output_embeddings().weight.requires_grad_(True)
    return model.train()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_fastpeft_model_fused_loss_equals_unfused(kind, train_head):
    model = _fastpeft_lora(kind, train_head)
    assert fused_loss_head(model.get_base_model())[0] is not None
    ids, labels = _batch()
    fused = _step(model, input_ids=ids, labels=labels)
    assert fused[0].logits is None  # training with labels: no full logits
    model.fused_loss = False
    unfused = _step(model, input_ids=ids, labels=labels)
    assert unfused[0].logits is not None
    _assert_same(fused, unfused)
    if train_head:
        head = model.get_base_model().get_output_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is head)
        assert fused[1][name].abs().sum() > 0


def test_fused_loss_reads_softcap_and_scale_from_the_config():
    assert fused_loss_head(_tiny("gemma2"))[0].softcap == 2.0
    assert fused_loss_head(_tiny("cohere"))[0].logit_scale == 0.5
    assert fused_loss_head(_tiny("granite"))[0].logit_scale == 0.25
    head = fused_loss_head(_tiny("llama"))[0]
    assert head.logit_scale == 1.0 and head.softcap is None


def test_gradient_checkpointing_and_num_items_in_batch():
    model = _fastpeft_lora("llama")
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = _batch(seed=2)
    call = dict(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40))
    fused = _step(model, **call)
    model.fused_loss = False
    _assert_same(fused, _step(model, **call))


def test_logits_when_asked_and_in_eval():
    model = _fastpeft_lora("gemma2")
    ids, labels = _batch()
    model.fused_loss = False
    want = model(input_ids=ids, labels=labels).logits
    model.fused_loss = True
    got = model(input_ids=ids, labels=labels, skip_logits=False)
    torch.testing.assert_close(got.logits, want, atol=FP32_ATOL, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, want, atol=FP32_ATOL, rtol=1e-5)
    assert model(input_ids=ids).loss is None  # no labels: the model's own forward


def test_logits_to_keep_slices_before_the_loss():
    model = _fastpeft_lora("llama")
    ids, labels = _batch()
    tail = labels[:, -5:]
    fused = _step(model, input_ids=ids, labels=tail, logits_to_keep=5)
    model.fused_loss = False
    _assert_same(fused, _step(model, input_ids=ids, labels=tail, logits_to_keep=5))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_patched_peft_model_equals_unpatched(kind):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False, task_type="CAUSAL_LM")).train()
    ids, labels = _batch(seed=1)
    want = _step(model, input_ids=ids, labels=labels)
    report = fastpeft.patch(model)
    assert report.loss is not None and "note" in report.loss and is_loss_patched(model)
    got = _step(model, input_ids=ids, labels=labels)
    assert got[0].logits is None
    _assert_same(got, want)
    fastpeft.unpatch(model)
    assert not is_loss_patched(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_patch_switch_and_unsupported_models():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny("llama"), peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    report = fastpeft.patch(model, fused_loss=False)
    assert report.loss is None and not is_loss_patched(model)
    # a LoRA-wrapped LM head is not a plain nn.Linear: the model keeps its own loss, with the reason
    wrapped = peft.get_peft_model(_tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    report = fastpeft.patch(wrapped)
    assert "reason" in report.loss and "nn.Linear" in report.loss["reason"] and not is_loss_patched(wrapped)


def test_patch_loss_on_a_plain_causal_lm_positional_labels_and_tuples():
    from fastpeft.patch_loss import patch_loss, unpatch_loss

    model = _tiny("qwen2").train()
    ids, labels = _batch(seed=3)
    want = model(input_ids=ids, labels=labels).loss
    assert patch_loss(model)["kind"] == "loss of Qwen2ForCausalLM"
    got = model(ids, None, None, None, None, labels)  # labels by position (input_ids, mask, positions, cache, embeds)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, atol=FP32_ATOL, rtol=1e-5)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False, skip_logits=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], want, atol=FP32_ATOL, rtol=1e-5)
    assert unpatch_loss(model) == ["lm_head"] and "forward" not in model.__dict__
