// CLIPTextModel (transformers) on ATen: learned position embeddings, pre-LN blocks, causal mask,
// quick_gelu/gelu, final layer norm, pooled output at the first end-of-text token; optional clip_skip.
// Loads text_encoder/config.json + model.safetensors. Thread-safety: forward() is const; concurrent calls
// are safe (ATen ops are reentrant) but the stage workers call it from one thread.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "diffpipe/stages/lora.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct ClipTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t max_position_embeddings = 77;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";  // or "gelu"
  int64_t eos_token_id = 49407;
  int64_t projection_dim = 0;  // > 0: CLIPTextModelWithProjection's text_projection is present
  static ClipTextConfig load(const std::string& config_json);
};

struct ClipTextOutput {
  at::Tensor last_hidden_state;  // [B, L, D] (after the final layer norm; with clip_skip, of the earlier layer)
  at::Tensor pooled;             // [B, D] at the first end-of-text token of the full model
  at::Tensor penultimate;        // [B, L, D]: transformers' hidden_states[-2] (the last layer's input, no final
                                 // layer norm), which SDXL's pipelines use; with sdxl_skip k, hidden_states[-(k + 2)]
};

class ClipTextModel {
 public:
  ClipTextModel(const ClipTextConfig& cfg, const Weights& w);
  // `lora`: layers fused into the weights first (those of the component named like `dir`'s last part:
  // "text_encoder" or "text_encoder_2")
  // `added_rows` [k, hidden_size] (textual inversion): token embeddings appended after the vocabulary's.
  static std::shared_ptr<ClipTextModel> load(const std::string& dir, const DeviceSpec& spec,
                                             const std::vector<LoraLayer>& lora = {},
                                             const at::Tensor& added_rows = at::Tensor());

  // input_ids: [B, L] int64. clip_skip: 0 = last layer, 1 = penultimate, ... (final layer norm applied).
  // attention_mask ([B, L], 1 = token, 0 = padding; optional): padding keys are masked too, as transformers does
  // when given one; without it only the causal mask applies (real tokens never see the padding after them, so
  // only the padding positions' states differ).
  // sdxl_skip: `penultimate` is hidden_states[-(sdxl_skip + 2)] (SDXL's clip_skip), in [0, num_hidden_layers).
  ClipTextOutput forward(const at::Tensor& input_ids, int clip_skip = 0, const at::Tensor& attention_mask = at::Tensor(),
                         int sdxl_skip = 0) const;
  // CLIPTextModelWithProjection's text_embeds: pooled @ text_projection^T ([B, projection_dim]); needs
  // projection_dim > 0 and the text_projection.weight tensor.
  at::Tensor text_embeds(const at::Tensor& input_ids) const;
  at::Tensor project(const at::Tensor& pooled) const;  // text_projection of a pooled output (same requirement)
  const ClipTextConfig& config() const { return cfg_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  ClipTextConfig cfg_;
};

}  // namespace diffpipe
