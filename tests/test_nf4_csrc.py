"""The CUDA NF4 GEMV source: compile-checked with the machine's nvcc (skipped, with the reason,
where there is none), and run against the reference where a CUDA device is present."""

import os
import shutil
import subprocess

import pytest
import torch

from fastpeft.ops import nf4, nf4_cuda


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def test_nvcc_compiles_the_gemv(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine): csrc/nf4_gemv.cu not compile-checked")
    src = os.path.join(nf4_cuda.source_dir(), "nf4_gemv.cu")
    out = tmp_path / "nf4_gemv.o"
    proc = subprocess.run(
        [nvcc, "-c", "-std=c++17", "-O3", "-arch=sm_90", "-I", nf4_cuda.source_dir(), src, "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 0


def test_cuda_gemv_not_used_without_cuda(settings):
    settings(nf4_gemv="cuda")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by test_cuda_gemv_matches_reference")
    assert not nf4_cuda.available()
    assert "CUDA" in nf4_cuda.unavailable_reason()
    with pytest.raises(RuntimeError, match="CPU tensor"):
        packed, st = nf4.quantize_nf4(torch.randn(8, 64))
        nf4_cuda.gemv(torch.randn(1, 64), packed, st)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_gemv_matches_reference(settings, dtype, nested):
    settings(nf4_gemv="cuda")
    assert nf4_cuda.available(), nf4_cuda.unavailable_reason()
    packed, st = nf4.quantize_nf4(torch.randn(200, 4096) * 0.05, 64, compress_statistics=nested)
    packed, st = packed.cuda(), st.to("cuda")
    x = torch.randn(1, 4096, device="cuda").to(dtype)
    ref = x.float() @ nf4.dequantize_nf4_reference(packed, st, dtype).float().t()
    got = nf4_cuda.gemv(x, packed, st)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


def test_uint4_loads_need_an_aligned_weight():
    """The GEMV reads the packed weight with 16-byte loads: a view that starts off a 16-byte
    boundary is refused (the op then takes the Triton GEMV); contiguous buffers and weights that
    gemv copies (non-contiguous) are fine."""
    buf = torch.zeros(4096, dtype=torch.uint8)
    assert buf.data_ptr() % 16 == 0 and nf4_cuda.vector_aligned(buf)
    assert not nf4_cuda.vector_aligned(buf[1:])
    assert nf4_cuda.vector_aligned(buf[16:])
    assert nf4_cuda.vector_aligned(buf.view(64, 64)[:, 1:])  # non-contiguous: copied before the launch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_misaligned_weight_falls_back_to_triton(monkeypatch, settings):
    settings(nf4_gemv="cuda")
    packed, st = nf4.quantize_nf4(torch.randn(64, 4096) * 0.05, 64)
    packed, st = packed.cuda(), st.to("cuda")
    store = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = store[1:].view_as(packed).copy_(packed)  # same bytes, 1 byte off alignment
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert not nf4_cuda.supports(x, st, shifted)
    with pytest.raises(ValueError, match="16-byte"):
        nf4_cuda.gemv(x, shifted, st)
    with torch.no_grad():
        got = nf4.qlora_linear(x, shifted, st)
    ref = x.float() @ nf4.dequantize_nf4_reference(packed, st, torch.bfloat16).float().t()
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
