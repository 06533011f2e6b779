// The CLIP-style image tower diffpipe trains with its text encoder (contrastively, `diffpipe train text`):
// three stride-2 3x3 convolutions, mean pooling onto a grid x grid map that is flattened (grid > 1 keeps where
// things are, so the text encoder trained against it must encode positions), a linear projection into the shared
// embedding space.
// It scores images (CLIP score) and gives features for FID. Folder: image_encoder/config.json +
// model.safetensors. Thread-safety: forward() is const.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct ImageTowerConfig {
  std::vector<int64_t> channels = {32, 64, 128};
  int64_t projection_dim = 64;
  int64_t image_size = 64;  // images are resized to this before encoding
  int64_t grid = 1;         // pooled map side: 1 = global mean pooling
  int64_t feature_dim() const { return channels.back() * grid * grid; }
  static ImageTowerConfig load(const std::string& config_json);
};

class ImageTower {
 public:
  ImageTower(const ImageTowerConfig& cfg, const Weights& w);
  static std::shared_ptr<ImageTower> load(const std::string& dir, const DeviceSpec& spec);
  // images [B, 3, H, W] in [-1, 1] -> pooled features [B, feature_dim()] and embeddings [B, projection_dim]
  at::Tensor features(const at::Tensor& images) const;
  at::Tensor embed(const at::Tensor& images) const;
  const ImageTowerConfig& config() const { return cfg_; }

 private:
  std::vector<at::Tensor> w_, b_;
  at::Tensor proj_;
  ImageTowerConfig cfg_;
};

}  // namespace diffpipe
