"""fastpeft.Settings: read from the environment once at import, validated, changed explicitly.

Oracles: a fresh interpreter started with the variables set (what import reads), the ops' own
choices (which backend / plan actually ran), and the errors' texts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastpeft
from fastpeft.ops import backend as bk
from fastpeft.ops.settings import ENV_VARS, Settings, get_settings, set_settings, use_settings


def _fresh_python(code: str, **env_vars: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    env.update(env_vars)
    # cwd="/" keeps the repository's top-level kernels/ off sys.path (see DESIGN.md)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_environment_is_read_once_at_import():
    """Every FASTPEFT_* variable set before import shows in get_settings(); changing os.environ
    afterwards (even to an invalid value) changes nothing."""
    code = (
        "import json, os, fastpeft\n"
        "first = vars(fastpeft.get_settings()).copy()\n"
        "os.environ['FASTPEFT_BACKEND'] = 'triton'\n"
        "os.environ['FASTPEFT_LORA_IMPL'] = 'not-a-plan'\n"
        "os.environ.pop('FASTPEFT_NF4_IMPL')\n"
        "print(json.dumps([first, vars(fastpeft.get_settings())]))\n"
    )
    out = _fresh_python(code, FASTPEFT_BACKEND="Reference", FASTPEFT_LORA_IMPL="fused", FASTPEFT_NF4_IMPL="dequant",
                        FASTPEFT_NF4_PAIR="0", FASTPEFT_NF4_GEMV="cuda", FASTPEFT_PREFIX_IMPL=" SDPA")
    first, later = json.loads(out)
    want = {"backend": "reference", "lora_impl": "fused", "nf4_impl": "dequant", "nf4_pair": False, "nf4_gemv": "cuda",
            "prefix_impl": "sdpa"}
    assert first == want and later == want


def test_unset_environment_gives_the_defaults():
    out = _fresh_python("import json, fastpeft; print(json.dumps(vars(fastpeft.get_settings())))")
    assert json.loads(out) == vars(Settings()) == {
        "backend": "auto", "lora_impl": "split", "nf4_impl": "auto", "nf4_pair": True, "nf4_gemv": "triton",
        "prefix_impl": "auto"}


def test_invalid_environment_value_fails_at_import_naming_variable_and_choices():
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    env["FASTPEFT_BACKEND"] = "gpu"
    proc = subprocess.run([sys.executable, "-c", "import fastpeft"], capture_output=True, text=True, cwd="/",
                          env=env, timeout=120)
    assert proc.returncode != 0
    assert "FASTPEFT_BACKEND" in proc.stderr and "'gpu'" in proc.stderr and "('auto', 'reference', 'triton')" in proc.stderr


@pytest.mark.parametrize("field,bad,allowed", [
    ("backend", "cuda", "('auto', 'reference', 'triton')"),
    ("lora_impl", "splitt", "('split', 'kernels', 'epilogue', 'fused')"),
    ("nf4_impl", "magic", "('auto', 'fused', 'dequant')"),
    ("nf4_gemv", "cublas", "('triton', 'triton_l1', 'cuda')"),
    ("prefix_impl", "flash", "('auto', 'kernel', 'sdpa')"),
])
def test_invalid_values_raise_a_clear_error(field, bad, allowed):
    with pytest.raises(ValueError) as err:
        Settings(**{field: bad})
    msg = str(err.value)
    assert f"Settings.{field}" in msg and ENV_VARS[field] in msg and repr(bad) in msg and allowed in msg
    with pytest.raises(ValueError, match=ENV_VARS[field]):
        Settings.from_env({ENV_VARS[field]: bad})


def test_invalid_types_and_names_raise():
    with pytest.raises(TypeError, match="nf4_pair.*bool"):
        Settings(nf4_pair="0")
    with pytest.raises(TypeError, match="backend.*string"):
        Settings(backend=None)
    with pytest.raises(ValueError, match="FASTPEFT_NF4_PAIR='maybe' is not a boolean"):
        Settings.from_env({"FASTPEFT_NF4_PAIR": "maybe"})
    with pytest.raises(TypeError, match=r"unknown fastpeft setting\(s\) \['backnd'\]"):
        get_settings().replace(backnd="reference")
    with pytest.raises(TypeError, match="fastpeft.Settings"):
        set_settings({"backend": "reference"})


def test_values_are_normalised_and_immutable():
    s = Settings.from_env({"FASTPEFT_BACKEND": " Triton ", "FASTPEFT_NF4_PAIR": "off", "FASTPEFT_LORA_IMPL": ""})
    assert s == Settings(backend="triton", nf4_pair=False) and s.forced_backend() == "triton"
    assert Settings().forced_backend() is None
    with pytest.raises(AttributeError):
        s.backend = "reference"


def test_use_settings_applies_and_restores_on_exit_and_on_exception():
    before = get_settings()
    with use_settings(backend="reference", lora_impl="fused") as inside:
        assert get_settings() is inside and inside == before.replace(backend="reference", lora_impl="fused")
        assert bk.choose_backend(torch.zeros(1)) == "reference" and bk.requested_backend() == "reference"
        with use_settings(Settings(nf4_impl="dequant")):  # nested: a whole Settings object
            assert get_settings() == Settings(nf4_impl="dequant")
        assert get_settings() is inside
    assert get_settings() is before
    with pytest.raises(RuntimeError, match="boom"):
        with use_settings(backend="reference"):
            raise RuntimeError("boom")
    assert get_settings() is before
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        with use_settings(backend="nope"):
            pass  # pragma: no cover - the bad value raises before the block
    assert get_settings() is before


def test_set_settings_returns_the_previous_value():
    before = get_settings()
    new = Settings(backend="reference")
    try:
        assert set_settings(new) is before and get_settings() is new
    finally:
        set_settings(before)


def test_public_names():
    assert fastpeft.Settings is Settings and fastpeft.use_settings is use_settings
    assert fastpeft.get_settings is get_settings and fastpeft.set_settings is set_settings
    assert {"Settings", "get_settings", "set_settings", "use_settings"} <= set(fastpeft.__all__)


def test_settings_fixture_changes_and_restores(settings):
    before = get_settings()
    assert settings(backend="reference") == before.replace(backend="reference") == get_settings()
    assert settings(nf4_pair=False) == before.replace(backend="reference", nf4_pair=False) == get_settings()


def test_ops_take_explicit_settings_over_the_current_ones(settings, monkeypatch):
    """An op given settings= uses them, whatever the current settings say."""
    from fastpeft.ops.lora_linear import lora_linear

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton's own switch: a forced triton on CPU now raises
    settings(backend="triton")
    x, W = torch.randn(3, 8), torch.randn(4, 8)
    A, B = torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lora_linear(x, W, None, A, B, 0.5)
    y = lora_linear(x, W, None, A, B, 0.5, settings=Settings(backend="reference"))
    torch.testing.assert_close(y, x @ W.t() + 0.5 * (x @ A.t()) @ B.t())
    y = lora_linear(x, W, None, A, B, 0.5, backend="reference")  # the single value wins too
    torch.testing.assert_close(y, x @ W.t() + 0.5 * (x @ A.t()) @ B.t())


def test_fallback_reason_follows_settings_or_argument(settings):
    cpu = torch.zeros(1)
    settings(backend="reference")
    assert bk.fallback_reason(cpu) == "backend forced to reference"
    if bk.triton_available():
        assert bk.fallback_reason(cpu, backend="auto").startswith("tensors are on CPU")


def _peft_llama():
    from conftest import tiny_llama

    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_llama(layers=1), cfg).eval()


def test_patch_bakes_the_settings_into_the_layers(settings, monkeypatch, ids):
    """patch() resolves the settings once: the layers keep them when the current settings change
    afterwards, and the report shows them."""
    from conftest import count_calls

    calls = count_calls(monkeypatch, sys.modules["fastpeft.patch"], "lora_linear", record=lambda a, k: k["settings"])
    model = _peft_llama()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    baked = settings(backend="reference", lora_impl="fused")
    report = fastpeft.patch(model)
    assert report.settings == baked and report.backend == "reference (fastpeft settings)"
    assert report.as_dict()["settings"] == vars(baked) and "lora_impl='fused'" in str(report)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    settings(backend="triton")  # an op reading the current settings would now raise on CPU
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert calls == [baked, baked]  # q_proj and v_proj, with the settings of patch time
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_patch_settings_and_backend_arguments(settings):
    """patch(settings=...) wins over the current settings, backend= over settings.backend; a bad
    backend name raises the backend's error."""
    model = _peft_llama()
    settings(backend="triton", lora_impl="kernels")
    report = fastpeft.patch(model, settings=Settings(nf4_impl="dequant"), backend="reference")
    assert report.settings == Settings(backend="reference", nf4_impl="dequant") and report.backend == "reference"
    report = fastpeft.patch(model, settings=Settings(backend="reference"))  # patching again updates the layers
    assert report.settings == Settings(backend="reference")
    states = [m.__dict__["_fastpeft_patch_state"] for m in model.modules() if "_fastpeft_patch_state" in m.__dict__]
    assert len(states) == 2 and all(s["settings"] == Settings(backend="reference") for s in states)
    with pytest.raises(ValueError, match="Unknown fastpeft backend 'gpu'"):
        fastpeft.patch(model, backend="gpu")


def test_only_the_settings_module_reads_fastpeft_variables():
    """No op, kernel or patch code reads a FASTPEFT_* setting from the environment (they would
    silently ignore use_settings); the kernels read no environment beyond triton's own switch."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    env_read = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = []
    for path in sorted([*root.joinpath("fastpeft").rglob("*.py"), *root.joinpath("kernels").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel in ("fastpeft/ops/settings.py", "kernels/_common.py") or rel.startswith("fastpeft/cli/"):
            continue  # the settings read; triton's TRITON_INTERPRET; the CLI's own FASTPEFT_CACHE
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if env_read.search(line) and (rel.startswith("kernels/") or "FASTPEFT_" in line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, offenders
