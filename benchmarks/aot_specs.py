"""What ``benchmarks/aot.py`` compiles: every Triton kernel of fastpeft with the argument values and
launch configuration its launcher passes at a benchmark shape.

A spec is a dict: ``name``, ``dtype``, ``shape`` and ``config`` (labels), ``fn`` (the
``@triton.jit`` function), ``args`` (every non-constexpr argument, in launch order: pointer
types as ``"*bf16"`` strings, ints and floats as the launcher passes them, so that
:func:`aot.jit_signature` specialises them as the JIT does), ``const`` (constexprs), ``warps``,
``stages``, ``elems_per_iter`` (elements one CTA processes per main-loop iteration, or per CTA
when the kernel has no loop) and ``unit`` (``element``, or ``weight`` for NF4).

Each group ``GROUPS[name](dtype, all_shapes)`` returns its specs: one representative shape per
kernel by default, every benchmark shape (of ``lora_linear.py``, ``qlora_matmul.py``,
``prefix_attention.py``) with ``all_shapes``; shapes that specialise to the same binary are
compiled once by ``aot.compile_spec``.
"""

from __future__ import annotations

SEED = 1234567  # an odd seed: the JIT would not specialise it
P_DROP = 0.05


def _args(fn, const: dict, *values) -> dict:
    """Map launch-order positional ``values`` onto ``fn``'s non-constexpr arguments."""
    names = [n for n in fn.arg_names if n not in const]
    if len(names) != len(values):
        raise ValueError(f"{fn.__name__}: {len(values)} values for {len(names)} arguments {names}")
    return dict(zip(names, values))


def _spec(name, dt, shape, config, fn, const, values, warps, stages, elems, unit="element", **extra):
    return dict(name=name, dtype=dt, shape=shape, config=config, fn=fn, const=const,
                args=_args(fn, const, *values), warps=warps, stages=stages, elems_per_iter=elems, unit=unit, **extra)


# ----------------------------------------------------------------------------- LoRA linear
LORA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
LORA_MS = [1, 16, 512, 4096, 16384]
LORA_RS = [8, 16, 64]


def lora_values(kind: str, dt: str, M: int, Kd: int, N: int, r: int) -> tuple:
    """The launch-order argument values the LoRA launcher passes to kernel ``kind`` (down, dx,
    da, fused) for contiguous operands at this shape."""
    from fastpeft.kernels import lora_linear as K

    ptr, mb = f"*{dt}", K._m_bucket(M)
    _, thresh, scale = K._dropout_args(P_DROP)  # the int threshold and float scale the launchers pass
    drop = (SEED, thresh, scale)
    if kind == "down":
        return (ptr, ptr, ptr, M, Kd, r, mb, Kd, 1, Kd, 1, r, 1) + drop
    if kind == "dx":
        return (ptr, ptr, ptr, M, Kd, r, mb, Kd, 1, r, 1, Kd, 1) + drop
    if kind == "da":
        return ("*fp32", ptr, ptr, M, Kd, r, mb, r, 1, Kd, 1, r * Kd, Kd, 1) + drop
    if kind == "epi_fwd":  # y = x (W^T) + b + (s u) (B^T): W [N, K] and B [N, r] read through transposed strides
        return (ptr,) * 6 + (M, N, Kd, r, mb, Kd, 1, 1, Kd, r, 1, 1, r, N, 1) + (0, 0, 2.0)
    if kind == "epi_dx":  # dx = dy W + mask * (g A): output columns are x's K, reduction over N; g is fp32
        return (ptr, ptr, ptr, "*fp32", ptr, ptr, M, Kd, N, r, mb, N, 1, Kd, 1, r, 1, Kd, 1, Kd, 1) + drop
    if kind == "dy":  # g planes [S, M, r] and atomic dB [1, N, r], both fp32
        return (ptr, ptr, ptr, "*fp32", "*fp32", M, N, r, mb, N, 1, r, 1, r, 1, M * r, r, 1, N * r, r, 1, 2.0)
    return (ptr,) * 7 + (M, N, Kd, r, mb, Kd, 1, Kd, 1, Kd, 1, r, 1, N, 1, r, 1) + drop + (2.0,)


