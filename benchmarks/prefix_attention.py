"""Shared-prefix attention: fastpeft's fused op vs concatenate + SDPA (what peft + transformers do),
and a whole prefix-tuning training step on a Llama config.

Attention rows (``what = attn fwd+bwd``): q/k/v ``[B, 32, T, 128]`` bf16, causal, prefix ``[32, P, 128]``
shared by the batch and trained (it requires grad, as do q/k/v). Each arm is timed forward
(``... fwd ms``) and forward+backward (``... ms``), with the fwd+bwd peak memory:

* ``base``: peft + transformers - the prefix expanded per batch element and concatenated before
  the sequence keys/values (peft's past_key_values through a DynamicCache), a boolean
  ``[B, 1, T, P+S]`` causal mask with the prefix columns visible (transformers' ``sdpa_mask``,
  built outside the timed region: one per model forward), SDPA (the mask rules out FlashAttention
  and cuDNN: the memory-efficient kernel with a float bias, ~130 MiB per layer at B=16, T=2048),
  KV heads repeated when GQA (transformers does so whenever a mask is present).
* ``fastpeft``: ``prefix_attention(impl="kernel")``, the Triton kernels (target: ``base/fastpeft``
  >= 1.3). ``auto``: ``prefix_attention`` as the settings leave it (``auto impl`` says which
  implementation ``choose_prefix_impl`` took).
* the alternatives for the same math (unpadded rows only; padding needs a mask anyway), ``best
  alt`` the fastest that ran (target: ``best alt/fastpeft`` >= 1), all of them in ``alternatives``:
  ``lower-right`` - the same concatenation with ``causal_lower_right`` and native GQA, no mask
  tensor (``lower-right runs`` names the kernel torch's dispatch takes); ``square flash / cudnn /
  efficient`` - the concatenation with P zero query rows before q, the square ``is_causal``
  problem pinned to one SDPA backend with ``sdpa_kernel`` (``refused (...)`` where that backend
  does not take it); ``hybrid flash`` - FlashAttention on the sequence part alone merged with the
  prefix part by log-sum-exp (torch's private flash ops; the prefix part in plain PyTorch).

Grid: B in 8/16/32/64, T = S in 512/1024/2048/4096, P in 10/32/128, plus GQA (8 KV heads) and
padded rows at B=16, T=2048. ``benchmarks/roofline.py --only prefix`` has the predictions.

Step rows (``what = llama step``): a Llama-2-7B-width model (hidden 4096, 32 heads of 128,
intermediate 11008, vocab 32000) with ``STEP_LAYERS`` layers, bf16, frozen base, a trained
prefix (P virtual tokens per layer, peft's PrefixEncoder layout), one forward + loss +
backward + AdamW step on the prefix. Baseline: peft's ``get_peft_model`` with
``PrefixTuningConfig`` when peft imports (else the same cache construction by hand).
fastpeft: the same peft model after ``fastpeft.patch(model)`` (the prefix shared by the batch
through the fused op, never expanded into the KV cache; without peft, the same through
``enable_prefix_attention`` by hand); ``max |diff|`` is here the |loss difference| of the two.

Columns: median ms per call; ``base/fastpeft`` > 1 means fastpeft is faster; peak MiB is device
memory allocated during one call above what was allocated before it (None on CPU); ``max |diff|``
(attention rows) is the largest difference of any arm's output or gradients from fastpeft's. CPU
(``quick`` or no CUDA): tiny fp32 shapes (the reference path for ``fastpeft``, the CPU flash ops
for the hybrid), to exercise the script only.

Run: ``python benchmarks/prefix_attention.py [--quick]`` or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, device, peak_memory_mib, session, standalone_main  # noqa: E402

from fastpeft.ops.prefix_attention import choose_prefix_impl, prefix_attention  # noqa: E402
from fastpeft.prefix_attention_hf import disable_prefix_attention, enable_prefix_attention  # noqa: E402
from fastpeft.prefix_route import cache_kwarg, split_prefix_kv  # noqa: E402

TITLE = "Shared-prefix attention (fused op vs concat + SDPA as peft + transformers) and a prefix-tuning step"

FULL = dict(
    attn=[(B, T, P, 32, False) for B in (8, 16, 32, 64) for T in (512, 1024, 2048, 4096) for P in (10, 32, 128)]
    + [(16, 2048, 32, 8, False), (16, 2048, 128, 8, False), (16, 2048, 32, 32, True)],
    H=32, D=128, dtype=torch.bfloat16,
    step=[(16, 1024, 32), (8, 2048, 128)], step_model=dict(hidden=4096, heads=32, kv_heads=32, inter=11008,
                                                             vocab=32000, layers=4),
)
QUICK = dict(
    attn=[(2, 32, 4, 2, False), (2, 32, 4, 4, True)], H=4, D=16, dtype=torch.float32,
    step=[(2, 16, 4)], step_model=dict(hidden=64, heads=4, kv_heads=2, inter=96, vocab=97, layers=2),
)


# --------------------------------------------------------------------------------------
# attention op
# --------------------------------------------------------------------------------------


def _concat_sdpa(q, k, v, pk, pv, mask4d):
    """peft + transformers: per-batch prefix in the cache, concatenated, masked SDPA."""
    B, H = q.shape[0], q.shape[1]
    kc = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
    vc = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    G = H // k.shape[1]
    if G > 1:  # transformers' repeat_kv (used whenever a mask is passed on CUDA)
        kc = kc.repeat_interleave(G, dim=1)
        vc = vc.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask4d)


def _concat(q, k, v, pk, pv):
    B = q.shape[0]
    return (torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2),
            torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2))


def _gqa(q, kc):
    return {"enable_gqa": True} if q.shape[1] != kc.shape[1] else {}


def _lower_right(q, k, v, pk, pv):
    """The concatenation with SDPA's lower-right causal bias (query t sees the P prefix keys and the
    sequence keys up to t) and native GQA: no mask tensor. torch dispatches it to FlashAttention,
    else to the memory-efficient kernel's lower-right mask type, else a materialised mask."""
    from torch.nn.attention.bias import causal_lower_right

    kc, vc = _concat(q, k, v, pk, pv)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=causal_lower_right(q.shape[2], kc.shape[2]),
                                          **_gqa(q, kc))


