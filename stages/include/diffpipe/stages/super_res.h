// The super-resolution stage's model: enlarges a decoded image by an integer factor (bicubic-free: nearest
// upsampling + a residual convolutional network), trained on (downsampled, original) pairs by
// `diffpipe train sr`. Folder: super_resolution/config.json + diffusion_pytorch_model.safetensors.
// Thread-safety: forward() is const and reentrant.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct SuperResConfig {
  int64_t scale = 2;
  int64_t channels = 32;
  int64_t layers = 4;  // 3x3 convolutions in the residual network
  static SuperResConfig load(const std::string& config_json);
};

class SuperResolution {
 public:
  SuperResolution(const SuperResConfig& cfg, const Weights& w);
  static std::shared_ptr<SuperResolution> load(const std::string& dir, const DeviceSpec& spec);
  // images: [B, 3, H, W] in [-1, 1] -> [B, 3, scale*H, scale*W]
  at::Tensor forward(const at::Tensor& images) const;
  const SuperResConfig& config() const { return cfg_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  SuperResConfig cfg_;
};

}  // namespace diffpipe
