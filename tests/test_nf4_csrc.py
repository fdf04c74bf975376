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
