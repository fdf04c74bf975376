"""fastpeft.patch / unpatch on Hugging Face peft models (the oracle) and on fastpeft models.

Oracle: the same model before patching (and after unpatch), peft's or fastpeft's. Patched layers
must give the same logits and the same LoRA gradients (reference backend; Triton interpreter on a
1-layer model), keep save_pretrained / merging / adapter switching / disabling working in both
libraries, compute only the active adapter, and the report must name what was patched and what
was left untouched (with reasons). fastpeft's own layers run the op without patching; forcing
backend "triton" (the settings fixture) under the interpreter checks them against the reference.
"""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, count_calls, lora_train_step, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
patch_mod = sys.modules["fastpeft.patch"]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_llama(layers=2, dropout=0.0, targets=LLAMA_TARGETS, **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets,
                          lora_dropout=dropout, task_type="CAUSAL_LM", **kw)
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_llama(layers=layers), cfg)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the fused op from patched layers (proves the forward was routed)."""
    return count_calls(monkeypatch, patch_mod, "lora_linear")


def _assert_same(a, b, atol=FP32_ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_peft_llama_logits_and_grads_equal_unpatched(ids, op_calls, settings, dropout):
    """Reference backend on CPU; with dropout the op's reference draws the mask like
    torch.nn.Dropout does, so with the same seed peft and the patched model agree exactly."""
    settings(backend="reference")
    model = _peft_llama(dropout=dropout)
    logits0, grads0 = lora_train_step(model, ids)
    report = fastpeft.patch(model)
    assert len(report.patched) == 2 * len(LLAMA_TARGETS) and not report.skipped
    assert report.backend == "reference (fastpeft settings)"
    logits1, grads1 = lora_train_step(model, ids)
    assert len(op_calls) == 2 * len(LLAMA_TARGETS)
    _assert_same(logits1, logits0)
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        _assert_same(grads1[n], grads0[n])
    model.eval()
    _assert_same(_logits(model, ids), _logits(copy.deepcopy(model), ids))


def test_peft_llama_triton_interpreter_one_layer(ids, op_calls, settings):
    """Settings backend "triton" under TRITON_INTERPRET=1: every LoRA kernel runs (impl=kernels,
    no dropout so peft's output is the oracle) on a 1-layer model."""
    kmod = pytest.importorskip("fastpeft.kernels.lora_linear")
    if not kmod.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    settings(lora_impl="kernels")
    model = _peft_llama(layers=1)
    logits0, grads0 = lora_train_step(model, ids)
    settings(backend="triton")
    report = fastpeft.patch(model)
    assert report.backend == "triton (fastpeft settings)" and len(report.patched) == len(LLAMA_TARGETS)
    logits1, grads1 = lora_train_step(model, ids)
    assert len(op_calls) == len(LLAMA_TARGETS)
    _assert_same(logits1, logits0, atol=1e-4)
    for n in grads0:
        _assert_same(grads1[n], grads0[n], atol=1e-4)


@pytest.mark.parametrize("backend,dropout", [("reference", 0.1), ("triton", 0.0)])
def test_peft_dora_layers_patched_to_the_dora_op(ids, monkeypatch, backend, dropout, settings):
    """peft's DoRA layers run fastpeft's DoRA op (fused norm + LoRA-linear op): same logits and
    gradients (magnitude included) as peft's own forward; triton: the norm kernel runs."""
    if backend == "triton":
        kmod = pytest.importorskip("fastpeft.kernels.lora_linear")
        if not kmod.interpreting():
            pytest.skip("needs TRITON_INTERPRET=1")
    calls = count_calls(monkeypatch, patch_mod, "dora_linear")
    model = _peft_llama(layers=1, dropout=dropout, targets=["q_proj", "v_proj", "down_proj"], use_dora=True)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_magnitude_vector" in n:
                prm.mul_(torch.linspace(0.5, 1.5, prm.numel()))
    logits0, grads0 = lora_train_step(model, ids)
    settings(backend=backend)
    report = fastpeft.patch(model)
    assert len(report.patched) == 3 and not report.skipped
    logits1, grads1 = lora_train_step(model, ids)
    assert len(calls) == 3
    atol = FP32_ATOL if backend == "reference" else 1e-4
    _assert_same(logits1, logits0, atol=atol)
    assert any("lora_magnitude_vector" in n for n in grads0) and grads1.keys() == grads0.keys()
    for n in grads0:
        _assert_same(grads1[n], grads0[n], atol=atol)


def test_gpt2_conv1d_patched(ids, op_calls, settings):
    settings(backend="reference")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_gpt2(), cfg)
    logits0, grads0 = lora_train_step(model, ids)
    report = fastpeft.patch(model)
    assert len(report.patched) == 2 * 4 and all(p.kind.endswith("on Conv1D") for p in report.patched)
    logits1, grads1 = lora_train_step(model, ids)
    assert op_calls
    _assert_same(logits1, logits0)
    for n in grads0:
        _assert_same(grads1[n], grads0[n])


