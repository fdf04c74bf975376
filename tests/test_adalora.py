"""AdaLoRA against Hugging Face peft (the oracle): outputs, the orthogonality regulariser,
rank pruning during training (same seed, same inputs, same rank patterns at every step),
rank_pattern checkpoints both ways, merge/unmerge, bad configs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, TokenRows, count_calls, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

BASE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12, lora_alpha=8)
CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")),
    "gpt2-defaults": (tiny_gpt2, dict(task_type="CAUSAL_LM")),  # default target c_attn, a Conv1D
    "bert-seqcls": (tiny_bert, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def _pair(case, **extra):
    make, kw = CASES[case]
    kw = dict(BASE, **kw, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.get_peft_model(make(), fastpeft.AdaLoraConfig(**copy.deepcopy(kw)))
        theirs = peft.get_peft_model(make(), peft.AdaLoraConfig(**copy.deepcopy(kw)))
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    return ours, theirs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_and_trainable_params_as_peft(case, ids, capsys):
    ours, theirs = _pair(case, init_lora_weights=False)  # random E: the update is not zero
    ours.eval(), theirs.eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    with ours.disable_adapter():
        base = _logits(ours, ids)
    assert (base - _logits(ours, ids)).abs().max() > 1e-3 * base.abs().max()
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad
    )
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines


def test_loss_has_peft_orthogonal_regulariser_and_same_gradients(ids):
    ours, theirs = _pair("llama", init_lora_weights=False, orth_reg_weight=0.3)
    ours.eval(), theirs.eval()
    loss_o = ours(input_ids=ids, labels=ids).loss
    loss_t = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_o, loss_t, atol=FP32_ATOL, rtol=0)
    reg = ours.base_model.orthogonal_regularizer()
    assert reg.item() > 0.1  # random A, B are far from orthonormal
    plain = torch.nn.functional.cross_entropy(_logits(ours, ids)[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss_o.detach(), plain + 0.3 * reg.detach(), atol=FP32_ATOL, rtol=0)
    loss_o.backward()
    loss_t.backward()
    g_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert g_o.keys() == g_t.keys()
    for n in g_o:
        torch.testing.assert_close(g_o[n], g_t[n], atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train fastpeft and peft AdaLoRA side by side (same init, data, optimiser): the rank
    pattern after every step of both, and the checkpoints of both."""
    ours, theirs = _pair("llama")
    g = torch.Generator().manual_seed(0)
    total = BASE["total_step"]
    data = [torch.randint(1, 128, (4, 12), generator=g) for _ in range(total + 1)]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    history = []
    for m in (ours, theirs):
        m.train()
    for step in range(1, total + 1):
        for m, opt in zip((ours, theirs), opts):
            m(input_ids=data[step], labels=data[step]).loss.backward()
            opt.step()
            m.base_model.update_and_allocate(step)
            opt.zero_grad()
        history.append(
            (step, copy.deepcopy(ours.peft_config["default"].rank_pattern), copy.deepcopy(theirs.peft_config["default"].rank_pattern))
        )
    tmp = tmp_path_factory.mktemp("adalora")
    ours.save_pretrained(tmp / "ours")
    theirs.save_pretrained(tmp / "theirs")
    return ours.eval(), theirs.eval(), history, tmp


def test_training_prunes_ranks_on_schedule_like_peft(trained):
    ours, theirs, history, _ = trained
    alloc = ours.base_model.rankallocator
    n_layers = len(ours.base_model.rank_counts())
    assert n_layers == 6 and alloc.init_bgt == 6 * BASE["init_r"] and alloc.target_bgt == 6 * BASE["target_r"]
    end = BASE["total_step"] - BASE["tfinal"]
    for step, mine, peft_pattern in history:
        assert mine == peft_pattern, f"step {step}: rank patterns differ"  # same modules, same kept ranks
        if step <= BASE["tinit"]:
            assert mine is None  # warm-up: nothing pruned yet
            continue
        kept = sum(sum(v) for v in mine.values())
        budget, _ = alloc.budget_schedule(min(step, end))
        assert kept == budget, f"step {step}: {kept} ranks kept, budget {budget}"
    assert sum(ours.base_model.rank_counts().values()) == n_layers * BASE["target_r"]
    # pruned singular values are zero in both
    for n, p in ours.named_parameters():
        if "lora_E" in n:
            q = dict(theirs.named_parameters())[n]
            assert torch.equal(p == 0, q == 0), n
    print("ranks per module after training:", ours.base_model.rank_counts())


