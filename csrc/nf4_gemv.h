// C interface of the NF4 GEMV (nf4_gemv.cu); no torch, no CUDA types in the signature.
#pragma once
#include <stdint.h>

enum Nf4GemvDtype { NF4_GEMV_F32 = 0, NF4_GEMV_F16 = 1, NF4_GEMV_BF16 = 2 };

struct Nf4GemvArgs {
    const void* x;               // [K] activations (dtype)
    const uint8_t* w;            // packed bytes of the [N, K] weight
    const float* code;           // [16] lookup table
    const float* absmax;         // [n_blocks] fp32 scales (plain state)
    const uint8_t* qabsmax;      // [n_blocks] 8-bit scale codes (nested state), or null
    const float* nested_code;    // [256]
    const float* nested_absmax;  // [ceil(n_blocks / nested_blocksize)]
    const float* offset;         // [1]
    void* out;                   // [N] (dtype)
    int N, K, blocksize, nested_blocksize;
    int dtype;                   // Nf4GemvDtype
};

// Returns 0 on success, a cudaError_t value on a launch error, -1 for an unsupported shape
// (K % 32 != 0 or blocksize not a multiple of 32), -2 for an unknown dtype.
int fastpeft_nf4_gemv_launch(const Nf4GemvArgs* args, void* stream);
