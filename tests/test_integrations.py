"""fastpeft.integrations (what it changes in transformers / accelerate / TRL, and undoing it) and
training fastpeft / peft models with transformers' Trainer and TRL's SFTTrainer.

Oracles: snapshots of every global and class attribute of those packages (the changed set must be
exactly what the module says it changes, and disable() must restore it); peft loading what the
trainer saved (same logits); the unpatched run's losses for a patched one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastpeft
from conftest import FP32_ATOL, count_calls, tiny_llama, word_tokenizer

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
patch_mod = sys.modules["fastpeft.patch"]

_SNAPSHOT_SCRIPT = r'''
import json, sys
import fastpeft
from fastpeft import integrations
import transformers.trainer, accelerate.utils, trl.trainer.sft_trainer  # loaded before enable()

PKGS = ("transformers", "accelerate", "trl")

def snapshot():
    snap = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or name.split(".")[0] not in PKGS:
            continue
        for key, value in list(vars(mod).items()):
            snap[f"{name}.{key}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for attr, member in list(vars(value).items()):
                    snap[f"{name}.{value.__qualname__}.{attr}"] = id(member)
    return snap

def changed(a, b):
    return sorted(k for k in a if k in b and a[k] != b[k])

assert integrations.applied() == []        # importing fastpeft (and the trainers) changes nothing
before = snapshot()
fastpeft.LoraConfig(r=2)                   # the first fastpeft config enables the integration
after = snapshot()
applied = integrations.applied()
restored = integrations.disable()
fastpeft.LoraConfig(r=2)                   # stays off after disable()
out = {"changed": changed(before, after), "applied": applied, "restored": restored,
       "after_disable": changed(before, snapshot()), "applied_after_disable": integrations.applied(),
       "changes": [[c.module, c.attribute, c.alias_name] for c in integrations.CHANGES],
       "doc": integrations.__doc__}
print("JSON" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def snapshot_run():
    proc = subprocess.run([sys.executable, "-c", _SNAPSHOT_SCRIPT], capture_output=True, text=True, cwd="/",
                          timeout=300, env={**os.environ, "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("JSON", 1)[1])


def test_enable_changes_exactly_what_the_docstring_lists(snapshot_run):
    run = snapshot_run
    assert run["changed"] == sorted(run["applied"])
    direct = {f"{m}.{a}" for m, a, _ in run["changes"]}
    assert direct <= set(run["changed"])  # every listed change is made (all three packages installed)
    aliases = {a for _, a, alias in run["changes"] if alias}
    for name in set(run["changed"]) - direct:  # the rest: by-name imports of the two check functions
        assert name.split(".")[0] in ("transformers", "accelerate", "trl") and name.rsplit(".", 1)[1] in aliases, name
    for module, attribute, _ in run["changes"]:
        assert f"``{module}.{attribute}``" in run["doc"], (module, attribute)
    assert "import hook" in run["doc"] and "disable" in run["doc"]


def test_disable_restores_every_attribute_and_stays_off(snapshot_run):
    assert snapshot_run["after_disable"] == []
    assert sorted(snapshot_run["restored"]) == sorted(snapshot_run["applied"])
    assert snapshot_run["applied_after_disable"] == []


def test_no_import_hook_is_installed():
    fastpeft.LoraConfig(r=2)
    assert not [f for f in sys.meta_path if type(f).__module__.startswith("fastpeft")]


# ----------------------------------------------------------------------------- TRL
def _sft(tmp_path, model, peft_config=None, callbacks=None, steps=3, bf16=True):
    """A short SFTTrainer run; bf16=True is TRL's default (autocast, also on CPU)."""
    data = datasets.Dataset.from_dict({"text": [" ".join(f"w{(3 * i + j) % 100}" for j in range(10)) for i in range(8)]})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                         seed=0, data_seed=0, bf16=bf16)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(),
                             peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    return trainer, [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_trainer_with_a_fastpeft_config_trains_and_saves_a_peft_adapter(tmp_path, ids):
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    # fp32 run: with bf16 accelerate leaves the model's forward under autocast, which the reloaded one is not
    trainer, losses = _sft(tmp_path, tiny_llama(), peft_config=config, bf16=False)
    model = trainer.model
    assert isinstance(model, fastpeft.PeftModel) and len(losses) == 3
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # lora_B starts at zero
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-4, rtol=0)


def test_sft_trainer_with_a_peft_config_and_patch_callback_runs_the_fused_op(tmp_path, monkeypatch):
    """peft_config=peft.LoraConfig: the LoRA layers appear inside SFTTrainer; PatchCallback patches
    them there, the training steps run the op, and the losses are the unpatched run's (TRL's default
    bf16 autocast, dropout on: the op's reference path is peft's own autocast sequence)."""
    def config():
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")

    _, want = _sft(tmp_path / "plain", tiny_llama(), peft_config=config())
    calls = count_calls(monkeypatch, patch_mod, "lora_linear")
    callback = fastpeft.PatchCallback(backend="reference")
    trainer, got = _sft(tmp_path / "patched", tiny_llama(), peft_config=config(), callbacks=[callback])
    assert isinstance(trainer.model, peft.PeftModel)
    assert callback.report is not None and len(callback.report.patched) == 2 * 7 and not callback.report.skipped
    assert len(calls) >= 3 * len(callback.report.patched)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=FP32_ATOL, rtol=0)


def test_patch_before_sft_trainer_wraps_the_model_warns():
    with pytest.warns(UserWarning, match="PatchCallback"):
        report = fastpeft.patch(tiny_llama())
    assert not report.patched
