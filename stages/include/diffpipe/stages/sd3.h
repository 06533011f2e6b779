// SD3Transformer2DModel (diffusers), the MMDiT denoiser of Stable Diffusion 3 / 3.5, on ATen: the latents cut into
// patches (a strided convolution plus a crop of the fixed 2-D sin-cos position table), the text tokens projected by
// context_embedder, and JointTransformerBlocks in which image and text tokens attend jointly, each stream with its
// own projections, adaLN-Zero modulation by (timestep embedding + pooled text projection) and gelu-tanh feed
// forward; SD3.5's blocks may add a second, image-only attention (dual_attention_layers) and RMS-normalise queries
// and keys (qk_norm "rms_norm"). Loads transformer/config.json + diffusion_pytorch_model.safetensors; every shape is
// checked against the config. Thread-safety: forward() is const and reentrant.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/lora.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct Sd3TransformerConfig {
  int64_t sample_size = 128, patch_size = 2, in_channels = 16, out_channels = 16, num_layers = 18;
  int64_t attention_head_dim = 64, num_attention_heads = 18;
  int64_t joint_attention_dim = 4096, caption_projection_dim = 1152, pooled_projection_dim = 2048;
  int64_t pos_embed_max_size = 96;
  std::vector<int64_t> dual_attention_layers;  // blocks with SD3.5's second (image-only) attention
  bool qk_norm = false;                        // qk_norm "rms_norm" (SD3.5); null otherwise
  int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
  static Sd3TransformerConfig load(const std::string& config_json);  // rejects unsupported values, naming the key
};

class Sd3Transformer2DModel {
 public:
  Sd3Transformer2DModel(const Sd3TransformerConfig& cfg, const Weights& w);
  // `lora`: layers fused into the weights first (those of component "transformer"; per-request adapters attach)
  static std::shared_ptr<Sd3Transformer2DModel> load(const std::string& dir, const DeviceSpec& spec,
                                                     const std::vector<LoraLayer>& lora = {});

  // hidden_states [B, C, H, W] (H and W multiples of patch_size, at most pos_embed_max_size patches each way);
  // timestep [B] (float: sigma x num_train_timesteps) or 0-d; encoder_hidden_states [B, L, joint_attention_dim];
  // pooled_projections [B, pooled_projection_dim]. Returns the velocity prediction [B, out_channels, H, W].
  // `skip_layers`: transformer blocks left out (skip-layer guidance's row; diffusers' skip_layers).
  at::Tensor forward(const at::Tensor& hidden_states, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states,
                     const at::Tensor& pooled_projections, const std::vector<int64_t>& skip_layers = {}) const;
  const Sd3TransformerConfig& config() const { return cfg_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  Sd3TransformerConfig cfg_;
};

}  // namespace diffpipe
