#include "unet_blocks.h"

#include <c10/core/GradMode.h>

#include "cuda_ops.h"
#include "diffpipe/runtime/error.h"

namespace diffpipe::nn {

ResnetBlock2D::ResnetBlock2D(const Weights& w, int64_t in, int64_t out, int64_t temb_channels, int64_t groups,
                             double eps, double output_scale, const ResnetOptions& options)
    : output_scale_factor(output_scale), opt(options) {
  if (opt.spatial_channels > 0) {
    spatial1 = SpatialNorm(w.sub("norm1"), in, opt.spatial_channels);
    spatial2 = SpatialNorm(w.sub("norm2"), out, opt.spatial_channels);
  } else {
    norm1 = GroupNorm(w, "norm1", groups, in, eps);
    norm2 = GroupNorm(w, "norm2", groups, out, eps);
  }
  conv1 = Conv2d(w, "conv1", in, out, 3, 1, 1);
  if (temb_channels > 0) time_emb_proj = Linear(w, "time_emb_proj", temb_channels, opt.scale_shift ? 2 * out : out);
  conv2 = Conv2d(w, "conv2", out, out, 3, 1, 1);
  has_shortcut = in != out;
  if (has_shortcut) conv_shortcut = Conv2d(w, "conv_shortcut", in, out, 1, 1, 0);
}

// As diffusers' ResnetBlock2D orders it; Stable Diffusion's blocks take the defaults (silu, the time embedding added
// before norm2, no resampling).
at::Tensor ResnetBlock2D::operator()(const at::Tensor& x, const at::Tensor& temb) const {
  if (opt.spatial_channels > 0) {  // ResnetBlockCondNorm2D: `temb` is the conditioning map
    DP_CHECK(temb.defined(), "resnet: a spatially normalised block needs its conditioning map");
    at::Tensor h = conv2(at::silu(spatial2(conv1(at::silu(spatial1(x, temb))), temb)));
    const at::Tensor out = (has_shortcut ? conv_shortcut(x) : x) + h;
    return output_scale_factor == 1.0 ? out : out / output_scale_factor;
  }
  auto act = [&](const at::Tensor& t) { return opt.gelu ? at::gelu(t) : at::silu(t); };
  auto norm_act = [&](const GroupNorm& n, const at::Tensor& t) { return opt.gelu ? at::gelu(n(t)) : n.silu(t); };
  // Both convolutions' biases join passes that run anyway (cuda_ops.h's fold_conv_bias): conv1's the addend of
  // silu(norm2(h + t)), conv2's the residual's addition.
  const bool fold = !opt.gelu && !opt.scale_shift && fold_conv_bias(x);
  at::Tensor in = x, h = norm_act(norm1, x);
  if (opt.resample == 1) {
    in = at::avg_pool2d(in, {2, 2}, {2, 2});
    h = at::avg_pool2d(h, {2, 2}, {2, 2});
  } else if (opt.resample == 2) {
    in = at::upsample_nearest2d(in, {2 * x.size(2), 2 * x.size(3)});
    h = at::upsample_nearest2d(h, {2 * x.size(2), 2 * x.size(3)});
  }
  h = conv1.apply(h, !fold);
  at::Tensor t;
  if (time_emb_proj.weight.defined() && temb.defined())
    t = time_emb_proj(opt.skip_time_act ? temb : act(temb)).unsqueeze(-1).unsqueeze(-1);
  if (fold) {
    const at::Tensor b1 = conv1.bias.view({1, -1, 1, 1});
    h = norm2.silu_after_add(h, t.defined() ? t + b1 : b1.expand({h.size(0), -1, 1, 1}));
    const at::Tensor r = has_shortcut ? conv_shortcut(in) : in;
    return add_bias_residual(conv2.without_bias(h), conv2.bias, r, output_scale_factor);
  }
  if (opt.scale_shift) {
    DP_CHECK(t.defined(), "resnet: scale_shift needs a time embedding");
    auto ss = t.chunk(2, 1);
    h = act(norm2(h) * (1 + ss[0]) + ss[1]);
  } else if (t.defined() && !opt.gelu) {
    h = norm2.silu_after_add(h, t);  // silu(norm2(h + t))
  } else {
    if (t.defined()) h = h + t;
    h = norm_act(norm2, h);
  }
  h = conv2(h);
  const at::Tensor out = (has_shortcut ? conv_shortcut(in) : in) + h;
  return output_scale_factor == 1.0 ? out : out / output_scale_factor;
}

CrossAttention::CrossAttention(const Weights& w, int64_t query_dim, int64_t context_dim, int64_t heads_,
                               int64_t dim_head, bool qkv_bias)
    : heads(heads_) {
  const int64_t inner = heads * dim_head;
  to_q = Linear(w, "to_q", query_dim, inner, qkv_bias);
  to_k = Linear(w, "to_k", context_dim, inner, qkv_bias);
  to_v = Linear(w, "to_v", context_dim, inner, qkv_bias);
  to_out = Linear(w, "to_out.0", inner, query_dim, true);
  if (query_dim == context_dim && to_q.lora.empty() && to_k.lora.empty() && to_v.lora.empty() &&
      fuse_qkv(to_q.weight)) {
    auto fuse = [&](at::Tensor& cat, at::Tensor Linear::*member) {
      cat = at::cat({to_q.*member, to_k.*member, to_v.*member});
      int64_t k = 0;
      for (Linear* l : {&to_q, &to_k, &to_v}) (l->*member) = cat.narrow(0, inner * k++, inner);
    };
    fuse(qkv_w, &Linear::weight);
    if (qkv_bias) fuse(qkv_b, &Linear::bias);
  }
  if (w.has("to_k_ip.weight")) {
    to_k_ip = Linear(w, "to_k_ip", context_dim, inner, false);
    to_v_ip = Linear(w, "to_v_ip", context_dim, inner, false);
  }
}

at::Tensor CrossAttention::operator()(const at::Tensor& x, const at::Tensor& context, const at::Tensor& residual) const {
  const int64_t B = x.size(0), N = x.size(1), L = context.size(1);
  at::Tensor q, k, v;
  // views into one [B, N, 3 x inner] product (strided rows: the attention kernels take them as they are)
  if (qkv_w.defined() && context.is_same(x) && !to_q.weight.requires_grad()) {
    auto parts = at::linear(x, qkv_w, qkv_b).chunk(3, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    q = to_q(x), k = to_k(context), v = to_v(context);
  }
  const int64_t inner = q.size(-1), D = inner / heads;
  q = q.view({B, N, heads, D}).transpose(1, 2);
  k = k.view({B, L, heads, D}).transpose(1, 2);
  v = v.view({B, L, heads, D}).transpose(1, 2);
  at::Tensor o = attention(q, k, v, at::Tensor());
  const AdapterRows* rows = to_k_ip.weight.defined() ? active_adapter_rows() : nullptr;
  if (rows && rows->ip_tokens.defined()) {  // diffusers' IPAdapterAttnProcessor2_0: + scale x attention to the tokens
    const at::Tensor& ip = rows->ip_tokens;
    DP_CHECK(ip.size(0) == B, "IP-Adapter: ", ip.size(0), " rows of image tokens for a batch of ", B);
    const int64_t T = ip.size(1);
    const at::Tensor ki = to_k_ip(ip).view({B, T, heads, D}).transpose(1, 2);
    const at::Tensor vi = to_v_ip(ip).view({B, T, heads, D}).transpose(1, 2);
    o = o + attention(q, ki, vi, at::Tensor()) * rows->ip_scales.to(o.scalar_type()).view({B, 1, 1, 1});
  }
  const at::Tensor merged = o.transpose(1, 2).reshape({B, N, inner});
  return residual.defined() ? to_out.plus(merged, residual) : to_out(merged);
}

AddedKVAttention::AddedKVAttention(const Weights& w, int64_t channels, int64_t context_dim, int64_t heads_,
                                   int64_t dim_head, int64_t groups, double eps, bool norm_cross_,
                                   int64_t cross_norm_groups)
    : has_norm_cross(norm_cross_), heads(heads_) {
  const int64_t inner = heads * dim_head;
  group_norm = GroupNorm(w, "group_norm", groups, channels, eps);
  if (has_norm_cross) norm_cross = GroupNorm(w, "norm_cross", cross_norm_groups, context_dim, 1e-5);
  to_q = Linear(w, "to_q", channels, inner);
  to_k = Linear(w, "to_k", channels, inner);
  to_v = Linear(w, "to_v", channels, inner);
  add_k_proj = Linear(w, "add_k_proj", context_dim, inner);
  add_v_proj = Linear(w, "add_v_proj", context_dim, inner);
  to_out = Linear(w, "to_out.0", inner, channels);
}

at::Tensor AddedKVAttention::operator()(const at::Tensor& x, const at::Tensor& context) const {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), L = context.size(1);
  at::Tensor e = has_norm_cross ? norm_cross(context.transpose(1, 2)).transpose(1, 2) : context;
  const at::Tensor h = group_norm(x.reshape({B, C, N})).transpose(1, 2);  // [B, N, C]
  const int64_t inner = to_q.weight.size(0), D = inner / heads;
  auto split = [&](const at::Tensor& t, int64_t n) { return t.view({B, n, heads, D}).transpose(1, 2); };
  const at::Tensor q = split(to_q(h), N);
  const at::Tensor k = at::cat({split(add_k_proj(e), L), split(to_k(h), N)}, 2);
  const at::Tensor v = at::cat({split(add_v_proj(e), L), split(to_v(h), N)}, 2);
  const at::Tensor o = to_out(attention(q, k, v, at::Tensor()).transpose(1, 2).reshape({B, N, inner}));
  return o.transpose(1, 2).reshape(x.sizes()) + x;
}

BasicTransformerBlock::BasicTransformerBlock(const Weights& w, int64_t dim, int64_t heads, int64_t dim_head,
                                             int64_t context_dim, bool only_cross_attention)
    : only_cross(only_cross_attention) {
  norm1 = LayerNorm(w, "norm1", dim, 1e-5);
  attn1 = CrossAttention(w.sub("attn1"), dim, only_cross ? context_dim : dim, heads, dim_head, false);
  norm2 = LayerNorm(w, "norm2", dim, 1e-5);
  attn2 = CrossAttention(w.sub("attn2"), dim, context_dim, heads, dim_head, false);
  norm3 = LayerNorm(w, "norm3", dim, 1e-5);
  const int64_t inner = dim * 4;
  ff_proj = Linear(w, "ff.net.0.proj", dim, inner * 2);
  ff_out = Linear(w, "ff.net.2", inner, dim);
}

at::Tensor BasicTransformerBlock::operator()(const at::Tensor& x0, const at::Tensor& context) const {
  at::Tensor y = norm1(x0);
  at::Tensor x = attn1(y, only_cross ? context : y, x0);  // x0 + attn1(...)
  x = attn2(norm2(x), context, x);
  const at::Tensor h = ff_proj(norm3(x));
  at::Tensor g = fused_geglu(h);  // GEGLU: a * gelu(b) for [a | b]; one kernel on a GPU
  if (!g.defined()) {
    auto parts = h.chunk(2, -1);
    g = parts[0] * at::gelu(parts[1]);
  }
  return ff_out.plus(g, x);
}

Transformer2DModel::Transformer2DModel(const Weights& w, int64_t channels, int64_t heads, int64_t layers,
                                       int64_t context_dim, int64_t groups, bool use_linear_projection,
                                       bool only_cross)
    : linear(use_linear_projection) {
  DP_CHECK(heads > 0 && channels % heads == 0, w.origin(), ": ", channels, " channels are not divisible by ", heads,
           " attention heads");
  const int64_t dim_head = channels / heads, inner = heads * dim_head;
  norm = GroupNorm(w, "norm", groups, channels, 1e-6);
  if (linear) {
    proj_in_linear = Linear(w, "proj_in", channels, inner);
    proj_out_linear = Linear(w, "proj_out", inner, channels);
  } else {
    proj_in_conv = Conv2d(w, "proj_in", channels, inner, 1);
    proj_out_conv = Conv2d(w, "proj_out", inner, channels, 1);
  }
  for (int64_t i = 0; i < layers; ++i)
    blocks.emplace_back(w.sub("transformer_blocks." + std::to_string(i)), inner, heads, dim_head, context_dim,
                        only_cross);
}

at::Tensor Transformer2DModel::operator()(const at::Tensor& x, const at::Tensor& context) const {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor h = norm(x);
  // h: [B, H*W, inner] tokens, pixel-major; each projection copies the layout at most once
  if (!linear) h = proj_in_conv.pointwise_rows(h);
  else h = proj_in_linear(h.permute({0, 2, 3, 1}).reshape({B, H * W, C}));
  h = h.view({B, H * W, h.size(-1)});
  for (const auto& b : blocks) h = b(h, context);
  // proj_out on the tokens as they are: the linear layer, or the 1x1 convolution's weight as one (rows first: its
  // branches apply per row too)
  const at::Tensor pw = linear ? proj_out_linear.weight : proj_out_conv.weight.flatten(1);
  const at::Tensor& pb = linear ? proj_out_linear.bias : proj_out_conv.bias;
  const std::vector<LoraBranch>& branches = linear ? proj_out_linear.lora : proj_out_conv.lora;
  if (branches.empty() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // x's memory is already the tokens' [B*H*W, C] rows: the residual joins proj_out's epilogue (linear_plus)
    const at::Tensor rows = x.permute({0, 2, 3, 1}).reshape({B * H * W, C});
    return linear_plus(h, pw, pb, rows).view({B, H, W, C}).permute({0, 3, 1, 2});  // channels-last like x
  }
  at::Tensor o = at::linear(h, pw, pb);
  if (!branches.empty()) o = add_branches(o, h, branches);
  return x + o.view({B, H, W, C}).permute({0, 3, 1, 2});  // NCHW like x (its first operand): no separate copy
}

Downsample2D::Downsample2D(const Weights& w, int64_t channels, int64_t padding_) : padding(padding_) {
  conv = Conv2d(w, "conv", channels, channels, 3, 2, padding);
}

at::Tensor Downsample2D::operator()(const at::Tensor& x) const {
  if (padding == 0) return conv(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
  return conv(x);
}

Upsample2D::Upsample2D(const Weights& w, int64_t channels) {
  conv = Conv2d(w, "conv", channels, channels, 3, 1, 1);
  if (!conv.weight.device().is_cpu()) return;  // GPUs keep the 3x3 form (cuDNN's Winograd kernels)
  // Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows {i - 1, i} for a = 0 (taps
  // {0}, {1, 2}) and {i, i + 1} for a = 1 (taps {0, 1}, {2}); columns alike. Over the input padded by one pixel,
  // phase (a, b) at (i, j) is a 2x2 convolution at padded position (i + a, j + b).
  c10::AutoGradMode no_grad(false);
  const at::Tensor k = conv.weight.to(at::kFloat);  // sums in float32, then back to the weights' dtype
  auto fold = [](const at::Tensor& t, int64_t dim, int64_t a) {  // 3 taps along dim -> the phase's 2
    return a == 0 ? at::stack({t.select(dim, 0), t.select(dim, 1) + t.select(dim, 2)}, dim)
                  : at::stack({t.select(dim, 0) + t.select(dim, 1), t.select(dim, 2)}, dim);
  };
  std::vector<at::Tensor> phases;
  for (int64_t a = 0; a < 2; ++a)
    for (int64_t b = 0; b < 2; ++b) phases.push_back(fold(fold(k, 2, a), 3, b));
  phase_weight = at::cat(phases, 0).to(conv.weight.scalar_type()).contiguous(
      prefers_channels_last(conv.weight) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  phase_bias = conv.bias.repeat({4});
}

at::Tensor Upsample2D::operator()(const at::Tensor& x, at::IntArrayRef size) const {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool doubled = size.empty() || (size[0] == 2 * H && size[1] == 2 * W);
  // Training updates conv.weight in place (it requires grad): the phase weights would be stale, so the 3x3 form.
  // Per-request LoRA branches of the convolution apply in its plain form (below).
  const bool branches = !conv.lora.empty() && active_adapter_rows();
  if (phase_weight.defined() && doubled && x.device().is_cpu() && !conv.weight.requires_grad() && !branches) {
    at::Tensor out = at::conv2d(at::constant_pad_nd(x, {1, 1, 1, 1}, 0), phase_weight, phase_bias);
    // out: [B, 4C, H + 1, W + 1], phase k = 2a + b in channels [kC, (k+1)C); output pixel (2i + a, 2j + b) is
    // phase (a, b) at (i + a, j + b). Strided views of both, so either memory layout works unchanged.
    at::Tensor y = at::empty({B, C, 2 * H, 2 * W}, x.options().memory_format(x.suggest_memory_format()));
    for (int64_t a = 0; a < 2; ++a)
      for (int64_t b = 0; b < 2; ++b) {
        const int64_t k = 2 * a + b;
        y.slice(2, a, 2 * H, 2).slice(3, b, 2 * W, 2)
            .copy_(out.slice(1, k * C, (k + 1) * C).slice(2, a, a + H).slice(3, b, b + W));
      }
    return y;
  }
  std::vector<int64_t> out_size = size.empty() ? std::vector<int64_t>{H * 2, W * 2}
                                               : std::vector<int64_t>(size.begin(), size.end());
  return conv(at::upsample_nearest2d(x, out_size));
}

SpatialNorm::SpatialNorm(const Weights& w, int64_t channels, int64_t zq_channels) {
  norm_layer = GroupNorm(w, "norm_layer", 32, channels, 1e-6);
  conv_y = Conv2d(w, "conv_y", zq_channels, channels, 1);
  conv_b = Conv2d(w, "conv_b", zq_channels, channels, 1);
}

at::Tensor SpatialNorm::operator()(const at::Tensor& f, const at::Tensor& zq_in) const {
  const at::Tensor zq = zq_in.size(2) == f.size(2) && zq_in.size(3) == f.size(3)
                            ? zq_in
                            : at::upsample_nearest2d(zq_in, {f.size(2), f.size(3)});
  return norm_layer(f) * conv_y(zq) + conv_b(zq);
}

SpatialSelfAttention::SpatialSelfAttention(const Weights& w, int64_t channels, int64_t groups, double eps,
                                           int64_t zq_channels)
    : spatial(zq_channels > 0) {
  if (spatial) spatial_norm = SpatialNorm(w.sub("spatial_norm"), channels, zq_channels);
  else group_norm = GroupNorm(w, "group_norm", groups, channels, eps);
  to_q = Linear(w, "to_q", channels, channels);
  to_k = Linear(w, "to_k", channels, channels);
  to_v = Linear(w, "to_v", channels, channels);
  to_out = Linear(w, "to_out.0", channels, channels);
}

at::Tensor SpatialSelfAttention::operator()(const at::Tensor& x, const at::Tensor& zq) const {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  DP_CHECK(!spatial || zq.defined(), "attention: a spatially normalised attention needs its conditioning map");
  // h: [B, HW, C], pixel-major (free for channels-last input; one copy for NCHW; see pointwise_rows)
  at::Tensor h = (spatial ? spatial_norm(x, zq) : group_norm(x)).permute({0, 2, 3, 1}).reshape({B, H * W, C});
  at::Tensor q = to_q(h).unsqueeze(1), k = to_k(h).unsqueeze(1), v = to_v(h).unsqueeze(1);
  at::Tensor o = attention(q, k, v, at::Tensor()).squeeze(1);
  return x + to_out(o).view({B, H, W, C}).permute({0, 3, 1, 2});  // in x's layout
}

}  // namespace diffpipe::nn
