// CUDA-only paths of the models: graph replay and fused kernels. Include only from stages/src.
//
// CUDA graph replay of a model's forward, one captured graph per input shape.
// A UNet call at small batch on a fast GPU is bound by the host: ~1,000 kernel launches at a few microseconds
// each take longer than the kernels themselves. A captured graph launches them all at once. GraphCache::run
// computes fn(inputs) eagerly the first time it sees an input-shape key (that call also warms up cuDNN and
// cuBLAS for the shape), captures fn into a graph on the second, and replays the graph from then on: the
// inputs are copied into the graph's static buffers, the graph is replayed on the caller's stream and its
// output is cloned out before the next replay. Graphs of one cache share one memory pool (their replays are
// serialised by the cache's lock and every output is cloned before the next replay, so one graph's
// intermediates never overwrite a live result). Capture uses thread-local mode, so other threads (other
// stages of the same process) may keep allocating and launching meanwhile. A capture that fails (an operation
// a graph cannot hold) leaves that key eager for good, with one warning. CPU inputs, builds without CUDA, and
// DIFFPIPE_CUDA_GRAPHS=0 always run fn eagerly. The result is the same function of the inputs either way:
// the graph replays the very kernels that the eager call launches.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <vector>

namespace diffpipe::nn {

// On by default; DIFFPIPE_CUDA_GRAPHS=0 turns it off (read once). set_cuda_graphs overrides it (tests).
bool cuda_graphs_enabled();
void set_cuda_graphs(bool on);

class GraphCache {
 public:
  using Fn = std::function<at::Tensor(const std::vector<at::Tensor>&)>;
  explicit GraphCache(const char* what, size_t max_graphs = 12);
  ~GraphCache();
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;
  // fn(inputs), eagerly or by replay (see above). Undefined tensors among inputs are allowed (passed through).
  at::Tensor run(const std::vector<at::Tensor>& inputs, const Fn& fn);
  size_t graphs() const;  // graphs captured so far (tests)

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Fused kernels (fused_kernels.cu) for memory-bound steps ATen runs as several passes. On by default on CUDA;
// DIFFPIPE_FUSED_KERNELS=0 turns them off (read once); set_fused_kernels overrides it (tests).
bool fused_kernels_enabled();
void set_fused_kernels(bool on);
// The GroupNorm kernels on channels-last tensors (where ATen's CUDA GroupNorm copies to NCHW and back, and SiLU
// and the time embedding's addition are passes of their own): on by default (H200, batch 16: UNet call 48.7 ->
// 38.2 ms, VAE decode of 8 latents 121.6 -> 60.1 ms); DIFFPIPE_FUSED_NHWC=0 turns them off (read once);
// set_fused_nhwc overrides it (tests).
bool fused_nhwc_enabled();
void set_fused_nhwc(bool on);
// silu(group_norm(x + add)) (or group_norm(x + add) when !silu; add: optional, N x C values broadcast over the
// positions) in fused kernels, when x is a CUDA tensor, NCHW-contiguous without an addend (or channels-last, when
// fused_nhwc_enabled()), of a size the kernels serve well; otherwise an undefined tensor (the caller runs ATen's).
// The result has x's memory format.
at::Tensor fused_group_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                            double eps, bool silu, const at::Tensor& add = at::Tensor());
// a * gelu(b) for [a | b] = h.chunk(2, -1), in one kernel, when h is a contiguous CUDA tensor; else undefined.
at::Tensor fused_geglu(const at::Tensor& h);

// Rearrangements of the UNet's arithmetic that save passes over the activations on a GPU. Each is a mode: 0 off,
// 1 where it pays (the default), 2 on every device (tests: the rearranged arithmetic checked on the CPU too).
//
// Convolution biases folded into the next fused pass: cuDNN convolutions leave the bias to an elementwise pass of
// its own in ATen (read and write the whole activation), so a ResNet block runs conv1 without bias and adds the bias
// to norm2's addend (the time embedding, added inside the GroupNorm kernels), and conv2 without bias, its bias
// added in the residual's pass (add_bias_residual). Mode 1: CUDA activations in channels-last with the fused
// GroupNorm kernels on. DIFFPIPE_FOLD_BIAS=0 turns it off (read once).
bool fold_conv_bias(const at::Tensor& x);
void set_fold_conv_bias(int mode);
// Self-attention's q, k and v projections as one matrix product on the concatenated weights (one launch, a wider
// product), the three layers' weights views of the fused one. Mode 1: weights on CUDA. DIFFPIPE_FUSED_QKV=0 off.
bool fuse_qkv(const at::Tensor& weight);
void set_fuse_qkv(int mode);
// (r + (x + bias)) / div, bias [C] broadcast over x's channels (dim 1 of a 4-D x, else the last): one kernel on CUDA
// for channels-last 4-D (or contiguous) tensors when DIFFPIPE_FUSED_RESIDUAL=1 (off by default until measured on a
// GPU; set_fused_residual overrides it), else ATen's two passes.
at::Tensor add_bias_residual(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& r, double div = 1.0);
void set_fused_residual(bool on);
// The kernel alone: undefined where it does not apply (or is off).
at::Tensor fused_bias_residual(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& r, double div);
// r + linear(x, weight, bias) as one cuBLASLt product whose epilogue adds the bias and r (beta = 1): the residual
// stream's addition without a pass of its own. 16-bit CUDA tensors, x and r contiguous (r: x's rows by weight's
// rows, any shape of that size), under the same switch (DIFFPIPE_FUSED_RESIDUAL=1); else undefined. Result [rows, out].
at::Tensor fused_linear_residual(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& r);

// Waits for the work queued on the calling thread's current stream of that GPU (not the whole device: another
// thread's graph capture must not be disturbed). No-op without CUDA.
void sync_current_stream(const at::Device& device);

}  // namespace diffpipe::nn
