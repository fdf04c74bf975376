"""Shared-prefix attention: fastpeft's fused op vs concatenate + SDPA (what peft + transformers do),
and a whole prefix-tuning training step on a Llama config.

Attention rows (``what = attn fwd+bwd``): q/k/v ``[B, 32, T, 128]`` bf16, causal, prefix ``[32, P, 128]``
shared by the batch and trained (it requires grad, as do q/k/v). Baseline ``concat+sdpa``: the
prefix expanded per batch element and concatenated before the sequence keys/values (peft's
past_key_values through a DynamicCache), a boolean ``[B, 1, T, P+S]`` causal mask with the
prefix columns visible (transformers' ``sdpa_mask``, built outside the timed region: one per
model forward), ``torch.nn.functional.scaled_dot_product_attention`` (a mask rules out its
flash kernel), KV heads repeated when GQA (transformers does so whenever a mask is present).
``fastpeft``: ``prefix_attention`` (Triton on CUDA). ``best alt``: the strongest alternative for
the same math where there is no padding - the same concatenation with SDPA's lower-right causal
bias and native GQA instead of a boolean mask, which FlashAttention / cuDNN take (target: fastpeft
no slower, ``best alt/fastpeft`` >= 1; n/a on padded rows, where a mask is needed anyway). Grid: B in 8/16/32/64, T = S in
512/1024/2048/4096, P in 10/32/128, plus GQA (8 KV heads) and padded rows at B=16, T=2048.

Step rows (``what = llama step``): a Llama-2-7B-width model (hidden 4096, 32 heads of 128,
intermediate 11008, vocab 32000) with ``STEP_LAYERS`` layers, bf16, frozen base, a trained
prefix (P virtual tokens per layer, peft's PrefixEncoder layout), one forward + loss +
backward + AdamW step on the prefix. Baseline: peft's ``get_peft_model`` with
``PrefixTuningConfig`` when peft imports (else the same cache construction by hand).
fastpeft: the same peft model after ``fastpeft.patch(model)`` (the prefix shared by the batch
through the fused op, never expanded into the KV cache; without peft, the same through
``enable_prefix_attention`` by hand); ``max |diff|`` is here the |loss difference| of the two.

Columns: median ms per call; ``base/fastpeft`` > 1 means fastpeft is faster; peak MiB is device
memory allocated during one call above what was allocated before it (None on CPU). CPU
(``quick`` or no CUDA): tiny fp32 shapes on the reference path, to exercise the script only.

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

from fastpeft.ops.prefix_attention import prefix_attention  # noqa: E402
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


def _concat_causal_sdpa(q, k, v, pk, pv):
    """The best alternative for the same math without padding: the same concatenation, but no
    boolean mask - SDPA's lower-right causal bias (query i sees the P prefix keys and sequence
    keys up to i) and native GQA, which its FlashAttention / cuDNN backends take."""
    from torch.nn.attention.bias import causal_lower_right

    B, H, T = q.shape[0], q.shape[1], q.shape[2]
    kc = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
    vc = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    G = H // k.shape[1]
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=causal_lower_right(T, kc.shape[2]),
                                          **({"enable_gqa": True} if G > 1 else {}))


def _attn_case(B, T, P, KVH, pad, H, D, dtype, dev, quick) -> Dict[str, object]:
    S = T
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_()

    q, k, v = rnd(B, H, T, D), rnd(B, KVH, S, D), rnd(B, KVH, S, D)
    pk, pv = rnd(KVH, P, D), rnd(KVH, P, D)
    do = torch.randn(B, H, T, D, generator=g).to(dev, dtype)
    kpm = None
    if pad:  # a quarter of the rows left-padded by a quarter of the length
        kpm = torch.ones(B, S, dtype=torch.bool, device=dev)
        kpm[: max(1, B // 4), : S // 4] = False
    keep = torch.ones(B, 1, T, P + S, dtype=torch.bool, device=dev)
    keep[..., P:] = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T)
    if kpm is not None:
        keep[..., P:] &= kpm[:, None, None, :]

    def zero():
        for t in (q, k, v, pk, pv):
            t.grad = None

    def base():
        zero()
        _concat_sdpa(q, k, v, pk, pv, keep).backward(do)

    def ours():
        zero()
        prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=kpm).backward(do)

    def best():
        zero()
        _concat_causal_sdpa(q, k, v, pk, pv).backward(do)

    warm, rep = (1, 3) if quick else ((3, 10) if B * T >= 131072 else (5, 20))
    ms_b = bench(base, warmup=warm, rep=rep)
    ms_o = bench(ours, warmup=warm, rep=rep)
    ms_best = None if pad else bench(best, warmup=warm, rep=rep)  # padding needs a mask: no better path
    mem_b = peak_memory_mib(base)
    mem_o = peak_memory_mib(ours)
    # agreement (same grads up to bf16 rounding): max |d out|, the best alternative included
    with torch.no_grad():
        ref = prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm).float()
        diff = (_concat_sdpa(q, k, v, pk, pv, keep).float() - ref).abs().max().item()
        if not pad:
            diff = max(diff, (_concat_causal_sdpa(q, k, v, pk, pv).float() - ref).abs().max().item())
    return _row("attn fwd+bwd", B, T, P, KVH, pad, ms_b, ms_o, mem_b, mem_o, diff, ms_best)


def _row(what, B, T, P, KVH, pad, ms_b, ms_o, mem_b, mem_o, diff, ms_best=None) -> Dict[str, object]:
    return {
        "what": what, "B": B, "T": T, "P": P, "kv heads": KVH, "padded": "yes" if pad else "no",
        "base ms": ms_b, "fastpeft ms": ms_o, "base/fastpeft": ms_b / ms_o,
        "best alt ms": ms_best, "best alt/fastpeft": None if ms_best is None else ms_best / ms_o,
        "peak MiB base": mem_b, "peak MiB fastpeft": mem_o,
        "MiB saved": None if mem_b is None else mem_b - mem_o,
        "max |diff|": diff,
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