def test_save_merge_switch_disable_on_patched_peft_model(ids, op_calls, tmp_path, settings):
    settings(backend="reference")
    model = _peft_llama(targets=["q_proj", "v_proj"]).eval()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj"]))
    ref = copy.deepcopy(model)  # unpatched twin
    fastpeft.patch(model)
    # adapter switching
    for name in ("other", "default"):
        model.set_adapter(name)
        ref.set_adapter(name)
        n0 = len(op_calls)
        _assert_same(_logits(model, ids), _logits(ref, ids))
        assert len(op_calls) > n0
    # disabled adapters -> base model, through the original forward
    with model.disable_adapter(), ref.disable_adapter():
        n0 = len(op_calls)
        _assert_same(_logits(model, ids), _logits(ref, ids))
        assert len(op_calls) == n0
    # save_pretrained: same files as the unpatched twin, loadable by peft
    model.save_pretrained(tmp_path / "p")
    ref.save_pretrained(tmp_path / "r")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval()
    _assert_same(_logits(loaded, ids), _logits(model, ids))
    # merging: merged forward goes through the original forward, same logits
    unmerged = _logits(model, ids)
    model.merge_adapter()
    n0 = len(op_calls)
    _assert_same(_logits(model, ids), unmerged, atol=1e-5)
    assert len(op_calls) == n0
    model.unmerge_adapter()
    _assert_same(_logits(model, ids), unmerged, atol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    _assert_same(_logits(merged, ids), unmerged, atol=1e-5)
    # deepcopy / pickle of a patched model keep working (the copy routes through its own layers)
    clone = pickle.loads(pickle.dumps(model))
    _assert_same(_logits(clone, ids), unmerged)
    assert patch_mod.is_patched(clone.base_model.model.model.layers[0].self_attn.q_proj)


def test_unpatch_restores(ids, op_calls, settings):
    settings(backend="reference")
    model = _peft_llama(targets=["q_proj", "v_proj"]).eval()
    before = _logits(model, ids)
    report = fastpeft.patch(model)
    again = fastpeft.patch(model, backend="reference")  # idempotent: updates the backend only
    assert again.patched_names == report.patched_names
    restored = fastpeft.unpatch(model)
    assert sorted(restored) == sorted(report.patched_names)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" not in layer.__dict__ and not patch_mod.is_patched(layer)
    n0 = len(op_calls)
    _assert_same(_logits(model, ids), before)
    assert len(op_calls) == n0
    assert fastpeft.unpatch(model) == []


def test_report_lists_skipped_modules_with_reasons(ids, settings):
    settings(backend="reference")
    model = _peft_llama(targets=["q_proj", "embed_tokens"]).eval()
    before = _logits(model, ids)
    report = fastpeft.patch(model)
    assert len(report.patched) == 2
    skipped = {s.name: s.reason for s in report.skipped}
    emb = [n for n in skipped if n.endswith("embed_tokens")]
    assert len(emb) == 1 and "Embedding" in skipped[emb[0]]
    emb_layer = model.get_submodule(emb[0])
    assert not patch_mod.is_patched(emb_layer) and "forward" not in emb_layer.__dict__  # left untouched
    _assert_same(_logits(model, ids), before)
    assert "skipped" in str(report) and "embed_tokens" in str(report)
    assert report.as_dict()["patched"][0]["name"].endswith("q_proj")
    dora = _peft_llama(targets=["v_proj"], use_dora=True)
    for layer in dora.modules():  # DoRA without its magnitude vector cannot be routed
        if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector["default"]
    rep = fastpeft.patch(dora)
    assert not rep.patched and len(rep.skipped) == 2
    assert all("DoRA" in s.reason and "lora_magnitude_vector" in s.reason for s in rep.skipped)


def test_fastpeft_model_is_native_unless_backend_forced(ids, settings):
    settings(backend="reference")
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).eval()
    before = _logits(model, ids)
    report = fastpeft.patch(model)
    assert len(report.native) == 4 and not report.patched and not report.skipped
    forced = fastpeft.patch(model, backend="reference")
    assert len(forced.patched) == 4 and forced.backend == "reference"
    _assert_same(_logits(model, ids), before)
    assert len(fastpeft.unpatch(model)) == 4


@pytest.fixture
def op_A(monkeypatch):
    """The lora_A tensor each op call from a patched layer received (which adapter ran)."""
    seen = []
    real = patch_mod.lora_linear

    def spy(x, weight, bias, lora_A, *a, **k):
        seen.append(lora_A)
        return real(x, weight, bias, lora_A, *a, **k)

    monkeypatch.setattr(patch_mod, "lora_linear", spy)
    return seen


