#include "diffpipe/stages/sd3.h"

#include <algorithm>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "diffpipe/stages/unet.h"
#include "dit_blocks.h"

namespace diffpipe {
using nn::modulate;
using nn::plain_norm;

Sd3TransformerConfig Sd3TransformerConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  Sd3TransformerConfig c;
  for (auto [key, field] : {std::pair{"sample_size", &c.sample_size}, {"patch_size", &c.patch_size},
                            {"in_channels", &c.in_channels}, {"num_layers", &c.num_layers},
                            {"attention_head_dim", &c.attention_head_dim}, {"num_attention_heads", &c.num_attention_heads},
                            {"joint_attention_dim", &c.joint_attention_dim},
                            {"caption_projection_dim", &c.caption_projection_dim},
                            {"pooled_projection_dim", &c.pooled_projection_dim},
                            {"pos_embed_max_size", &c.pos_embed_max_size}}) {
    *field = j.integer(key, *field);
    j.at_least(key, *field, 1);
  }
  c.out_channels = j.integer("out_channels", c.in_channels);  // null: in_channels, as diffusers
  j.at_least("out_channels", c.out_channels, 1);
  if (j.has("dual_attention_layers")) c.dual_attention_layers = j.int_list("dual_attention_layers");
  for (int64_t i : c.dual_attention_layers)
    if (i < 0 || i >= c.num_layers)
      j.fail("dual_attention_layers", "entry " + std::to_string(i) + " is not a block index (num_layers " +
                                          std::to_string(c.num_layers) + ")");
  if (j.has("qk_norm")) {
    j.require("qk_norm", "rms_norm");
    c.qk_norm = true;
  }
  if (c.caption_projection_dim != c.inner_dim())
    j.fail("caption_projection_dim", std::to_string(c.caption_projection_dim) + " must equal num_attention_heads x "
                                         "attention_head_dim = " + std::to_string(c.inner_dim()) +
                                         " (the text tokens join the image tokens' blocks)");
  return c;
}

namespace {
// diffusers' RMSNorm with a weight, over the last dimension (per head): in float32, back to the input's dtype.
struct RmsNorm {
  at::Tensor weight;
  RmsNorm() = default;
  RmsNorm(const Weights& w, const std::string& name, int64_t dim) : weight(w.get(name + ".weight", {dim})) {}
  at::Tensor operator()(const at::Tensor& x) const {
    if (!weight.defined()) return x;
    const at::Tensor f = x.to(at::kFloat);
    return (f * at::rsqrt(f.pow(2).mean(-1, true) + 1e-6)).to(x.scalar_type()) * weight;
  }
};

struct Attention {  // to_q/k/v, to_out.0; with added projections (the text stream) when `joint`
  nn::Linear q, k, v, out, add_q, add_k, add_v, add_out;
  RmsNorm norm_q, norm_k, norm_added_q, norm_added_k;
  int64_t heads = 1;
  bool joint = false, context_out = false;
  Attention() = default;
  Attention(const Weights& w, const std::string& p, const Sd3TransformerConfig& c, bool joint_, bool context_out_)
      : heads(c.num_attention_heads), joint(joint_), context_out(context_out_) {
    const int64_t D = c.inner_dim(), d = c.attention_head_dim;
    q = nn::Linear(w, p + ".to_q", D, D);
    k = nn::Linear(w, p + ".to_k", D, D);
    v = nn::Linear(w, p + ".to_v", D, D);
    out = nn::Linear(w, p + ".to_out.0", D, D);
    if (c.qk_norm) {
      norm_q = RmsNorm(w, p + ".norm_q", d);
      norm_k = RmsNorm(w, p + ".norm_k", d);
    }
    if (!joint) return;
    add_q = nn::Linear(w, p + ".add_q_proj", D, D);
    add_k = nn::Linear(w, p + ".add_k_proj", D, D);
    add_v = nn::Linear(w, p + ".add_v_proj", D, D);
    if (context_out) add_out = nn::Linear(w, p + ".to_add_out", D, D);
    if (c.qk_norm) {
      norm_added_q = RmsNorm(w, p + ".norm_added_q", d);
      norm_added_k = RmsNorm(w, p + ".norm_added_k", d);
    }
  }
  // x [B, N, D] (and the text tokens c [B, L, D] when joint): attention over the N (+ L) tokens together; returns the
  // image tokens' output and, when joint, the text tokens' (after to_add_out; undefined for the last block's)
  std::pair<at::Tensor, at::Tensor> operator()(const at::Tensor& x, const at::Tensor& c) const {
    const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
    auto split = [&](const at::Tensor& y) { return y.view({B, y.size(1), heads, D / heads}).transpose(1, 2); };
    at::Tensor qs = norm_q(split(q(x))), ks = norm_k(split(k(x))), vs = split(v(x));
    if (joint) {
      qs = at::cat({qs, norm_added_q(split(add_q(c)))}, 2);
      ks = at::cat({ks, norm_added_k(split(add_k(c)))}, 2);
      vs = at::cat({vs, split(add_v(c))}, 2);
    }
    const at::Tensor a = nn::attention(qs, ks, vs, at::Tensor()).transpose(1, 2).reshape({B, -1, D});
    if (!joint) return {out(a), at::Tensor()};
    const at::Tensor ctx = a.slice(1, N);
    return {out(a.slice(1, 0, N)), context_out ? add_out(ctx) : at::Tensor()};
  }
};

struct Block {  // JointTransformerBlock
  nn::Linear norm1, norm1_context;  // adaLN-Zero: 6 (dual: 9) modulations; the last block's text side: 2
  Attention attn, attn2;
  nn::GeluFeedForward ff, ff_context;
  bool dual = false, context_pre_only = false;
};
}  // namespace

