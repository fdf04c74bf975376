"""Bottleneck adapters (Houlsby / Pfeiffer) and AdapterFusion: zero effect at init, placement, math,
training, save/load round-trips and clear errors. peft has no bottleneck adapters, so the oracles
are the base model (at init) and a direct re-computation of the adapter formula."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from conftest import FP32_ATOL, TokenRows, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from fastpeft.tuners.bottleneck import AdapterFusionLayer, BottleneckLayer
from safetensors.torch import load_file


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_adapters(model, seed=0, std=0.3, name=None):
    """Give adapters non-trivial weights (a 'trained' adapter) so they have a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if (".adapter_down." in n or ".adapter_up." in n) and (name is None or f".{name}." in n):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckLayer))


def _n_params(h, rf):
    b = h // rf
    return 2 * h * b + b + h  # down (weight + bias) + up (weight + bias)


CASES = {
    "llama-houlsby": (tiny_llama, fastpeft.HoulsbyConfig, "CAUSAL_LM",
                      ["model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1.mlp", "model.layers.1.self_attn"]),
    "llama-pfeiffer": (tiny_llama, fastpeft.PfeifferConfig, "CAUSAL_LM", ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "gpt2-houlsby": (tiny_gpt2, fastpeft.HoulsbyConfig, "CAUSAL_LM",
                     ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp"]),
    "bert-houlsby": (tiny_bert, fastpeft.HoulsbyConfig, "SEQ_CLS",
                     ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
                      "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]),
    "bert-pfeiffer": (tiny_bert, fastpeft.PfeifferConfig, "SEQ_CLS",
                      ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_effect_at_init_placement_and_param_count(case, ids, capsys):
    make, cfg_cls, task, expected = CASES[case]
    model = fastpeft.get_peft_model(make(), cfg_cls(reduction_factor=4, task_type=task)).eval()
    torch.testing.assert_close(_out(model, ids), _out(make(), ids), atol=0, rtol=0)
    assert _wrapped(model.get_base_model()) == expected
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    head = 32 * 3 + 3 if task == "SEQ_CLS" else 0  # the classifier head trains in full for SEQ_CLS
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == len(expected) * _n_params(32, 4) + head
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in printed
    # with trained weights the adapters do change the output, and disable_adapter restores the base
    _randomise_adapters(model)
    assert (_out(model, ids) - _out(make(), ids)).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, ids), _out(make(), ids), atol=0, rtol=0)


def test_leave_out_and_explicit_target_modules():
    model = fastpeft.get_peft_model(tiny_llama(layers=3), fastpeft.HoulsbyConfig(reduction_factor=8, leave_out=[0, 2]))
    assert _wrapped(model.get_base_model()) == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    model = fastpeft.get_peft_model(tiny_t5(), fastpeft.BottleneckConfig(reduction_factor=8, target_modules=["DenseReluDense"]))
    assert len(_wrapped(model.get_base_model())) == 4  # 2 encoder + 2 decoder feed-forward blocks


def test_adapter_math_on_the_sublayer_output():
    """The wrapped sub-layer returns ``y + s * up(act(down(y)))`` where ``y`` is the original output."""
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.HoulsbyConfig(reduction_factor=4, scaling=0.5))
    _randomise_adapters(model)
    layer = model.get_base_model().model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y = mlp.base_layer(x)
        want = y + 0.5 * F.linear(F.silu(F.linear(y, mlp.adapter_down["default"].weight, mlp.adapter_down["default"].bias)),
                                  mlp.adapter_up["default"].weight, mlp.adapter_up["default"].bias)
        torch.testing.assert_close(mlp(x), want, atol=FP32_ATOL, rtol=0)
        # attention returns a tuple: the adapter transforms its first element only
        pos = model.get_base_model().model.rotary_emb(x, torch.arange(5)[None])
        got, weights = attn(hidden_states=x, position_embeddings=pos, attention_mask=None)
        y, ref_weights = attn.base_layer(hidden_states=x, position_embeddings=pos, attention_mask=None)
        d = attn.adapter_down["default"]
        u = attn.adapter_up["default"]
        torch.testing.assert_close(got, y + 0.5 * u(F.silu(d(y))), atol=FP32_ATOL, rtol=0)


def _train(model, batch, steps=25, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _snapshot(model, trainable):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("case", ["llama-houlsby", "bert-pfeiffer"])
def test_training_reduces_loss_and_touches_only_the_adapter(case, ids):
    make, cfg_cls, task, _ = CASES[case]
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(make(), cfg_cls(reduction_factor=4, task_type=task))
    batch = {"input_ids": ids, "labels": ids if task == "CAUSAL_LM" else torch.tensor([0, 2])}
    frozen = _snapshot(model, False)
    losses = _train(model, batch)
    # tiny random models have near-uniform, small-norm logits: a 0.1-nat drop is a clear, repeatable signal
    assert losses[-1] < losses[0] - 0.1, losses
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapter_" in n or ".modules_to_save." in n for n in trainable)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("case", ["llama-houlsby", "bert-pfeiffer"])
def test_save_load_round_trip_and_documented_format(case, ids, tmp_path):
    make, cfg_cls, task, expected = CASES[case]
    model = fastpeft.get_peft_model(make(), cfg_cls(reduction_factor=4, task_type=task, non_linearity="gelu")).eval()
    _randomise_adapters(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["reduction_factor"] == 4 and cfg["non_linearity"] == "gelu"
    assert cfg["mh_adapter"] == (cfg_cls is fastpeft.HoulsbyConfig) and cfg["output_adapter"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    want = {f"base_model.model.{m}.adapter_{p}.{w}" for m in expected for p in ("down", "up") for w in ("weight", "bias")}
    if task == "SEQ_CLS":
        want |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(tensors) == want
    assert tensors[f"base_model.model.{expected[0]}.adapter_down.weight"].shape == (8, 32)
    assert tensors[f"base_model.model.{expected[0]}.adapter_up.weight"].shape == (32, 8)
    loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    assert isinstance(loaded.peft_config["default"], fastpeft.BottleneckConfig)
    torch.testing.assert_close(_out(loaded, ids), _out(model, ids), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    again = fastpeft.PeftModel.from_pretrained(make(), tmp_path, is_trainable=True)
    assert again.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def _two_adapters(make=tiny_llama, task="CAUSAL_LM", cfg_cls=fastpeft.HoulsbyConfig):
    model = fastpeft.get_peft_model(make(), cfg_cls(reduction_factor=4, task_type=task), adapter_name="a")
    model.add_adapter("b", cfg_cls(reduction_factor=8, task_type=task, non_linearity="relu"))
    return model


def test_fusion_at_init_zero_effect_and_single_adapter_identity(ids):
    model = _two_adapters()
    name = model.add_fusion(["a", "b"])
    assert name == "a,b" and name in model.peft_config
    model.set_adapter(name)
    torch.testing.assert_close(_out(model, ids), _out(tiny_llama(), ids), atol=0, rtol=0)  # fresh adapters: no effect
    # a fusion over one trained adapter starts out equal to that adapter (softmax of one = 1, V = I)
    _randomise_adapters(model, name="a")
    model.add_fusion(["a"], fusion_name="only_a")
    model.set_adapter("a")
    want = _out(model, ids)
    model.set_adapter("only_a")
    torch.testing.assert_close(_out(model, ids), want, atol=FP32_ATOL, rtol=0)
    assert model.fusion_regularization_loss().item() == 0.0


@pytest.mark.parametrize("fcfg", [dict(), dict(value_before_softmax=False, residual_before=True, softmax_temperature=2.0), dict(query=False, value=False)])
def test_fusion_layer_matches_formula(fcfg):
    torch.manual_seed(0)
    layer = AdapterFusionLayer(16, fastpeft.AdapterFusionConfig(**fcfg))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    cfg = layer.config
    h = torch.randn(2, 3, 16)
    deltas = [torch.randn(2, 3, 16) for _ in range(3)]
    vals = [d + h if cfg.residual_before else d for d in deltas]
    q = layer.query(h) if layer.query is not None else h
    ks = [layer.key(v) if layer.key is not None else v for v in vals]
    scores = torch.stack([(q * k).sum(-1) for k in ks], -1) / cfg.softmax_temperature
    p = scores.softmax(-1)
    if layer.value is not None and cfg.value_before_softmax:
        mix = sum(p[..., i : i + 1] * layer.value(v) for i, v in enumerate(vals))
    else:
        mix = sum(p[..., i : i + 1] * v for i, v in enumerate(vals))
        if layer.value is not None:
            mix = layer.value(mix)
    want = mix if cfg.residual_before else mix + h
    torch.testing.assert_close(layer(h, deltas), want, atol=FP32_ATOL, rtol=1e-5)


def test_fusion_trains_only_fusion_weights_and_round_trips(ids, tmp_path, capsys):
    torch.manual_seed(0)
    model = _two_adapters(tiny_bert, "SEQ_CLS", fastpeft.PfeifferConfig)
    _randomise_adapters(model, seed=1, name="a")
    _randomise_adapters(model, seed=2, name="b")
    fusion = model.add_fusion(["a", "b"], fusion_name="ab", fusion_config=fastpeft.AdapterFusionConfig())
    model.set_adapter(fusion)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_fusion.ab." in n or ".modules_to_save.ab." in n for n in trainable)
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == 2 * 3 * (32 * 32 + 32) + (32 * 3 + 3)  # Q, K, V per layer + the classifier head
    model.print_trainable_parameters()
    assert f"trainable params: {trainable_count:,d} || all params: {total:,d}" in capsys.readouterr().out
    model.gradient_checkpointing_enable()  # the fusion also trains under activation checkpointing
    frozen = _snapshot(model, False)
    losses = _train(model, {"input_ids": ids, "labels": torch.tensor([1, 2])}, lr=2e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert model.fusion_regularization_loss().item() > 0
    want = _out(model, ids)

    model.save_pretrained(tmp_path)
    assert {"a", "b", "ab"} <= set(os.listdir(tmp_path))
    cfg = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["fusion_of"] == ["a", "b"] and cfg["fusion_config"]["value"] is True
    keys = set(load_file(tmp_path / "ab" / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.output.dense.adapter_fusion.query.weight" in keys
    assert not any(".adapter_down." in k for k in keys)

    loaded = fastpeft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match=r"fuses \['a', 'b'\], but \['b'\] are not loaded"):
        loaded.load_adapter(tmp_path / "ab", "ab")
    assert "ab" not in loaded.peft_config
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.load_adapter(tmp_path / "ab", "ab")
    loaded.set_adapter("ab")
    torch.testing.assert_close(_out(loaded, ids), want, atol=FP32_ATOL, rtol=0)


def test_multiple_adapters_switch_stack_and_delete(ids):
    model = _two_adapters()
    _randomise_adapters(model, seed=1, name="a")
    _randomise_adapters(model, seed=2, name="b")
    model.set_adapter("a")
    out_a = _out(model, ids)
    model.set_adapter("b")
    out_b = _out(model, ids)
    assert (out_a - out_b).abs().max() > 1e-3
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    model.base_model.set_adapter(["a", "b"])  # stacked: a then b at every position
    layer = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        y = layer.base_layer(x)
        y1 = y + layer._delta("a", y)
        torch.testing.assert_close(layer(x), y1 + layer._delta("b", y1), atol=FP32_ATOL, rtol=0)
    model.add_fusion(["a", "b"])
    with pytest.raises(ValueError, match=r"used by fusion\(s\) \['a,b'\]; delete those first"):
        model.delete_adapter("a")
    model.delete_adapter("a,b")
    model.delete_adapter("a")
    model.set_adapter("b")
    assert list(model.peft_config) == ["b"]
    torch.testing.assert_close(_out(model, ids), out_b, atol=0, rtol=0)


def test_unload_and_no_merge(ids):
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.HoulsbyConfig(reduction_factor=4))
    _randomise_adapters(model)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not _wrapped(base)
    torch.testing.assert_close(_out(base, ids), _out(tiny_llama(), ids), atol=0, rtol=0)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match=r"reduction_factor=5 does not divide the hidden size 32 of module .*pick a divisor of 32 \(e.g. 4\)"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.PfeifferConfig(reduction_factor=5))
    with pytest.raises(ValueError, match="reduction_factor must be a positive integer"):
        fastpeft.BottleneckConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="reduction_factor must be a positive integer"):
        fastpeft.BottleneckConfig(reduction_factor=2.5)
    with pytest.raises(ValueError, match="Unknown non_linearity 'softplusx'"):
        fastpeft.BottleneckConfig(non_linearity="softplusx")
    with pytest.raises(ValueError, match="init_weights must be one of"):
        fastpeft.BottleneckConfig(init_weights="xavier")
    with pytest.raises(ValueError, match="needs mh_adapter=True and/or output_adapter=True"):
        fastpeft.BottleneckConfig(mh_adapter=False, output_adapter=False)
    with pytest.raises(ValueError, match=r"No default bottleneck-adapter placement for model_type 't5'.*Pass target_modules"):
        fastpeft.get_peft_model(tiny_t5(), fastpeft.HoulsbyConfig())
    with pytest.raises(ValueError, match=r"Target modules \['nope'\] not found"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.BottleneckConfig(target_modules=["nope"]))
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.HoulsbyConfig(reduction_factor=4), adapter_name="a")
    model.add_adapter("p", fastpeft.PfeifferConfig(reduction_factor=4))
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn' has adapters \['a'\] but not \['p'\]"):
        model.add_fusion(["a", "p"])
    with pytest.raises(ValueError, match=r"\['zz'\] are not loaded bottleneck adapters"):
        model.add_fusion(["a", "zz"])
    assert list(model.peft_config) == ["a", "p"]
    with pytest.raises(ValueError, match="softmax_temperature must be > 0"):
        fastpeft.AdapterFusionConfig(softmax_temperature=0)


def test_bf16_base_fp32_adapters_and_checkpointing(ids):
    model = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16), fastpeft.HoulsbyConfig(reduction_factor=4, task_type="CAUSAL_LM"))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    torch.testing.assert_close(_out(model.eval(), ids), _out(tiny_llama().to(torch.bfloat16), ids), atol=0, rtol=0)
    model.gradient_checkpointing_enable()
    model.train()
    out = model(input_ids=ids, labels=ids, skip_logits=False)  # the fused loss skips logits in training unless asked
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    ups = [p.grad for n, p in model.named_parameters() if ".adapter_up." in n]
    assert ups and all(g is not None and g.abs().sum() > 0 for g in ups)


def test_transformers_trainer_with_checkpointing_trains_and_round_trips(ids, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.HoulsbyConfig(reduction_factor=4, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(4, 10))
    trainer.train()
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    # all adapters of both layers trained (W_up leaves zero at step 1, W_down moves from step 2)
    assert all((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before), "a parameter did not train"
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    torch.testing.assert_close(_out(loaded, ids), _out(model.eval(), ids), atol=0, rtol=0)
