"""fastpeft's own LoRA on bitsandbytes 4-bit bases (QLoRA) against Hugging Face peft.

A tiny Llama is saved once and loaded 4-bit by transformers + bitsandbytes on CPU
(``BitsAndBytesConfig`` nf4 + double quantisation, or fp4). fastpeft's ``get_peft_model`` and
peft's, given the same LoRA weights, must give the same logits and LoRA gradients (train
mode: bitsandbytes repacks weights for its CPU inference kernel in eval mode, about 1e-3 off),
load each other's adapters, and merge the same way. Hidden sizes are multiples of the
blocksize: bitsandbytes' CPU C dequantiser mis-indexes other even in_features (see
tests/test_nf4.py), which would make peft, not fastpeft, the odd one out.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, count_calls, lora_train_step
from qlora_helpers import load_4bit, save_tiny_llama

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

lora_bnb = sys.modules["fastpeft.tuners.lora_bnb"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def lora_kwargs(dropout=0.0):
    return dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout,
                task_type="CAUSAL_LM")


def pair(path, dropout=0.0, **load_kw):
    """(peft model, fastpeft model) on two 4-bit loads of the same checkpoint, same LoRA weights."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(load_4bit(path, **load_kw), peft.LoraConfig(**lora_kwargs(dropout)))
    fm = fastpeft.get_peft_model(load_4bit(path, **load_kw), fastpeft.LoraConfig(**lora_kwargs(dropout)))
    lora = {k: v for k, v in pm.state_dict().items() if ".lora_" in k}
    missing = fm.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys
    return pm, fm


@pytest.fixture
def op_calls(monkeypatch):
    """Counts fastpeft 4-bit layer forwards that went through the QLoRA op."""
    return count_calls(monkeypatch, lora_bnb, "bnb_linear4bit")


@pytest.mark.parametrize("quant_type,double_quant,dropout", [("nf4", True, 0.0), ("nf4", True, 0.1), ("fp4", False, 0.0)])
def test_same_structure_logits_and_grads_as_peft(tiny_dir, ids, op_calls, quant_type, double_quant, dropout):
    pm, fm = pair(tiny_dir, dropout, quant_type=quant_type, double_quant=double_quant)
    layer = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora_bnb.Linear4bit) and type(layer.base_layer).__name__ == "Linear4bit"
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert sorted(pm.state_dict()) == sorted(fm.state_dict())
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == [n for n, p in fm.named_parameters() if p.requires_grad]
    logits_p, grads_p = lora_train_step(pm, ids, seed=5)
    logits_f, grads_f = lora_train_step(fm, ids, seed=5)
    assert len(op_calls) == 2 * 7
    torch.testing.assert_close(logits_f, logits_p, atol=FP32_ATOL, rtol=0)
    assert grads_p.keys() == grads_f.keys()
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], atol=FP32_ATOL, rtol=0, msg=k)


def _logits_train(model, ids):
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_load_in_either_library(tiny_dir, ids, tmp_path):
    pm, fm = pair(tiny_dir)
    want = _logits_train(pm, ids)
    fm.save_pretrained(tmp_path / "from_fastpeft")
    pm.save_pretrained(tmp_path / "from_peft")
    # fastpeft's adapter in peft
    p2 = peft.PeftModel.from_pretrained(load_4bit(tiny_dir), tmp_path / "from_fastpeft")
    torch.testing.assert_close(_logits_train(p2, ids), want, atol=FP32_ATOL, rtol=0)
    # peft's adapter in fastpeft
    f2 = fastpeft.PeftModel.from_pretrained(load_4bit(tiny_dir), tmp_path / "from_peft")
    assert isinstance(f2.base_model.model.model.layers[1].mlp.down_proj, lora_bnb.Linear4bit)
    torch.testing.assert_close(_logits_train(f2, ids), want, atol=FP32_ATOL, rtol=0)


