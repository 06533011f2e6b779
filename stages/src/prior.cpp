#include "diffpipe/stages/prior.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "diffpipe/stages/unet.h"
#include "nn.h"

namespace diffpipe {

PriorConfig PriorConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  PriorConfig c;
  c.num_attention_heads = j.integer("num_attention_heads", c.num_attention_heads);
  c.attention_head_dim = j.integer("attention_head_dim", c.attention_head_dim);
  c.num_layers = j.integer("num_layers", c.num_layers);
  c.embedding_dim = j.integer("embedding_dim", c.embedding_dim);
  c.num_embeddings = j.integer("num_embeddings", c.num_embeddings);
  c.additional_embeddings = j.integer("additional_embeddings", c.additional_embeddings);
  auto opt_int = [&](const char* k) { return j.has(k) && !j.json()[k].is_null() ? j.integer(k, 0) : int64_t(0); };
  c.time_embed_dim = opt_int("time_embed_dim");
  c.embedding_proj_dim = opt_int("embedding_proj_dim");
  c.clip_embed_dim = opt_int("clip_embed_dim");
  for (const char* k : {"num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"})
    j.at_least(k, j.integer(k, 1), 1);
  j.at_least("additional_embeddings", c.additional_embeddings, 4);
  j.require("norm_in_type", nullptr);
  j.require("embedding_proj_norm_type", nullptr);
  j.require("encoder_hid_proj_type", "linear");
  j.require("added_emb_type", "prd");
  j.require("time_embed_act_fn", "silu");
  return c;
}

struct PriorTransformer::Impl {
  struct Block {
    nn::LayerNorm norm1, norm3;
    nn::Linear q, k, v, out, ff1, ff2;
  };
  nn::Linear time_1, time_2, proj_in, embedding_proj, encoder_proj, proj_out;
  nn::LayerNorm norm_out;
  at::Tensor positional, prd, clip_mean, clip_std;
  std::vector<Block> blocks;
};

PriorTransformer::PriorTransformer(const PriorConfig& c, const Weights& w) : cfg_(c), impl_(std::make_shared<Impl>()) {
  Impl& m = *impl_;
  const int64_t D = c.inner_dim(), E = c.embedding_dim, T = c.time_embed_dim > 0 ? c.time_embed_dim : D;
  const int64_t P = c.embedding_proj_dim > 0 ? c.embedding_proj_dim : E, C = c.clip_embed_dim > 0 ? c.clip_embed_dim : E;
  m.time_1 = nn::Linear(w, "time_embedding.linear_1", D, T);
  m.time_2 = nn::Linear(w, "time_embedding.linear_2", T, D);
  m.proj_in = nn::Linear(w, "proj_in", E, D);
  m.embedding_proj = nn::Linear(w, "embedding_proj", P, D);
  m.encoder_proj = nn::Linear(w, "encoder_hidden_states_proj", E, D);
  m.positional = w.get("positional_embedding", {1, c.num_embeddings + c.additional_embeddings, D});
  m.prd = w.get("prd_embedding", {1, 1, D});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "transformer_blocks." + std::to_string(i) + ".";
    Impl::Block b;
    b.norm1 = nn::LayerNorm(w, p + "norm1", D, 1e-5);
    b.norm3 = nn::LayerNorm(w, p + "norm3", D, 1e-5);
    b.q = nn::Linear(w, p + "attn1.to_q", D, D);
    b.k = nn::Linear(w, p + "attn1.to_k", D, D);
    b.v = nn::Linear(w, p + "attn1.to_v", D, D);
    b.out = nn::Linear(w, p + "attn1.to_out.0", D, D);
    b.ff1 = nn::Linear(w, p + "ff.net.0.proj", D, 4 * D);
    b.ff2 = nn::Linear(w, p + "ff.net.2", 4 * D, D);
    m.blocks.push_back(std::move(b));
  }
  m.norm_out = nn::LayerNorm(w, "norm_out", D, 1e-5);
  m.proj_out = nn::Linear(w, "proj_to_clip_embeddings", D, C);
  m.clip_mean = w.get("clip_mean", {1, C});
  m.clip_std = w.get("clip_std", {1, C});
}

