// Fused CUDA kernels (stages/src/fused_kernels.cu), on raw device pointers so that the .cu file needs no LibTorch
// headers. Each returns a cudaError_t value (0: launched). Only in builds with CUDA; callers go through
// cuda_ops.h, which checks shapes, dtypes and layouts and falls back to ATen where a kernel does not apply.
#pragma once
#include <cstdint>

namespace diffpipe::fused {

enum class DType { F32, F16, BF16 };

// GroupNorm of x [N, C, HW] with G groups, affine (gamma, beta [C]), then SiLU when silu: one pass over the input
// from device memory, one write. x and y are contiguous NCHW, or NHWC (channels-last) when nhwc.
int group_norm(DType t, const void* x, void* y, const void* gamma, const void* beta, int64_t N, int64_t C,
               int64_t HW, int64_t G, float eps, bool silu, bool nhwc, void* stream);
// GEGLU: h [rows, 2D] contiguous -> out [rows, D] = h[:, :D] * gelu(h[:, D:]).
int geglu(DType t, const void* h, void* out, int64_t rows, int64_t D, void* stream);
const char* error_string(int code);

}  // namespace diffpipe::fused
