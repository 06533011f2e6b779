// FluxTransformer2DModel (diffusers), the rectified-flow transformer of FLUX.1 [dev] / [schnell], on ATen: the
// latents as 2x2-packed tokens (64 channels for a 16-channel VAE), T5 tokens projected by context_embedder, rotary
// position embeddings over (0, row, column) ids, double-stream blocks (text and image tokens attend jointly, each
// with its own projections, RMS-normed queries/keys and adaLN-Zero modulation) then single-stream blocks (one sequence,
// attention and a gelu-tanh MLP in parallel), conditioned on the timestep, the guidance scale (guidance_embeds: the
// [dev] model's distilled guidance) and CLIP's pooled embedding. Loads transformer/config.json +
// diffusion_pytorch_model.safetensors; every shape is checked against the config. Thread-safety: forward() is const.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/lora.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct FluxTransformerConfig {
  int64_t in_channels = 64, out_channels = 64, num_layers = 19, num_single_layers = 38;
  int64_t attention_head_dim = 128, num_attention_heads = 24, joint_attention_dim = 4096, pooled_projection_dim = 768;
  bool guidance_embeds = false;
  std::vector<int64_t> axes_dims_rope{16, 56, 56};  // rotary widths of the id axes; they add up to the head width
  int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
  static FluxTransformerConfig load(const std::string& config_json);  // rejects unsupported values, naming the key
};

class FluxTransformer2DModel {
 public:
  FluxTransformer2DModel(const FluxTransformerConfig& cfg, const Weights& w);
  // `lora`: layers fused into the weights first (those of component "transformer"; per-request adapters attach)
  static std::shared_ptr<FluxTransformer2DModel> load(const std::string& dir, const DeviceSpec& spec,
                                                      const std::vector<LoraLayer>& lora = {});

  // latents [B, in_channels / 4, H, W] (H, W even; packed into (H/2)(W/2) tokens here, image ids (0, row, column));
  // timestep [B] or 0-d as the Flux pipelines pass it (sigma: t / 1000); encoder_hidden_states [B, L,
  // joint_attention_dim] (text ids all 0); pooled_projections [B, pooled_projection_dim]; guidance [B] or 0-d (the
  // guidance scale; needed exactly when guidance_embeds). Returns the velocity [B, out_channels / 4, H, W], unpacked.
  at::Tensor forward(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states,
                     const at::Tensor& pooled_projections, const at::Tensor& guidance = at::Tensor()) const;
  const FluxTransformerConfig& config() const { return cfg_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  FluxTransformerConfig cfg_;
};

}  // namespace diffpipe
