// Private: ResnetBlock2D, Transformer2DModel (BasicTransformerBlock with GEGLU), Down/Upsample2D, and the
// VAE's single-head spatial attention. Names follow diffusers so keys map one to one.
#pragma once
#include "nn.h"

namespace diffpipe::nn {

// ResnetBlock2D's variants beyond Stable Diffusion's (DeepFloyd IF's UNets use all of them).
struct ResnetOptions {
  bool gelu = false;           // act_fn "gelu" (exact) instead of silu
  bool scale_shift = false;    // resnet_time_scale_shift "scale_shift": the time embedding gives (scale, shift)
                               // applied after norm2 (time_emb_proj has 2 x out outputs)
  bool skip_time_act = false;  // resnet_skip_time_act: no activation before time_emb_proj
  int resample = 0;            // 1: 2x2 average pool (down=True), 2: nearest x2 (up=True), of both paths
  // > 0: ResnetBlockCondNorm2D with SpatialNorm (a MoVQ decoder's, norm_type "spatial"): norm1 and norm2 are
  // modulated by a conditioning map of this many channels, passed as the block's `temb`; no time embedding
  int64_t spatial_channels = 0;
};

// diffusers' SpatialNorm (MoVQ): group_norm(f) (32 groups, eps 1e-6) x conv_y(zq) + conv_b(zq), zq (the latents)
// resized to f's size by nearest neighbour.
struct SpatialNorm {
  GroupNorm norm_layer;
  Conv2d conv_y, conv_b;
  SpatialNorm() = default;
  SpatialNorm(const Weights& w, int64_t channels, int64_t zq_channels);
  at::Tensor operator()(const at::Tensor& f, const at::Tensor& zq) const;
};

struct ResnetBlock2D {
  GroupNorm norm1, norm2;
  SpatialNorm spatial1, spatial2;  // ResnetOptions::spatial_channels
  Conv2d conv1, conv2, conv_shortcut;
  Linear time_emb_proj;  // absent (undefined) when temb_channels == 0
  bool has_shortcut = false;
  double output_scale_factor = 1.0;
  ResnetOptions opt;
  ResnetBlock2D() = default;
  ResnetBlock2D(const Weights& w, int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps,
                double output_scale, const ResnetOptions& options = {});
  // x: [B, in, H, W], temb: [B, temb_channels] or undefined -> [B, out, H, W]
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& temb) const;
};

struct CrossAttention {  // diffusers Attention with to_q/to_k/to_v/to_out.0
  Linear to_q, to_k, to_v, to_out;
  // IP-Adapter (present when the weights have them): the image tokens' keys and values; each row adds its scale x
  // attention(query, them) (nn::AdapterRows::ip_tokens / ip_scales in force) before to_out
  Linear to_k_ip, to_v_ip;
  // Self-attention's projections as one product (cuda_ops.h's fuse_qkv): [to_q; to_k; to_v] rows, of which the
  // three layers' weights (and biases) are views. Undefined where not fused (adapter branches, other widths).
  at::Tensor qkv_w, qkv_b;
  int64_t heads = 1;
  CrossAttention() = default;
  CrossAttention(const Weights& w, int64_t query_dim, int64_t context_dim, int64_t heads, int64_t dim_head,
                 bool qkv_bias);
  // x: [B, N, query_dim], context: [B, L, context_dim] (or x itself); residual (optional, [B, N, query_dim]) is
  // added to the output (in to_out's epilogue where cuda_ops.h's fused_linear_residual applies)
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& context, const at::Tensor& residual = {}) const;
};

// diffusers' Attention with added key/value projections (AttnAddedKVProcessor2_0), in DeepFloyd IF's
// SimpleCrossAttn blocks: the spatial tokens (group-normed) attend to the text tokens' add_k/add_v projections
// (group-normed over channels when cross_attention_norm is "group_norm") followed by their own keys and values;
// the output joins the input as a residual.
struct AddedKVAttention {
  GroupNorm group_norm, norm_cross;
  bool has_norm_cross = false;
  Linear to_q, to_k, to_v, add_k_proj, add_v_proj, to_out;
  int64_t heads = 1;
  AddedKVAttention() = default;
  AddedKVAttention(const Weights& w, int64_t channels, int64_t context_dim, int64_t heads, int64_t dim_head,
                   int64_t groups, double eps, bool norm_cross, int64_t cross_norm_groups);
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& context) const;  // x: [B, C, H, W]
};

struct BasicTransformerBlock {
  LayerNorm norm1, norm2, norm3;
  CrossAttention attn1, attn2;
  Linear ff_proj, ff_out;  // ff.net.0.proj (GEGLU, dim -> 2*inner), ff.net.2 (inner -> dim)
  BasicTransformerBlock() = default;
  bool only_cross = false;  // only_cross_attention: attn1 attends to the context too (the SD x4 upscaler)
  BasicTransformerBlock(const Weights& w, int64_t dim, int64_t heads, int64_t dim_head, int64_t context_dim,
                        bool only_cross = false);
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& context) const;
};

struct Transformer2DModel {
  GroupNorm norm;
  Conv2d proj_in_conv, proj_out_conv;
  Linear proj_in_linear, proj_out_linear;
  bool linear = false;
  std::vector<BasicTransformerBlock> blocks;
  Transformer2DModel() = default;
  Transformer2DModel(const Weights& w, int64_t channels, int64_t heads, int64_t layers, int64_t context_dim,
                     int64_t groups, bool use_linear_projection, bool only_cross = false);
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& context) const;  // x: [B, C, H, W]
};

struct Downsample2D {
  Conv2d conv;
  int64_t padding = 1;
  Downsample2D() = default;
  Downsample2D(const Weights& w, int64_t channels, int64_t padding);
  at::Tensor operator()(const at::Tensor& x) const;
};

struct Upsample2D {
  Conv2d conv;
  // On the CPU, nearest x2 followed by the 3x3 convolution is computed as one 2x2 convolution with 4x the
  // output channels (one block per output phase (a, b), the 3x3 taps that land on the same input pixel summed)
  // over the once-padded input: 16 instead of 36 multiply-adds per input pixel and channel pair, the same
  // result up to float rounding. phase_weight: [4 * C, C, 2, 2], phase k = 2a + b; phase_bias: [4 * C].
  at::Tensor phase_weight, phase_bias;
  Upsample2D() = default;
  Upsample2D(const Weights& w, int64_t channels);
  // nearest x2 (or to `size` when given), then a 3x3 conv
  at::Tensor operator()(const at::Tensor& x, at::IntArrayRef size = {}) const;
};

// The VAE's Attention (group_norm, one head, residual); a MoVQ decoder's normalises with a SpatialNorm instead
// (spatial_norm_dim = zq_channels > 0), whose conditioning map is `zq`.
struct SpatialSelfAttention {
  GroupNorm group_norm;
  SpatialNorm spatial_norm;
  bool spatial = false;
  Linear to_q, to_k, to_v, to_out;
  SpatialSelfAttention() = default;
  SpatialSelfAttention(const Weights& w, int64_t channels, int64_t groups, double eps, int64_t zq_channels = 0);
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& zq = {}) const;
};

}  // namespace diffpipe::nn
