// torch binding of the NF4 GEMV (nf4_gemv.cu), built on demand by fastpeft.ops.nf4_cuda.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

#include "nf4_gemv.h"

static int dtype_code(const at::Tensor& t) {
    if (t.scalar_type() == at::kFloat) return NF4_GEMV_F32;
    if (t.scalar_type() == at::kHalf) return NF4_GEMV_F16;
    if (t.scalar_type() == at::kBFloat16) return NF4_GEMV_BF16;
    TORCH_CHECK(false, "nf4_gemv: activations must be float32, float16 or bfloat16, got ", t.scalar_type());
    return -1;
}

// x: [K]; packed: uint8 [ceil(N*K/2)]; absmax: fp32 [n_blocks] or uint8 (nested) with
// nested_code [256], nested_absmax fp32, offset fp32 [1]. Returns [N] in x's dtype.
at::Tensor nf4_gemv(at::Tensor x, at::Tensor packed, at::Tensor code, at::Tensor absmax,
                    c10::optional<at::Tensor> nested_code, c10::optional<at::Tensor> nested_absmax,
                    c10::optional<at::Tensor> offset, int64_t N, int64_t K, int64_t blocksize,
                    int64_t nested_blocksize) {
    TORCH_CHECK(x.is_cuda() && packed.is_cuda(), "nf4_gemv: tensors must be on a CUDA device");
    TORCH_CHECK(x.is_contiguous() && x.numel() == K, "nf4_gemv: x must be a contiguous vector of ", K, " values");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "nf4_gemv: packed weight must be contiguous uint8");
    TORCH_CHECK(K % 32 == 0 && blocksize % 32 == 0, "nf4_gemv: needs K and blocksize multiples of 32");
    // the kernel reads each weight row with 16-byte uint4 loads: the buffer start must be aligned
    TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
                "nf4_gemv: packed weight must be 16-byte aligned (clone it, or use the Triton GEMV)");
    auto out = at::empty({N}, x.options());
    Nf4GemvArgs a{};
    a.x = x.data_ptr();
    a.w = packed.data_ptr<uint8_t>();
    a.code = code.data_ptr<float>();
    const bool nested = absmax.scalar_type() == at::kByte;
    if (nested) {
        TORCH_CHECK(nested_code && nested_absmax && offset, "nf4_gemv: nested state is incomplete");
        a.qabsmax = absmax.data_ptr<uint8_t>();
        a.nested_code = nested_code->data_ptr<float>();
        a.nested_absmax = nested_absmax->data_ptr<float>();
        a.offset = offset->data_ptr<float>();
    } else {
        a.absmax = absmax.data_ptr<float>();
    }
    a.out = out.data_ptr();
    a.N = static_cast<int>(N);
    a.K = static_cast<int>(K);
    a.blocksize = static_cast<int>(blocksize);
    a.nested_blocksize = static_cast<int>(nested_blocksize);
    a.dtype = dtype_code(x);
    const int rc = fastpeft_nf4_gemv_launch(&a, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(rc == 0, "nf4_gemv: launch failed with code ", rc);
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("nf4_gemv", &nf4_gemv, "NF4/FP4 GEMV over bitsandbytes' packed format (M = 1)");
}