std::shared_ptr<PriorTransformer> PriorTransformer::load(const std::string& dir, const DeviceSpec& spec) {
  const auto cfg = PriorConfig::load(path_join(dir, "config.json"));
  const Weights w = Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec);
  auto m = std::make_shared<PriorTransformer>(cfg, w);
  for (const auto& k : w.unused()) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

at::Tensor PriorTransformer::post_process_latents(const at::Tensor& latents) const {
  return latents * impl_->clip_std + impl_->clip_mean;
}

at::Tensor PriorTransformer::forward(const at::Tensor& hidden_states, const at::Tensor& timesteps,
                                     const at::Tensor& proj_embedding, const at::Tensor& encoder_hidden_states,
                                     const at::Tensor& attention_mask) const {
  const Impl& m = *impl_;
  const int64_t B = hidden_states.size(0), D = cfg_.inner_dim(), H = cfg_.num_attention_heads;
  DP_CHECK(hidden_states.dim() == 2 && proj_embedding.dim() == 2 && proj_embedding.size(0) == B,
           "prior: hidden_states and proj_embedding must be [B, E]");
  DP_CHECK(encoder_hidden_states.dim() == 3 && encoder_hidden_states.size(0) == B &&
               encoder_hidden_states.size(1) == cfg_.num_embeddings,
           "prior: encoder_hidden_states must be [", B, ", ", cfg_.num_embeddings, ", E]");
  at::Tensor t = timesteps.to(at::kCPU);
  if (t.dim() == 0) t = t.reshape({1});
  if (t.size(0) == 1 && B > 1) t = t.expand({B});
  if (nn::batch_invariant() && B > 1)  // each sample alone: its result does not depend on its batch neighbours
    return nn::per_sample(B, [&](int64_t i) {
      return forward(hidden_states.slice(0, i, i + 1), t.slice(0, i, i + 1), proj_embedding.slice(0, i, i + 1),
                     encoder_hidden_states.slice(0, i, i + 1),
                     attention_mask.defined() ? attention_mask.slice(0, i, i + 1) : attention_mask);
    });
  const auto dt = hidden_states.scalar_type();
  // tokens: [projected hidden states (L); text embedding; time embedding; noisy image embedding; prd]
  const at::Tensor t_emb = timestep_embedding(t, D, /*flip_sin_to_cos=*/true, 0).to(hidden_states.device(), dt);
  const at::Tensor time = m.time_2(at::silu(m.time_1(t_emb)));
  at::Tensor x = at::cat({m.encoder_proj(encoder_hidden_states), m.embedding_proj(proj_embedding).unsqueeze(1),
                          time.unsqueeze(1), m.proj_in(hidden_states).unsqueeze(1), m.prd.to(dt).expand({B, 1, D})},
                         1);
  const int64_t N = x.size(1);
  x = x + m.positional.to(dt);
  // additive mask [B, 1, N, N]: causal (-10000 above the diagonal) plus padding keys (-10000), as diffusers builds it
  at::Tensor causal = at::full({N, N}, -10000.0, x.options()).triu(1);
  at::Tensor pad = (1 - attention_mask.to(x.device(), dt)) * -10000.0;                 // [B, L]
  pad = at::constant_pad_nd(pad, {0, cfg_.additional_embeddings}, 0.0);                 // [B, N]
  const at::Tensor mask = (pad.unsqueeze(1) + causal.unsqueeze(0)).unsqueeze(1);         // [B, 1, N, N]
  auto heads = [&](const at::Tensor& y) { return y.view({B, N, H, D / H}).transpose(1, 2); };
  for (const auto& b : m.blocks) {
    at::Tensor y = b.norm1(x);
    at::Tensor a = nn::attention(heads(b.q(y)), heads(b.k(y)), heads(b.v(y)), mask).transpose(1, 2).reshape({B, N, D});
    x = x + b.out(a);
    y = b.ff2(at::gelu(b.ff1(b.norm3(x))));
    x = x + y;
  }
  x = m.norm_out(x);
  return m.proj_out(x.select(1, N - 1));  // the prd token
}

}  // namespace diffpipe