def test_rank_pattern_checkpoints_round_trip_both_ways(trained, ids):
    ours, theirs, _, tmp = trained
    a = load_file(str(tmp / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp / "theirs" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k  # both keep only the surviving ranks
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)  # two trainings, same math
    assert any(a[k].shape[0] < BASE["init_r"] for k in a if k.endswith("lora_A"))
    ca = json.loads((tmp / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp / "theirs" / "adapter_config.json").read_text())
    assert ca["peft_type"] == cb["peft_type"] == "ADALORA"
    assert ca["rank_pattern"] == cb["rank_pattern"] and ca["rank_pattern"]
    for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "beta1", "beta2", "orth_reg_weight"):
        assert ca[key] == cb[key], key
    theirs_loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp / "ours").eval()
    torch.testing.assert_close(_logits(theirs_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)
    ours_loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp / "theirs").eval()
    torch.testing.assert_close(_logits(ours_loaded, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)
    assert ours_loaded.base_model.rank_counts() == ours.base_model.rank_counts()
    mine_loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp / "ours").eval()
    torch.testing.assert_close(_logits(mine_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("sched", [dict(tinit=3, tfinal=4, deltaT=3, total_step=20), dict(tinit=0, tfinal=0, deltaT=1, total_step=7)])
def test_budget_schedule_equals_peft(sched):
    ours, theirs = _pair("llama", **sched)
    a, b = ours.base_model.rankallocator, theirs.base_model.rankallocator
    assert (a.init_bgt, a.target_bgt) == (b.init_bgt, b.target_bgt)
    for step in range(0, sched["total_step"] + 3):
        assert a.budget_schedule(step) == b.budget_schedule(step), step


@pytest.mark.parametrize("case", ["gpt2-defaults", "bert-seqcls"])
def test_untrained_checkpoints_round_trip_both_ways(case, ids, tmp_path):
    """Before any pruning (no rank_pattern): GPT-2 Conv1D and a BERT classifier (modules_to_save head)."""
    ours, theirs = _pair(case, init_lora_weights=False)
    ours.eval(), theirs.eval()
    make = CASES[case][0]
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    theirs_loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)
    ours_loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path / "theirs").eval()
    assert isinstance(ours_loaded.base_model, fastpeft.AdaLoraModel)
    torch.testing.assert_close(_logits(ours_loaded, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2-defaults"])
def test_merge_unmerge_restores_weights(case, ids):
    ours, theirs = _pair(case, init_lora_weights=False)
    ours.eval(), theirs.eval()
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k and "ranknum" not in k}
    expected = _logits(ours, ids)
    ours.base_model.merge_adapter()
    torch.testing.assert_close(_logits(ours, ids), expected, atol=FP32_ATOL, rtol=0)
    assert any(not torch.equal(v, before[k]) for k, v in ours.get_base_model().state_dict().items() if k in before)
    ours.base_model.unmerge_adapter()
    after = ours.get_base_model().state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=1e-5)
    merged, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    sd_o, sd_t = merged.state_dict(), merged_theirs.state_dict()
    assert sd_o.keys() == sd_t.keys()
    for k in sd_o:
        torch.testing.assert_close(sd_o[k], sd_t[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_logits(merged, ids), expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(init_r=4, target_r=8), r"target_r=8 is larger than init_r=4"),
        (dict(total_step=None), r"total_step must be the number of training steps"),
        (dict(tinit=8, tfinal=4, total_step=12), r"leave no steps for pruning"),
        (dict(beta1=1.0), r"beta1 .* must lie in \(0, 1\)"),
        (dict(deltaT=0), r"deltaT .* must be >= 1"),
        (dict(orth_reg_weight=-1.0), r"orth_reg_weight must be >= 0"),
        (dict(use_dora=True), r"AdaLoRA does not support DoRA"),
    ],
)
def test_bad_configs_give_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.AdaLoraConfig(**dict(BASE, target_modules=["q_proj"], **kw))