def lora_constants(kind: str, dt: str, r: int, dropout: bool) -> dict:
    """The constexprs (other than the autotuned block sizes) the LoRA launcher passes to ``kind``."""
    from fastpeft.kernels import lora_linear as K

    rp = K._pad_rank(r)
    prec = "ieee" if dt == "fp32" else "tf32"
    const = dict(HAS_DROPOUT=dropout, R_PAD=rp, UPCAST=False, PRECISION=prec)
    if kind == "dy":
        return dict(R_PAD=rp, UPCAST=False, PRECISION=prec, DETERMINISTIC=False)
    if kind in ("epi_fwd", "epi_dx"):  # the forward never masks (u carries the dropout); dx does
        const.update(HAS_BIAS=kind == "epi_fwd", HAS_DROPOUT=dropout and kind == "epi_dx",
                     R_CHUNK=K._dx_rank_chunk(rp, prec), GROUP_M=8)
        return const
    if kind == "dx":
        const["R_CHUNK"] = K._dx_rank_chunk(rp, prec)
    if kind == "da":
        const.update(BLOCK_R=min(rp, 128), DETERMINISTIC=False)
    if kind == "fused":
        const.update(HAS_BIAS=True, WRITE_U=True, GROUP_M=8)
    return const


LORA_KERNELS = {"down": ("lora.down", "_lora_down_kernel", "_down_configs"),
                "dx": ("lora.dx_add", "_lora_dx_add_kernel", "_dx_configs"),
                "da": ("lora.grad_a", "_lora_grad_a_kernel", "_da_configs"),
                "fused": ("lora.fused_fwd", "_lora_fused_fwd_kernel", "_fused_configs"),
                "epi_fwd": ("lora.epilogue_fwd", "_lora_epilogue_gemm_kernel", "_epi_configs"),
                "epi_dx": ("lora.epilogue_dx", "_lora_epilogue_gemm_kernel", "_epi_configs"),
                "dy": ("lora.grad_dy", "_lora_dy_kernel", "_dy_configs")}


def lora_prune_kind(kind: str) -> str:
    """The ``kernels.lora_linear._prune`` kind of a ``LORA_KERNELS`` entry (both epilogue GEMM
    launches share one config list)."""
    return "epi" if kind.startswith("epi_") else kind


def lora_elems(kind: str, c) -> dict:
    """``elems_per_iter`` (elements of the main loop's streamed tile: x / dy per row and column
    block) and, for the epilogue GEMMs, ``epilogue_elems`` (output elements per CTA: the SASS
    outside the main loop is spent once per output tile, see ``benchmarks/roofline.py``)."""
    kw = c.kwargs
    if kind == "dy":
        return dict(elems_per_iter=kw["BLOCK_M"] * kw["BLOCK_N"])
    if kind.startswith("epi_"):
        return dict(elems_per_iter=kw["BLOCK_M"] * kw["BLOCK_K"], epilogue_elems=kw["BLOCK_M"] * kw["BLOCK_N"])
    return dict(elems_per_iter=kw["BLOCK_M"] * kw["BLOCK_K"])


def lora_kernel_spec(kind: str, dt: str, M: int, Kd: int, N: int, r: int, dropout: bool, c, shape: str = ""):
    """The spec of LoRA kernel ``kind`` launched with autotune config ``c``."""
    from fastpeft.kernels import lora_linear as K

    name, kernel, _ = LORA_KERNELS[kind]
    fn = getattr(K, kernel).fn
    const = {k: v for k, v in lora_constants(kind, dt, r, dropout).items() if k in fn.arg_names}
    el = lora_elems(kind, c)
    return _spec(name, dt, shape, _cfg(c), fn, dict(const, **c.kwargs), lora_values(kind, dt, M, Kd, N, r),
                 c.num_warps, c.num_stages, el.pop("elems_per_iter"), **el)


def lora_kept_configs(kind: str, dt: str, M: int, r: int, dropout: bool, configs=None) -> list:
    """The autotune configs of ``kind`` (default: its config list) that the launcher's pruning
    keeps at this M and rank."""
    from fastpeft.kernels import lora_linear as K

    _, kernel, configs_fn = LORA_KERNELS[kind]
    fn = getattr(K, kernel).fn
    const = {k: v for k, v in lora_constants(kind, dt, r, dropout).items() if k in fn.arg_names}
    configs = getattr(K, configs_fn)() if configs is None else configs
    return K._prune(lora_prune_kind(kind))(configs, dict(const, M=M, ELEM_BYTES=4 if dt == "fp32" else 2))


