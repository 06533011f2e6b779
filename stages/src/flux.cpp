#include "diffpipe/stages/flux.h"

#include <cmath>
#include <numeric>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "diffpipe/stages/unet.h"
#include "dit_blocks.h"

namespace diffpipe {
using nn::modulate;
using nn::plain_norm;

FluxTransformerConfig FluxTransformerConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  FluxTransformerConfig c;
  for (auto [key, field] : {std::pair{"in_channels", &c.in_channels}, {"num_layers", &c.num_layers},
                            {"num_single_layers", &c.num_single_layers}, {"attention_head_dim", &c.attention_head_dim},
                            {"num_attention_heads", &c.num_attention_heads},
                            {"joint_attention_dim", &c.joint_attention_dim},
                            {"pooled_projection_dim", &c.pooled_projection_dim}}) {
    *field = j.integer(key, *field);
    j.at_least(key, *field, key == std::string("num_layers") || key == std::string("num_single_layers") ? 0 : 1);
  }
  c.out_channels = j.integer("out_channels", c.in_channels);  // null: in_channels, as diffusers
  j.at_least("out_channels", c.out_channels, 1);
  c.guidance_embeds = j.boolean("guidance_embeds", false);
  if (j.integer("patch_size", 1) != 1) j.fail("patch_size", "supported: 1 (the pipelines pack 2x2 latents instead)");
  if (c.in_channels % 4 != 0 || c.out_channels % 4 != 0)
    j.fail("in_channels", "in_channels and out_channels must be multiples of 4 (2x2-packed latent channels)");
  if (j.has("axes_dims_rope")) c.axes_dims_rope = j.int_list("axes_dims_rope");
  if (c.axes_dims_rope.size() != 3)
    j.fail("axes_dims_rope", "expected 3 entries (the ids' axes: 0, row, column)");
  for (int64_t a : c.axes_dims_rope)
    if (a <= 0 || a % 2 != 0) j.fail("axes_dims_rope", "every entry must be a positive even width");
  if (std::accumulate(c.axes_dims_rope.begin(), c.axes_dims_rope.end(), int64_t(0)) != c.attention_head_dim)
    j.fail("axes_dims_rope", "the entries must add up to attention_head_dim " + std::to_string(c.attention_head_dim));
  return c;
}

namespace {
// Rotary embedding of positions [S, 3] (float) for each axis's width: cos and sin [S, head_dim], each frequency
// repeated twice (diffusers' get_1d_rotary_pos_embed with repeat_interleave_real, theta 10000, float64 angles).
std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& ids, const std::vector<int64_t>& axes) {
  std::vector<at::Tensor> cos, sin;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  for (size_t i = 0; i < axes.size(); ++i) {
    const auto d = static_cast<double>(axes[i]);
    const at::Tensor freqs = 1.0 / at::pow(10000.0, at::arange(0, axes[i], 2, f64) / d);  // [d/2]
    const at::Tensor ang = at::outer(ids.select(1, static_cast<int64_t>(i)).to(at::kDouble), freqs);
    cos.push_back(ang.cos().repeat_interleave(2, 1).to(at::kFloat));
    sin.push_back(ang.sin().repeat_interleave(2, 1).to(at::kFloat));
  }
  return {at::cat(cos, -1), at::cat(sin, -1)};
}

// x [B, S, H, D] rotated pairwise: x * cos + (-x_odd, x_even interleaved) * sin, in float32
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor pairs = x.reshape({x.size(0), x.size(1), x.size(2), -1, 2});
  const at::Tensor rotated = at::stack({-pairs.select(-1, 1), pairs.select(-1, 0)}, -1).flatten(3);
  const at::Tensor c = cos.unsqueeze(0).unsqueeze(2), s = sin.unsqueeze(0).unsqueeze(2);
  return (x.to(at::kFloat) * c + rotated.to(at::kFloat) * s).to(x.scalar_type());
}

struct RmsNorm {  // torch.nn.RMSNorm(dim, eps=1e-6) with a weight
  at::Tensor weight;
  RmsNorm() = default;
  RmsNorm(const Weights& w, const std::string& name, int64_t dim) : weight(w.get(name + ".weight", {dim})) {}
  at::Tensor operator()(const at::Tensor& x) const { return at::rms_norm(x, {weight.size(0)}, weight, 1e-6); }
};