struct Sd3Transformer2DModel::Impl {
  at::Tensor patch_w, patch_b, pos_embed;  // pos_embed [M * M, D]
  nn::SiluMlp time, text;
  nn::Linear context_embedder, norm_out, proj_out;
  std::vector<Block> blocks;
};

Sd3Transformer2DModel::Sd3Transformer2DModel(const Sd3TransformerConfig& c, const Weights& w)
    : impl_(std::make_shared<Impl>()), cfg_(c) {
  Impl& m = const_cast<Impl&>(*impl_);
  const int64_t D = c.inner_dim(), P = c.patch_size, M = c.pos_embed_max_size;
  m.patch_w = w.get("pos_embed.proj.weight", {D, c.in_channels, P, P});
  m.patch_b = w.get("pos_embed.proj.bias", {D});
  m.pos_embed = w.get("pos_embed.pos_embed", {1, M * M, D})[0];
  m.time = nn::SiluMlp(w, "time_text_embed.timestep_embedder", 256, D);
  m.text = nn::SiluMlp(w, "time_text_embed.text_embedder", c.pooled_projection_dim, D);
  m.context_embedder = nn::Linear(w, "context_embedder", c.joint_attention_dim, c.caption_projection_dim);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "transformer_blocks." + std::to_string(i) + ".";
    Block b;
    b.dual = std::find(c.dual_attention_layers.begin(), c.dual_attention_layers.end(), i) !=
             c.dual_attention_layers.end();
    b.context_pre_only = i == c.num_layers - 1;
    b.norm1 = nn::Linear(w, p + "norm1.linear", D, (b.dual ? 9 : 6) * D);
    b.norm1_context = nn::Linear(w, p + "norm1_context.linear", D, (b.context_pre_only ? 2 : 6) * D);
    b.attn = Attention(w, p + "attn", c, true, !b.context_pre_only);
    if (b.dual) b.attn2 = Attention(w, p + "attn2", c, false, false);
    b.ff = nn::GeluFeedForward(w, p + "ff", D);
    if (!b.context_pre_only) b.ff_context = nn::GeluFeedForward(w, p + "ff_context", D);
    m.blocks.push_back(std::move(b));
  }
  m.norm_out = nn::Linear(w, "norm_out.linear", D, 2 * D);
  m.proj_out = nn::Linear(w, "proj_out", D, P * P * c.out_channels);
}

std::shared_ptr<Sd3Transformer2DModel> Sd3Transformer2DModel::load(const std::string& dir, const DeviceSpec& spec,
                                         const std::vector<LoraLayer>& lora) {
  const auto cfg = Sd3TransformerConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec);
  apply_lora(w, lora, "transformer");
  auto m = std::make_shared<Sd3Transformer2DModel>(cfg, w);
  for (const auto& k : w.unused()) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

