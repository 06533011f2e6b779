// Fused CUDA kernels for the UNet's memory-bound steps (see fused_kernels.h). Plain CUDA: no LibTorch headers,
// so nvcc stays fast; stages/src/cuda_ops.cpp wraps them for ATen tensors.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
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

// NCHW: one block per (sample, group), whose M = (C / G) * HW elements are one contiguous run. Loads and stores
// move W elements at once (W divides HW, so a vector never leaves its channel). Two-pass statistics in float32
// (mean, then the mean squared deviation: no cancellation), then the normalised, affine and optionally
// SiLU-activated output, written once. The group's data (<= 256 KB) stays in L2 between the three passes.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                              const T* __restrict__ gamma, const T* __restrict__ beta,
                                                              int64_t C, int64_t HW, int64_t G, float eps, bool silu) {
  const int64_t ng = blockIdx.x, g = ng % G, cpg = C / G, M = cpg * HW;
  const T* xp = x + ng * M;
  T* yp = y + ng * M;
  using P = Pack<T, W>;
  float s = 0.f;
  for (int64_t i = threadIdx.x * W; i < M; i += kThreads * W) {
    const P a = *reinterpret_cast<const P*>(xp + i);
#pragma unroll
    for (int k = 0; k < W; ++k) s += to_f(a.v[k]);
  }
  const float mean = block_sum(s) / static_cast<float>(M);
  float q = 0.f;
  for (int64_t i = threadIdx.x * W; i < M; i += kThreads * W) {
    const P a = *reinterpret_cast<const P*>(xp + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float d = to_f(a.v[k]) - mean;
      q += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(q) / static_cast<float>(M) + eps);
  for (int64_t i = threadIdx.x * W; i < M; i += kThreads * W) {
    const int64_t c = g * cpg + i / HW;
    const float a_c = rstd * to_f(gamma[c]), b_c = to_f(beta[c]) - mean * a_c;
    const P a = *reinterpret_cast<const P*>(xp + i);
    P b;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      float v = to_f(a.v[k]) * a_c + b_c;
      if (silu) v = v / (1.f + expf(-v));
      b.v[k] = from_f<T>(v);
    }
    *reinterpret_cast<P*>(yp + i) = b;
  }
}

// NHWC (channels-last), in three coalesced passes instead of a block per group (a group is C / G channels of
// every position: with 320 channels and 32 groups, 20-byte runs 640 bytes apart).
// 1. Statistics: block (split s, sample n) reads positions [s * rows, (s + 1) * rows) of its sample, whole rows of C
//    channels, each thread W adjacent channels of every `rpi`-th position; Welford per channel in float32 (no
//    cancellation however large the mean), merged across the block's threads (Chan's formula) into a partial
//    (mean, M2) per (n, s, channel).
// 2. Finalise: block (n, g) merges its group's partials (splits x channels) into mean and 1/std, and writes each
//    channel's scale and shift: y = x * a + b, a = gamma / std, b = beta + (add - mean) * a.
// 3. Apply: every element once, 16-byte vectors, y = x * a[n, c] + b[n, c], SiLU when asked.
// `add` (optional, [N, C]) is added to x before the normalisation, as if x + add had been written first (the
// ResNet block's time embedding): one pass over the activation fewer.
__device__ __forceinline__ void chan_merge(float& n, float& m, float& q, float nb, float mb, float qb) {
  if (nb == 0.f) return;
  const float nn = n + nb, d = mb - m;
  m += d * (nb / nn);
  q += qb + d * d * (n * nb / nn);
  n = nn;
}