struct Attention {  // FluxAttention: to_q/k/v with RMS-normed q/k; added projections for the text stream
  nn::Linear q, k, v, out, add_q, add_k, add_v, add_out;
  RmsNorm norm_q, norm_k, norm_added_q, norm_added_k;
  int64_t heads = 1, head_dim = 1;
  bool joint = false, pre_only = false;
  Attention() = default;
  Attention(const Weights& w, const std::string& p, const FluxTransformerConfig& c, bool joint_)
      : heads(c.num_attention_heads), head_dim(c.attention_head_dim), joint(joint_), pre_only(!joint_) {
    const int64_t D = c.inner_dim();
    q = nn::Linear(w, p + ".to_q", D, D);
    k = nn::Linear(w, p + ".to_k", D, D);
    v = nn::Linear(w, p + ".to_v", D, D);
    norm_q = RmsNorm(w, p + ".norm_q", head_dim);
    norm_k = RmsNorm(w, p + ".norm_k", head_dim);
    if (!joint) return;  // the single-stream blocks' attention has no output projection (pre_only)
    out = nn::Linear(w, p + ".to_out.0", D, D);
    add_q = nn::Linear(w, p + ".add_q_proj", D, D);
    add_k = nn::Linear(w, p + ".add_k_proj", D, D);
    add_v = nn::Linear(w, p + ".add_v_proj", D, D);
    add_out = nn::Linear(w, p + ".to_add_out", D, D);
    norm_added_q = RmsNorm(w, p + ".norm_added_q", head_dim);
    norm_added_k = RmsNorm(w, p + ".norm_added_k", head_dim);
  }
  // x [B, N, D] (joint: the text tokens c [B, L, D] go first); rotary cos/sin over the whole sequence. Returns the
  // image tokens' output and (joint) the text tokens'; single-stream: the whole sequence's, unprojected.
  std::pair<at::Tensor, at::Tensor> operator()(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cos,
                                               const at::Tensor& sin) const {
    const int64_t B = x.size(0), D = x.size(2);
    auto split = [&](const at::Tensor& y) { return y.view({B, y.size(1), heads, head_dim}); };  // [B, S, H, d]
    at::Tensor qs = norm_q(split(q(x))), ks = norm_k(split(k(x))), vs = split(v(x));
    if (joint) {
      qs = at::cat({norm_added_q(split(add_q(c))), qs}, 1);
      ks = at::cat({norm_added_k(split(add_k(c))), ks}, 1);
      vs = at::cat({split(add_v(c)), vs}, 1);
    }
    qs = apply_rope(qs, cos, sin);
    ks = apply_rope(ks, cos, sin);
    const at::Tensor a = nn::attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), at::Tensor())
                             .transpose(1, 2)
                             .reshape({B, -1, D});
    if (!joint) return {a, at::Tensor()};
    const int64_t L = c.size(1);
    return {out(a.slice(1, L)), add_out(a.slice(1, 0, L))};
  }
};

struct DoubleBlock {  // FluxTransformerBlock
  nn::Linear norm1, norm1_context;  // adaLN-Zero: 6 modulations each
  Attention attn;
  nn::GeluFeedForward ff, ff_context;
};
struct SingleBlock {  // FluxSingleTransformerBlock
  nn::Linear norm, proj_mlp, proj_out;  // norm: 3 modulations (shift, scale, gate)
  Attention attn;
};

// float16 activations kept finite, as diffusers clips them after each block
at::Tensor clip16(const at::Tensor& x) { return x.scalar_type() == at::kHalf ? x.clamp(-65504, 65504) : x; }
}  // namespace

struct FluxTransformer2DModel::Impl {
  nn::Linear x_embedder, context_embedder, norm_out, proj_out;
  nn::SiluMlp time, guidance, text;
  std::vector<DoubleBlock> blocks;
  std::vector<SingleBlock> singles;
};

