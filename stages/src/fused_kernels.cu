// Fused CUDA kernels for the UNet's memory-bound steps (see fused_kernels.h). Plain CUDA: no LibTorch headers,
// so nvcc stays fast; stages/src/cuda_ops.cpp wraps them for ATen tensors.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fused_kernels.h"

namespace diffpipe::fused {

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// W elements of T loaded or stored as one aligned vector (W * sizeof(T) in {2, 4, 8, 16} bytes).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

constexpr int kThreads = 512;

// Sum over the block (every thread gets the total).
__device__ float block_sum(float s) {
  __shared__ float part[kThreads / 32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[warp] = s;
  __syncthreads();
  if (warp == 0) {
    float t = lane < kThreads / 32 ? part[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) total = t;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();  // part/total may be reused by the next call
  return r;
}

// One block per (sample, group). In NCHW the group's M = (C / G) * HW elements are one contiguous run; in NHWC
// (channels-last) they are HW runs of C / G channels, C apart. Element i of the group (i < M, channel-major in NCHW,
// position-major in NHWC) lives at `offset(i)` from the group's first element. Loads and stores move W elements at
// once; W divides the contiguous run, so a vector never leaves its run. Two-pass statistics in float32 (mean, then
// the mean squared deviation: no cancellation), then the normalised, affine and optionally SiLU-activated output,
// written once. The group's data (<= 256 KB) stays in L2 between the three passes.
template <typename T, int W, bool kNhwc>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                              const T* __restrict__ gamma, const T* __restrict__ beta,
                                                              int64_t C, int64_t HW, int64_t G, float eps, bool silu) {
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G, cpg = C / G, M = cpg * HW;
  const int64_t base = kNhwc ? n * HW * C + g * cpg : ng * M;
  const T* xp = x + base;
  T* yp = y + base;
  auto offset = [&](int64_t i) { return kNhwc ? (i / cpg) * C + i % cpg : i; };
  auto channel = [&](int64_t i) { return g * cpg + (kNhwc ? i % cpg : i / HW); };  // of i's first vector element
  using P = Pack<T, W>;
  float s = 0.f;
  for (int64_t i = threadIdx.x * W; i < M; i += kThreads * W) {
    const P a = *reinterpret_cast<const P*>(xp + offset(i));
#pragma unroll
    for (int k = 0; k < W; ++k) s += to_f(a.v[k]);
  }
  const float mean = block_sum(s) / static_cast<float>(M);
  float q = 0.f;
  for (int64_t i = threadIdx.x * W; i < M; i += kThreads * W) {
    const P a = *reinterpret_cast<const P*>(xp + offset(i));
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float d = to_f(a.v[k]) - mean;
      q += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(q) / static_cast<float>(M) + eps);
  for (int64_t i = threadIdx.x * W; i < M; i += kThreads * W) {
    const int64_t o = offset(i), c = channel(i);
    const P a = *reinterpret_cast<const P*>(xp + o);
    P b;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const int64_t ck = kNhwc ? c + k : c;  // NHWC: the vector runs along channels; NCHW: along positions
      float v = (to_f(a.v[k]) - mean) * rstd * to_f(gamma[ck]) + to_f(beta[ck]);
      if (silu) v = v / (1.f + expf(-v));
      b.v[k] = from_f<T>(v);
    }
    *reinterpret_cast<P*>(yp + o) = b;
  }
}

// GEGLU: h [rows, 2D] -> out [rows, D], out = h[:, :D] * gelu(h[:, D:]) (exact, erf-based GELU), in float32.
template <typename T>
__global__ void geglu_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t rows, int64_t D) {
  const int64_t n = rows * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, j = i % D;
    const float a = to_f(h[r * 2 * D + j]), b = to_f(h[r * 2 * D + D + j]);
    out[i] = from_f<T>(a * (0.5f * b * (1.f + erff(b * 0.70710678118654752f))));
  }
}

template <typename T, bool kNhwc>
int launch_group_norm(const T* x, T* y, const T* gamma, const T* beta, int64_t N, int64_t C, int64_t HW, int64_t G,
                      float eps, bool silu, cudaStream_t stream) {
  // The widest vector (<= 16 bytes) that divides the contiguous run and keeps every access aligned.
  const int64_t run = kNhwc ? C / G : HW, stride = kNhwc ? C : HW;
  int W = 16 / static_cast<int>(sizeof(T));
  auto aligned = [&](int w) {
    const auto bytes = static_cast<uintptr_t>(w * sizeof(T));
    return run % w == 0 && stride % w == 0 && reinterpret_cast<uintptr_t>(x) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(y) % bytes == 0;
  };
  while (W > 1 && !aligned(W)) W /= 2;
  const dim3 grid(static_cast<unsigned>(N * G));
  switch (W) {
#define DP_GN_LAUNCH(w)                                                                                     \
  case w:                                                                                                  \
    group_norm_kernel<T, w, kNhwc><<<grid, kThreads, 0, stream>>>(x, y, gamma, beta, C, HW, G, eps, silu); \
    break;
    DP_GN_LAUNCH(1)
    DP_GN_LAUNCH(2)
    DP_GN_LAUNCH(4)
#undef DP_GN_LAUNCH
    default:  // 16 / sizeof(T) == 8 only for 2-byte types; float stops at 4 above
      group_norm_kernel<T, 16 / sizeof(T), kNhwc><<<grid, kThreads, 0, stream>>>(x, y, gamma, beta, C, HW, G, eps,
                                                                                silu);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_group_norm(const void* x, void* y, const void* gamma, const void* beta, int64_t N, int64_t C, int64_t HW,
                      int64_t G, float eps, bool silu, bool nhwc, cudaStream_t stream) {
  auto xs = static_cast<const T*>(x);
  auto ys = static_cast<T*>(y);
  auto gs = static_cast<const T*>(gamma);
  auto bs = static_cast<const T*>(beta);
  return nhwc ? launch_group_norm<T, true>(xs, ys, gs, bs, N, C, HW, G, eps, silu, stream)
              : launch_group_norm<T, false>(xs, ys, gs, bs, N, C, HW, G, eps, silu, stream);
}

template <typename T>
int launch_geglu(const void* h, void* out, int64_t rows, int64_t D, cudaStream_t stream) {
  const int64_t n = rows * D;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
  geglu_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(h), static_cast<T*>(out), rows, D);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int group_norm(DType t, const void* x, void* y, const void* gamma, const void* beta, int64_t N, int64_t C,
               int64_t HW, int64_t G, float eps, bool silu, bool nhwc, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case DType::F32: return launch_group_norm<float>(x, y, gamma, beta, N, C, HW, G, eps, silu, nhwc, s);
    case DType::F16: return launch_group_norm<__half>(x, y, gamma, beta, N, C, HW, G, eps, silu, nhwc, s);
    case DType::BF16: return launch_group_norm<__nv_bfloat16>(x, y, gamma, beta, N, C, HW, G, eps, silu, nhwc, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int geglu(DType t, const void* h, void* out, int64_t rows, int64_t D, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case DType::F32: return launch_geglu<float>(h, out, rows, D, s);
    case DType::F16: return launch_geglu<__half>(h, out, rows, D, s);
    case DType::BF16: return launch_geglu<__nv_bfloat16>(h, out, rows, D, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace diffpipe::fused