at::Tensor Sd3Transformer2DModel::forward(const at::Tensor& hidden_states, const at::Tensor& timestep,
                                          const at::Tensor& encoder_hidden_states, const at::Tensor& pooled_projections,
                                          const std::vector<int64_t>& skip_layers) const {
  const Impl& m = *impl_;
  const Sd3TransformerConfig& c = cfg_;
  DP_CHECK(hidden_states.dim() == 4 && hidden_states.size(1) == c.in_channels, "SD3 transformer: hidden_states must be [B, ",
           c.in_channels, ", H, W], got ", hidden_states.sizes());
  const int64_t B = hidden_states.size(0), H = hidden_states.size(2), W = hidden_states.size(3), P = c.patch_size;
  const int64_t h = H / P, w = W / P, M = c.pos_embed_max_size, D = c.inner_dim();
  DP_CHECK(H % P == 0 && W % P == 0, "SD3 transformer: latent size ", H, "x", W, " is not a multiple of patch_size ", P);
  DP_CHECK(h <= M && w <= M, "SD3 transformer: ", h, "x", w, " patches exceed pos_embed_max_size ", M,
           " (at most ", M * P, " latent pixels a side)");
  DP_CHECK(encoder_hidden_states.dim() == 3 && encoder_hidden_states.size(0) == B &&
               encoder_hidden_states.size(2) == c.joint_attention_dim,
           "SD3 transformer: encoder_hidden_states must be [", B, ", L, ", c.joint_attention_dim, "], got ",
           encoder_hidden_states.sizes());
  DP_CHECK(pooled_projections.dim() == 2 && pooled_projections.size(0) == B &&
               pooled_projections.size(1) == c.pooled_projection_dim,
           "SD3 transformer: pooled_projections must be [", B, ", ", c.pooled_projection_dim, "], got ",
           pooled_projections.sizes());
  at::Tensor t = timestep.to(at::kCPU, at::kFloat);
  if (t.dim() == 0) t = t.reshape({1});
  if (t.size(0) == 1 && B > 1) t = t.expand({B});
  DP_CHECK(t.dim() == 1 && t.size(0) == B, "SD3 transformer: timestep must be [", B, "] or a scalar");
  if (nn::batch_invariant() && B > 1)  // each sample alone: its result does not depend on its batch neighbours
    return nn::per_sample(B, [&](int64_t i) {
      return forward(hidden_states.slice(0, i, i + 1), t.slice(0, i, i + 1), encoder_hidden_states.slice(0, i, i + 1),
                     pooled_projections.slice(0, i, i + 1), skip_layers);
    });
  const auto dt = hidden_states.scalar_type();
  // patches + the centre crop of the position table
  at::Tensor x = at::conv2d(hidden_states, m.patch_w, m.patch_b, {P, P}).flatten(2).transpose(1, 2);  // [B, h*w, D]
  const at::Tensor pos = m.pos_embed.view({M, M, D}).slice(0, (M - h) / 2, (M - h) / 2 + h)
                             .slice(1, (M - w) / 2, (M - w) / 2 + w).reshape({1, h * w, D});
  x = (x + pos.to(dt)).contiguous();
  // conditioning: the timestep's 256-wide sinusoid (cos first) embedded, plus the pooled text projection
  const at::Tensor t_emb = timestep_embedding(t, 256, /*flip_sin_to_cos=*/true, 0).to(x.device(), dt);
  const at::Tensor temb = m.time(t_emb) + m.text(pooled_projections.to(dt));
  const at::Tensor act = at::silu(temb);
  at::Tensor ctx = m.context_embedder(encoder_hidden_states.to(dt));
  for (size_t bi = 0; bi < m.blocks.size(); ++bi) {
    if (std::find(skip_layers.begin(), skip_layers.end(), static_cast<int64_t>(bi)) != skip_layers.end()) continue;
    const Block& b = m.blocks[bi];
    const std::vector<at::Tensor> e = b.norm1(act).chunk(b.dual ? 9 : 6, 1);  // shift, scale, gate (msa, mlp[, msa2])
    const at::Tensor nx = plain_norm(x);
    at::Tensor nc;
    std::vector<at::Tensor> ce;
    if (b.context_pre_only) {  // AdaLayerNormContinuous: scale, then shift
      ce = b.norm1_context(act).chunk(2, 1);
      nc = modulate(plain_norm(ctx), ce[1], ce[0]);
    } else {
      ce = b.norm1_context(act).chunk(6, 1);
      nc = modulate(plain_norm(ctx), ce[0], ce[1]);
    }
    const auto [a, ca] = b.attn(modulate(nx, e[0], e[1]), nc);
    x = x + e[2].unsqueeze(1) * a;
    if (b.dual) x = x + e[8].unsqueeze(1) * b.attn2(modulate(nx, e[6], e[7]), at::Tensor()).first;
    x = x + e[5].unsqueeze(1) * b.ff(modulate(plain_norm(x), e[3], e[4]));
    if (!b.context_pre_only) {
      ctx = ctx + ce[2].unsqueeze(1) * ca;
      ctx = ctx + ce[5].unsqueeze(1) * b.ff_context(modulate(plain_norm(ctx), ce[3], ce[4]));
    }
  }
  const std::vector<at::Tensor> o = m.norm_out(act).chunk(2, 1);  // scale, shift
  x = m.proj_out(modulate(plain_norm(x), o[1], o[0]));            // [B, h*w, P*P*C]
  const int64_t C = c.out_channels;
  return x.view({B, h, w, P, P, C}).permute({0, 5, 1, 3, 2, 4}).reshape({B, C, H, W});
}

}  // namespace diffpipe
