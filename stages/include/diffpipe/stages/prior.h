// PriorTransformer, the DALL-E 2 / Karlo / Stable unCLIP diffusion prior: from the prompt's projected text
// embedding and its hidden states it predicts a CLIP image embedding (diffusers' PriorTransformer with
// encoder_hid_proj_type "linear", added_emb_type "prd": tokens [projected hidden states; text embedding;
// time embedding; noisy image embedding; prd], causal plus padding mask, the prd token's output projected).
// Parameter names follow diffusers, so prior/diffusion_pytorch_model.safetensors maps one to one.
// Thread-safety: immutable after load; forward() is const.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct PriorConfig {
  int64_t num_attention_heads = 32, attention_head_dim = 64, num_layers = 20;
  int64_t embedding_dim = 768;       // the CLIP embedding the prior predicts (and the text embedding)
  int64_t num_embeddings = 77;       // text hidden states (tokens)
  int64_t additional_embeddings = 4; // text embedding, time, noisy image embedding, prd
  int64_t time_embed_dim = 0;        // 0 = inner dim
  int64_t embedding_proj_dim = 0;    // 0 = embedding_dim
  int64_t clip_embed_dim = 0;        // 0 = embedding_dim
  int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
  // Rejects what this implementation does not do (norm_in_type, embedding_proj_norm_type, other projection or
  // added-embedding types, activations), naming the key.
  static PriorConfig load(const std::string& config_json);
};

class PriorTransformer {
 public:
  PriorTransformer(const PriorConfig& cfg, const Weights& w);
  static std::shared_ptr<PriorTransformer> load(const std::string& dir, const DeviceSpec& spec);
  // hidden_states: the noisy image embedding [B, E]; timesteps: [B] or a scalar; proj_embedding: the text
  // embedding [B, E]; encoder_hidden_states: [B, L, E]; attention_mask: [B, L] (1 = token, 0 = padding).
  // Returns the predicted image embedding [B, clip_embed_dim].
  at::Tensor forward(const at::Tensor& hidden_states, const at::Tensor& timesteps, const at::Tensor& proj_embedding,
                     const at::Tensor& encoder_hidden_states, const at::Tensor& attention_mask) const;
  // latents * clip_std + clip_mean: the prior's output in CLIP's embedding space.
  at::Tensor post_process_latents(const at::Tensor& latents) const;
  const PriorConfig& config() const { return cfg_; }

 private:
  struct Impl;
  PriorConfig cfg_;
  std::shared_ptr<Impl> impl_;
};

}  // namespace diffpipe