FluxTransformer2DModel::FluxTransformer2DModel(const FluxTransformerConfig& c, const Weights& w)
    : impl_(std::make_shared<Impl>()), cfg_(c) {
  Impl& m = const_cast<Impl&>(*impl_);
  const int64_t D = c.inner_dim();
  m.x_embedder = nn::Linear(w, "x_embedder", c.in_channels, D);
  m.context_embedder = nn::Linear(w, "context_embedder", c.joint_attention_dim, D);
  m.time = nn::SiluMlp(w, "time_text_embed.timestep_embedder", 256, D);
  if (c.guidance_embeds) m.guidance = nn::SiluMlp(w, "time_text_embed.guidance_embedder", 256, D);
  m.text = nn::SiluMlp(w, "time_text_embed.text_embedder", c.pooled_projection_dim, D);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "transformer_blocks." + std::to_string(i) + ".";
    DoubleBlock b;
    b.norm1 = nn::Linear(w, p + "norm1.linear", D, 6 * D);
    b.norm1_context = nn::Linear(w, p + "norm1_context.linear", D, 6 * D);
    b.attn = Attention(w, p + "attn", c, true);
    b.ff = nn::GeluFeedForward(w, p + "ff", D);
    b.ff_context = nn::GeluFeedForward(w, p + "ff_context", D);
    m.blocks.push_back(std::move(b));
  }
  for (int64_t i = 0; i < c.num_single_layers; ++i) {
    const std::string p = "single_transformer_blocks." + std::to_string(i) + ".";
    SingleBlock b;
    b.norm = nn::Linear(w, p + "norm.linear", D, 3 * D);
    b.proj_mlp = nn::Linear(w, p + "proj_mlp", D, 4 * D);
    b.proj_out = nn::Linear(w, p + "proj_out", 5 * D, D);
    b.attn = Attention(w, p + "attn", c, false);
    m.singles.push_back(std::move(b));
  }
  m.norm_out = nn::Linear(w, "norm_out.linear", D, 2 * D);
  m.proj_out = nn::Linear(w, "proj_out", D, c.out_channels);
}

std::shared_ptr<FluxTransformer2DModel> FluxTransformer2DModel::load(const std::string& dir, const DeviceSpec& spec,
                                         const std::vector<LoraLayer>& lora) {
  const auto cfg = FluxTransformerConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec);
  apply_lora(w, lora, "transformer");
  auto m = std::make_shared<FluxTransformer2DModel>(cfg, w);
  for (const auto& k : w.unused()) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