def test_misuse_gives_clear_errors(ids):
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaLoraConfig(**dict(BASE, target_modules=["q_proj"])))
    with pytest.raises(RuntimeError, match="has no gradient.*after loss.backward"):
        model.base_model.update_and_allocate(1)
    with pytest.raises(ValueError, match="trains one adapter at a time"):
        model.add_adapter("second", fastpeft.AdaLoraConfig(**dict(BASE, target_modules=["v_proj"])))
    with pytest.raises(ValueError, match="not found in the base model"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaLoraConfig(**dict(BASE, target_modules=["qq_proj"])))


def test_triton_backend_matches_reference(ids, settings):
    """SVDLinear runs the LoRA-linear op with A*E: under TRITON_INTERPRET=1 the Triton kernels
    (impl=kernels) give the reference path's logits and gradients."""
    kmod = pytest.importorskip("fastpeft.kernels.lora_linear")
    if not kmod.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    kw = dict(BASE, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    results = []
    for backend in ("reference", "triton"):
        settings(backend=backend, lora_impl="kernels")
        model = fastpeft.get_peft_model(tiny_llama(layers=1), fastpeft.AdaLoraConfig(**kw)) if not results else results[0][2]
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, model))
    (l0, g0, _), (l1, g1, _) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_patch_reports_adalora_layers_as_native():
    model = fastpeft.get_peft_model(tiny_llama(layers=1), fastpeft.AdaLoraConfig(**dict(BASE, target_modules=["q_proj", "v_proj"])))
    report = fastpeft.patch(model)
    assert len(report.native) == 2 and not report.patched and not report.skipped
    assert all("lora_linear" in p.note for p in report.native)


# ----------------------------------------------------------------------------- fastpeft.patch on peft AdaLoRA
def _peft_adalora(make, **kw):
    cfg = dict(BASE, init_lora_weights=False, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make(), peft.AdaLoraConfig(**cfg))


@pytest.fixture
def adalora_op_calls(monkeypatch):
    """The LoRA-linear op calls made by patched layers (proves the routing)."""
    import sys

    return count_calls(monkeypatch, sys.modules["fastpeft.patch"], "lora_linear")


@pytest.mark.parametrize("case", ["llama", "gpt2-defaults"])
def test_patch_routes_peft_svdlinear_with_same_logits_and_grads(case, ids, adalora_op_calls, settings):
    """peft's SVDLinear (nn.Linear, and GPT-2's Conv1D with fan_in_fan_out) through the op: the same
    loss (with peft's orthogonality term), logits and A/E/B gradients as peft's own forward."""
    from conftest import lora_train_step

    settings(backend="reference")
    make, kw = CASES[case]
    model = _peft_adalora(make, lora_dropout=0.1, **kw)
    n_layers = sum(type(m).__name__ == "SVDLinear" for m in model.modules())
    logits0, grads0 = lora_train_step(model, ids)
    report = fastpeft.patch(model)
    assert len(report.patched) == n_layers > 0 and not report.skipped, report
    assert all("A*E" in p.note for p in report.patched)
    logits1, grads1 = lora_train_step(model, ids)
    assert len(adalora_op_calls) == n_layers and report.backend == "reference (fastpeft settings)"
    torch.testing.assert_close(logits1, logits0, atol=FP32_ATOL, rtol=0)
    assert grads1.keys() == grads0.keys() and any("lora_E" in n for n in grads0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-5, rtol=1e-5, msg=lambda s: f"{n}: {s}")


def test_patch_peft_adalora_triton_interpreter_and_fallbacks(ids, adalora_op_calls, settings):
    """The Triton kernels (interpreter) on a 1-layer peft AdaLoRA model, then the cases that must
    take peft's own forward: disabled adapters and merged weights; unpatch restores."""
    kmod = pytest.importorskip("fastpeft.kernels.lora_linear")
    if not kmod.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    from conftest import lora_train_step

    settings(lora_impl="kernels")
    model = _peft_adalora(lambda: tiny_llama(layers=1), target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    logits0, grads0 = lora_train_step(model, ids)
    model.eval()
    base_logits = _logits_disabled(model, ids)
    settings(backend="triton")
    assert len(fastpeft.patch(model).patched) == 2
    logits1, grads1 = lora_train_step(model, ids)
    assert len(adalora_op_calls) == 2
    torch.testing.assert_close(logits1, logits0, atol=1e-4, rtol=0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-4, rtol=1e-4, msg=lambda s: f"{n}: {s}")
    model.eval()
    adalora_op_calls.clear()
    torch.testing.assert_close(_logits_disabled(model, ids), base_logits, atol=FP32_ATOL, rtol=0)
    assert adalora_op_calls == []  # disabled: peft's forward, base layer only
    on = _logits(model, ids)
    model.merge_adapter()
    adalora_op_calls.clear()
    torch.testing.assert_close(_logits(model, ids), on, atol=1e-4, rtol=0)
    assert adalora_op_calls == []  # merged: peft's forward
    model.unmerge_adapter()
    assert len(fastpeft.unpatch(model)) == 2


def _logits_disabled(model, ids):
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids=ids).logits


