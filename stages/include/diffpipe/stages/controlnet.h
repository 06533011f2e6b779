// ControlNet (diffusers' ControlNetModel, Stable Diffusion 1.x/2.x and SDXL): a trained copy of a UNet's encoder half that reads a conditioning image
// (edges, depth, pose... as [0, 1] RGB) through a small convolutional embedding added to conv_in's output, and
// returns, through 1x1 zero-initialised convolutions, one residual per skip connection and one for the mid block,
// which the UNet adds to its own (UNetResiduals), each scaled by the request's conditioning scale.
// Thread-safety: const after load.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/unet.h"

namespace diffpipe {

struct ControlNetConfig {
  UNetConfig unet;  // the encoder half's settings (config.json's UNet keys)
  std::vector<int64_t> conditioning_embedding_out_channels{16, 32, 96, 256};
  int64_t conditioning_channels = 3;
  bool bgr = false;  // controlnet_conditioning_channel_order "bgr": the image's channels reversed first
  // global_pool_conditions: each residual averaged over its pixels (shuffle-type ControlNets; the pipelines then run
  // them in guess mode)
  bool global_pool = false;
  // Rejects what is not implemented (an addition_embed_type other than SDXL's "text_time"), naming the key.
  static ControlNetConfig load(const std::string& config_json);
};

class ControlNetModel {
 public:
  ControlNetModel(const ControlNetConfig& cfg, const Weights& w);
  static std::shared_ptr<ControlNetModel> load(const std::string& dir, const DeviceSpec& spec);
  // sample, timesteps, encoder_hidden_states as the UNet takes them; cond [B, 3, H, W] in [0, 1] with H, W the
  // latents' size times the VAE's factor; scales [B] (float, on any device): each row's conditioning scale, or
  // [B, K + 1] with one per residual (K skips, then the mid block's: guess mode's 0.1 ... 1 ramp). An SDXL
  // ControlNet (addition_embed_type "text_time") also takes the UNet's pooled text embedding and size conditioning
  // (class_labels, time_ids as UNet2DConditionModel::forward takes them).
  UNetResiduals forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& encoder_hidden_states,
                        const at::Tensor& cond, const at::Tensor& scales, const at::Tensor& class_labels = at::Tensor(),
                        const at::Tensor& time_ids = at::Tensor()) const;
  const ControlNetConfig& config() const { return cfg_; }
  int64_t num_skips() const;  // the residuals for the UNet's skips (K; the mid block's comes after them)

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  ControlNetConfig cfg_;
};

}  // namespace diffpipe