template <typename T, int W>
__global__ void gn_nhwc_stats(const T* __restrict__ x, const T* __restrict__ add, float* __restrict__ part,
                              int64_t C, int64_t HW, int64_t rows, int rpi) {
  extern __shared__ float sh[];  // mean [rpi][C], M2 [rpi][C], count [rpi]
  const int64_t s = blockIdx.x, n = blockIdx.y, S = gridDim.x;
  const int lanes = static_cast<int>(C / W), v = threadIdx.x % lanes, rr = threadIdx.x / lanes;
  const int64_t r0 = s * rows, r1 = r0 + rows < HW ? r0 + rows : HW;
  float addv[W], mean[W], m2[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    addv[k] = add ? to_f(add[n * C + v * W + k]) : 0.f;
    mean[k] = 0.f;
    m2[k] = 0.f;
  }
  float cnt = 0.f;
  using P = Pack<T, W>;
  const T* xp = x + n * HW * C + v * W;
  for (int64_t r = r0 + rr; r < r1; r += rpi) {
    const P a = *reinterpret_cast<const P*>(xp + r * C);
    cnt += 1.f;
    const float inv = 1.f / cnt;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float val = to_f(a.v[k]) + addv[k], d = val - mean[k];
      mean[k] += d * inv;
      m2[k] += d * (val - mean[k]);
    }
  }
  float* sh_mean = sh;
  float* sh_m2 = sh + rpi * C;
  float* sh_cnt = sh + 2 * rpi * C;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    sh_mean[rr * C + v * W + k] = mean[k];
    sh_m2[rr * C + v * W + k] = m2[k];
  }
  if (v == 0) sh_cnt[rr] = cnt;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float nn = 0.f, m = 0.f, q = 0.f;
    for (int j = 0; j < rpi; ++j) chan_merge(nn, m, q, sh_cnt[j], sh_mean[j * C + c], sh_m2[j * C + c]);
    float* o = part + ((n * S + s) * C + c) * 2;
    o[0] = m;
    o[1] = q;
  }
}

constexpr int kFinalThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kFinalThreads) gn_nhwc_finalize(const float* __restrict__ part,
                                                                  const T* __restrict__ gamma,
                                                                  const T* __restrict__ beta, const T* __restrict__ add,
                                                                  float* __restrict__ ab, int64_t C, int64_t HW,
                                                                  int64_t G, int64_t S, int64_t rows, float eps) {
  __shared__ float sn[kFinalThreads], sm[kFinalThreads], sq[kFinalThreads];
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G, cpg = C / G;
  float nn = 0.f, m = 0.f, q = 0.f;
  for (int64_t j = threadIdx.x; j < S * cpg; j += kFinalThreads) {
    const int64_t s = j / cpg, c = g * cpg + j % cpg;
    const int64_t r0 = s * rows, r1 = r0 + rows < HW ? r0 + rows : HW;
    const float* p = part + ((n * S + s) * C + c) * 2;
    chan_merge(nn, m, q, static_cast<float>(r1 - r0), p[0], p[1]);
  }
  sn[threadIdx.x] = nn;
  sm[threadIdx.x] = m;
  sq[threadIdx.x] = q;
  __syncthreads();
  for (int h = kFinalThreads / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) {
      float a = sn[threadIdx.x], b = sm[threadIdx.x], d = sq[threadIdx.x];
      chan_merge(a, b, d, sn[threadIdx.x + h], sm[threadIdx.x + h], sq[threadIdx.x + h]);
      sn[threadIdx.x] = a;
      sm[threadIdx.x] = b;
      sq[threadIdx.x] = d;
    }
    __syncthreads();
  }
  const float mean = sm[0], rstd = rsqrtf(sq[0] / sn[0] + eps);
  for (int64_t k = threadIdx.x; k < cpg; k += kFinalThreads) {
    const int64_t c = g * cpg + k;
    const float a = rstd * to_f(gamma[c]);
    const float shift = (add ? to_f(add[n * C + c]) : 0.f) - mean;
    ab[(n * C + c) * 2] = a;
    ab[(n * C + c) * 2 + 1] = to_f(beta[c]) + shift * a;
  }
}

