"""NF4 (QLoRA 4-bit) quantisation in bitsandbytes' exact format, and the QLoRA matmul op.

Format (bitsandbytes ``Params4bit`` / ``QuantState``, read and written as is):

* ``packed``: uint8 (or any ``quant_storage`` dtype viewed as uint8) holding ``ceil(N*K/2)``
  bytes of the row-major flattened ``[N, K]`` weight; element ``e`` lives in byte ``e // 2``,
  the high nibble for even ``e``, the low nibble for odd ``e`` (an odd total is padded with
  the code of 0.0). Blocks of ``blocksize`` consecutive flattened elements share one absmax, so
  a block may straddle two rows when ``K`` is not a multiple of the blocksize.
* ``absmax``: one fp32 scale per block; with double quantisation (``compress_statistics`` /
  ``bnb_4bit_use_double_quant``) it is stored as uint8 codes of ``absmax - offset`` in
  bitsandbytes' 8-bit dynamic map, blockwise over 256 scales, with an fp32 scale per 256
  (the nested state, ``state2``) and the fp32 ``offset`` (the mean absmax).
* dequantised value = ``code[nibble] * absmax[block]`` computed in fp32, rounded once to the
  output dtype (what bitsandbytes' CPU and CUDA kernels do).

The op, :func:`qlora_linear`, computes ``y = x dequant(Wq)^T + b + s * dropout(x) A^T B^T``
with a backward that dequantises the weight again (no dequantised weight is kept between
forward and backward). Backends: ``reference`` (pure PyTorch, :class:`QLoraLinearReference`,
the oracle and CPU path) and ``triton`` (``fastpeft.kernels.nf4``: fused dequant-GEMM for
training sizes, or with ``nf4_impl="dequant"`` Triton dequantisation then cuBLAS; a GEMV-style
kernel for decoding, M <= 16), picked by :func:`fastpeft.ops.backend.choose_backend`. With
``lora_impl="epilogue"`` the ``dequant`` plan multiplies by the dequantised weight in the LoRA
layer's Triton GEMMs, the LoRA products in their epilogues (see :class:`QLoraLinearTriton`).
On CUDA with M == 1 a CUDA GEMV from ``csrc/`` is used when it builds (see
:mod:`fastpeft.ops.nf4_cuda`).

bitsandbytes itself is not imported here: any object with bitsandbytes' ``QuantState``
attributes is accepted (see :meth:`NF4State.from_quant_state`), so the op runs on machines
without bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import torch

from fastpeft.ops.backend import choose_backend, interpreting
from fastpeft.ops.dropout import reference_dropout_mask as _dropout_mask
from fastpeft.ops.settings import NF4_IMPLS, Settings, get_settings

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "VALID_BLOCKSIZES",
    "NF4State",
    "dynamic_map",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "canonicalize",
    "qlora_linear",
    "nf4_linear",
    "nf4_impl",
    "bnb_linear4bit",
    "QLoraLinearReference",
]

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), as float32 values.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (e2m1, bitsandbytes' bias) levels in bit-pattern order, before normalising by 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_RAW)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantised absmax


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 lookup table of ``quant_type`` (``"nf4"`` or ``"fp4"``)."""
    if quant_type == "nf4":
        vals = NF4_CODE
    elif quant_type == "fp4":
        vals = FP4_CODE
    else:
        raise ValueError(f"4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    t = torch.tensor(vals, dtype=torch.float32, device=device)
    if quant_type == "fp4":  # same arithmetic as bitsandbytes: fp32 table divided by its max
        t = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
        t = t / t.abs().max()
    return t


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values, 7 exponent bits)
    used for double quantisation of the absmax: for each decade ``10**(i-6)``, ``i < 7``,
    ``2**i`` evenly spaced fraction midpoints in ``[0.1, 1]``, both signs, plus 0 and 1."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# Quantisation state
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NF4State:
    """Everything needed to dequantise a packed 4-bit weight (bitsandbytes ``QuantState``).

    ``absmax`` is fp32 ``[n_blocks]`` or, when ``nested``, uint8 codes with ``nested_absmax``
    (fp32 ``[ceil(n_blocks / nested_blocksize)]``), ``nested_code`` (fp32 ``[256]``) and
    ``offset`` (fp32 scalar tensor).
    """

    absmax: torch.Tensor
    shape: Tuple[int, ...]
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32
    code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(
                f"4-bit quant_type {self.quant_type!r} is not supported: fastpeft reads bitsandbytes' "
                "'nf4' and 'fp4' formats (use BitsAndBytesConfig(bnb_4bit_quant_type='nf4'))."
            )
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"4-bit blocksize {self.blocksize} is not one of bitsandbytes' {VALID_BLOCKSIZES}")
        if self.code is None:
            self.code = code_table(self.quant_type, self.absmax.device)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 scales (undoing double quantisation exactly as bitsandbytes does:
        ``nested_code[q] * nested_absmax[i // 256]`` in fp32, then ``+ offset``)."""
        if not self.nested:
            return self.absmax.float()
        q = self.absmax.reshape(-1).long()
        n = q.numel()
        scale = self.nested_absmax.float().repeat_interleave(self.nested_blocksize)[:n]
        a = self.nested_code.float()[q] * scale
        return a + self.offset.float()

    def to(self, device) -> "NF4State":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, absmax=mv(self.absmax), code=mv(self.code), offset=mv(self.offset),
            nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code),
        )

    @classmethod
    def from_quant_state(cls, qs: Any) -> "NF4State":
        """Read a bitsandbytes ``QuantState`` (duck-typed: bitsandbytes is not imported).

        A state in bitsandbytes' CPU inference layout (``packing_format_for_cpu``) needs the
        weight too: use :func:`canonicalize`.
        """
        if isinstance(qs, cls):
            return qs
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "this QuantState is in bitsandbytes' CPU inference layout (packing_format_for_cpu=True, "
                "set when a Linear4bit runs in eval mode on an AVX512-BF16 CPU); pass the weight too: "
                "fastpeft.ops.nf4.canonicalize(weight, quant_state)"
            )
        if qs is None or not hasattr(qs, "absmax"):
            raise TypeError(f"expected a bitsandbytes QuantState or NF4State, got {type(qs).__name__}")
        if qs.shape is None or len(qs.shape) != 2:
            raise ValueError(f"the 4-bit weight must be 2-D [out_features, in_features], its QuantState has shape {qs.shape}")
        nested = bool(getattr(qs, "nested", False))
        kw = {}
        if nested:
            s2 = qs.state2
            kw = dict(offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device),
                      nested_absmax=s2.absmax, nested_code=s2.code, nested_blocksize=int(s2.blocksize))
        return cls(absmax=qs.absmax, shape=tuple(qs.shape), blocksize=int(qs.blocksize),
                   quant_type=qs.quant_type, dtype=qs.dtype, code=qs.code, **kw)

    def to_quant_state(self):
        """The equivalent bitsandbytes ``QuantState`` (imports bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=self.nested_blocksize, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                          blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                          offset=self.offset, state2=state2)


def _unpack_cpu_layout(packed: torch.Tensor, qs: Any) -> Tuple[torch.Tensor, NF4State]:
    # bitsandbytes' AVX512-BF16 layout: rows in groups of 32, within a group and a byte column
    # the 64 nibbles of a [32, 2] tile are stored as 32 bytes (low nibbles: element 0 of each
    # pair, high nibbles: element 1); absmax is bf16 [K/bs, N], not nested. We undo the nibble
    # layout (lossless) and keep the bf16 absmax values, which is what its kernel multiplies by.
    N, K = (int(s) for s in qs.shape)
    p = packed.reshape(N, K // 2).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(N, K // 2)
    p = p.reshape(-1, 32)
    qw = torch.cat([p & 0xF, p >> 4], dim=-1)  # [.., 64]: 32 low then 32 high
    qw = qw.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(N, K)
    flat = qw.reshape(-1)
    std = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8).reshape(-1, 1)
    absmax = qs.absmax.t().reshape(-1).float()
    dtype = getattr(qs, "original_dtype", qs.dtype)
    state = NF4State(absmax=absmax, shape=(N, K), blocksize=int(qs.blocksize), quant_type=qs.quant_type,
                     dtype=dtype, code=code_table(qs.quant_type, packed.device))
    return std, state


def canonicalize(packed: torch.Tensor, quant_state: Any) -> Tuple[torch.Tensor, NF4State]:
    """``(uint8 packed bytes [ceil(N*K/2)], NF4State)`` from a bitsandbytes weight and its state.

    Accepts any ``quant_storage`` dtype (viewed as uint8) and bitsandbytes' CPU inference
    layout (``packing_format_for_cpu``; its absmax there is bf16, which is used as is).
    Nothing is re-quantised and the inputs are not modified.
    """
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _unpack_cpu_layout(packed, quant_state)
    state = NF4State.from_quant_state(quant_state)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1)
    need = -(-state.numel // 2)
    if packed.numel() != need:
        raise ValueError(
            f"packed 4-bit weight has {packed.numel()} bytes, expected {need} for shape {state.shape}"
        )
    return packed, state


# --------------------------------------------------------------------------------------------
# Quantise / dequantise (reference, bit-exact with bitsandbytes)
# --------------------------------------------------------------------------------------------


def _quantize_blockwise_dynamic(a: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # bitsandbytes' CPU blockwise 8-bit quantiser: per block absmax, value / absmax, nearest
    # entry of the dynamic map (ties to the lower index; the map's first entry acts as -1).
    code = dynamic_map(a.device)
    flat = a.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)  # the zero padding cannot raise a block's max of |x|
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    search = code.clone()
    search[0] = -1.0
    idx = torch.searchsorted(search, normed, right=True) - 1
    idx = idx.clamp(0, 255)
    right = (idx + 1).clamp(max=255)
    dl = (normed - search[idx]).abs()
    dr = (normed - search[right]).abs()
    idx = torch.where((idx < 255) & (dr < dl), right, idx)
    return idx.to(torch.uint8), absmax, code


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_type: str = "nf4",
) -> Tuple[torch.Tensor, NF4State]:
    """Quantise ``weight`` (any shape, fp32/fp16/bf16) to bitsandbytes' 4-bit format.

    Returns ``(packed uint8 [ceil(numel/2), 1], NF4State)`` with the same bytes, absmax and
    nested state as ``bitsandbytes.functional.quantize_4bit(weight, blocksize,
    compress_statistics, quant_type)`` on CPU.
    """
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 needs a float32/float16/bfloat16 tensor, got {weight.dtype}")
    code = code_table(quant_type, weight.device)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / am).clamp(-1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    order = torch.argsort(code)
    srt = code[order]
    bounds = (srt[:-1] + srt[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q = q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).reshape(-1, 1)
    kw = {}
    if compress_statistics:
        offset = absmax.mean()
        qabs, nested_absmax, ncode = _quantize_blockwise_dynamic(absmax - offset, NESTED_BLOCKSIZE)
        kw = dict(offset=offset, nested_absmax=nested_absmax, nested_code=ncode)
        absmax = qabs
    state = NF4State(absmax=absmax, shape=tuple(weight.shape), blocksize=blocksize, quant_type=quant_type,
                     dtype=weight.dtype, code=code, **kw)
    return packed, state


def dequantize_nf4_reference(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch dequantisation, bit-exact with bitsandbytes' ``dequantize_4bit``."""
    dtype = dtype or state.dtype
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    n = state.numel
    idx = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    vals = state.code.to(p.device).float()[idx]
    absmax = state.absmax_fp32().to(p.device)
    pad = state.n_blocks * state.blocksize - n
    vals = torch.nn.functional.pad(vals, (0, pad)).reshape(-1, state.blocksize) * absmax[:, None]
    return vals.reshape(-1)[:n].to(dtype).reshape(state.shape)


