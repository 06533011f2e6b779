#include "diffpipe/stages/clip_text.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "clip_layer.h"
#include "nn.h"

namespace diffpipe {

struct ClipTextModel::Impl {
  at::Tensor token_embedding, position_embedding;
  std::vector<nn::ClipLayer> layers;
  nn::LayerNorm final_ln;
  nn::Linear projection;  // text_projection (no bias), when projection_dim > 0 and present
};

ClipTextModel::ClipTextModel(const ClipTextConfig& c, const Weights& w0) : cfg_(c) {
  auto impl = std::make_shared<Impl>();
  const Weights w = w0.has("text_model.embeddings.token_embedding.weight") ? w0.sub("text_model") : w0;
  const int64_t D = c.hidden_size, F = c.intermediate_size;
  impl->token_embedding = w.get("embeddings.token_embedding.weight", {c.vocab_size, D});
  impl->position_embedding = w.get("embeddings.position_embedding.weight", {c.max_position_embeddings, D});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    impl->layers.emplace_back(w.sub("encoder.layers." + std::to_string(i)), D, F, c.num_attention_heads,
                              c.layer_norm_eps, c.hidden_act == "quick_gelu");
  impl->final_ln = nn::LayerNorm(w, "final_layer_norm", D, c.layer_norm_eps);
  if (c.projection_dim > 0 && (w0.has("text_projection.weight") || w0.has("text_model.text_projection.weight") ||
                               w.has("text_projection.weight")))
    impl->projection = nn::Linear(w0.has("text_projection.weight") ? w0 : w, "text_projection", D, c.projection_dim, false);
  impl_ = impl;
}

std::shared_ptr<ClipTextModel> ClipTextModel::load(const std::string& dir, const DeviceSpec& spec,
                                                   const std::vector<LoraLayer>& lora, const at::Tensor& added_rows) {
  auto cfg = ClipTextConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::load(path_join(dir, "model.safetensors"), spec);
  std::string name = dir;
  while (!name.empty() && name.back() == '/') name.pop_back();
  apply_lora(w, lora, name.substr(name.rfind('/') == std::string::npos ? 0 : name.rfind('/') + 1));
  if (added_rows.defined() && added_rows.size(0) > 0) {  // textual inversion: rows after the vocabulary's
    const std::string key = w.has("text_model.embeddings.token_embedding.weight")
                                ? "text_model.embeddings.token_embedding.weight"
                                : "embeddings.token_embedding.weight";
    w.update(key, [&](const at::Tensor& t) { return at::cat({t, added_rows.to(t.device(), t.scalar_type())}, 0); });
    cfg.vocab_size += added_rows.size(0);
  }
  auto m = std::make_shared<ClipTextModel>(cfg, w);
  for (const auto& k : w.unused())
    if (k.find("position_ids") == std::string::npos && k.find("text_projection") == std::string::npos)
      DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

at::Tensor ClipTextModel::text_embeds(const at::Tensor& input_ids) const { return project(forward(input_ids).pooled); }

at::Tensor ClipTextModel::project(const at::Tensor& pooled) const {
  DP_CHECK(impl_->projection.weight.defined(), "text encoder: no text_projection in this checkpoint");
  // a matrix product's rows depend on how many there are on some CPUs (AVX-512 GEMM kernels chosen by size): one
  // row at a time where results must not depend on the batch
  if (nn::batch_invariant() && pooled.dim() == 2 && pooled.size(0) > 1)
    return nn::per_sample(pooled.size(0), [&](int64_t i) { return impl_->projection(pooled.slice(0, i, i + 1)); });
  return impl_->projection(pooled);
}

ClipTextOutput ClipTextModel::forward(const at::Tensor& input_ids, int clip_skip, const at::Tensor& attention_mask,
                                      int sdxl_skip) const {
  const Impl& m = *impl_;
  DP_CHECK(input_ids.dim() == 2, "text encoder: input_ids must be [batch, length]");
  const int64_t B = input_ids.size(0), L = input_ids.size(1), D = cfg_.hidden_size;
  DP_CHECK(L <= cfg_.max_position_embeddings, "text encoder: ", L, " tokens exceed max_position_embeddings ",
           cfg_.max_position_embeddings);
  DP_CHECK(clip_skip >= 0 && clip_skip < cfg_.num_hidden_layers, "text encoder: clip_skip ", clip_skip,
           " must be in [0, ", cfg_.num_hidden_layers, ")");
  DP_CHECK(sdxl_skip >= 0 && sdxl_skip < cfg_.num_hidden_layers, "text encoder: clip_skip ", sdxl_skip,
           " must be in [0, ", cfg_.num_hidden_layers, ") (SDXL: hidden_states[-(clip_skip + 2)])");
  if (nn::batch_invariant() && B > 1) {
    std::vector<at::Tensor> last, pooled, pen;
    for (int64_t i = 0; i < B; ++i) {
      ClipTextOutput o = nn::at_row(i, [&] {
        return forward(input_ids.slice(0, i, i + 1), clip_skip,
                       attention_mask.defined() ? attention_mask.slice(0, i, i + 1) : attention_mask, sdxl_skip);
      });
      last.push_back(o.last_hidden_state);
      pooled.push_back(o.pooled);
      pen.push_back(o.penultimate);
    }
    return {at::cat(last), at::cat(pooled), at::cat(pen)};
  }
  const at::Tensor ids = input_ids.to(m.token_embedding.device(), at::kLong);
  DP_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < cfg_.vocab_size),
           "text encoder: token id out of range [0, ", cfg_.vocab_size, ")");
  at::Tensor x = at::embedding(m.token_embedding, ids) + m.position_embedding.slice(0, 0, L).unsqueeze(0);
  // causal mask [L, L]: -inf above the diagonal
  at::Tensor mask = at::full({L, L}, -std::numeric_limits<float>::infinity(), x.options()).triu(1);
  if (attention_mask.defined()) {  // [B, 1, L, L]: padding keys masked for every query
    DP_CHECK(attention_mask.dim() == 2 && attention_mask.size(0) == B && attention_mask.size(1) == L,
             "text encoder: attention_mask must be [", B, ", ", L, "], got ", attention_mask.sizes());
    const at::Tensor pad = attention_mask.to(x.device()).eq(0).view({B, 1, 1, L});
    mask = at::where(pad, at::full({}, -std::numeric_limits<float>::infinity(), x.options()), mask.view({1, 1, L, L}));
  }
  const int64_t n = static_cast<int64_t>(m.layers.size());
  at::Tensor skipped, penultimate = x;  // hidden_states[-(sdxl_skip + 2)]: the input of layer n - 1 - sdxl_skip
  for (int64_t i = 0; i < n; ++i) {
    if (i == n - 1 - sdxl_skip) penultimate = x;
    x = m.layers[i](x, mask);
    if (clip_skip > 0 && i == n - 1 - clip_skip) skipped = x;
  }
  ClipTextOutput out;
  out.penultimate = penultimate;
  const at::Tensor last = m.final_ln(x);
  out.last_hidden_state = clip_skip > 0 ? m.final_ln(skipped) : last;
  // pooled: first end-of-text position (legacy configs with eos_token_id == 2 use argmax of the ids)
  at::Tensor pos = cfg_.eos_token_id == 2 ? ids.argmax(-1) : (ids == cfg_.eos_token_id).to(at::kInt).argmax(-1);
  out.pooled = last.reshape({B * L, D}).index_select(0, at::arange(B, ids.options()) * L + pos);
  return out;
}

}  // namespace diffpipe