def _lower_right_backend(q, k, v, pk, pv) -> str:
    """Which kernel torch's lower-right dispatch runs for these operands (its own checks, in its order)."""
    if not q.is_cuda:
        return "math"
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    Sk = pk.shape[1] + k.shape[2]
    kk = k.new_empty(k.shape[0], k.shape[1], Sk, k.shape[3])
    params = SDPAParams(q, kk, kk, None, 0.0, False, q.shape[1] != k.shape[1])
    if can_use_flash_attention(params, False):
        return "flash"
    return "efficient" if can_use_efficient_attention(params, False) else "math"


def _square(q, k, v, pk, pv):
    """The concatenation as the square causal problem every SDPA backend takes: P zero query rows
    before q (query P + t then sees the prefix and sequence keys up to t), their output dropped."""
    B, H, T, D = q.shape
    P = pk.shape[1]
    kc, vc = _concat(q, k, v, pk, pv)
    qz = torch.cat([q.new_zeros(B, H, P, D), q], dim=2)
    return F.scaled_dot_product_attention(qz, kc, vc, is_causal=True, **_gqa(q, kc))[:, :, P:]


def _pinned(fn, backend_name):
    """``fn`` under ``sdpa_kernel`` pinned to one SDPA backend (it raises if that one refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]

    def run(*args):
        with sdpa_kernel([backend]):
            return fn(*args)
    return run


class _HybridFlash(torch.autograd.Function):
    """FlashAttention on the sequence part (square causal) merged with the prefix part by
    log-sum-exp. Backward: the attention gradient splits over key blocks given the *merged* output
    and log-sum-exp, so flash's own backward runs on the sequence part with (out, lse) of the
    whole softmax, and the prefix part's gradient is a few GEMMs. Uses torch's private flash ops
    (``_for_cpu`` on CPU), MHA only (GQA: KV heads repeated first)."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv):
        cuda = q.is_cuda
        scale = q.shape[-1] ** -0.5
        if cuda:
            o_s, lse_s, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, True, False, scale=scale)
            ctx.flash = (cq, ck, mq, mk, seed, offset)
        else:
            o_s, lse_s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        s = torch.einsum("bhtd,hpd->bhtp", q.float(), pk.float()) * scale  # the prefix part in fp32
        lse_p = torch.logsumexp(s, dim=-1)
        lse = torch.logaddexp(lse_s.float(), lse_p)
        out = (o_s.float() * torch.exp(lse_s.float() - lse)[..., None]
               + torch.einsum("bhtp,hpd->bhtd", torch.exp(s - lse[..., None]), pv.float())).to(q.dtype)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        scale = ctx.scale
        do = do.contiguous()
        if q.is_cuda:
            cq, ck, mq, mk, seed, offset = ctx.flash
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, out, lse, 0.0, True, scale=scale)
        p = torch.exp(torch.einsum("bhtd,hpd->bhtp", q.float(), pk.float()) * scale - lse[..., None])
        delta = (do.float() * out.float()).sum(-1, keepdim=True)
        ds = p * (torch.einsum("bhtd,hpd->bhtp", do.float(), pv.float()) - delta)
        dq = (dq.float() + torch.einsum("bhtp,hpd->bhtd", ds, pk.float()) * scale).to(q.dtype)
        dpk = (torch.einsum("bhtp,bhtd->hpd", ds, q.float()) * scale).to(pk.dtype)
        dpv = torch.einsum("bhtp,bhtd->hpd", p, do.float()).to(pv.dtype)
        return dq, dk, dv, dpk, dpv


