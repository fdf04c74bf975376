// NF4/FP4 GEMV for decoding (M = 1) over bitsandbytes' packed 4-bit format.
//
// y[n] = sum_k x[k] * W[n, k], W[n, k] = round_T(code[nibble(n*K + k)] * scale(block)) where
// element e of the row-major [N, K] weight is the high nibble of byte e/2 when e is even, the
// low nibble when odd, and scale(b) = absmax[b] or, double-quantised,
// nested_code[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset (fp32), as bitsandbytes
// computes it. The weight is rounded to the activation type before the product, so this equals
// bitsandbytes' dequantise-then-matmul up to fp32 summation order.
//
// One warp per output row, 16-byte vector loads of the packed row (32 weights per load);
// requires K % 32 == 0 and blocksize >= 32 (every 32-weight chunk then has a single scale).
// Torch-free: compiled on its own by the CI check, bound to torch by nf4_gemv.cpp.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "nf4_gemv.h"

namespace fastpeft_nf4 {

template <typename T> struct Cvt;
template <> struct Cvt<float> {
    __device__ static float load(float v) { return v; }
    __device__ static float round(float v) { return v; }
    __device__ static float store(float v) { return v; }
};
template <> struct Cvt<__half> {
    __device__ static float load(__half v) { return __half2float(v); }
    __device__ static float round(float v) { return __half2float(__float2half_rn(v)); }
    __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
    __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
    __device__ static float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
    __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

constexpr int kWarps = 4;

template <typename T, bool Nested>
__global__ void __launch_bounds__(kWarps * 32) nf4_gemv_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ code,
    const float* __restrict__ absmax, const uint8_t* __restrict__ qabsmax,
    const float* __restrict__ nested_code, const float* __restrict__ nested_absmax,
    const float* __restrict__ offset, T* __restrict__ out, int N, int K, int blocksize,
    int nested_blocksize) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * kWarps + warp;
    if (row >= N) return;

    const int chunks = K / 32;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)row * (size_t)(K / 2));
    const float off = Nested ? __ldg(offset) : 0.f;
    float acc = 0.f;
    for (int c = lane; c < chunks; c += 32) {
        const uint4 packed = __ldg(wrow + c);
        const size_t blk = ((size_t)row * (size_t)K + (size_t)c * 32) / (size_t)blocksize;
        float scale;
        if (Nested) {
            scale = __ldg(nested_code + __ldg(qabsmax + blk)) * __ldg(nested_absmax + blk / nested_blocksize);
            scale = __fadd_rn(scale, off);  // two roundings, as bitsandbytes does (no FMA contraction)
        } else {
            scale = __ldg(absmax + blk);
        }
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
        const T* xp = x + (size_t)c * 32;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const uint8_t b = bytes[j];
            const float w0 = Cvt<T>::round(__fmul_rn(lut[b >> 4], scale));
            const float w1 = Cvt<T>::round(__fmul_rn(lut[b & 15], scale));
            acc = fmaf(w0, Cvt<T>::load(xp[2 * j]), acc);
            acc = fmaf(w1, Cvt<T>::load(xp[2 * j + 1]), acc);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[row] = Cvt<T>::store(acc);
}

template <typename T>
static int launch_typed(const Nf4GemvArgs& a, cudaStream_t stream) {
    const dim3 grid((a.N + kWarps - 1) / kWarps);
    const dim3 block(kWarps * 32);
    if (a.qabsmax != nullptr) {
        nf4_gemv_kernel<T, true><<<grid, block, 0, stream>>>(
            static_cast<const T*>(a.x), a.w, a.code, a.absmax, a.qabsmax, a.nested_code, a.nested_absmax,
            a.offset, static_cast<T*>(a.out), a.N, a.K, a.blocksize, a.nested_blocksize);
    } else {
        nf4_gemv_kernel<T, false><<<grid, block, 0, stream>>>(
            static_cast<const T*>(a.x), a.w, a.code, a.absmax, a.qabsmax, a.nested_code, a.nested_absmax,
            a.offset, static_cast<T*>(a.out), a.N, a.K, a.blocksize, a.nested_blocksize);
    }
    return static_cast<int>(cudaGetLastError());
}

}  // namespace fastpeft_nf4

int fastpeft_nf4_gemv_launch(const Nf4GemvArgs* args, void* stream) {
    using namespace fastpeft_nf4;
    const Nf4GemvArgs& a = *args;
    if (a.K % 32 != 0 || a.blocksize < 32 || a.blocksize % 32 != 0) return -1;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (a.dtype) {
        case NF4_GEMV_F32: return launch_typed<float>(a, s);
        case NF4_GEMV_F16: return launch_typed<__half>(a, s);
        case NF4_GEMV_BF16: return launch_typed<__nv_bfloat16>(a, s);
    }
    return -2;
}
