"""LoRA model behaviour: merging, disabling, gradients, generate, errors, atomic saves, Trainer."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, TokenRows, tiny_bert, tiny_gpt2, tiny_llama, word_tokenizer

peft = pytest.importorskip("peft")


def _lora(make=tiny_llama, **kw):
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")
    cfg.update(kw)
    return fastpeft.get_peft_model(make(), fastpeft.LoraConfig(**cfg))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj", "gate_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_unmerge_restores_weights(make, targets, ids):
    model = _lora(make, target_modules=targets, fan_in_fan_out=make is tiny_gpt2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    out = _logits(model, ids)
    model.merge_adapter()
    assert all(layer.merged for _, layer in model.base_model.tuner_layers())
    torch.testing.assert_close(_logits(model, ids), out, atol=1e-5, rtol=0)
    changed = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before)
    assert changed > 1e-4  # merging really changed the base weights
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, ids), out, atol=1e-5, rtol=0)


def test_merge_and_unload_and_unload(ids):
    model = _lora()
    out = _logits(model, ids)
    with model.disable_adapter():
        base_out = _logits(model, ids)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), out, atol=1e-5, rtol=0)
    plain = model.unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), base_out, atol=0, rtol=0)


def test_disable_adapter_gives_base_outputs(ids):
    base = tiny_llama()
    expected = _logits(base, ids)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    assert (_logits(model, ids) - expected).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), expected, atol=0, rtol=0)
    assert (_logits(model, ids) - expected).abs().max() > 1e-4
    # also when the adapter was merged before disabling
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)


def test_default_init_is_a_no_op(ids):
    base = tiny_llama()
    expected = _logits(base, ids)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=8, target_modules="all-linear"))
    torch.testing.assert_close(_logits(model, ids), expected, atol=0, rtol=0)
    g = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=8, target_modules="all-linear", init_lora_weights="gaussian"))
    torch.testing.assert_close(_logits(g, ids), expected, atol=0, rtol=0)


def test_gradients_reach_only_lora_and_modules_to_save(ids):
    model = fastpeft.get_peft_model(tiny_bert(), fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.train()
    out = model(input_ids=ids, labels=torch.tensor([0, 2]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all(("lora_" in n) or (".modules_to_save.default." in n) for n in with_grad)
    assert any(".modules_to_save.default." in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_generate_matches_peft():
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict())
    prompt = torch.tensor([[5, 17, 33, 2, 90]])
    a = ours.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = theirs.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert a.shape == (1, 13)
    assert torch.equal(a, b)


def test_training_step_with_gradient_checkpointing(ids):
    model = _lora()
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_base_keeps_fp32_adapters_and_runs(ids):
    model = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------- errors
def test_bad_rank():
    for r in (0, -3, 2.5):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            fastpeft.LoraConfig(r=r)
    with pytest.raises(ValueError, match="rank_pattern"):
        fastpeft.LoraConfig(r=4, rank_pattern={"q_proj": 0})


def test_unknown_target_modules_lists_close_names():
    with pytest.raises(ValueError) as err:
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_prj", "vproj"]))
    msg = str(err.value)
    assert "not found" in msg and "q_proj" in msg and "v_proj" in msg


def test_unknown_task_type():
    with pytest.raises(ValueError, match="Unknown task_type 'CAUSAL'"):
        fastpeft.LoraConfig(task_type="CAUSAL")


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match="embed_tokens.*Embedding.*not support|Embedding, which LoRA does not support"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["embed_tokens"]))


def test_adapter_for_another_base_model(tmp_path):
    src = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    src.save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"Shape mismatch for .*q_proj\.lora_A\.weight.*\(4, 32\).*\(4, 48\)"):
        fastpeft.PeftModel.from_pretrained(other, tmp_path)
    with pytest.raises(ValueError, match="Target modules .*not found"):
        fastpeft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="lack 1 tensors|lack 2 tensors"):
        fastpeft.PeftModel.from_pretrained(deeper, tmp_path)


def test_corrupt_or_missing_files(tmp_path):
    src = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    src.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _lora()
    model.save_pretrained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_resume_style_load_into_existing_adapter(tmp_path, ids):
    a = _lora()
    a.save_pretrained(tmp_path)
    b = _lora()
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_" in n:
                p.zero_()
    b.load_adapter(tmp_path, "default", is_trainable=True)
    torch.testing.assert_close(_logits(b, ids), _logits(a, ids), atol=0, rtol=0)
    assert any(p.requires_grad for n, p in b.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------- Trainer
def test_transformers_trainer_trains_and_saves_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(8, 12))
    trainer.train()
    assert any((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    ids = torch.tensor([[3, 4, 5, 6]])
    model.eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=FP32_ATOL, rtol=0)


def test_trl_sft_trainer_trains_and_saves_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": [" ".join(f"w{(i + j) % 100}" for j in range(10)) for i in range(8)]})
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
    trainer.train()
    assert any((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_prepare_model_for_kbit_training_freezes_upcasts_and_checkpoints(ids):
    base = tiny_llama().to(torch.bfloat16)
    model = fastpeft.prepare_model_for_kbit_training(base)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.is_gradient_checkpointing
    peft_model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_accelerate_prepare_backward_accumulate_and_save(tmp_path, ids):
    """The accelerate loop peft users write: prepare, accumulate, backward, unwrap, save."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide singletons; earlier Trainer tests leave theirs behind
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = accelerate.Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=2)
    pmodel, popt = acc.prepare(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for step in range(6):
        with acc.accumulate(pmodel):
            loss = pmodel(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            popt.step()
            popt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    unwrapped = acc.unwrap_model(pmodel, keep_fp32_wrapper=False).eval()
    assert isinstance(unwrapped, fastpeft.PeftModel)
    unwrapped.save_pretrained(tmp_path, state_dict=acc.get_state_dict(pmodel))
    loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, unwrapped(input_ids=ids).logits, atol=FP32_ATOL, rtol=0)
    # an explicit state_dict (what FSDP gathers) is what gets written, not the live parameters
    sd = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in unwrapped.state_dict().items()}
    unwrapped.save_pretrained(tmp_path / "zeros", state_dict=sd)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "zeros" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in saved) and all(not v.any() for k, v in saved.items() if "lora_B" in k)


def test_get_and_set_peft_model_state_dict_like_peft(ids):
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    ours = fastpeft.get_peft_model_state_dict(model)
    assert sorted(ours) == sorted(peft.get_peft_model_state_dict(ref))
    # from a given full state dict (what FSDP gathers) instead of the live parameters
    zeroed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert all(not v.any() for v in fastpeft.get_peft_model_state_dict(model, state_dict=zeroed).values())
    peft.set_peft_model_state_dict(ref, ours)
    fresh = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    fastpeft.set_peft_model_state_dict(fresh, ours)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ref(input_ids=ids).logits, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=FP32_ATOL, rtol=0)