def _hybrid_flash(q, k, v, pk, pv):
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v, pk, pv = (t.repeat_interleave(G, dim=-3) for t in (k, v, pk, pv))
    return _HybridFlash.apply(q, k, v, pk, pv)


def _alternatives(dev) -> Dict[str, object]:
    """The unpadded alternatives for the same math: name -> fn(q, k, v, pk, pv)."""
    alts: Dict[str, object] = {"lower-right": _lower_right}
    for b in ("flash", "cudnn", "efficient"):
        alts[f"square {b}"] = _pinned(_square, b)
    alts["hybrid flash"] = _hybrid_flash
    return alts


def _time_arm(fn, args, do, warm, rep) -> Dict[str, object]:
    """Forward and forward+backward median ms, fwd+bwd peak MiB, output and gradients (for the
    agreement check); ``refused`` with the error when the arm cannot run these operands."""
    q, k, v, pk, pv = args

    def zero():
        for t in args:
            t.grad = None

    def fwd():
        return fn(q, k, v, pk, pv)

    def fwd_bwd():
        zero()
        fn(q, k, v, pk, pv).backward(do)

    try:
        fwd_bwd()
    except RuntimeError as err:  # e.g. "No available kernel" from a pinned SDPA backend
        return {"refused": "refused (" + " ".join(str(err).split())[:60] + ")"}
    out = fwd().detach()
    grads = [t.grad.detach().clone() for t in args]
    return {"fwd ms": bench(fwd, warmup=warm, rep=rep), "ms": bench(fwd_bwd, warmup=warm, rep=rep),
            "MiB": peak_memory_mib(fwd_bwd), "out": out, "grads": grads}


def _max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip([a["out"]] + a["grads"], [b["out"]] + b["grads"]))


