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

// 16-byte vectors of T: V elements each.
template <typename T>
struct Vec {
  static constexpr int V = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[V];
  };
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

// One block per (sample, group). Its M = (C / G) * HW elements are contiguous in NCHW. Two-pass statistics in
// float32 (mean, then the mean squared deviation: no cancellation), then the normalised, affine and optionally
// SiLU-activated output, written once. The group's data (<= 256 KB) stays in L2 between the three passes.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                              const T* __restrict__ gamma, const T* __restrict__ beta,
                                                              int64_t C, int64_t HW, int64_t G, float eps, bool silu) {
  const int64_t ng = blockIdx.x, g = ng % G, cpg = C / G, M = cpg * HW;
  const T* xp = x + ng * M;
  T* yp = y + ng * M;
  constexpr int V = Vec<T>::V;
  float s = 0.f;
  if (kVec) {
    for (int64_t i = threadIdx.x * V; i < M; i += kThreads * V) {
      Vec<T> a;
      a.raw = *reinterpret_cast<const uint4*>(xp + i);
#pragma unroll
      for (int k = 0; k < V; ++k) s += to_f(a.v[k]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < M; i += kThreads) s += to_f(xp[i]);
  }
  const float mean = block_sum(s) / static_cast<float>(M);
  float q = 0.f;
  if (kVec) {
    for (int64_t i = threadIdx.x * V; i < M; i += kThreads * V) {
      Vec<T> a;
      a.raw = *reinterpret_cast<const uint4*>(xp + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = to_f(a.v[k]) - mean;
        q += d * d;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < M; i += kThreads) {
      const float d = to_f(xp[i]) - mean;
      q += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(q) / static_cast<float>(M) + eps);
  auto out = [&](float v, int64_t i) {
    const int64_t c = g * cpg + i / HW;
    v = (v - mean) * rstd * to_f(gamma[c]) + to_f(beta[c]);
    if (silu) v = v / (1.f + expf(-v));
    return v;
  };
  if (kVec) {  // HW % V == 0, so a vector never straddles two channels
    for (int64_t i = threadIdx.x * V; i < M; i += kThreads * V) {
      Vec<T> a, b;
      a.raw = *reinterpret_cast<const uint4*>(xp + i);
#pragma unroll
      for (int k = 0; k < V; ++k) b.v[k] = from_f<T>(out(to_f(a.v[k]), i + k));
      *reinterpret_cast<uint4*>(yp + i) = b.raw;
    }
  } else {
    for (int64_t i = threadIdx.x; i < M; i += kThreads) yp[i] = from_f<T>(out(to_f(xp[i]), i));
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

template <typename T>
int launch_group_norm(const void* x, void* y, const void* gamma, const void* beta, int64_t N, int64_t C, int64_t HW,
                      int64_t G, float eps, bool silu, cudaStream_t stream) {
  const int64_t M = (C / G) * HW;
  constexpr int V = Vec<T>::V;
  const bool vec = HW % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
                   (M * int64_t(sizeof(T))) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(N * G));
  if (vec)
    group_norm_kernel<T, true><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                              static_cast<const T*>(gamma),
                                                              static_cast<const T*>(beta), C, HW, G, eps, silu);
  else
    group_norm_kernel<T, false><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                               static_cast<const T*>(gamma),
                                                               static_cast<const T*>(beta), C, HW, G, eps, silu);
  return static_cast<int>(cudaGetLastError());
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
               int64_t HW, int64_t G, float eps, bool silu, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case DType::F32: return launch_group_norm<float>(x, y, gamma, beta, N, C, HW, G, eps, silu, s);
    case DType::F16: return launch_group_norm<__half>(x, y, gamma, beta, N, C, HW, G, eps, silu, s);
    case DType::BF16: return launch_group_norm<__nv_bfloat16>(x, y, gamma, beta, N, C, HW, G, eps, silu, s);
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
