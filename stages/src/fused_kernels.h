// Fused CUDA kernels (stages/src/fused_kernels.cu), on raw device pointers so that the .cu file needs no LibTorch
// headers. Each returns a cudaError_t value (0: launched). Only in builds with CUDA; callers go through
// cuda_ops.h, which checks shapes, dtypes and layouts and falls back to ATen where a kernel does not apply.
#pragma once
#include <algorithm>
#include <cstdint>

namespace diffpipe::fused {

enum class DType { F32, F16, BF16 };

// GroupNorm of x [N, C, HW] with G groups, affine (gamma, beta [C]), then SiLU when silu: x and y are contiguous
// NCHW, or NHWC (channels-last) when nhwc. NCHW: one block per group, one read from device memory, one write.
// NHWC: three kernels (statistics per split of the positions, per-group merge, apply), two reads and one write,
// all coalesced; it may add `add` ([N, C], may be null; NHWC only) to x first, and needs `work`: a float32 device
// buffer of group_norm_nhwc_work(plan, N, C) elements (NCHW: null).
int group_norm(DType t, const void* x, void* y, const void* gamma, const void* beta, const void* add, float* work,
               int64_t N, int64_t C, int64_t HW, int64_t G, float eps, bool silu, bool nhwc, void* stream);

// How the NHWC kernels split the work: each statistics block has (C / width) x rpi threads (width adjacent channels
// each, every rpi-th position) over `rows` positions; `splits` blocks per sample. splits == 0: not served (more
// than 512 vectors per row).
struct NhwcPlan {
  int width = 0, rpi = 0;
  int64_t rows = 0, splits = 0;
};
inline NhwcPlan group_norm_nhwc_plan(int64_t C, int64_t HW, int64_t N, int elem_bytes) {
  NhwcPlan p;
  int w = 16 / elem_bytes;
  while (w > 1 && C % w != 0) w /= 2;
  const int64_t lanes = C / w;
  if (lanes > 512 || HW < 1 || N < 1) return p;
  p.width = w;
  p.rpi = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(HW, 512 / lanes)));
  const int64_t most = (HW + p.rpi - 1) / p.rpi;  // at least rpi positions a block
  const int64_t want = std::max<int64_t>(1, (512 + N - 1) / N);  // ~512 blocks in all: a few waves on any GPU
  const int64_t s = std::min(want, most);
  p.rows = (HW + s - 1) / s;
  p.splits = (HW + p.rows - 1) / p.rows;
  return p;
}
inline int64_t group_norm_nhwc_work(const NhwcPlan& p, int64_t N, int64_t C) { return N * p.splits * C * 2 + N * C * 2; }

// GEGLU: h [rows, 2D] contiguous -> out [rows, D] = h[:, :D] * gelu(h[:, D:]).
int geglu(DType t, const void* h, void* out, int64_t rows, int64_t D, void* stream);
// y = (x + bias[c] + r) / div for `positions` runs of C channels (x, r, y contiguous with C innermost, bias [C]).
int bias_residual(DType t, const void* x, const void* bias, const void* r, void* y, int64_t positions, int64_t C,
                  float div, void* stream);
const char* error_string(int code);

}  // namespace diffpipe::fused