def _attn_case(B, T, P, KVH, pad, H, D, dtype, dev, quick) -> Dict[str, object]:
    S = T
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_()

    q, k, v = rnd(B, H, T, D), rnd(B, KVH, S, D), rnd(B, KVH, S, D)
    pk, pv = rnd(KVH, P, D), rnd(KVH, P, D)
    args = (q, k, v, pk, pv)
    do = torch.randn(B, H, T, D, generator=g).to(dev, dtype)
    kpm = None
    if pad:  # a quarter of the rows left-padded by a quarter of the length
        kpm = torch.ones(B, S, dtype=torch.bool, device=dev)
        kpm[: max(1, B // 4), : S // 4] = False
    keep = torch.ones(B, 1, T, P + S, dtype=torch.bool, device=dev)
    keep[..., P:] = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T)
    if kpm is not None:
        keep[..., P:] &= kpm[:, None, None, :]

    warm, rep = (1, 3) if quick else ((3, 10) if B * T >= 131072 else (5, 20))
    arms = {
        "base": lambda *a: _concat_sdpa(*a, keep),
        "fastpeft": lambda *a: prefix_attention(*a, causal=True, key_padding_mask=kpm, impl="kernel"),
        "auto": lambda *a: prefix_attention(*a, causal=True, key_padding_mask=kpm),
    }
    if not pad:  # padding needs a mask: no better path than the masked one
        arms.update(_alternatives(dev))
    res = {name: _time_arm(fn, args, do, warm, rep) for name, fn in arms.items()}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    ok = {n: r for n, r in res.items() if "refused" not in r}
    alts = {n: r for n, r in ok.items() if n not in ("base", "fastpeft", "auto")}
    best = min(alts, key=lambda n: alts[n]["ms"]) if alts else None
    ours, base = ok["fastpeft"], ok["base"]
    row = _row("attn fwd+bwd", B, T, P, KVH, pad, base["ms"], ours["ms"], base["MiB"], ours["MiB"],
               max(_max_diff(r, ours) for r in ok.values()), None if best is None else alts[best]["ms"])
    choice = choose_prefix_impl(q, k, pk, kpm)
    row.update({
        "best alt": "n/a (padded)" if pad else best, "base fwd ms": base["fwd ms"], "fastpeft fwd ms": ours["fwd ms"],
        "best alt fwd ms": None if best is None else alts[best]["fwd ms"],
        "peak MiB best alt": None if best is None else alts[best]["MiB"],
        "auto impl": choice, "auto ms": ok["auto"]["ms"],
        "lower-right runs": None if pad else _lower_right_backend(q, k, v, pk, pv),
        "alternatives (fwd+bwd ms)": "; ".join(
            f"{n}: {r['refused'] if 'refused' in r else format(r['ms'], '.3g')}" for n, r in res.items()
            if n not in ("base", "fastpeft", "auto")),
    })
    return row


def _row(what, B, T, P, KVH, pad, ms_b, ms_o, mem_b, mem_o, diff, ms_best=None) -> Dict[str, object]:
    return {
        "what": what, "B": B, "T": T, "P": P, "kv heads": KVH, "padded": "yes" if pad else "no",
        "base ms": ms_b, "fastpeft ms": ms_o, "base/fastpeft": ms_b / ms_o,
        "best alt ms": ms_best, "best alt/fastpeft": None if ms_best is None else ms_best / ms_o,
        "peak MiB base": mem_b, "peak MiB fastpeft": mem_o,
        "MiB saved": None if mem_b is None else mem_b - mem_o,
        "max |diff|": diff,
        # attention rows only (None on step rows)
        "best alt": None, "base fwd ms": None, "fastpeft fwd ms": None, "best alt fwd ms": None,
        "peak MiB best alt": None, "auto impl": None, "auto ms": None, "lower-right runs": None,
        "alternatives (fwd+bwd ms)": None,
    }


# --------------------------------------------------------------------------------------
# whole training step
# --------------------------------------------------------------------------------------


def _llama(m, dtype, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["inter"],
                      num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                      num_key_value_heads=m["kv_heads"], max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dev, dtype)
    model.requires_grad_(False)
    return model


def _peft_baseline(model, P, flat0):
    """peft's PrefixTuning model (when peft imports) with the same initial prefix; else None."""
    try:
        from peft import PrefixTuningConfig, get_peft_model
    except Exception:
        return None
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(flat0)
    return pm


def _manual_baseline_loss(model, flat, ids, m):
    """The same cache construction as peft's get_prompt, by hand (used when peft is missing)."""
    from transformers import DynamicCache

    B, T = ids.shape
    P = flat.shape[0]
    L, KVH = m["layers"], m["kv_heads"]
    D = m["hidden"] // m["heads"]
    past = flat.unsqueeze(0).expand(B, -1, -1).reshape(B, P, L * 2, KVH, D).permute(2, 0, 3, 1, 4).split(2)
    cache = DynamicCache()
    for layer, kv in enumerate(past):
        cache.update(kv[0], kv[1], layer)
    mask = torch.ones(B, P + T, dtype=torch.long, device=ids.device)
    return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False, **{cache_kwarg(model): cache}).loss