template <typename T, int W>
__global__ void gn_nhwc_apply(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ ab, int64_t C,
                              int64_t HWC, int64_t vectors, bool silu) {
  using P = Pack<T, W>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vectors; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * W, n = e / HWC, c = e % C;
    const float2* f = reinterpret_cast<const float2*>(ab) + n * C + c;
    const P a = *reinterpret_cast<const P*>(x + e);
    P b;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float2 s = f[k];
      float v = to_f(a.v[k]) * s.x + s.y;
      if (silu) v = v / (1.f + expf(-v));
      b.v[k] = from_f<T>(v);
    }
    *reinterpret_cast<P*>(y + e) = b;
  }
}

// GEGLU: h [rows, 2D] -> out [rows, D], out = h[:, :D] * gelu(h[:, D:]) (exact, erf-based GELU), in float32.
// W output elements a thread (16-byte vectors where D allows): one index division per vector, not per element.
template <typename T, int W>
__global__ void geglu_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t rows, int64_t D) {
  using P = Pack<T, W>;
  const int64_t per_row = D / W, n = rows * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, j = (i - r * per_row) * W;
    const P a = *reinterpret_cast<const P*>(h + r * 2 * D + j);
    const P b = *reinterpret_cast<const P*>(h + r * 2 * D + D + j);
    P o;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float x = to_f(a.v[k]), g = to_f(b.v[k]);
      o.v[k] = from_f<T>(x * (0.5f * g * (1.f + erff(g * 0.70710678118654752f))));
    }
    *reinterpret_cast<P*>(out + r * D + j) = o;
  }
}

// y = (x + bias[c] + r) / div over positions of C channels each (C innermost: channels-last activations), in
// float32: a convolution's bias (cuDNN's convolutions leave it to a pass of its own in ATen) and the ResNet block's
// residual in one pass.
template <typename T, int W>
__global__ void bias_residual_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ r,
                                     T* __restrict__ y, int64_t C, int64_t vectors, float div) {
  using P = Pack<T, W>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vectors; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * W, c = e % C;
    const P a = *reinterpret_cast<const P*>(x + e);
    const P b = *reinterpret_cast<const P*>(r + e);
    const P k = *reinterpret_cast<const P*>(bias + c);
    P o;
#pragma unroll
    for (int j = 0; j < W; ++j) o.v[j] = from_f<T>((to_f(a.v[j]) + to_f(k.v[j]) + to_f(b.v[j])) / div);
    *reinterpret_cast<P*>(y + e) = o;
  }
}

// The current GPU's multiprocessor count (grid sizes: a few waves, then grid-stride loops), read once per device.
int sm_count() {
  constexpr int kDevices = 64;
  static std::atomic<int> counts[kDevices];  // 0: not read yet (threads may race to read it: the same value)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) return 132;
  int c = counts[dev].load(std::memory_order_relaxed);
  if (c == 0) {
    int n = 0;
    c = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && n > 0 ? n : 132;
    counts[dev].store(c, std::memory_order_relaxed);
  }
  return c;
}

// Blocks of `threads` for n grid-stride items: enough for all of them, at most `waves` blocks per multiprocessor.
unsigned capped_grid(int64_t n, int threads, int waves) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, int64_t(sm_count()) * waves));
}

// The widest vector width (elements of T, <= 16 bytes) that divides `run` with both pointers aligned to it: a
// vector never leaves its run and every access is aligned.
template <typename T>
int vector_width(int64_t run, const void* a, const void* b) {
  int W = 16 / static_cast<int>(sizeof(T));
  auto ok = [&](int w) {
    const auto bytes = static_cast<uintptr_t>(w * sizeof(T));
    return run % w == 0 && reinterpret_cast<uintptr_t>(a) % bytes == 0 && reinterpret_cast<uintptr_t>(b) % bytes == 0;
  };
  while (W > 1 && !ok(W)) W /= 2;
  return W;
}