at::Tensor FluxTransformer2DModel::forward(const at::Tensor& latents, const at::Tensor& timestep,
                                           const at::Tensor& encoder_hidden_states,
                                           const at::Tensor& pooled_projections, const at::Tensor& guidance) const {
  const Impl& m = *impl_;
  const FluxTransformerConfig& c = cfg_;
  const int64_t C = c.in_channels / 4;
  DP_CHECK(latents.dim() == 4 && latents.size(1) == C, "Flux transformer: latents must be [B, ", C, ", H, W], got ",
           latents.sizes());
  const int64_t B = latents.size(0), H = latents.size(2), W = latents.size(3);
  DP_CHECK(H % 2 == 0 && W % 2 == 0, "Flux transformer: latent size ", H, "x", W, " must be even (2x2 packing)");
  DP_CHECK(encoder_hidden_states.dim() == 3 && encoder_hidden_states.size(0) == B &&
               encoder_hidden_states.size(2) == c.joint_attention_dim,
           "Flux transformer: encoder_hidden_states must be [", B, ", L, ", c.joint_attention_dim, "], got ",
           encoder_hidden_states.sizes());
  DP_CHECK(pooled_projections.dim() == 2 && pooled_projections.size(0) == B &&
               pooled_projections.size(1) == c.pooled_projection_dim,
           "Flux transformer: pooled_projections must be [", B, ", ", c.pooled_projection_dim, "], got ",
           pooled_projections.sizes());
  DP_CHECK(guidance.defined() == c.guidance_embeds, "Flux transformer: ",
           c.guidance_embeds ? "this model embeds the guidance scale (guidance_embeds): pass one"
                             : "this model has no guidance embedding (guidance_embeds false): pass none");
  auto per_row = [&](const at::Tensor& v, const char* what) {
    at::Tensor t = v.to(at::kCPU, at::kFloat);
    if (t.dim() == 0) t = t.reshape({1});
    if (t.size(0) == 1 && B > 1) t = t.expand({B});
    DP_CHECK(t.dim() == 1 && t.size(0) == B, "Flux transformer: ", what, " must be [", B, "] or a scalar");
    return t;
  };
  const at::Tensor t = per_row(timestep, "timestep");
  const at::Tensor g = guidance.defined() ? per_row(guidance, "guidance") : at::Tensor();
  if (nn::batch_invariant() && B > 1)  // each sample alone: its result does not depend on its batch neighbours
    return nn::per_sample(B, [&](int64_t i) {
      return forward(latents.slice(0, i, i + 1), t.slice(0, i, i + 1), encoder_hidden_states.slice(0, i, i + 1),
                     pooled_projections.slice(0, i, i + 1), g.defined() ? g.slice(0, i, i + 1) : g);
    });
  const auto dt = latents.scalar_type();
  const at::Device dev = latents.device();
  const int64_t h = H / 2, w = W / 2, N = h * w, L = encoder_hidden_states.size(1);
  // 2x2 packing (the pipelines' _pack_latents): [B, C, h, 2, w, 2] -> [B, h*w, C*4]
  at::Tensor x = latents.view({B, C, h, 2, w, 2}).permute({0, 2, 4, 1, 3, 5}).reshape({B, N, C * 4});
  x = m.x_embedder(x);
  // conditioning: timestep x 1000, guidance x 1000 and the pooled text. The products stay float32 whatever the model's
  // dtype (diffusers multiplies in the model's dtype: in bfloat16 a guidance of 7.25 becomes 7232 instead of 7250, a
  // sinusoid of another phase; float32 gives diffusers' float32 numbers and keeps 16-bit runs close to them)
  auto sinusoid = [&](const at::Tensor& v) {
    return timestep_embedding(v * 1000, 256, /*flip_sin_to_cos=*/true, 0).to(dev, dt);
  };
  at::Tensor temb = m.time(sinusoid(t));
  if (g.defined()) temb = temb + m.guidance(sinusoid(g));
  temb = temb + m.text(pooled_projections.to(dt));
  const at::Tensor act = at::silu(temb);
  at::Tensor ctx = m.context_embedder(encoder_hidden_states.to(dt));
  // rotary ids: the text's all 0, the image's (0, row, column); text first
  const at::Tensor rows = at::arange(h, at::kFloat).view({h, 1}).expand({h, w}).reshape({N});
  const at::Tensor cols = at::arange(w, at::kFloat).view({1, w}).expand({h, w}).reshape({N});
  const at::Tensor img_ids = at::stack({at::zeros({N}, at::kFloat), rows, cols}, 1);
  const at::Tensor ids = at::cat({at::zeros({L, 3}, at::kFloat), img_ids}, 0);
  auto [cos, sin] = rope(ids, c.axes_dims_rope);
  cos = cos.to(dev);
  sin = sin.to(dev);
  for (const DoubleBlock& b : m.blocks) {
    const std::vector<at::Tensor> e = b.norm1(act).chunk(6, 1);  // shift, scale, gate (msa, then mlp)
    const std::vector<at::Tensor> ce = b.norm1_context(act).chunk(6, 1);
    const auto [a, ca] = b.attn(modulate(plain_norm(x), e[0], e[1]), modulate(plain_norm(ctx), ce[0], ce[1]), cos, sin);
    x = x + e[2].unsqueeze(1) * a;
    x = x + e[5].unsqueeze(1) * b.ff(modulate(plain_norm(x), e[3], e[4]));
    ctx = ctx + ce[2].unsqueeze(1) * ca;
    ctx = clip16(ctx + ce[5].unsqueeze(1) * b.ff_context(modulate(plain_norm(ctx), ce[3], ce[4])));
  }
  at::Tensor hs = at::cat({ctx, x}, 1);  // one sequence, text first
  for (const SingleBlock& b : m.singles) {
    const std::vector<at::Tensor> e = b.norm(act).chunk(3, 1);  // shift, scale, gate
    const at::Tensor n = modulate(plain_norm(hs), e[0], e[1]);
    const at::Tensor mlp = at::gelu(b.proj_mlp(n), "tanh");
    const at::Tensor a = b.attn(n, at::Tensor(), cos, sin).first;
    hs = clip16(hs + e[2].unsqueeze(1) * b.proj_out(at::cat({a, mlp}, 2)));
  }
  x = hs.slice(1, L);
  const std::vector<at::Tensor> o = m.norm_out(act).chunk(2, 1);  // scale, shift
  x = m.proj_out(modulate(plain_norm(x), o[1], o[0]));            // [B, N, out_channels]
  const int64_t Co = c.out_channels / 4;
  // unpacked (_unpack_latents): [B, h, w, Co, 2, 2] -> [B, Co, H, W]
  return x.view({B, h, w, Co, 2, 2}).permute({0, 3, 1, 4, 2, 5}).reshape({B, Co, H, W});
}

}  // namespace diffpipe
