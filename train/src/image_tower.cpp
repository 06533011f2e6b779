#include "diffpipe/train/image_tower.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe {

ImageTowerConfig ImageTowerConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  ImageTowerConfig c;
  c.channels = j.int_list("channels");
  c.projection_dim = j.integer("projection_dim");
  c.image_size = j.integer("image_size", 64);
  c.grid = j.integer("grid", 1);
  if (c.channels.empty()) j.fail("channels", "must not be empty");
  const int64_t map = c.image_size >> c.channels.size();
  if (c.grid < 1 || map < c.grid || map % c.grid) j.fail("grid", "must divide the final map side " + std::to_string(map));
  return c;
}

ImageTower::ImageTower(const ImageTowerConfig& c, const Weights& w) : cfg_(c) {
  int64_t in = 3;
  for (size_t i = 0; i < c.channels.size(); ++i) {
    w_.push_back(w.get("convs." + std::to_string(i) + ".weight", {c.channels[i], in, 3, 3}));
    b_.push_back(w.get("convs." + std::to_string(i) + ".bias", {c.channels[i]}));
    in = c.channels[i];
  }
  proj_ = w.get("projection.weight", {c.projection_dim, c.feature_dim()});
}

std::shared_ptr<ImageTower> ImageTower::load(const std::string& dir, const DeviceSpec& spec) {
  return std::make_shared<ImageTower>(ImageTowerConfig::load(path_join(dir, "config.json")),
                                      Weights::load(path_join(dir, "model.safetensors"), spec));
}

at::Tensor ImageTower::features(const at::Tensor& images) const {
  DP_CHECK(images.dim() == 4 && images.size(1) == 3, "image tower: images must be [B, 3, H, W]");
  at::Tensor x = images;
  if (x.size(2) != cfg_.image_size || x.size(3) != cfg_.image_size)
    x = at::upsample_bilinear2d(x, {cfg_.image_size, cfg_.image_size}, false);
  for (size_t i = 0; i < w_.size(); ++i) x = at::silu(at::conv2d(x, w_[i], b_[i], {2, 2}, {1, 1}));
  if (cfg_.grid == 1) return x.mean({2, 3});
  return at::adaptive_avg_pool2d(x, {cfg_.grid, cfg_.grid}).flatten(1);
}

at::Tensor ImageTower::embed(const at::Tensor& images) const { return at::linear(features(images), proj_); }

}  // namespace diffpipe