def _step_case(B, T, P, m, dtype, dev, quick) -> Dict[str, object]:
    model = _llama(m, dtype, dev)
    L, KVH, D = m["layers"], m["kv_heads"], m["hidden"] // m["heads"]
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, m["vocab"], (B, T), generator=g).to(dev)
    flat0 = (torch.randn(P, L * 2 * KVH * D, generator=g) * 0.5).to(dev, dtype)

    # baseline: peft (or the identical hand-built cache)
    pm = _peft_baseline(model, P, flat0)
    if pm is not None:
        base_params = [p for p in pm.parameters() if p.requires_grad]

        def base_loss():
            return pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    else:
        flat_b = flat0.clone().requires_grad_()
        base_params = [flat_b]

        def base_loss():
            return _manual_baseline_loss(model, flat_b, ids, m)
    opt_b = torch.optim.AdamW(base_params, lr=0.0)  # lr 0: timing only, identical weights each call

    def base():
        opt_b.zero_grad(set_to_none=True)
        base_loss().backward()
        opt_b.step()

    ms_b = bench(base, warmup=1 if quick else 3, rep=2 if quick else 10)
    mem_b = peak_memory_mib(base)
    with torch.no_grad():
        loss_b = base_loss().float().item()
    if pm is not None:
        # fastpeft: the same peft model after fastpeft.patch (the user's path): the prefix is
        # shared by the batch through the fused op, never expanded into the KV cache
        import fastpeft

        fastpeft.patch(pm)
        ours, ours_loss = base, base_loss
    else:
        flat_o = flat0.clone().requires_grad_()
        registry = enable_prefix_attention(model)
        pos = torch.arange(P, P + T, device=dev).unsqueeze(0).expand(B, -1)
        opt_o = torch.optim.AdamW([flat_o], lr=0.0)

        def ours_loss():
            with registry.active(split_prefix_kv(flat_o, L, KVH, D)):
                return model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, labels=ids,
                             use_cache=False).loss

        def ours():
            opt_o.zero_grad(set_to_none=True)
            ours_loss().backward()
            opt_o.step()

    try:
        ms_o = bench(ours, warmup=1 if quick else 3, rep=2 if quick else 10)
        mem_o = peak_memory_mib(ours)
        with torch.no_grad():
            loss_o = ours_loss().float().item()
    finally:
        if pm is not None:
            fastpeft.unpatch(pm)
        else:
            disable_prefix_attention(model)
    row = _row("llama step", B, T, P, KVH, False, ms_b, ms_o, mem_b, mem_o, abs(loss_b - loss_o))
    row["max |diff|"] = abs(loss_b - loss_o)  # here: |loss difference|
    del model
    return row


def run(quick: bool = False) -> List[Dict[str, object]]:
    """Benchmark protocol entry point (see benchmarks/README.md)."""
    dev = device()
    small = quick or dev.type != "cuda"
    cfg = QUICK if small else FULL
    if not small and session():  # benchmarks/gpu_run.sh: one MHA, one GQA and one padded point, one step
        cfg = dict(FULL, attn=[(16, 2048, 32, 32, False), (16, 2048, 32, 8, False), (16, 2048, 32, 32, True)],
                   step=FULL["step"][:1])
    rows: List[Dict[str, object]] = []
    for B, T, P, KVH, pad in cfg["attn"]:
        rows.append(_attn_case(B, T, P, KVH, pad, cfg["H"], cfg["D"], cfg["dtype"], dev, small))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for B, T, P in cfg["step"]:
        rows.append(_step_case(B, T, P, cfg["step_model"], cfg["dtype"], dev, small))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: Optional[list] = None) -> None:
    standalone_main(run, __doc__, argv=argv)


if __name__ == "__main__":
    main()