template <typename T>
int launch_group_norm_nchw(const T* x, T* y, const T* gamma, const T* beta, int64_t N, int64_t C, int64_t HW,
                           int64_t G, float eps, bool silu, cudaStream_t stream) {
  const int W = vector_width<T>(HW, x, y);  // along a channel's positions
  const dim3 grid(static_cast<unsigned>(N * G));
  switch (W) {
#define DP_GN_LAUNCH(w)                                                                                   \
  case w:                                                                                                \
    group_norm_kernel<T, w><<<grid, kThreads, 0, stream>>>(x, y, gamma, beta, C, HW, G, eps, silu);       \
    break;
    DP_GN_LAUNCH(1)
    DP_GN_LAUNCH(2)
    DP_GN_LAUNCH(4)
#undef DP_GN_LAUNCH
    default:  // 16 / sizeof(T) == 8 only for 2-byte types; float stops at 4 above
      group_norm_kernel<T, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(x, y, gamma, beta, C, HW, G, eps, silu);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_group_norm_nhwc(const T* x, T* y, const T* gamma, const T* beta, const T* add, float* work, int64_t N,
                           int64_t C, int64_t HW, int64_t G, float eps, bool silu, cudaStream_t stream) {
  const NhwcPlan p = group_norm_nhwc_plan(C, HW, N, static_cast<int>(sizeof(T)));
  if (p.splits == 0) return static_cast<int>(cudaErrorInvalidValue);
  const int W = vector_width<T>(C, x, y);  // along a position's channels
  if (W != p.width) return static_cast<int>(cudaErrorMisalignedAddress);  // the caller planned for aligned tensors
  float* part = work;
  float* ab = work + N * p.splits * C * 2;
  const dim3 sgrid(static_cast<unsigned>(p.splits), static_cast<unsigned>(N));
  const int threads = static_cast<int>(C / W) * p.rpi;
  const size_t shm = (2 * static_cast<size_t>(p.rpi) * C + p.rpi) * sizeof(float);
  switch (W) {
#define DP_GN_STATS(w)                                                                                      \
  case w:                                                                                                  \
    gn_nhwc_stats<T, w><<<sgrid, threads, shm, stream>>>(x, add, part, C, HW, p.rows, p.rpi);             \
    break;
    DP_GN_STATS(1)
    DP_GN_STATS(2)
    DP_GN_STATS(4)
#undef DP_GN_STATS
    default:
      gn_nhwc_stats<T, 16 / sizeof(T)><<<sgrid, threads, shm, stream>>>(x, add, part, C, HW, p.rows, p.rpi);
  }
  gn_nhwc_finalize<T><<<static_cast<unsigned>(N * G), kFinalThreads, 0, stream>>>(part, gamma, beta, add, ab, C, HW, G,
                                                                                  p.splits, p.rows, eps);
  const int64_t vectors = N * HW * C / W;
  const int at = 256;
  const unsigned blocks = capped_grid(vectors, at, 16);  // grid-stride beyond a few waves
  switch (W) {
#define DP_GN_APPLY(w)                                                                                                 \
  case w:                                                                                                             \
    gn_nhwc_apply<T, w><<<blocks, at, 0, stream>>>(x, y, ab, C, HW * C, vectors, silu);                              \
    break;
    DP_GN_APPLY(1)
    DP_GN_APPLY(2)
    DP_GN_APPLY(4)
#undef DP_GN_APPLY
    default:
      gn_nhwc_apply<T, 16 / sizeof(T)><<<blocks, at, 0, stream>>>(x, y, ab, C, HW * C, vectors, silu);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_group_norm(const void* x, void* y, const void* gamma, const void* beta, const void* add, float* work,
                      int64_t N, int64_t C, int64_t HW, int64_t G, float eps, bool silu, bool nhwc,
                      cudaStream_t stream) {
  auto xs = static_cast<const T*>(x);
  auto ys = static_cast<T*>(y);
  auto gs = static_cast<const T*>(gamma);
  auto bs = static_cast<const T*>(beta);
  if (nhwc)
    return launch_group_norm_nhwc<T>(xs, ys, gs, bs, static_cast<const T*>(add), work, N, C, HW, G, eps, silu, stream);
  if (add) return static_cast<int>(cudaErrorInvalidValue);  // the NCHW kernel takes no addend
  return launch_group_norm_nchw<T>(xs, ys, gs, bs, N, C, HW, G, eps, silu, stream);
}

template <typename T>
int launch_geglu(const void* h, void* out, int64_t rows, int64_t D, cudaStream_t stream) {
  const int W = vector_width<T>(D, h, out);  // along a row's D outputs (and each half of its input)
  const int64_t n = rows * D / W;
  const int threads = 256;
  const unsigned grid = capped_grid(n, threads, 32);
  auto hs = static_cast<const T*>(h);
  auto os = static_cast<T*>(out);
  switch (W) {
    case 1: geglu_kernel<T, 1><<<grid, threads, 0, stream>>>(hs, os, rows, D); break;
    case 2: geglu_kernel<T, 2><<<grid, threads, 0, stream>>>(hs, os, rows, D); break;
    case 4: geglu_kernel<T, 4><<<grid, threads, 0, stream>>>(hs, os, rows, D); break;
    default: geglu_kernel<T, 16 / sizeof(T)><<<grid, threads, 0, stream>>>(hs, os, rows, D);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bias_residual(const void* x, const void* bias, const void* r, void* y, int64_t positions, int64_t C,
                         float div, cudaStream_t stream) {
  const int W = std::min(vector_width<T>(C, x, y), vector_width<T>(C, r, bias));  // along a position's channels
  const int64_t n = positions * C / W;
  const int threads = 256;
  const unsigned grid = capped_grid(n, threads, 32);
  auto xs = static_cast<const T*>(x);
  auto bs = static_cast<const T*>(bias);
  auto rs = static_cast<const T*>(r);
  auto ys = static_cast<T*>(y);
  switch (W) {
    case 1: bias_residual_kernel<T, 1><<<grid, threads, 0, stream>>>(xs, bs, rs, ys, C, n, div); break;
    case 2: bias_residual_kernel<T, 2><<<grid, threads, 0, stream>>>(xs, bs, rs, ys, C, n, div); break;
    case 4: bias_residual_kernel<T, 4><<<grid, threads, 0, stream>>>(xs, bs, rs, ys, C, n, div); break;
    default: bias_residual_kernel<T, 16 / sizeof(T)><<<grid, threads, 0, stream>>>(xs, bs, rs, ys, C, n, div);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int group_norm(DType t, const void* x, void* y, const void* gamma, const void* beta, const void* add, float* work,
               int64_t N, int64_t C, int64_t HW, int64_t G, float eps, bool silu, bool nhwc, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case DType::F32: return launch_group_norm<float>(x, y, gamma, beta, add, work, N, C, HW, G, eps, silu, nhwc, s);
    case DType::F16: return launch_group_norm<__half>(x, y, gamma, beta, add, work, N, C, HW, G, eps, silu, nhwc, s);
    case DType::BF16:
      return launch_group_norm<__nv_bfloat16>(x, y, gamma, beta, add, work, N, C, HW, G, eps, silu, nhwc, s);
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

int bias_residual(DType t, const void* x, const void* bias, const void* r, void* y, int64_t positions, int64_t C,
                  float div, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case DType::F32: return launch_bias_residual<float>(x, bias, r, y, positions, C, div, s);
    case DType::F16: return launch_bias_residual<__half>(x, bias, r, y, positions, C, div, s);
    case DType::BF16: return launch_bias_residual<__nv_bfloat16>(x, bias, r, y, positions, C, div, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace diffpipe::fused
