// Private building blocks for the model code: parameter holders with diffusers names, loaded (and shape
// checked) at construction, applied with ATen functional ops. Include only from stages/src.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "diffpipe/stages/weights.h"

namespace diffpipe::nn {

// Batch-invariant execution: LibTorch's CPU kernels pick blockings and code paths from the whole tensor's shape
// (convolutions, matrix products whose row count includes the batch, even where an elementwise op's thread
// chunks end), and which ones depend on the CPU's instruction set, so a sample's result can change (by ~1e-7
// to 1e-5) with its batch neighbours. When enabled, every model's forward runs sample by sample: each op then
// sees the same shapes whatever the batch, on any CPU, so a request's output does not depend on the batch it
// shares. Set once at model load from DeviceSpec::batch_invariant (CPU only; off by default).
void set_batch_invariant(bool on);
bool batch_invariant();

// Memory layout: on the CPU, oneDNN's bfloat16 (AMX) convolutions work in channels-last; given NCHW they
// transpose every input and output, which costs 2-4x the convolution itself (float32 kernels do not gain). So
// models whose weights are bfloat16 on the CPU keep their activations channels-last: the conv weights are
// stored so at load, the model's forward converts its input once and returns NCHW. Every block below accepts
// either layout and keeps its input's.
// On a GPU, 16-bit models run channels-last too: cuDNN's NHWC convolutions gave 102 instead of 87 denoising
// steps/s at batch 1 on an H100 and the same images/s at batch 8 (docs/results.md), although GroupNorm (ATen's or
// the fused kernel) then takes an NCHW copy. DIFFPIPE_CHANNELS_LAST=0 keeps them NCHW (read once).
bool cuda_channels_last();
inline bool prefers_channels_last(const at::Tensor& weight) {
  if (weight.device().is_cpu()) return weight.scalar_type() == at::kBFloat16;
  return weight.is_cuda() && weight.scalar_type() != at::kFloat && cuda_channels_last();
}
// A model's input in the layout its first convolution's weights call for (see above).
inline at::Tensor in_layout_of(const at::Tensor& first_conv_weight, const at::Tensor& x) {
  return prefers_channels_last(first_conv_weight) ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

// Per-request LoRA adapters (weights.h's LoraBranch): the row scales of the forward pass running on this thread,
// one entry per adapter of the run: [B] float32 on the model's device (the scale of each row's request, 0 where
// it did not choose the adapter), or undefined where no row did. Layers with branches add theirs for these rows.
struct AdapterRows {
  std::vector<at::Tensor> scales;
  // IP-Adapter: each row's image embedding [rows, E] and scale [rows] (0: no image prompt); ip_tokens [rows, T, D],
  // the UNet's projection of the embeddings, set by the UNet for its cross-attentions
  at::Tensor ip_embeds, ip_scales, ip_tokens;
  AdapterRows row(int64_t i) const;  // the same for row i alone (a batch of one)
};
const AdapterRows* active_adapter_rows();  // nullptr: no adapter in this pass
// Sets the rows for the scope's lifetime (nullptr: none), restoring the previous ones after.
class AdapterScope {
 public:
  explicit AdapterScope(const AdapterRows* rows);
  ~AdapterScope();
  AdapterScope(const AdapterScope&) = delete;
  AdapterScope& operator=(const AdapterScope&) = delete;

 private:
  const AdapterRows* prev_;
};

// f() on row i of the batch alone: the adapter rows in force (if any) narrowed to that row for the call. Every
// sample-by-sample loop over a model's batch goes through this (or per_sample).
template <typename F>
decltype(auto) at_row(int64_t i, F&& f) {
  const AdapterRows* rows = active_adapter_rows();
  if (!rows) return f();
  const AdapterRows one = rows->row(i);
  AdapterScope scope(&one);
  return f();
}

// f(i) -> sample i's result with a leading batch dimension of 1 (run through at_row); the results concatenated
// along dim 0.
template <typename F>
at::Tensor per_sample(int64_t batch, F&& f) {
  std::vector<at::Tensor> outs;
  outs.reserve(batch);
  for (int64_t i = 0; i < batch; ++i) outs.push_back(at_row(i, [&] { return f(i); }));
  return at::cat(outs);
}

// A layer's branches in its weight's dtype and device: linear ones [r, in] / [out, r]; for a convolution `conv_k`
// > 0, down [r, in, k, k] and up [out, r, 1, 1] (as the layer's stride and padding apply to down).
std::vector<LoraBranch> layer_branches(const Weights& w, const std::string& key, const at::Tensor& weight, int64_t conv_k);
// y + the branches of the active adapter rows applied to x (x [B, ...] rows first; conv: [B, C, H, W]).
at::Tensor add_branches(const at::Tensor& y, const at::Tensor& x, const std::vector<LoraBranch>& branches,
                        int64_t stride = 1, int64_t padding = 0);
// The same for a pointwise convolution's rows (Conv2d::pointwise_rows): x [B, C, H, W], y [B*H*W, out].
at::Tensor add_branches_rows(const at::Tensor& y, const at::Tensor& x, const std::vector<LoraBranch>& branches);

// r + linear(x, weight, bias), r of x's rows by weight's rows: on CUDA the addition can happen in the product's
// epilogue (cuda_ops.h's fused_linear_residual); r's shape is kept.
at::Tensor linear_plus(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& r);

struct Linear {
  at::Tensor weight, bias;  // weight: [out, in]
  std::vector<LoraBranch> lora;  // per-request adapters' branches (none: the plain layer)
  Linear() = default;
  Linear(const Weights& w, const std::string& name, int64_t in, int64_t out, bool has_bias = true) {
    weight = w.get(name + ".weight", {out, in});
    if (has_bias) bias = w.get(name + ".bias", {out});
    lora = layer_branches(w, name + ".weight", weight, 0);
  }
  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y = at::linear(x, weight, bias);
    return lora.empty() ? y : add_branches(y, x, lora);
  }
  // r + this(x): the residual stream's addition (see linear_plus)
  at::Tensor plus(const at::Tensor& x, const at::Tensor& r) const {
    return lora.empty() ? linear_plus(x, weight, bias, r) : r + (*this)(x).reshape(r.sizes());
  }
};

struct Conv2d {
  at::Tensor weight, bias;  // weight: [out, in, k, k]
  int64_t stride = 1, padding = 0;
  Conv2d() = default;
  Conv2d(const Weights& w, const std::string& name, int64_t in, int64_t out, int64_t k, int64_t stride_ = 1,
         int64_t padding_ = 0)
      : stride(stride_), padding(padding_) {
    weight = w.get(name + ".weight", {out, in, k, k});
    bias = w.get(name + ".bias", {out});
    if (k > 1 && prefers_channels_last(weight)) weight = weight.contiguous(at::MemoryFormat::ChannelsLast);
    lora = layer_branches(w, name + ".weight", weight, is_pointwise() ? 0 : k);
  }
  std::vector<LoraBranch> lora;  // per-request adapters' branches (pointwise: linear ones)
  bool is_pointwise() const { return weight.size(2) == 1 && weight.size(3) == 1 && stride == 1 && padding == 0; }
  // A 1x1 convolution of x [B, C, H, W] as rows [B*H*W, out] (pixel-major). The product runs on a contiguous 2-D
  // matrix: LibTorch's linear on a permuted 4-D view takes a generic batched path, ~30x slower in bfloat16.
  at::Tensor pointwise_rows(const at::Tensor& x, bool with_bias = true) const {
    at::Tensor y = at::linear(x.permute({0, 2, 3, 1}).reshape({-1, x.size(1)}), weight.flatten(1),
                              with_bias ? bias : at::Tensor());
    return lora.empty() ? y : add_branches_rows(y, x, lora);
  }
  at::Tensor operator()(const at::Tensor& x) const { return apply(x, true); }
  // The convolution without its bias: the caller adds it in a pass it runs anyway (cuda_ops.h's fold_conv_bias).
  at::Tensor without_bias(const at::Tensor& x) const { return apply(x, false); }
  at::Tensor apply(const at::Tensor& x, bool with_bias) const {
    if (is_pointwise()) {
      // 1x1: a matrix product over channels. LibTorch's NCHW 1x1 convolution gives results that depend on the
      // intra-op thread count when the batch has more than one sample; this form does not.
      const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
      return pointwise_rows(x, with_bias)
          .view({B, H, W, weight.size(0)})
          .permute({0, 3, 1, 2})
          .contiguous(x.suggest_memory_format());
    }
    at::Tensor y = at::conv2d(x, weight, with_bias ? bias : at::Tensor(), {stride, stride}, {padding, padding});
    return lora.empty() ? y : add_branches(y, x, lora, stride, padding);
  }
};

struct GroupNorm {
  at::Tensor weight, bias;
  int64_t groups = 32;
  double eps = 1e-5;
  GroupNorm() = default;
  GroupNorm(const Weights& w, const std::string& name, int64_t groups_, int64_t channels, double eps_)
      : groups(groups_), eps(eps_) {
    weight = w.get(name + ".weight", {channels});
    bias = w.get(name + ".bias", {channels});
  }
  at::Tensor operator()(const at::Tensor& x) const;
  at::Tensor silu(const at::Tensor& x) const;  // silu(group_norm(x)); one fused kernel on a GPU
  // silu(group_norm(x + add)), add [N, C, 1, 1] (the ResNet block's time embedding): on a GPU with channels-last
  // activations the addition happens inside the fused kernels instead of a pass of its own.
  at::Tensor silu_after_add(const at::Tensor& x, const at::Tensor& add) const;
};

struct LayerNorm {
  at::Tensor weight, bias;
  double eps = 1e-5;
  LayerNorm() = default;
  LayerNorm(const Weights& w, const std::string& name, int64_t dim, double eps_) : eps(eps_) {
    weight = w.get(name + ".weight", {dim});
    bias = w.get(name + ".bias", {dim});
  }
  at::Tensor operator()(const at::Tensor& x) const {
    return at::layer_norm(x, {weight.size(0)}, weight, bias, eps);
  }
};

// Scaled dot-product attention. q: [B, H, Lq, D], k/v: [B, H, Lk, D]; mask (optional) added to the scores.
// LibTorch's fused scaled_dot_product_attention, as diffusers' default processor (AttnProcessor2_0) calls it: a
// flash kernel on the CPU, flash / memory-efficient kernels on CUDA, never the whole [Lq, Lk] score matrix,
// softmax accumulated in float32 whatever the input dtype (so diffusers' upcast_attention / upcast_softmax
// flags, which its fused processor ignores too, need no separate path).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask);

}  // namespace diffpipe::nn
