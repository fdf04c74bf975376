"""fastpeft under torch.distributed on CPU (gloo): DDP and FSDP2 (``fully_shard``) all-reduce the same
LoRA gradients as one process, for fastpeft models and for Hugging Face peft models patched by
``fastpeft.patch``, on fp32 bases and on bitsandbytes 4-bit (QLoRA) bases.

The 4-bit setups load the base with ``bnb_4bit_quant_storage=torch.float32`` (the compute dtype), so
``fully_shard`` splits the packed ``Params4bit`` weights like any fp32 parameter. Each of them also
takes an SGD step and saves the adapter through ``fastpeft.utils.distributed.save_adapter`` (gathered
on rank 0, PEFT's format); the test loads it in peft and compares with one process's step.

One spawn of two processes runs every setup (process start-up dominates). The first 4-bit setup,
``fsdp2-qlora-peft``, runs only bitsandbytes + peft + torch: if it raises, bitsandbytes cannot shard
here, and the 4-bit tests skip with that exception's text as the reason.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from conftest import FP32_ATOL  # noqa: E402

FP_SETUPS = ("ddp-fastpeft", "ddp-peft-patched", "fsdp2-fastpeft")
QLORA_PROBE = "fsdp2-qlora-peft"  # no fastpeft code: can bitsandbytes' 4-bit base be sharded here at all?
QLORA_SETUPS = (QLORA_PROBE, "fsdp2-qlora-fastpeft", "fsdp2-qlora-peft-patched", "ddp-qlora-peft-patched",
                # the Triton kernels in the CPU interpreter: for CPU machines (conftest sets TRITON_INTERPRET=1)
                *(() if torch.cuda.is_available() else ("fsdp2-qlora-peft-patched-triton",)))
LR = 1.0  # one SGD step on the adapters, large enough that the saved adapter differs from the initial one
LORA_KW = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear", task_type="CAUSAL_LM")


def _library(setup: str):
    import fastpeft

    if "peft" in setup.split("-"):
        import peft

        return peft
    return fastpeft


def _model(setup: str):
    from conftest import tiny_llama

    torch.manual_seed(0)
    lib = _library(setup)
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**LORA_KW))
    if setup.endswith("patched"):
        import fastpeft

        assert fastpeft.patch(model, backend="reference").patched
    return model


def _qlora_layers(setup: str) -> int:
    return 1 if setup.endswith("triton") else 2  # the interpreter is slow: one decoder layer


def _qlora_model(setup: str, ckpt: str):
    """A LoRA model on the 4-bit checkpoint ``ckpt`` (fp32 quant storage); unpatched for the probe."""
    from qlora_helpers import load_4bit

    lib = _library(setup)
    torch.manual_seed(0)
    model = lib.get_peft_model(load_4bit(ckpt, quant_storage=torch.float32), lib.LoraConfig(**LORA_KW))
    if "patched" in setup:
        import fastpeft

        report = fastpeft.patch(model, backend="triton" if setup.endswith("triton") else "reference")
        assert len(report.patched) == 7 * _qlora_layers(setup) and not report.skipped, str(report)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 128, (4, 10), generator=g)


def _shard_by_hand(model):
    """fully_shard per decoder layer, then the root, with torch alone (the probe's wrapping)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_step(model, rank: int, out_dir: str, setup: str) -> None:
    """Forward/backward on this rank's half of the batch; save the (full) LoRA gradients."""
    model.train()  # bitsandbytes repacks 4-bit weights for another CPU kernel in eval mode
    ids = _batch()[rank * 2:(rank + 1) * 2]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.removeprefix("module."): _full(p.grad).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    _save(grads, os.path.join(out_dir, f"{setup}-{rank}.pt"))


def _run_qlora(setup: str, rank: int, out_dir: str, ckpts: dict) -> None:
    from fastpeft.utils.distributed import save_adapter, wrap_model

    model = _qlora_model(setup, ckpts[_qlora_layers(setup)])
    if setup == QLORA_PROBE:
        _train_step(_shard_by_hand(model), rank, out_dir, setup)
        return
    model = wrap_model(model, setup.split("-")[0])
    _train_step(model, rank, out_dir, setup)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    save_adapter(model, os.path.join(out_dir, f"{setup}-adapter"))


def _worker(rank: int, world: int, out_dir: str, ckpts: dict, canary: bool = False) -> None:
    # Each rank's stderr goes to its own log, so a crash in the C++ layers (gloo aborts without a Python
    # traceback) can be reported by the fixture instead of vanishing into pytest's capture.
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    # Rendezvous through a file and talk over loopback: no free-port race, no TCPStore server thread, and
    # no dependence on the machine's hostname resolving to a usable interface.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # what torchrun exports: fastpeft's launch detection reads it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from fastpeft.utils.distributed import DistributedSetupError, init_distributed

    try:
        # a short timeout: a rank that raised must not leave its peer waiting 30 minutes in a collective
        init_distributed("fsdp2", device="cpu", timeout_s=120,
                         init_method="file://" + os.path.join(out_dir, "store"))
    except DistributedSetupError:
        raise  # fastpeft's own checks refused: a failure, not a machine limit
    except Exception as e:  # torch alone could not form the group (e.g. no loopback address)
        with open(os.path.join(out_dir, f"init-failed-{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}")
        log.flush()
        os._exit(3)
    if canary:  # torch alone, no fastpeft: can this machine run a gloo all-reduce at all?
        t = torch.full((4,), float(rank + 1))
        dist.all_reduce(t)
        _save({"sum": t}, os.path.join(out_dir, f"canary-{rank}.pt"))
    for setup in () if canary else FP_SETUPS:
        model = _model(setup)
        if setup.startswith("ddp"):
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from fastpeft.utils.distributed import wrap_model

            model = wrap_model(model, "fsdp2")
        _train_step(model, rank, out_dir, setup)
    if ckpts and not canary:
        _worker_qlora(rank, out_dir, ckpts)
    # Both ranks leave together; then skip the interpreter's teardown, where gloo's socket threads can
    # abort when the peer process has already gone (a known gloo-at-exit race, not a fastpeft result).
    dist.barrier()
    dist.destroy_process_group()
    log.flush()
    os._exit(0)


def _worker_qlora(rank: int, out_dir: str, ckpts: dict) -> None:
    try:
        _run_qlora(QLORA_PROBE, rank, out_dir, ckpts)
    except Exception as e:  # bitsandbytes (or torch) cannot shard a 4-bit base here: record its own words
        with open(os.path.join(out_dir, f"qlora-unsupported-{rank}.txt"), "w") as f:
            kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
            f.write(f"{kind}: {' '.join(str(e).split())[:400]}")
        return
    for setup in QLORA_SETUPS[1:]:
        _run_qlora(setup, rank, out_dir, ckpts)


def _save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _logs(out) -> str:
    text = []
    for rank in range(2):
        f = out / f"rank{rank}.log"
        lines = [ln for ln in (f.read_text().splitlines() if f.exists() else []) if ln.strip()]
        text.append(f"rank {rank} stderr: " + (" | ".join(lines[-6:]) or "<empty>"))
    return "; ".join(text)


def _expected(out, ckpts: dict, canary: bool) -> bool:
    if canary:
        return all((out / f"canary-{r}.pt").exists() for r in range(2))
    names = list(FP_SETUPS)
    if ckpts:
        # a probe that raised saved nothing: the 4-bit tests skip with its message
        names += [] if list(out.glob("qlora-unsupported-*.txt")) else list(QLORA_SETUPS)
    return all((out / f"{n}-{r}.pt").exists() for n in names for r in range(2))


def _spawn(out, ckpts: dict, canary: bool = False, attempts: int = 2):
    """Run the two workers; return None when every expected file is on disk, else why not. A worker
    killed by a signal before finishing is run once more (gloo's socket set-up has known aborts)."""
    why = None
    for _ in range(attempts):
        for f in out.glob("*"):
            if f.is_file():
                f.unlink()
        crash = None
        try:
            mp.spawn(_worker, args=(2, str(out), ckpts, canary), nprocs=2, join=True)
        except mp.ProcessExitedException as e:
            crash = f"{e}; {_logs(out)}"
        if _expected(out, ckpts, canary):
            if crash:  # the crash came after the work, in process teardown
                warnings.warn(f"a distributed worker crashed after saving its results ({crash})")
            return None
        why = crash or f"the workers exited without saving every result; {_logs(out)}"
    return why


def _qlora_checkpoints(tmp_path_factory) -> dict:
    """{decoder layers: tiny Llama checkpoint dir} for the 4-bit setups, or {} without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        return {}
    from qlora_helpers import save_tiny_llama

    return {n: save_tiny_llama(tmp_path_factory.mktemp(f"llama{n}"), layers=n) for n in (1, 2)}


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """(output dir, 4-bit checkpoints) of one two-process run of every setup."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ckpts = _qlora_checkpoints(tmp_path_factory)
    out = tmp_path_factory.mktemp("dist")
    why = _spawn(out, ckpts)
    if why is None:
        return out, ckpts
    init_failed = sorted(out.glob("init-failed-*.txt"))
    if init_failed:  # before any fastpeft code ran: this machine cannot run torch.distributed's gloo
        pytest.skip(f"torch.distributed (gloo) cannot start here: {init_failed[0].read_text()}")
    # The workers died (by a signal: a Python error would have raised above). Tell a fastpeft failure
    # from a machine where torch's gloo backend itself cannot run, with a bare two-process all-reduce.
    canary = tmp_path_factory.mktemp("dist-canary")
    canary_why = _spawn(canary, {}, canary=True)
    if canary_why is not None:
        pytest.skip(f"torch.distributed (gloo) cannot run on this machine: a bare all-reduce died too ({canary_why})")
    raise RuntimeError(f"distributed workers died before saving their gradients ({why})")


def _one_process_grads(model):
    """The LoRA gradients of one process on the mean of the two half-batch losses (what DDP's and
    FSDP's gradient averaging computes), in train mode."""
    model.train()
    ids = _batch()
    loss = 0.5 * (model(input_ids=ids[:2], labels=ids[:2]).loss + model(input_ids=ids[2:], labels=ids[2:]).loss)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_match(out, setup: str, ref: dict) -> None:
    g0 = torch.load(out / f"{setup}-0.pt")
    g1 = torch.load(out / f"{setup}-1.pt")
    assert sorted(g0) == sorted(ref) and ref and all("lora_" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(g0[n], g1[n], atol=0, rtol=0)
        torch.testing.assert_close(g0[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("setup", FP_SETUPS)
def test_distributed_gradients_match_single_process(dist_run, setup):
    # reference: one process, unpatched fastpeft model
    _assert_grads_match(dist_run[0], setup, _one_process_grads(_model("ddp-fastpeft")))


# ---- 4-bit (QLoRA) bases ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qlora_run(dist_run):
    out, ckpts = dist_run
    if not ckpts:
        pytest.importorskip("bitsandbytes")
        pytest.importorskip("peft")
    unsupported = sorted(out.glob("qlora-unsupported-*.txt"))
    if unsupported:
        pytest.skip("bitsandbytes cannot shard a 4-bit base with fully_shard here (bitsandbytes + peft + torch "
                    f"alone, no fastpeft code, raised): {unsupported[0].read_text()}")
    return out, ckpts


_refs: dict = {}


def _qlora_reference(setup: str, ckpts: dict):
    """One process, unpatched, same library and base: (LoRA gradients, model after the SGD step)."""
    lib, layers = _library(setup).__name__, _qlora_layers(setup)
    if (lib, layers) not in _refs:
        model = _qlora_model(f"fsdp2-qlora-{lib}", ckpts[layers])  # the unpatched build of that library
        grads = _one_process_grads(model)
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
        _refs[lib, layers] = grads, model
    return _refs[lib, layers]


def _logits(model, ids):
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("setup", QLORA_SETUPS)
def test_qlora_gradients_match_single_process(qlora_run, setup):
    """FSDP2 shards the 4-bit base; DDP replicates it; patched or not, Triton interpreter or the
    reference backend: the LoRA gradients are one unpatched process's."""
    out, ckpts = qlora_run
    _assert_grads_match(out, setup, _qlora_reference(setup, ckpts)[0])


@pytest.mark.parametrize("setup", QLORA_SETUPS[1:])
def test_qlora_saved_adapter_is_one_process_step_and_loads_in_peft(qlora_run, setup):
    import peft
    from safetensors.torch import load_file

    from qlora_helpers import load_4bit

    out, ckpts = qlora_run
    grads, trained = _qlora_reference(setup, ckpts)
    # the step moved the adapter far beyond the tolerance, so a save of the initial weights would fail
    assert LR * max(g.abs().max() for g in grads.values()) > 100 * FP32_ATOL
    saved_dir = out / f"{setup}-adapter"
    saved = load_file(str(saved_dir / "adapter_model.safetensors"))
    # PEFT's keys and exactly the tensors one process's step produced (the step moved them: LR is large)
    want = {k: v.detach().clone() for k, v in _library(setup).get_peft_model_state_dict(trained).items()}
    assert sorted(saved) == sorted(want) and all(".lora_" in k for k in want)
    for k in want:
        torch.testing.assert_close(saved[k], want[k].cpu(), atol=FP32_ATOL, rtol=0, msg=k)
    loaded = peft.PeftModel.from_pretrained(load_4bit(ckpts[_qlora_layers(setup)], quant_storage=torch.float32),
                                            str(saved_dir))
    # peft loads exactly the saved tensors ...
    got = peft.get_peft_model_state_dict(loaded)
    assert all(torch.equal(got[k].cpu(), saved[k]) for k in saved)
    # ... and computes with them what the one-process model computes with them. (Against the
    # trained weights themselves the logits differ by more than the weights' 1e-5: the step's
    # last-bit gradient differences, scaled by LR and carried through the layers, reached 1.2e-5
    # on this machine's CPU kernels.)
    ids = _batch()
    lib = _library(setup)  # the reference's own library sets its adapter weights
    lib.set_peft_model_state_dict(trained, saved)
    try:
        want_logits = _logits(trained, ids)
    finally:
        lib.set_peft_model_state_dict(trained, want)  # the cached reference stays one process's step
    torch.testing.assert_close(_logits(loaded, ids), want_logits, atol=FP32_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_fsdp2_one_gpu(tmp_path):
    """The 4-bit FSDP2 setup on a GPU (one rank, NCCL): fastpeft's LoRA on a CUDA bitsandbytes base
    (fp32 quant storage) through its CUDA kernels, wrapped by wrap_model("fsdp2"): the same LoRA
    gradients as the unwrapped model, and the adapter gathered by save_adapter after an SGD step
    loads in peft with the same logits. (Two ranks on CPU: test_qlora_gradients_match_single_process.)"""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    import fastpeft
    from fastpeft.utils.distributed import check_strategy, save_adapter, wrap_model
    from qlora_helpers import load_4bit, save_tiny_llama

    assert check_strategy("fsdp2", "cuda") == "nccl"
    ckpt = save_tiny_llama(tmp_path / "llama", layers=2)
    ids = _batch().cuda()

    def build():
        torch.manual_seed(0)
        base = load_4bit(ckpt, quant_storage=torch.float32, device_map="cuda:0")
        return fastpeft.get_peft_model(base, fastpeft.LoraConfig(**LORA_KW)).train()

    def step(model):
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
        return grads

    ref_model = build()
    ref = step(ref_model)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        sharded = wrap_model(build(), "fsdp2")
        got = step(sharded)
        save_adapter(sharded, str(tmp_path / "adapter"))
    finally:
        dist.destroy_process_group()
    assert sorted(got) == sorted(ref) and all("lora_" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)
    # the gathered adapter is the unwrapped model's after the step, and peft computes the same with either
    ref_model.save_pretrained(str(tmp_path / "reference"))
    logits = {}
    for name in ("adapter", "reference"):
        base = load_4bit(ckpt, quant_storage=torch.float32, device_map="cuda:0")
        logits[name] = _logits(peft.PeftModel.from_pretrained(base, str(tmp_path / name)), ids)
    torch.testing.assert_close(logits["adapter"], logits["reference"], atol=1e-5, rtol=1e-4)
