"""The QLoRA benchmarks in their quick CPU configuration. benchmarks/train_step.py: every arm
trains a tiny 4-bit Llama, the rows follow the benchmark protocol, and the arms agree on the
loss (same model from the same seed; only the 4-bit matmul path differs).
benchmarks/qlora_matmul.py: rows with positive times and consistent ratios."""

import importlib.util
import os

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name="train_step"):
    spec = importlib.util.spec_from_file_location(f"fastpeft_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_step_quick_rows(settings):
    settings(backend="auto")
    bench = _load()
    rows = bench.run(quick=True)
    assert [r["arm"] for r in rows] == list(bench.QUICK_ARMS) == ["peft", "peft+patch", "fastpeft"]
    assert all(list(r) == list(rows[0]) for r in rows)  # same columns, same order
    for r in rows:
        assert r["model"] == "tiny" and r["batch x seq"] == "1x32"
        assert r["step ms"] > 0 and abs(r["tokens/s"] - 32 / (r["step ms"] / 1e3)) < 1e-6 * r["tokens/s"]
        assert r["peak MiB"] is None and r["memory vs peft"] is None  # no allocator statistics on CPU
        assert abs(r["speedup vs peft"] - rows[0]["step ms"] / r["step ms"]) < 1e-9
        assert abs(r["loss"] - rows[0]["loss"]) < 1e-5
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["peft+patch"]["layers via op"] == 2 * 7
    assert "| arm |" in bench.markdown_table(rows)


def test_bad_config_and_arm_are_refused():
    bench = _load()
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        bench.run(quick=True, configs=["nope"])
    with pytest.raises(ValueError, match="unknown arm"):
        bench.wrap("nope", None)


def test_qlora_matmul_quick_rows(settings):
    settings(backend="auto")
    bench = _load("qlora_matmul")
    rows = bench.run(quick=True)
    assert rows and all(list(r) == list(rows[0]) for r in rows)
    for r in rows:
        assert r["fastpeft_ms"] > 0 and r["dense_bf16_ms"] > 0 and r["bnb_dequant_mm_ms"] > 0
        assert r["fastpeft_cuda_ms"] is None  # no CUDA here: the CUDA GEMV column is n/a
        best_bnb = min(v for v in (r["bnb_dequant_mm_ms"], r["bnb_gemv_ms"]) if v is not None)
        assert abs(r["bnb/fastpeft"] - best_bnb / r["fastpeft_ms"]) < 1e-9
    trained = [r for r in rows if r["fastpeft_train_ms"] is not None]
    assert trained and all(r["bnb_train_ms"] > 0 and r["fastpeft_dequant_train_ms"] > 0 for r in trained)
    assert all(r["fastpeft_dequant_epilogue_train_ms"] is None for r in rows)  # Triton-only plan: GPU rows