def lora_kernel_specs(dt: str, M: int, Kd: int, N: int, r: int, dropout: bool = True):
    """The LoRA-linear kernels (down, dx_add, grad_a, fused forward; the epilogue plan's GEMM as
    forward and dx, and its dy kernel) at one shape, each with the first autotune config the
    pruning keeps (autotuning picks among them on a GPU)."""
    from fastpeft.kernels import lora_linear as K

    shape = f"M={M} K={Kd} N={N} r={r}" + (" p>0" if dropout else "")
    specs = []
    for kind in LORA_KERNELS:
        if kind == "fused" and r > K.MAX_FUSED_RANK:
            continue
        c = lora_kept_configs(kind, dt, M, r, dropout)[0]
        specs.append(lora_kernel_spec(kind, dt, M, Kd, N, r, dropout, c, shape))
    return specs


def _cfg(c) -> str:
    kw = c.kwargs
    return " ".join(f"{k.replace('BLOCK_', 'B')}={v}" for k, v in kw.items())


def _lora_specs(dt: str, all_shapes: bool):
    if dt == "fp32" and not all_shapes:
        return lora_kernel_specs(dt, 4096, 4096, 4096, 16)
    shapes = [(M, k, n, r) for k, n in LORA_SHAPES for M in LORA_MS for r in LORA_RS] if all_shapes else \
        [(1, 4096, 4096, 16), (4096, 4096, 4096, 16)]
    out = []
    for M, k, n, r in shapes:
        out += lora_kernel_specs(dt, M, k, n, r, dropout=True)
    return out


# ----------------------------------------------------------------------------- NF4
NF4_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # K x N (qlora_matmul.py)