def test_patched_peft_adalora_prunes_ranks_like_unpatched():
    """Rank allocation reads the same parameters: a patched and an unpatched peft AdaLoRA model
    trained side by side keep the same rank pattern and the same pruned singular values."""
    make, kw = CASES["llama"]
    models = [_peft_adalora(make, **kw) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    report = fastpeft.patch(models[1], backend="reference")
    assert len(report.patched) == 6
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, 128, (4, 12), generator=g) for _ in range(BASE["total_step"] + 1)]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(1, BASE["total_step"] + 1):
        for m, opt in zip(models, opts):
            m.train()
            m(input_ids=data[step], labels=data[step]).loss.backward()
            opt.step()
            m.base_model.update_and_allocate(step)
            opt.zero_grad()
        patterns = [m.peft_config["default"].rank_pattern for m in models]
        assert patterns[0] == patterns[1], f"step {step}"
    assert patterns[0] is not None
    e0 = {n: p for n, p in models[0].named_parameters() if "lora_E" in n}
    for n, p in models[1].named_parameters():
        if "lora_E" in n:
            assert torch.equal(p == 0, e0[n] == 0), n
            torch.testing.assert_close(p, e0[n], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- Trainer callback
def _train_with_callback(model, tmp_path, max_steps, accum=1):
    from transformers import Trainer, TrainingArguments

    calls = []
    tuner = model.base_model
    real = tuner.update_and_allocate

    def spy(step):  # gradients must still be there when the scores are updated
        grads = [p.grad for n, p in model.named_parameters() if "lora_E" in n]
        calls.append((step, all(g is not None for g in grads)))
        return real(step)

    tuner.update_and_allocate = spy
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=max_steps,
                             gradient_accumulation_steps=accum, learning_rate=1e-2, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=TokenRows(16, 12), callbacks=[fastpeft.AdaLoraCallback()]).train()
    return calls


@pytest.mark.parametrize("library", ["fastpeft", "peft"])
def test_adalora_callback_prunes_to_target_inside_trainer(library, tmp_path):
    """One update_and_allocate per optimizer step (gradient accumulation 2), with gradients present,
    0-based steps; at the end the layers keep target_r ranks each on average (AdaLoRA's budget is
    global), as the schedule says."""
    make, kw = CASES["llama"]
    cfg = dict(BASE, **kw)
    lib = fastpeft if library == "fastpeft" else peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(make(), lib.AdaLoraConfig(**cfg))
    assert model.peft_config["default"].rank_pattern is None
    calls = _train_with_callback(model, tmp_path, BASE["total_step"], accum=2)
    assert calls == [(s, True) for s in range(BASE["total_step"])]
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and len(pattern) == 6
    assert sum(sum(keep) for keep in pattern.values()) == 6 * BASE["target_r"], pattern


def test_adalora_callback_warns_on_schedule_mismatch_and_rejects_other_methods(tmp_path, caplog):
    make, kw = CASES["llama"]
    model = fastpeft.get_peft_model(make(), fastpeft.AdaLoraConfig(**dict(BASE, **kw)))
    with caplog.at_level("WARNING", logger="fastpeft"):
        calls = _train_with_callback(model, tmp_path, 3)
    assert [s for s, _ in calls] == [0, 1, 2]
    assert any("total_step=12" in r.getMessage() and "3 optimizer steps" in r.getMessage() for r in caplog.records)
    lora = fastpeft.get_peft_model(make(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(TypeError, match="AdaLoraCallback needs an AdaLoRA PeftModel"):
        Trainer(model=lora, args=args, train_dataset=TokenRows(16, 12), callbacks=[fastpeft.AdaLoraCallback()]).train()
