"""LLaMA-Adapter (adaption prompts) against Hugging Face peft: outputs, gradients, checkpoints both ways."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, TokenRows, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    return MistralForCausalLM(cfg).eval()


def tiny_llama_eager(seed: int = 0):
    model = tiny_llama(seed)
    model.set_attn_implementation("eager")  # transformers 5 attention interface, the non-sdpa path
    return model


# llama: GQA (4 query heads, 2 key/value heads), sdpa; mistral: 1 key/value head, 3 layers
MODELS = {"llama": tiny_llama, "llama-eager": tiny_llama_eager, "mistral": tiny_mistral}


def _randomise_gates(model, value=0.5):
    """Gates start at zero (a no-op); give them a value so the prompt branch matters."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaption_gate" in n:
                p.fill_(value)
                value += 0.25


def _pair(make, **kw):
    kw = dict(dict(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"), **kw)
    ours = fastpeft.get_peft_model(make(), fastpeft.AdaptionPromptConfig(**kw))
    theirs = peft.get_peft_model(make(), peft.AdaptionPromptConfig(**kw))
    _randomise_gates(ours)
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    return ours.eval(), theirs.eval()


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("arch", list(MODELS))
def test_same_outputs_params_and_keys_as_peft(arch, ids, capsys):
    ours, theirs = _pair(MODELS[arch])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    for kw in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(_logits(ours, ids, **kw), _logits(theirs, ids, **kw), atol=FP32_ATOL, rtol=0)
    # the prompt branch really changes the output
    with ours.disable_adapter():
        base = _logits(ours, ids)
    assert (base - _logits(ours, ids)).abs().max() > 1e-3
    # trainable parameters: counts printed and equal to peft's; checkpoint keys equal peft's
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == printed[1] and printed[0].startswith("trainable params: ")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))


def test_zero_init_gate_leaves_model_unchanged(ids):
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama(), ids), atol=0, rtol=0)


def test_gradients_match_peft(ids):
    ours, theirs = _pair(tiny_llama)
    ours.train(), theirs.train()
    labels = ids.clone()
    ours(input_ids=ids, labels=labels).loss.backward()
    theirs(input_ids=ids, labels=labels).loss.backward()
    g_ours = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(g_ours) == set(g_theirs) and len(g_ours) == 4
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], atol=FP32_ATOL, rtol=1e-4)
        assert g_ours[n].abs().max() > 0


def test_generate_with_cache_matches_peft(ids):
    ours, theirs = _pair(tiny_llama)
    left_padded = torch.ones_like(ids)
    left_padded[0, :3] = 0
    for mask in (torch.ones_like(ids), left_padded):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            a, b = ours.generate(**kw), theirs.generate(**kw)
            base = tiny_llama().generate(**kw)
        assert torch.equal(a, b)  # greedy tokens equal peft's (KV cache: prompts only touch the queries)
        assert not torch.equal(a, base)  # and the adapter does steer generation


def test_fastpeft_checkpoint_loads_in_peft(ids, tmp_path):
    ours, _ = _pair(tiny_llama, adapter_layers=1)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADAPTION_PROMPT" and cfg["target_modules"] == "self_attn"
    assert (cfg["adapter_len"], cfg["adapter_layers"]) == (3, 1)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


def test_peft_checkpoint_loads_in_fastpeft(ids, tmp_path):
    _, theirs = _pair(tiny_mistral)
    theirs.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(tiny_mistral(), tmp_path)
    assert isinstance(loaded, fastpeft.PeftModelForCausalLM)
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    # and back again: fastpeft writes the same keys and config fields peft wrote
    loaded.save_pretrained(tmp_path / "again")
    a = json.loads((tmp_path / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    for k in ("peft_type", "adapter_len", "adapter_layers", "target_modules", "task_type"):
        assert a[k] == b[k]
    from safetensors.torch import load_file

    x, y = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_training_reduces_loss_and_only_prompts_train(ids):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adaption_prompt." in n or ".adaption_gate." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


def test_multiple_adapters_switch_and_delete(ids):
    ours, _ = _pair(tiny_llama, adapter_layers=1)
    ref = _logits(ours, ids)
    ours.add_adapter("other", fastpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=2, task_type="CAUSAL_LM"))
    torch.testing.assert_close(_logits(ours, ids), ref, atol=0, rtol=0)  # adding does not change the active one
    ours.set_adapter("other")
    torch.testing.assert_close(_logits(ours, ids), _logits(tiny_llama(), ids), atol=0, rtol=0)  # zero gates
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"base_model.model.model.layers.{i}.self_attn.adaption_{k}.other" for i in (0, 1) for k in ("prompt", "gate")
    }
    ours.set_adapter("default")
    torch.testing.assert_close(_logits(ours, ids), ref, atol=0, rtol=0)
    ours.delete_adapter("other")
    assert list(ours.peft_config) == ["default"]
    torch.testing.assert_close(_logits(ours, ids), ref, atol=0, rtol=0)


def test_unload_and_no_merge(ids):
    ours, _ = _pair(tiny_llama)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        ours.merge_and_unload()
    base = ours.unload()
    assert not any("adaption" in n for n, _ in base.named_parameters())
    torch.testing.assert_close(_logits(base, ids), _logits(tiny_llama(), ids), atol=0, rtol=0)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match=r"adapter_layers=5.*more adapter layers than the model has \(2 .*adapter_layers <= 2"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=5))
    with pytest.raises(ValueError, match="adapter_len must be a positive integer"):
        fastpeft.AdaptionPromptConfig(adapter_len=0, adapter_layers=1)
    with pytest.raises(ValueError, match="needs adapter_layers"):
        fastpeft.AdaptionPromptConfig(adapter_len=4)
    with pytest.raises(ValueError, match=r"model_type is 'gpt2'"):
        fastpeft.get_peft_model(tiny_gpt2(), fastpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(ValueError, match=r"No attention submodule named 'attn'"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="attn"))


def test_bf16_base_matches_peft_and_trains_with_checkpointing(ids):
    kw = dict(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")
    ours = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16), fastpeft.AdaptionPromptConfig(**kw)).eval()
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.AdaptionPromptConfig(**kw)).eval()
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}  # fp32 adapter on a bf16 base
    _randomise_gates(ours)
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    # same bf16 math as peft (the fp32 prompt is cast to the base dtype, as peft stores it)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=0, rtol=0)
    ours.gradient_checkpointing_enable()
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert len(grads) == 4 and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_transformers_trainer_with_checkpointing_trains_and_saves_for_peft(ids, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-2,
                             save_strategy="no", report_to=[], use_cpu=True, gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(4, 10))
    trainer.train()
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    # every prompt and gate moved (gates leave zero, so the prompts get gradient from step 2)
    assert all((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before), "a parameter did not train"
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final").eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model.eval(), ids), atol=FP32_ATOL, rtol=0)