def nf4_specs(dt: str, Kd: int = 4096, N: int = 4096, M: int = 4096, gemv_ms=(1, 16), gemv1_luts=(True, False)):
    """NF4 kernels at one shape (blocksize 64, double quantisation: QLoRA's default); the one-row
    GEMV in both code-table builds (``gemv1_luts``: register ``prmt`` table, L1 table)."""
    import torch

    from fastpeft.kernels import nf4 as K
    from fastpeft.ops.settings import get_settings

    fp32 = dt == "fp32"
    BS, NBS = 64, 256
    quant = ("*u8", "*fp32", "*u8", "*fp32", "*fp32", "*fp32")  # packed, code, absmax, ncode, nabs, offset
    qc = dict(BS=BS, NESTED=True, NBS=NBS)
    shape = f"K={Kd} N={N}"
    specs = []
    if not fp32:  # dequantise and GEMV have no fp32-specific path
        const = dict(qc, BLOCK=1024)
        specs.append(_spec("nf4.dequant", dt, shape, "BLOCK=1024", K._dequant_kernel, const,
                           (f"*{dt}", N * Kd) + quant, 4, 3, 1024, unit="weight", **_nf4_options(K, "dequant")))
        for m in gemv_ms:
            specs += _gemv_specs(K, dt, m, Kd, N, quant, qc, shape, gemv1_luts)
    mm = dict(DOT_FP32=fp32, IEEE=fp32, LORA_FP32=fp32)
    torch_dt = torch.float32 if fp32 else torch.bfloat16
    ptr = f"*{dt}"
    for name, trans_w, extra in (
            ("nf4.matmul fwd", True, dict(HAS_BIAS=True, HAS_MASK=False)),
            ("nf4.matmul dx", False, dict(HAS_BIAS=False, HAS_MASK=False))):
        bm, bp, bq, gm, kw = K._matmul_config(M, N if trans_w else Kd, trans_w, torch_dt, BS, interp=False)
        pair = trans_w and get_settings().nf4_pair  # the launcher's default plan (Settings.nf4_pair)
        const = dict(qc, **mm, **extra, TRANS_W=trans_w, HAS_LORA=True, ROW_SCALE=True, PAIR=pair,
                     BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, R_PAD=16, GROUP_M=gm)
        P, Q = (N, Kd) if trans_w else (Kd, N)
        vals = (ptr,) * 6 + quant + (M, P, Q, Kd, Kd // BS, 2.0, 16, Q, 1, P, 1, 16, 1, P, 1, 0, 0)
        specs.append(_spec(name, dt, f"M={M} " + shape, f"{bm}x{bp}x{bq}" + (" pair" if pair else ""),
                           K._matmul_kernel, const, vals, kw["num_warps"], kw["num_stages"], bp * bq, unit="weight"))
    return specs


def _nf4_options(K, kind):
    opts = getattr(K, "COMPILE_OPTIONS", {}).get(kind)
    return {"options": opts} if opts else {}


def _nf4_table_words() -> tuple:
    """The register table words (int32) the one-row GEMV gets for bitsandbytes' NF4 code."""
    import torch

    from fastpeft.kernels import nf4_prmt
    from fastpeft.ops.nf4 import NF4_CODE

    return nf4_prmt.fp16_planes(torch.tensor(NF4_CODE))


def _gemv_specs(K, dt, m, Kd, N, quant, qc, shape, gemv1_luts=(True,)):
    """The GEMV the launcher picks for ``m`` rows (its ``gemv_config`` when it has one); at one
    row, the register-table (``prmt``) build, and with ``gemv1_luts=(True, False)`` also the
    L1-table one (``Settings.nf4_gemv="triton_l1"``)."""
    if m == 1 and K.gemv1_config(Kd, N, 64) is not None:  # the one-row GEMV
        bn, bh, warps, split = K.gemv1_config(Kd, N, 64)
        kps = -(-(-(-Kd // split)) // (2 * bh)) * (2 * bh)
        specs = []
        for lut in gemv1_luts:
            const = dict(qc, BLOCK_N=bn, BLOCK_H=bh, LUT=lut, VEC=min(16, bh))
            vals = (f"*{dt}", "*fp32", "*u8", "*i64") + quant[2:] + _nf4_table_words() + (N, Kd, Kd // 64, kps, 1)
            specs.append(_spec("nf4.gemv(M=1)" + ("" if lut else " l1"), dt, shape,
                               f"BN={bn} BK={2 * bh}" + (" prmt" if lut else " L1 table"), K._gemv1_kernel, const, vals,
                               warps, 3, bn * 2 * bh, unit="weight"))
        return specs
    cfg = None
    if cfg is None:  # the M <= 16 launcher's hard-coded config
        bm, bn, bk = (1, 64, 64) if m == 1 else (16, 64, 64)
        const = dict(qc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=m > 1, ROW_SCALE=True)
        split = max(1, min(-(-Kd // (bk * 4)), -(-528 // -(-N // bn))))
        kps = -(-(-(-Kd // split)) // bk) * bk
        vals = (f"*{dt}", "*fp32") + quant + (m, N, Kd, Kd // 64, kps, Kd, 1)
        return [_spec(f"nf4.gemv(M={m})", dt, shape, f"BM={bm} BN={bn} BK={bk}", K._gemv_kernel, const, vals,
                      4, 3, bn * bk, unit="weight")]
    return [_spec(f"nf4.gemv(M={m})", dt, shape, cfg["label"], cfg["fn"], cfg["const"],
                  cfg["values"](dt, quant), cfg["warps"], cfg["stages"], cfg["elems_per_iter"], unit="weight",
                  **({"options": cfg["options"]} if cfg.get("options") else {}))]


def _nf4_group(dt: str, all_shapes: bool):
    if not all_shapes:
        return nf4_specs(dt)
    out = []
    for k, n in NF4_SHAPES:
        out += nf4_specs(dt, k, n)
    return out


# ----------------------------------------------------------------------------- DoRA
def _dora_specs(dt: str, all_shapes: bool):
    from fastpeft.kernels import dora as K

    fp32 = dt == "fp32"
    const = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_R=16, UPCAST=fp32, PRECISION="ieee")
    out = []
    for k, n in (LORA_SHAPES if all_shapes else LORA_SHAPES[:1]):
        vals = (f"*{dt}", f"*{dt}", f"*{dt}", "*fp32", n, k, 16, k, 1, k, 1, 16, 1, 2.0)
        out.append(_spec("dora.row_norm", dt, f"K={k} N={n} r=16", "BN=32 BK=64 BR=16", K._dora_row_norm_kernel,
                         const, vals, 4, 3, 32 * 64))
    return out


# ----------------------------------------------------------------------------- prefix attention
def _contig(*shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def prefix_specs(dt: str, B: int = 8, H: int = 32, T: int = 2048, P: int = 32, D: int = 128,
                 has_mask: bool = True):
    """The four prefix-attention kernels as the launcher starts them (causal; ``has_mask``: with a
    key padding mask, the sm_90 table's variant, or without one, the unpadded batches
    ``roofline.py --only prefix`` models)."""
    import torch

    from fastpeft.kernels import prefix_attention as K

    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    cfgs = K._configs(D, torch_dt)
    dot_fp32, prec = K._dot_mode(torch_dt)
    p = f"*{dt}"
    KVH, S, G = H, T, 1
    q = _contig(B, H, T, D)
    kv = _contig(B, KVH, S, D)
    pk = _contig(KVH, P, D)
    kpm = (S, 1)
    scale = D ** -0.5
    shape = f"B={B} H={H} T={T} P={P} D={D}" + ("" if has_mask else " no pad")
    common = dict(BLOCK_D=K._block_d(D), DOT_FP32=dot_fp32, PREC=prec)
    kernels = [
        ("prefix.fwd", K._fwd_kernel, "fwd", dict(CAUSAL=True, HAS_MASK=has_mask),
         (p, p, p, p, p, "*i8", p, "*fp32") + q + kv + kv + pk + pk + kpm + q + (H, G, T, S, P, D, scale * 1.4427)),
        ("prefix.dq", K._bwd_dq_kernel, "dq", dict(CAUSAL=True, HAS_MASK=has_mask),
         (p, p, p, p, p, "*i8", p, "*fp32", "*fp32", p) + q + kv + kv + pk + pk + kpm + q + q
         + (H, G, T, S, P, D, scale * 1.4427, scale)),
        ("prefix.dkdv", K._bwd_dkdv_kernel, "dkdv", dict(CAUSAL=True, HAS_MASK=has_mask),
         (p, p, p, "*i8", p, "*fp32", "*fp32", p, p) + q + kv + kv + kpm + q + kv + kv
         + (H, KVH, G, T, S, D, scale * 1.4427, scale)),
        ("prefix.dprefix", K._bwd_dprefix_kernel, "dprefix", {},
         (p, p, p, p, "*fp32", "*fp32", "*fp32", "*fp32") + q + pk + pk + q
         + (B, H, KVH, G, T, P, D, B // 2, scale * 1.4427, scale)),
    ]
    specs = []
    for name, fn, key, extra, vals in kernels:
        c = cfgs[key]
        const = dict(common, **extra, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"])
        specs.append(_spec(name, dt, shape, f"BM={c['BLOCK_M']} BN={c['BLOCK_N']}", fn, const, vals,
                           c["num_warps"], c["num_stages"], c["BLOCK_M"] * c["BLOCK_N"]))
    return specs


def _prefix_group(dt: str, all_shapes: bool):
    if not all_shapes:
        return prefix_specs(dt)
    out = []
    for B, T in ((8, 512), (16, 2048), (8, 4096)):
        for P in (10, 32, 128):
            out += prefix_specs(dt, B=B, T=T, P=P)
    return out


# ----------------------------------------------------------------------------- linear cross-entropy
LCE_VOCABS = (49152, 128256)  # SmolLM2 / Llama-3


def _lce_specs(dt: str, all_shapes: bool):
    """The per-row loss + dlogits kernel as ``cross_entropy_rows_`` launches it: one row per program,
    BLOCK_V 2048 with 8 warps, gradient pass on, with and without softcapping."""
    from fastpeft.kernels import linear_cross_entropy as K

    out = []
    for vocab in (LCE_VOCABS if all_shapes else LCE_VOCABS[:1]):
        for softcap in (False, True):
            const = dict(HAS_SOFTCAP=softcap, COMPUTE_GRAD=True, BLOCK_V=2048)
            vals = (f"*{dt}", vocab, "*i64", "*fp32", "*fp32", vocab, -100, 1.0, 30.0 if softcap else 1.0)
            out.append(_spec("lce.rows" + (" softcap" if softcap else ""), dt, f"V={vocab}", "BLOCK_V=2048",
                             K._cross_entropy_rows_kernel, const, vals, 8, 3, 2048))
    return out


GROUPS = {"lora": _lora_specs, "nf4": _nf4_group, "dora": _dora_specs, "prefix": _prefix_group, "lce": _lce_specs}