def _adapter_A_ptrs(model, adapter):
    return {p.data_ptr() for n, p in model.named_parameters() if f".lora_A.{adapter}." in n}


def test_several_adapters_only_the_active_one_is_computed(ids, op_A, settings):
    """Two adapters on the same layers of a patched peft model: each op call gets the active
    adapter's weights only, and only the active adapter receives gradients."""
    settings(backend="reference")
    model = _peft_llama(targets=["q_proj", "v_proj"])
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj"]))
    ref = copy.deepcopy(model)
    assert len(fastpeft.patch(model).patched) == 4
    for name, other in (("other", "default"), ("default", "other")):
        model.set_adapter(name)
        ref.set_adapter(name)
        op_A.clear()
        logits, grads = lora_train_step(model, ids)
        assert len(op_A) == 4 and {t.data_ptr() for t in op_A} == _adapter_A_ptrs(model, name)
        assert grads and all(f".{name}." in n for n in grads)
        assert all(p.grad is None for n, p in model.named_parameters() if f".{other}." in n)
        ref_logits, ref_grads = lora_train_step(ref, ids)
        _assert_same(logits, ref_logits)
        for n in grads:
            _assert_same(grads[n], ref_grads[n])


def test_fastpeft_model_patched_keeps_save_merge_switch(ids, op_A, tmp_path, settings):
    """A fastpeft model re-routed by patch(backend=...) keeps adapter switching, disabling,
    save_pretrained (same files as its unpatched twin; peft and fastpeft load them) and merging."""
    settings(backend="reference")
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw)).eval()
    model.add_adapter("other", fastpeft.LoraConfig(**dict(kw, r=2)))
    ref = copy.deepcopy(model)
    report = fastpeft.patch(model, backend="reference")
    assert len(report.patched) == 4 and all(p.kind.startswith("fastpeft lora.Linear") for p in report.patched)
    outs = {}
    for name in ("other", "default"):
        model.set_adapter(name)
        ref.set_adapter(name)
        op_A.clear()
        outs[name] = _logits(model, ids)
        assert len(op_A) == 4 and {t.data_ptr() for t in op_A} == _adapter_A_ptrs(model, name)
        _assert_same(outs[name], _logits(ref, ids))
    assert (outs["default"] - outs["other"]).abs().max() > 1e-4
    with model.disable_adapter(), ref.disable_adapter():
        op_A.clear()
        _assert_same(_logits(model, ids), _logits(ref, ids))
        assert not op_A
    # save_pretrained: identical files to the unpatched twin's, loadable by both libraries
    model.save_pretrained(tmp_path / "p")
    ref.save_pretrained(tmp_path / "r")
    from safetensors.torch import load_file

    for sub in ("", "other"):
        a = load_file(str(tmp_path / "p" / sub / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "r" / sub / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    _assert_same(_logits(fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval(), ids), outs["default"])
    _assert_same(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval(), ids), outs["default"])
    # merging: the merged weights path runs the base layers only (no op call), same logits
    model.merge_adapter()
    op_A.clear()
    _assert_same(_logits(model, ids), outs["default"], atol=1e-5)
    assert not op_A
    model.unmerge_adapter()
    _assert_same(_logits(model, ids), outs["default"], atol=1e-5)
    assert len(op_A) == 4
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    _assert_same(_logits(merged, ids), outs["default"], atol=1e-5)
    assert sorted(fastpeft.unpatch(model)) == sorted(report.patched_names)
    op_A.clear()
    _assert_same(_logits(model, ids), outs["default"])
    assert not op_A


def test_fastpeft_model_triton_interpreter_without_patch(ids, monkeypatch, settings):
    """fastpeft's own LoRA layers call the op with the automatic backend; forcing
    backend "triton" under TRITON_INTERPRET=1 runs the Triton kernels on a 1-layer model
    and gives the reference backend's logits and LoRA gradients."""
    kmod = pytest.importorskip("fastpeft.kernels.lora_linear")
    if not kmod.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    lora_mod = sys.modules["fastpeft.tuners.lora"]
    backends, kernel_calls = [], []
    real_op = lora_mod.lora_linear

    def spy(*a, **k):
        backends.append(k.get("backend"))
        return real_op(*a, **k)

    monkeypatch.setattr(lora_mod, "lora_linear", spy)
    for kname in ("lora_down", "lora_dx_add", "lora_grad_a"):
        real_k = getattr(kmod, kname)
        monkeypatch.setattr(kmod, kname, lambda *a, _f=real_k, _n=kname, **k: (kernel_calls.append(_n), _f(*a, **k))[1])
    settings(lora_impl="kernels")
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(layers=1), fastpeft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    settings(backend="reference")
    logits0, grads0 = lora_train_step(model, ids)
    assert not kernel_calls
    settings(backend="triton")
    logits1, grads1 = lora_train_step(model, ids)
    assert backends and set(backends) == {None}  # the layers never force a backend themselves
    n = len(LLAMA_TARGETS)
    # q/k/v read the normed (frozen) embeddings: no dx there, so dx kernels run for the other 4
    assert sorted(kernel_calls) == sorted(["lora_down"] * n + ["lora_dx_add"] * (n - 3) + ["lora_grad_a"] * n)
    _assert_same(logits1, logits0, atol=1e-4)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        _assert_same(grads1[name], grads0[name], atol=1e-4)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        fastpeft.patch("not a model")
    with pytest.raises(ValueError, match="Unknown fastpeft backend"):
        fastpeft.patch(torch.nn.Linear(2, 2), backend="cuda-magic")


def test_import_fastpeft_does_not_import_peft():
    import subprocess

    code = "import sys, fastpeft; fastpeft.patch; assert 'peft' not in sys.modules, 'peft imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels)")