def dequantize_nf4(packed: torch.Tensor, quant_state: Any, dtype: Optional[torch.dtype] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Dequantise a bitsandbytes 4-bit weight to ``dtype`` (default: the state's dtype).

    ``quant_state`` is a bitsandbytes ``QuantState`` or an :class:`NF4State`.
    """
    packed, state = canonicalize(packed, quant_state)
    if choose_backend(packed, backend=backend) == "triton":
        from fastpeft.kernels import nf4 as K

        return K.dequantize(packed, state, dtype or state.dtype)
    return dequantize_nf4_reference(packed, state, dtype)


# --------------------------------------------------------------------------------------------
# The QLoRA matmul op
# --------------------------------------------------------------------------------------------


def _check(x, state: NF4State, bias, lora_A, lora_B):
    N, K = state.shape
    if x.shape[-1] != K:
        raise ValueError(f"qlora_linear: input has {x.shape[-1]} features, the 4-bit weight expects {K} (shape {state.shape})")
    if not x.is_floating_point():
        raise ValueError(f"qlora_linear: input must be floating point, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"qlora_linear: bias has shape {tuple(bias.shape)}, expected [{N}]")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("qlora_linear: pass both lora_A and lora_B, or neither")
    if lora_A is not None:
        r = lora_A.shape[0]
        if lora_A.dim() != 2 or lora_A.shape[1] != K:
            raise ValueError(f"qlora_linear: lora_A has shape {tuple(lora_A.shape)}, expected [r, {K}]")
        if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
            raise ValueError(f"qlora_linear: lora_B has shape {tuple(lora_B.shape)}, expected [{N}, {r}] (out_features, r)")
    devs = {t.device for t in (x, state.absmax, bias, lora_A, lora_B) if t is not None}
    if len(devs) > 1:
        raise ValueError(f"qlora_linear: tensors are on different devices {sorted(map(str, devs))}; move the layer and input together")


class QLoraLinearReference(torch.autograd.Function):
    """Pure-PyTorch QLoRA linear on 2-D ``x`` ``[M, K]``; the oracle for the kernels.

    Forward: ``W = dequant(packed)`` in ``x.dtype``; ``y = x W^T + b``; the LoRA branch runs
    in ``lora_A.dtype`` (as peft does) and is added after casting to ``y.dtype``. Backward
    dequantises again; only the packed weight is kept, never ``W``.
    """

    @staticmethod
    def forward(ctx, x, packed, state, bias, lora_A, lora_B, scaling, dropout_p, training):
        W = dequantize_nf4_reference(packed, state, x.dtype)
        y = torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
        del W
        u = mask = None
        has_lora = lora_A is not None
        if has_lora:
            xl = x.to(lora_A.dtype)
            if training and dropout_p > 0.0:
                mask = _dropout_mask(xl, dropout_p)
                xl = xl * mask
            u = xl @ lora_A.t()
            y = y + ((u @ lora_B.t()) * scaling).to(y.dtype)
        ctx.save_for_backward(x, packed, lora_A, lora_B, u, mask)
        ctx.state, ctx.scaling, ctx.has_bias, ctx.has_lora = state, scaling, bias is not None, has_lora
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, packed, lora_A, lora_B, u, mask = ctx.saved_tensors
        s = ctx.scaling
        dx = db = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = dy @ dequantize_nf4_reference(packed, ctx.state, dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(0).to(ctx.bias_dtype)
        if ctx.has_lora:
            dyl = dy.to(lora_A.dtype)
            g = (dyl @ lora_B) * s  # [M, r]
            if ctx.needs_input_grad[0]:
                dxl = g @ lora_A
                if mask is not None:
                    dxl = dxl * mask
                dx = dx + dxl.to(dx.dtype)
            if ctx.needs_input_grad[4]:
                xl = x.to(lora_A.dtype)
                if mask is not None:
                    xl = xl * mask
                dA = g.t() @ xl
            if ctx.needs_input_grad[5]:
                dB = (dyl.t() @ u) * s
        return dx, None, None, db, dA, dB, None, None, None


def nf4_impl(impl: Optional[str] = None) -> str:
    """The Triton plan for training-size QLoRA matmuls: argument, else the current settings'
    ``nf4_impl`` (``FASTPEFT_NF4_IMPL`` at import), where ``"auto"`` (the default) means:
    ``dequant`` on a GPU, ``fused`` under ``TRITON_INTERPRET=1``.

    * ``"dequant"`` - the Triton dequantisation kernel writes the weight in the compute dtype,
      then a cuBLAS matmul, the weight freed at once (bitsandbytes' plan). The automatic choice
      on a GPU: the static model (``benchmarks/roofline.py``, from the sm_90 code) predicts
      forward+backward at 1.2-1.3x bf16 dense on an H100, where ``fused`` is ~2.7x (it
      re-dequantises every weight tile once per 128-row tile of x, ~15 / ~40 SASS instructions per
      weight in its forward / input-gradient loops). Until a GPU timing says otherwise.
    * ``"fused"`` - dequantisation inside the GEMM's weight loads, no dequantised weight in
      memory. The automatic choice under ``TRITON_INTERPRET=1`` (CPU tests), where speed does
      not matter and it exercises the fused kernel.
    """
    value = (impl if impl is not None else get_settings().nf4_impl).strip().lower() or "auto"
    if value == "auto":
        value = "fused" if interpreting() else "dequant"
    if value not in NF4_IMPLS:
        raise ValueError(f"nf4_impl={value!r} (FASTPEFT_NF4_IMPL) is not one of {NF4_IMPLS}")
    return value


class QLoraLinearTriton(torch.autograd.Function):
    """The QLoRA linear on the Triton kernels of ``fastpeft.kernels.nf4`` (2-D ``x``).

    Base product: M <= 16 without grad uses the GEMV kernel; otherwise the plan of
    :func:`nf4_impl`: ``dequant`` (Triton dequantisation, then a torch matmul, for the forward
    and for ``dx = dy W``) or ``fused`` (the dequant-GEMM with bias and ``s * U B^T`` in its
    epilogue). Only the packed weight is kept for backward.

    LoRA branch, adapter in x's dtype (autocast, or a 16-bit adapter on a 16-bit base): the
    16-bit layer's kernels (``fastpeft.kernels.lora_linear``): ``U = dropout(x) A^T`` by
    ``lora_down``, ``dx += (G A) * mask`` by ``lora_dx_add``, ``dA = G^T (x * mask)`` by
    ``lora_grad_a``, the mask regenerated from an integer seed each time: no mask tensor, no
    dropped copy of x (without dropout: plain matmuls). An adapter in another dtype than x (fp32
    factors on a 16-bit base outside autocast, peft's arithmetic) keeps the eager branch with a
    materialised mask. ``pair`` is ``Settings.nf4_pair`` (the forward GEMM's one-load-per-byte path).

    ``lora_plan`` is ``Settings.lora_impl``. With ``"epilogue"``, on the ``dequant`` plan and an
    adapter in x's dtype (r <= 256), the dequantised W goes to the 16-bit layer's epilogue plan
    instead of cuBLAS: forward ``y = x W^T + b + (s u) B^T`` in one Triton GEMM
    (``lora_epilogue_gemm``); backward ``g`` and ``dB`` from one pass over dy (``lora_grad_dy``),
    ``dx = dy W + mask * (g A)`` in one Triton GEMM with the mask regenerated in its epilogue, ``dA``
    as above. Every other case (fused plan, the GEMV, other adapter dtypes, no adapter) ignores it.
    """

    @staticmethod
    def forward(ctx, x, packed, state, bias, lora_A, lora_B, scaling, dropout_p, training, impl="fused", pair=True,
                seed=None, lut=True, lora_plan="split"):
        from fastpeft.kernels import nf4 as K

        x = x.contiguous()
        has_lora = lora_A is not None
        shared = has_lora and lora_A.dtype == x.dtype  # the LoRA-linear kernels take one dtype
        p = float(dropout_p) if (training and has_lora) else 0.0
        u = mask = None
        if has_lora:
            u, mask, seed = _lora_down(x, lora_A, p, seed, shared)
        needs_grad = any(ctx.needs_input_grad)
        epilogue = impl == "dequant" and lora_plan == "epilogue" and _epilogue_fits(x, lora_A, lora_B)
        if x.shape[0] <= 16 and not needs_grad:
            y = K.gemv(x, packed, state, lut=lut)
            y = y if bias is None else y + bias.to(y.dtype)
            if has_lora:
                y = y + ((u @ lora_B.t()) * scaling).to(y.dtype)
        elif epilogue:  # bias and (s u) B^T in the Triton GEMM's epilogue, s folded into u's rounding
            from fastpeft.kernels import lora_linear as LK

            W = K.dequantize(packed, state, x.dtype)
            y = LK.lora_epilogue_gemm(x, W.t(), None if bias is None else bias.to(x.dtype), u, lora_B.t(), scaling)
            del W
        elif impl == "dequant":
            W = K.dequantize(packed, state, x.dtype)
            y = torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
            del W
            if has_lora:
                if shared:
                    y.addmm_(u, lora_B.t(), alpha=scaling)  # beta = 1: the LoRA add in the GEMM epilogue
                else:
                    y = y + ((u @ lora_B.t()) * scaling).to(y.dtype)
        else:
            y = K.matmul(x, packed, state, trans_w=True, bias=bias,
                         lora_l=u, lora_r=lora_B.t() if has_lora else None, lora_scale=scaling, pair=pair)
        ctx.save_for_backward(x, packed, lora_A, lora_B, u, mask)
        ctx.state, ctx.scaling, ctx.has_bias, ctx.has_lora = state, scaling, bias is not None, has_lora
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.impl, ctx.p, ctx.seed, ctx.shared, ctx.epilogue = impl, p, seed, shared, epilogue
        return y

    @staticmethod
    def backward(ctx, dy):
        from fastpeft.kernels import lora_linear as LK
        from fastpeft.kernels import nf4 as K

        dy = dy.contiguous()
        if ctx.epilogue:
            return _backward_epilogue(ctx, dy)
        x, packed, lora_A, lora_B, u, mask = ctx.saved_tensors
        s = ctx.scaling
        dx = db = dA = dB = None
        regen = ctx.shared and ctx.p > 0.0  # the mask is regenerated in the LoRA kernels
        g = None
        if ctx.has_lora:
            dyl = dy.to(lora_A.dtype)
            g = (dyl @ lora_B) * s  # [M, r]
            if ctx.needs_input_grad[4]:
                if regen:
                    dA = LK.lora_grad_a(g, x, ctx.seed, ctx.p, out_dtype=lora_A.dtype)
                else:
                    dA = g.t() @ (x.to(lora_A.dtype) if mask is None else x.to(lora_A.dtype) * mask)
            if ctx.needs_input_grad[5]:
                dB = (dyl.t() @ u) * s
        if ctx.needs_input_grad[0]:
            dx = _input_grad(ctx, dy, packed, g, lora_A, mask, regen)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(0).to(ctx.bias_dtype)
        return dx, None, None, db, dA, dB, None, None, None, None, None, None, None, None


def _epilogue_fits(x, lora_A, lora_B) -> bool:
    """Whether ``lora_impl="epilogue"`` can take this call: an adapter in x's dtype (the LoRA-epilogue
    GEMM has one operand dtype), a dtype and a rank the LoRA kernels take (otherwise the matmuls)."""
    from fastpeft.kernels.lora_linear import MAX_RANK

    return (lora_A is not None and lora_A.dtype == x.dtype and lora_B.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and lora_A.shape[0] <= MAX_RANK)


def _backward_epilogue(ctx, dy):
    """Backward of the ``dequant`` plan with ``lora_impl="epilogue"`` (the 16-bit op's
    ``_backward_epilogue`` on a freshly dequantised W): ``g = s dy B`` and ``dB = s dy^T u`` from
    one pass over dy when both are needed, ``dx = dy W + mask * (g A)`` in one Triton GEMM (the
    mask regenerated in its epilogue, ``1 / (1 - p)`` carried by the LoRA scale), ``dA`` by
    ``lora_grad_a`` with dropout, else a matmul. Only the gradients asked for are computed."""
    from fastpeft.kernels import nf4 as K
    from fastpeft.ops.lora_linear import epilogue_da, epilogue_dx, epilogue_g_db

    x, packed, lora_A, lora_B, u, _ = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = db = dA = None
    g, dB = epilogue_g_db(dy, u, lora_B, ctx.scaling, need_g=need[0] or need[4], need_B=need[5])
    if need[0]:
        W = K.dequantize(packed, ctx.state, dy.dtype)
        dx = epilogue_dx(dy, W, g, lora_A, ctx.seed, ctx.p)
        del W
    if need[4]:
        dA = epilogue_da(g, x, lora_A, ctx.seed, ctx.p)
    if ctx.has_bias and need[3]:
        db = dy.sum(0).to(ctx.bias_dtype)
    return dx, None, None, db, dA, dB, None, None, None, None, None, None, None, None


def _lora_down(x, lora_A, p, seed, shared):
    """``(u, mask, seed)`` of the LoRA branch's down projection (see :class:`QLoraLinearTriton`)."""
    if shared and p > 0.0:
        from fastpeft.kernels import lora_linear as LK
        from fastpeft.ops.lora_linear import _new_seed

        seed = _new_seed() if seed is None else int(seed)
        return LK.lora_down(x, lora_A, seed, p), None, seed
    xl = x.to(lora_A.dtype)
    mask = None
    if p > 0.0:
        mask = _dropout_mask(xl, p)
        xl = xl * mask
    return xl @ lora_A.t(), mask, seed


def _input_grad(ctx, dy, packed, g, lora_A, mask, regen):
    """``dx = dy W + (g A) * mask`` on the plan of ``ctx.impl``."""
    from fastpeft.kernels import lora_linear as LK
    from fastpeft.kernels import nf4 as K

    if ctx.impl == "fused" and not regen:
        return K.matmul(dy, packed, ctx.state, trans_w=False, lora_l=g, lora_r=lora_A if g is not None else None,
                        lora_scale=1.0, lora_mask=mask, out_dtype=dy.dtype)
    if ctx.impl == "fused":
        dx = K.matmul(dy, packed, ctx.state, trans_w=False, out_dtype=dy.dtype)
    else:
        dx = dy @ K.dequantize(packed, ctx.state, dy.dtype)
    if g is None:
        return dx
    if regen:
        return LK.lora_dx_add(dx, g, lora_A, ctx.seed, ctx.p)
    if ctx.shared and mask is None:
        return dx.addmm_(g.to(dx.dtype), lora_A)
    dxl = g @ lora_A
    return dx + (dxl if mask is None else dxl * mask).to(dx.dtype)


def _use_cuda_gemv(x2: torch.Tensor, packed: torch.Tensor, state: NF4State, has_lora: bool, training: bool,
                   gemv: str) -> bool:
    if not x2.is_cuda or x2.shape[0] != 1 or x2.requires_grad or has_lora or torch.is_grad_enabled() and training:
        return False
    from fastpeft.ops import nf4_cuda

    return nf4_cuda.available(gemv) and nf4_cuda.supports(x2, state, packed)


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: Any,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    impl: Optional[str] = None,
    *,
    settings: Optional[Settings] = None,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``x dequant(Wq)^T + b + scaling * dropout(x) A^T B^T`` for ``x`` ``[..., K]``.

    ``packed``/``quant_state``: a bitsandbytes ``Params4bit``'s data and ``QuantState`` (or
    an :class:`NF4State`), ``[N, K]`` weight, used as is. ``lora_A`` ``[r, K]`` and ``lora_B``
    ``[N, r]`` may both be None (a frozen 4-bit linear). Gradients flow to ``x``, ``bias``,
    ``lora_A`` and ``lora_B``; the 4-bit weight is frozen. ``backend`` forces ``"reference"``
    or ``"triton"``; ``impl`` picks the Triton plan, see :func:`nf4_impl`. ``settings`` (default
    :func:`fastpeft.get_settings`) supplies ``backend``, ``impl``, ``nf4_pair``, ``nf4_gemv`` and
    ``lora_impl`` (``"epilogue"``: see :class:`QLoraLinearTriton`).
    ``seed`` (Triton, adapter in x's dtype) fixes the dropout mask the LoRA kernels draw
    (``fastpeft.kernels.lora_linear.dropout_mask(seed, p, M, K)``); by default one is drawn from
    torch's CPU generator.
    """
    settings = settings if settings is not None else get_settings()
    packed, state = canonicalize(packed, quant_state)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # One compute dtype, the autocast one, for x, bias and the adapter; the casts are
        # differentiable (fp32 adapter weights get fp32 grads) and the Function runs with
        # autocast off so its backward sees the same dtypes.
        dt = torch.get_autocast_dtype(device_type)
        x, bias, lora_A, lora_B = (None if t is None else t.to(dt) for t in (x, bias, lora_A, lora_B))
        with torch.autocast(device_type, enabled=False):
            return qlora_linear(x, packed, state, bias, lora_A, lora_B, scaling, dropout_p, training, backend, impl,
                                settings=settings, seed=seed)
    _check(x, state, bias, lora_A, lora_B)
    N, K = state.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if state.absmax.device != x.device or packed.device != x.device:
        raise ValueError(f"qlora_linear: the 4-bit weight is on {packed.device}, the input on {x.device}")
    has_lora = lora_A is not None
    if _use_cuda_gemv(x2, packed, state, has_lora, training, settings.nf4_gemv):
        from fastpeft.ops import nf4_cuda

        y = nf4_cuda.gemv(x2, packed, state)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, N)
    which = choose_backend(x, packed, backend=backend if backend is not None else settings.backend)
    args = (x2, packed, state, bias, lora_A, lora_B, float(scaling), float(dropout_p), bool(training))
    if which == "triton":
        from fastpeft.ops.lora_linear import lora_impl

        y = QLoraLinearTriton.apply(*args, nf4_impl(impl if impl is not None else settings.nf4_impl), settings.nf4_pair,
                                    seed, settings.nf4_gemv != "triton_l1", lora_impl(settings.lora_impl))
    else:
        y = QLoraLinearReference.apply(*args)
    return y.reshape(*lead, N)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: Optional[torch.Tensor] = None,
               backend: Optional[str] = None, settings: Optional[Settings] = None) -> torch.Tensor:
    """``x dequant(Wq)^T + b``: a frozen bitsandbytes 4-bit linear (no adapter)."""
    return qlora_linear(x, packed, quant_state, bias, None, None, backend=backend, settings=settings)


def bnb_linear4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: Any,
    bias: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    settings: Optional[Settings] = None,
) -> torch.Tensor:
    """What a bitsandbytes ``Linear4bit`` (plus, optionally, one peft LoRA adapter) computes,
    through :func:`qlora_linear`.

    bitsandbytes casts the input to the layer's ``compute_dtype`` (None: the input's dtype),
    multiplies, and casts the result back to the input's dtype; peft adds
    ``scaling * B(A(dropout(x)))`` computed from the original input in the adapter's dtype and
    cast to the result's dtype. When the input is already in the compute dtype this is one
    fused op; otherwise the base product goes through the op and the LoRA branch is added as
    peft adds it, so the rounding is the same as bitsandbytes + peft either way. Under
    ``torch.autocast`` everything runs in the autocast dtype (see :func:`qlora_linear`) and
    the result is returned in the input's dtype. ``backend`` and ``settings`` go to
    :func:`qlora_linear`.
    """
    inp_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        settings = settings if settings is not None else get_settings()
        if choose_backend(x, packed, backend=backend if backend is not None else settings.backend) == "reference":
            return _bnb_autocast_reference(x, packed, quant_state, bias, compute_dtype, lora_A, lora_B, float(scaling),
                                           float(dropout_p), bool(training))
        y = qlora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p, training, backend,
                         settings=settings)
        return y.to(inp_dtype)
    cd = compute_dtype or inp_dtype
    if cd == inp_dtype:
        if bias is not None and bias.dtype != cd:
            bias = bias.to(cd)
        return qlora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p, training, backend,
                            settings=settings)
    y = qlora_linear(x.to(cd), packed, quant_state, None if bias is None else bias.to(cd), backend=backend, settings=settings)
    y = y.to(inp_dtype)
    if lora_A is not None:
        xl = torch.nn.functional.dropout(x.to(lora_A.dtype), dropout_p, training=training and dropout_p > 0)
        y = y + (torch.nn.functional.linear(torch.nn.functional.linear(xl, lora_A), lora_B) * scaling).to(inp_dtype)
    return y


def _bnb_autocast_reference(x, packed, quant_state, bias, compute_dtype, lora_A, lora_B, scaling: float,
                            dropout_p: float, training: bool) -> torch.Tensor:
    """The reference path under ``torch.autocast``: bitsandbytes' ``Linear4bit.forward`` then peft's
    ``lora.bnb.Linear4bit`` adapter branch, op for op in plain autograd, so every cast and rounding
    happens in the same dtype at the same point as in an unpatched model:

    * base: the input cast to ``compute_dtype``, one autocast ``linear`` with the bias against the
      weight dequantised in the state's dtype (what bitsandbytes' 4-bit matmul computes under
      autocast), cast back to the input's dtype;
    * adapter: peft asks ``torch.is_autocast_enabled()`` with no device, i.e. about CUDA. Where that
      is False (CPU autocast) it casts ``x`` to ``lora_A``'s dtype and the branch's output back to
      the base output's dtype; where True it does neither. Dropout is ``F.dropout`` (nn.Dropout's
      mask and RNG draw), then two autocast linears and ``* scaling``, added to the base output.
    """
    F = torch.nn.functional
    packed, state = canonicalize(packed, quant_state)
    inp_dtype = x.dtype
    xc = x if compute_dtype is None else x.to(compute_dtype)
    weight = dequantize_nf4_reference(packed, state)
    y = F.linear(xc, weight, None if bias is None else bias.to(xc.dtype)).to(inp_dtype)
    if lora_A is None:
        return y
    convert = not torch.is_autocast_enabled()  # peft's own (CUDA-only) check, kept on purpose
    xa = x.to(lora_A.dtype) if convert else x
    if training and dropout_p > 0.0:
        xa = F.dropout(xa, dropout_p, training=True)
    out = F.linear(F.linear(xa, lora_A), lora_B) * scaling
    return y + (out.to(y.dtype) if convert else out)