def test_merge_unmerge_like_peft(tiny_dir, ids):
    pm, fm = pair(tiny_dir)
    before = _logits_train(fm, ids)
    with fm.disable_adapter():
        base_only = _logits_train(fm, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
        fm.merge_adapter()
    lp = pm.base_model.model.model.layers[0].mlp.up_proj
    lf = fm.base_model.model.model.layers[0].mlp.up_proj
    assert lf.merged and type(lf.base_layer.weight).__name__ == "Params4bit"
    assert torch.equal(lf.base_layer.weight.data, lp.base_layer.weight.data)  # dequantise, add, requantise: same bytes
    merged = _logits_train(fm, ids)
    torch.testing.assert_close(merged, _logits_train(pm, ids), atol=FP32_ATOL, rtol=0)
    # the merge is the update up to 4-bit rounding: closer to the adapter's output than the base is
    assert (merged - before).abs().mean() < (base_only - before).abs().mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.unmerge_adapter()
        fm.unmerge_adapter()
    assert not lf.merged
    assert torch.equal(lf.base_layer.weight.data, lp.base_layer.weight.data)
    torch.testing.assert_close(_logits_train(fm, ids), _logits_train(pm, ids), atol=FP32_ATOL, rtol=0)
    # merge_and_unload: plain 4-bit layers again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fm.merge_and_unload()
    assert type(plain.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


def test_prepare_for_kbit_training_then_trainer(tiny_dir, tmp_path):
    """The QLoRA recipe: fastpeft.prepare_model_for_kbit_training, get_peft_model, a few steps of
    transformers' Trainer (which refuses quantized bases unless it sees a PEFT model) with
    gradient checkpointing: the loss goes down and the 4-bit weights are untouched."""
    from transformers import Trainer, TrainingArguments

    model = fastpeft.prepare_model_for_kbit_training(load_4bit(tiny_dir))
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            task_type="CAUSAL_LM"))
    packed0 = fm.base_model.model.model.layers[0].self_attn.v_proj.base_layer.weight.data.clone()
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(1, 128, (4, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=fm, args=args, train_dataset=data)
    trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    assert torch.equal(fm.base_model.model.model.layers[0].self_attn.v_proj.base_layer.weight.data, packed0)


def _bnb_layer(K, N, quant_type="nf4", bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=bias)
    q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu").train()


@pytest.mark.parametrize("K", [100, 33])
def test_in_features_not_a_multiple_of_the_blocksize(K):
    """Blocks straddle rows: the layer computes x W^T + b + LoRA with W dequantised in
    bitsandbytes' format (its pure-PyTorch definition), forward and backward."""
    from fastpeft.ops import nf4

    base = _bnb_layer(K, 24)
    layer = lora_bnb.Linear4bit(base, "default", r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(5, K, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    W = nf4.dequantize_nf4_reference(*nf4.canonicalize(base.weight.data, base.weight.quant_state), torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    want = torch.nn.functional.linear(x2, W, base.bias.detach()) + (x2 @ A.t() @ B.t()) * 2.0
    want.sum().backward()
    torch.testing.assert_close(y, want, atol=FP32_ATOL, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=FP32_ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, atol=FP32_ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, atol=FP32_ATOL, rtol=1e-5)


def test_input_dtype_other_than_compute_dtype_matches_peft_rounding():
    """bf16 input, fp32 compute dtype: bitsandbytes rounds its result to bf16 and peft adds a
    bf16-rounded LoRA output; the layer does the same (not one fused rounding)."""
    base = _bnb_layer(64, 16)
    layer = lora_bnb.Linear4bit(base, "default", r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        want = base(x) + (layer.lora_B["default"](layer.lora_A["default"](x.float())) * 2.0).bfloat16()
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_cpu_tensors_never_reach_gpu_kernels(monkeypatch, settings):
    """Automatic choice on CPU runs the reference path; forcing Triton on CPU without the
    interpreter is refused with a message naming the fix."""
    import fastpeft.kernels.nf4 as K

    layer = lora_bnb.Linear4bit(_bnb_layer(64, 16), "default", r=2, init_lora_weights=False)
    x = torch.randn(2, 64)

    def boom(*a, **k):
        raise AssertionError("a Triton NF4 kernel was launched on CPU tensors")

    monkeypatch.setattr(K, "matmul", boom)
    monkeypatch.setattr(K, "gemv", boom)
    settings(backend="auto")
    assert layer(x).shape == (2, 16)
    settings(backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(x)


def test_fastpeft_lora_on_int8_base_is_refused_clearly():
    """8-bit bitsandbytes layers are not 4-bit: no silent dense-LoRA on their int8 weight."""
    lin8 = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    model = torch.nn.Sequential()
    model.add_module("proj", lin8)
    with pytest.raises(ValueError, match="Linear8bitLt"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["proj"]))


# The layer against peft's lora.bnb.Linear4bit wrapping the same base layer: on CPU (reference
# path, fp32, exact up to FP32_ATOL) and on CUDA (the Triton kernels, bf16 and fp32).
GPU_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _layer_vs_peft(device, dtype, M, tol):
    import copy

    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384, bias=True)
    base = bnb.nn.Linear4bit(512, 384, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    base.load_state_dict(lin.state_dict())
    base = base.to(device).train()
    ours = lora_bnb.Linear4bit(base, "default", r=16, lora_alpha=32, init_lora_weights=False)
    theirs = PeftLinear4bit(copy.deepcopy(base), "default", config=peft.LoraConfig(r=16, lora_alpha=32), r=16, lora_alpha=32)
    res = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora_" in "." + k}, strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k]
    x = torch.randn(M, 512, device=device, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(M > 1), x.clone().requires_grad_(M > 1)
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == y2.dtype == dtype
    torch.testing.assert_close(y1, y2, **tol[dtype])
    if M > 1:
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x1.grad, x2.grad, **tol[dtype])
        for name in ("lora_A", "lora_B"):
            g1 = getattr(ours, name)["default"].weight.grad
            g2 = getattr(theirs, name)["default"].weight.grad
            assert g1.dtype == torch.float32
            torch.testing.assert_close(g1, g2, **tol[dtype])


def test_cpu_layer_matches_peft_layer():
    _layer_vs_peft("cpu", torch.float32, 7, {torch.float32: dict(rtol=1e-5, atol=FP32_ATOL)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 300])
def test_cuda_layer_matches_peft(dtype, M):
    _layer_vs_peft("cuda", dtype, M, GPU_TOL)


def test_layer_after_bitsandbytes_repacked_for_cpu_inference():
    """An eval-mode forward through the bare base layer (e.g. under disable_adapter()) makes
    bitsandbytes rewrite the weight into its CPU inference layout (AVX512-BF16 CPUs). The LoRA
    layer keeps working on that layer: forward/backward read the layout (its absmax rounded to
    bf16 by bitsandbytes, so outputs move by about that rounding) and merging re-quantises from it."""
    from fastpeft.ops import nf4

    layer = lora_bnb.Linear4bit(_bnb_layer(128, 64), "default", r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(3, 128)
    before = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        layer.base_layer(x)
    qs = layer.base_layer.weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack here (no AVX512-BF16)")
    layer.train()
    xg = x.clone().requires_grad_(True)
    after = layer(xg)
    packed, st = nf4.canonicalize(layer.base_layer.weight.data, qs)
    W = nf4.dequantize_nf4_reference(packed, st, torch.float32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(after, torch.nn.functional.linear(x, W, layer.base_layer.bias) + x @ A.t() @ B.t() * 2.0,
                               atol=FP32_ATOL, rtol=1e-5)
    torch.testing.assert_close(after.detach(), before, atol=5e-2, rtol=5e-2)  # bf16-rounded scales
    after.sum().backward()
    assert xg.grad is not None and A.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    import bitsandbytes.functional as BF

    want, _ = BF.quantize_4bit(W + (B @ A).detach() * 2.0, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.base_layer.weight.data.reshape(-1), want.reshape(-1))  # dequantise, add, quantise


def test_two_active_adapters_and_autocast_like_peft():
    """Several active adapters: the first goes through the op, the others are added as peft adds
    them (same result as peft's layer). Under torch.autocast the layer computes in the autocast
    dtype and returns the input's dtype, as bitsandbytes + peft do."""
    import copy

    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = _bnb_layer(64, 32)
    ours = lora_bnb.Linear4bit(base, "default", r=2, lora_alpha=4, init_lora_weights=False)
    ours.update_layer("other", 3, 3, 0.0, False, False)
    theirs = PeftLinear4bit(copy.deepcopy(base), "default", config=peft.LoraConfig(r=2, lora_alpha=4), r=2, lora_alpha=4)
    theirs.update_layer("other", r=3, lora_alpha=3, config=peft.LoraConfig(r=3, lora_alpha=3))
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    ours.set_adapter(["default", "other"])
    theirs.set_adapter(["default", "other"])
    x = torch.randn(4, 64)
    with torch.no_grad():
        y1, y2 = ours(x), theirs(x)
        torch.testing.assert_close(y1, y2, atol=FP32_ATOL, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z1, z2 = ours(x), theirs(x)
    assert z1.dtype == z2.dtype == torch.float32
    torch.testing.assert_close(z1, z2, atol=2e-2, rtol=2e-2)  # bf16 compute on both sides
    torch.testing.assert_close(z1, y1, atol=5e-2, rtol=5e-2)


def test_unquantised_linear4bit_is_refused_with_the_fix():
    model = torch.nn.Sequential()
    model.add_module("proj", bnb.nn.Linear4bit(64, 32, quant_type="nf4"))  # not moved to a device yet
    assert getattr(model.proj.weight, "quant_state", None) is None
    with pytest.raises(ValueError, match=r"no quantised weight yet .*model.to\('cuda'\)"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["proj"]))
    model.to("cpu")  # quantises
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["proj"]))
    assert isinstance(pm.base_model.model.proj, lora_bnb.Linear4bit)
