// AutoencoderKL (diffusers) on ATen: encoder -> quant_conv -> diagonal Gaussian (mean, logvar);
// post_quant_conv -> decoder. Also VQModel (MoVQ, Kandinsky 2.2), which VaeConfig::vq marks. Loads vae/config.json +
// diffusion_pytorch_model.safetensors (legacy attention key names query/key/value/proj_attn are accepted). Thread-safety: encode()/decode() are const and reentrant.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct VaeConfig {
  int64_t in_channels = 3, out_channels = 3, latent_channels = 4;
  std::vector<int64_t> block_out_channels;
  int64_t layers_per_block = 2;
  int64_t norm_num_groups = 32;
  double scaling_factor = 0.18215;
  double shift_factor = 0.0;
  bool use_quant_conv = true, use_post_quant_conv = true, mid_block_add_attention = true;
  bool force_upcast = true;  // run in float32 when the pipeline is float16/bfloat16
  // AttnDownEncoderBlock2D / AttnUpDecoderBlock2D: a one-head attention after each resnet of that block
  std::vector<bool> down_attention, up_attention;
  // VQModel (Kandinsky 2.2's MoVQ): its pipelines encode images to latents and decode latents as they are (no
  // scaling factor, no sampling, no quantisation: force_not_quantize); with norm_type "spatial" every decoder norm
  // is a SpatialNorm conditioned on those latents.
  bool vq = false;
  bool spatial_norm = false;
  static VaeConfig load(const std::string& config_json);
};

struct GaussianLatent {
  at::Tensor mean, logvar;  // [B, latent_channels, h, w]; logvar clamped to [-30, 20] (a VQModel: the latents as
                            // mean, logvar undefined)
};

class AutoencoderKL {
 public:
  // with_encoder / with_decoder: which halves to build (a rank that only encodes images leaves the decoder out).
  AutoencoderKL(const VaeConfig& cfg, const Weights& w, bool with_encoder = true, bool with_decoder = true);
  static std::shared_ptr<AutoencoderKL> load(const std::string& dir, const DeviceSpec& spec, bool with_encoder = true,
                                             bool with_decoder = true);

  GaussianLatent encode(const at::Tensor& image) const;  // image: [B, 3, H, W] in [-1, 1]
  at::Tensor decode(const at::Tensor& latents) const;    // raw: [B, L, h, w] -> [B, 3, H, W] (no scaling/clamp)
  // Pipeline convention: decode(latents / scaling_factor + shift_factor); a VQModel's pipelines decode the latents
  // as they are.
  at::Tensor decode_scaled(const at::Tensor& latents) const;
  const VaeConfig& config() const { return cfg_; }
  int64_t downscale() const { return int64_t(1) << (cfg_.block_out_channels.size() - 1); }
  bool has_encoder() const;
  bool has_decoder() const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  VaeConfig cfg_;
};

// [-1, 1] float images [B, 3, H, W] -> uint8 HWC [B, H, W, 3]: round(clamp(x/2+0.5, 0, 1) * 255).
at::Tensor to_uint8_hwc(const at::Tensor& images);

}  // namespace diffpipe
