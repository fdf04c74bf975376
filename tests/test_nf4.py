"""NF4 reference vs bitsandbytes on CPU: dequantise bit for bit, quantise to the same bytes,
the QLoRA op against a bitsandbytes Linear4bit (train mode) plus a peft-style LoRA branch."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from fastpeft.ops import nf4  # noqa: E402

SHAPES = [(33, 7), (48, 100), (64, 96), (64, 128), (300, 257), (16, 4096)]


def _bnb_default_dequant(packed, qs, dtype):
    """bitsandbytes' pure-PyTorch dequantisation (its format definition, the one its CUDA
    kernel agrees with), called eagerly (bitsandbytes wraps it in torch.compile)."""
    from bitsandbytes.backends.default import ops as D

    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    fn = getattr(D._dequantize_4bit_compute, "__wrapped__", D._dequantize_4bit_compute)
    code = BF.get_4bit_type(qs.quant_type, device="cpu")
    return fn(packed.reshape(-1).view(torch.uint8), absmax, code, qs.blocksize, qs.shape, dtype)


# bitsandbytes 0.50's CPU C dequantiser indexes blocks per row, which disagrees with its own
# (flat) format when in_features is even and not a multiple of the blocksize (see
# test_bitsandbytes_cpu_kernel_discrepancy_is_theirs); for odd in_features it falls back to the
# PyTorch implementation.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _w(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), BF.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_are_bitsandbytes(quant_type):
    assert torch.equal(nf4.code_table(quant_type), BF.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact(shape, blocksize, nested, quant_type):
    for i, dtype in enumerate(DTYPES):
        w = _w(shape, dtype, seed=i)
        packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        got = nf4.dequantize_nf4(packed, qs)
        assert got.dtype == dtype
        assert torch.equal(got, _bnb_default_dequant(packed, qs, dtype)), (shape, blocksize, nested, dtype)
        if shape[-1] % blocksize == 0:  # bitsandbytes' CPU C kernel (odd shapes use the function above)
            assert torch.equal(got, BF.dequantize_4bit(packed, qs))
        # straight to another dtype: one rounding from fp32, as bitsandbytes' kernels do
        for out_dtype in DTYPES:
            assert torch.equal(nf4.dequantize_nf4(packed, qs, out_dtype), _bnb_default_dequant(packed, qs, out_dtype))


def test_bitsandbytes_cpu_kernel_discrepancy_is_theirs():
    """Where bitsandbytes' CPU C kernel disagrees with us, it also disagrees with bitsandbytes'
    own quantiser: re-quantising its output does not give back the stored bytes, ours does."""
    w = _w((8, 96), torch.float32)
    packed, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    theirs = BF.dequantize_4bit(packed, qs)
    ours = nf4.dequantize_nf4(packed, qs)
    if torch.equal(theirs, ours):
        pytest.skip("this bitsandbytes build dequantises this shape consistently")
    assert torch.equal(BF.quantize_4bit(ours, blocksize=64, quant_type="nf4")[0], packed)
    assert not torch.equal(BF.quantize_4bit(theirs, blocksize=64, quant_type="nf4")[0], packed)


@pytest.mark.parametrize("shape", SHAPES + [(5,), (3, 5, 7)])
@pytest.mark.parametrize("blocksize", [64, 128, 32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_same_bytes(shape, blocksize, quant_type):
    for i, dtype in enumerate(DTYPES):
        w = _w(shape, dtype, seed=10 + i)
        packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)
        p2, s2 = nf4.quantize_nf4(w, blocksize, compress_statistics=False, quant_type=quant_type)
        assert p2.dtype == torch.uint8 and p2.shape == packed.shape
        assert torch.equal(p2, packed)
        assert torch.equal(s2.absmax, qs.absmax)
        assert s2.shape == tuple(qs.shape) and s2.dtype == qs.dtype and s2.blocksize == qs.blocksize


@pytest.mark.parametrize("shape", [(48, 100), (300, 257), (1000, 130)])
@pytest.mark.parametrize("blocksize", [64, 32])
def test_quantize_double_quant_state(shape, blocksize):
    """The 4-bit bytes, offset and nested absmax equal bitsandbytes'. The 8-bit absmax codes
    are the exact nearest entries of the dynamic map; bitsandbytes' CPU search is approximate
    (about 2**-16 absolute error on the normalised value), so a few codes near the midpoint of
    two entries may differ: there ours is never farther from the value than bitsandbytes'."""
    w = _w(shape, torch.float32, seed=3)
    packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    p2, s2 = nf4.quantize_nf4(w, blocksize, compress_statistics=True)
    assert torch.equal(p2, packed)
    assert torch.equal(s2.offset, qs.offset)
    assert torch.equal(s2.nested_absmax, qs.state2.absmax)
    assert torch.equal(s2.nested_code, qs.state2.code) and s2.nested_blocksize == qs.state2.blocksize == 256
    diff = (s2.absmax != qs.absmax).nonzero().flatten()
    assert diff.numel() <= max(2, qs.absmax.numel() // 50)
    _, am = torch.ops.bitsandbytes.quantize_4bit.default(w, blocksize, "nf4", torch.uint8)
    normed = (am - qs.offset) / qs.state2.absmax.repeat_interleave(256)[: am.numel()]
    code = nf4.dynamic_map()
    code[0] = -1.0
    ours = (normed - code[s2.absmax.long()]).abs()
    theirs = (normed - code[qs.absmax.long()]).abs()
    assert (ours <= theirs).all()
    assert ((ours - theirs).abs()[diff] < 2**-14).all()
    # and what we produce dequantises the way bitsandbytes dequantises it
    qs2 = s2.to_quant_state()
    assert torch.equal(nf4.dequantize_nf4(p2, s2), _bnb_default_dequant(p2, qs2, torch.float32))


def test_quant_storage_and_state_roundtrip():
    w = _w((64, 128), torch.bfloat16)
    packed, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(nf4.dequantize_nf4(packed, qs), BF.dequantize_4bit(packed.view(torch.uint8), qs))
    st = nf4.NF4State.from_quant_state(qs)
    assert st.nested and st.shape == (64, 128)
    assert torch.equal(st.absmax_fp32(), BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)


def _bnb_layer(K, N, dtype, bias=True, quant_type="nf4", nested=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias).to(dtype)
    q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, quant_type=quant_type,
                          compress_statistics=nested)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    q.train()
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N,nested,quant_type", [(128, 48, True, "nf4"), (64, 33, False, "nf4"), (192, 40, True, "fp4")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_qlora_linear_matches_bitsandbytes_and_peft_math(dtype, K, N, nested, quant_type, dropout_p):
    layer = _bnb_layer(K, N, dtype, quant_type=quant_type, nested=nested)
    r, s = 4, 2.0
    g = torch.Generator().manual_seed(1)
    A0 = torch.randn(r, K, generator=g) * 0.1
    B0 = torch.randn(N, r, generator=g) * 0.1
    x0 = torch.randn(3, 5, K, generator=g).to(dtype)
    dy = torch.randn(3, 5, N, generator=g).to(dtype)

    # bitsandbytes base + peft's LoRA arithmetic (lora_B(lora_A(dropout(x))) * scaling)
    x1 = x0.clone().requires_grad_(True)
    A1, B1 = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    torch.manual_seed(7)
    base = layer(x1)
    xl = torch.nn.functional.dropout(x1.to(A1.dtype), dropout_p, training=True)
    y1 = base + (torch.nn.functional.linear(torch.nn.functional.linear(xl, A1), B1) * s).to(base.dtype)
    y1.backward(dy)

    x2 = x0.clone().requires_grad_(True)
    A2, B2 = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    torch.manual_seed(7)
    y2 = nf4.qlora_linear(x2, layer.weight, layer.weight.quant_state, layer.bias, A2, B2, s, dropout_p,
                          training=True, backend="reference")
    y2.backward(dy)
    assert torch.equal(y2, y1)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    torch.testing.assert_close(A2.grad, A1.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(B2.grad, B1.grad, rtol=1e-6, atol=1e-6)


def test_nf4_linear_frozen_matches_bitsandbytes():
    layer = _bnb_layer(192, 24, torch.float32, nested=True)
    x = torch.randn(4, 192, requires_grad=True)
    want = layer(x)
    got = nf4.nf4_linear(x, layer.weight, layer.weight.quant_state, layer.bias, backend="reference")
    assert torch.equal(got, want)


def test_backward_keeps_no_dequantised_weight():
    layer = _bnb_layer(64, 32, torch.float32)
    x = torch.randn(2, 64, requires_grad=True)
    A = torch.zeros(2, 64, requires_grad=True)
    B = torch.zeros(32, 2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nf4.qlora_linear(x, layer.weight, layer.weight.quant_state, None, A, B, 1.0, backend="reference")
    assert any(t.dtype == torch.uint8 for t in saved)  # the packed weight is what backward keeps
    assert not any(t.is_floating_point() and t.numel() >= 32 * 64 for t in saved)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None


@pytest.mark.skipif(not BF.has_avx512bf16(), reason="bitsandbytes repacks for CPU only on AVX512-BF16 CPUs")
def test_cpu_packed_layout_recognised():
    layer = _bnb_layer(128, 64, torch.bfloat16, nested=True)
    orig_w, orig_qs = layer.weight.data.clone(), layer.weight.quant_state
    absmax_bf16 = nf4.NF4State.from_quant_state(orig_qs).absmax_fp32().bfloat16().float()
    layer.eval()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # bitsandbytes rewrites weight.data into its CPU layout here
    qs = layer.weight.quant_state
    assert getattr(qs, "packing_format_for_cpu", False)
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        nf4.NF4State.from_quant_state(qs)
    packed, st = nf4.canonicalize(layer.weight.data, qs)
    assert torch.equal(packed.reshape(-1), orig_w.reshape(-1))  # nibble layout undone losslessly
    assert torch.equal(st.absmax_fp32(), absmax_bf16)  # its bf16 scales, used as is
    y = nf4.nf4_linear(x, layer.weight.data, qs, layer.bias, backend="reference")
    want_w = nf4.dequantize_nf4_reference(packed, st, torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(x, want_w, layer.bias))


def test_bad_inputs_have_clear_errors():
    layer = _bnb_layer(64, 32, torch.float32)
    w, qs = layer.weight, layer.weight.quant_state
    with pytest.raises(ValueError, match="input has 63 features"):
        nf4.qlora_linear(torch.randn(2, 63), w, qs)
    with pytest.raises(ValueError, match="lora_B has shape"):
        nf4.qlora_linear(torch.randn(2, 64), w, qs, None, torch.zeros(4, 64), torch.zeros(32, 5))
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        nf4.qlora_linear(torch.randn(2, 64), w, qs, None, torch.zeros(4, 64), None)
    with pytest.raises(ValueError, match="bytes, expected"):
        nf4.qlora_linear(torch.randn(2, 64), w[:-1], qs)
    with pytest.raises(ValueError, match="quant_type 'int4' is not supported"):
        nf4.NF4State(absmax=torch.ones(1), shape=(8, 8), quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.randn(8, 8), blocksize=48)
    with pytest.raises(TypeError, match="QuantState"):
        nf4.qlora_linear(torch.randn(2, 64), w, None)


def test_qlora_linear_under_autocast_runs_in_the_autocast_dtype():
    """Under torch.autocast the op computes in the autocast dtype (x, bias and the adapter
    cast, differentiably): the same as running it on pre-cast inputs, fp32 grads for fp32
    adapter weights."""
    layer = _bnb_layer(64, 24, torch.float32)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 64, generator=g)
    A0, B0 = torch.randn(2, 64, generator=g) * 0.1, torch.randn(24, 2, generator=g) * 0.1
    A, B = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4.qlora_linear(x0, layer.weight, layer.weight.quant_state, layer.bias, A, B, 2.0, backend="reference")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    A2, B2 = A0.bfloat16().requires_grad_(True), B0.bfloat16().requires_grad_(True)
    want = nf4.qlora_linear(x0.bfloat16(), layer.weight, layer.weight.quant_state, layer.bias.bfloat16(), A2, B2, 2.0,
                            backend="reference")
    want.float().sum().backward()
    assert torch.equal(y, want)
    assert A.grad.dtype == torch.float32 and torch.equal(A.grad, A2.grad.float())
    assert torch.equal(B.grad, B2.grad.float())