@pytest.mark.parametrize("impl", ["split", "fused"])
def test_cuda_patched_peft_llama_matches_unpatched(ids, settings, impl):
    """On a GPU the automatic backend is Triton: a patched peft model (fp32, no dropout) gives
    the unpatched model's logits and LoRA gradients."""
    settings(backend="auto", lora_impl=impl)
    model = _peft_llama().cuda()
    ids = ids.cuda()
    logits0, grads0 = lora_train_step(model, ids)
    report = fastpeft.patch(model)
    assert report.backend.startswith("auto (triton")
    logits1, grads1 = lora_train_step(model, ids)
    _assert_same(logits1, logits0, atol=1e-4)
    for n in grads0:
        _assert_same(grads1[n], grads0[n], atol=1e-4)


# ---------------------------------------------------------------- honest report, warnings, routes
class _AttentionThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.mha(x, x, x)[0])


def test_multihead_attention_out_proj_is_skipped_not_counted(op_calls, monkeypatch, settings):
    """peft's LoRA MultiheadAttention wraps out_proj in a lora.Linear whose forward never runs
    (nn.MultiheadAttention reads out_proj.weight): the report lists it as skipped with that
    reason, and every layer it counts as patched really calls the op once per forward."""
    settings(backend="reference")
    torch.manual_seed(0)
    model = peft.get_peft_model(_AttentionThenLinear(), peft.LoraConfig(r=2, target_modules=["mha", "lin"],
                                                                        init_lora_weights=False))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want = model(x)
    report = fastpeft.patch(model)
    assert [n.rsplit(".", 1)[-1] for n in report.patched_names] == ["lin"], str(report)
    skipped = {s.name.removeprefix("base_model.model."): s.reason for s in report.skipped}
    assert "never calls its forward" in skipped["mha.base_layer.out_proj"]
    assert "MultiheadAttention" in skipped["mha"]
    with torch.no_grad():
        got = model(x)
    assert len(op_calls) == len(report.patched)
    _assert_same(got, want)
    assert not patch_mod.is_patched(model.base_model.model.mha.base_layer.out_proj)


def test_patch_warns_when_there_is_nothing_to_patch():
    with pytest.warns(UserWarning, match=r"no LoRA.*after the trainer has wrapped the model.*PatchCallback"):
        report = fastpeft.patch(tiny_llama())
    assert not report.patched and not report.native and not report.skipped


def test_patch_warns_when_every_layer_is_skipped():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match=r"all 1 adapter layers were skipped .*embed_tokens"):
        fastpeft.patch(model)


def test_route_table_entry_is_all_a_new_layer_type_needs(ids, monkeypatch):
    """Adding a route is adding one ROUTES entry: a toy route for plain nn.Linear layers outside any
    tuner patches them, runs its forward, is reported with its note, and unpatches."""
    seen = []

    def forward(module, state, x, args, kwargs):
        seen.append(module)
        return torch.nn.functional.linear(x, module.weight, module.bias)

    toy = patch_mod.Route("toy", lambda l: isinstance(l.module, torch.nn.Linear) and l.library is None and not l.inside_tuner,
                          lambda l: "lm_head stays" if l.name == "lm_head" else None, forward, "toy route")
    monkeypatch.setattr(patch_mod, "ROUTES", patch_mod.ROUTES + (toy,))
    model = tiny_llama(layers=1)
    want = _logits(model, ids)
    report = fastpeft.patch(model)
    assert len(report.patched) == 7 and all(p.note == "toy route" for p in report.patched)
    assert [s.name for s in report.skipped] == ["lm_head"] and report.skipped[0].reason == "lm_head stays"
    _assert_same(_logits(model, ids), want)
    assert len(seen) == 7  # one call per patched layer per forward
    assert sorted(fastpeft.unpatch(model)) == sorted(report.patched_names)
