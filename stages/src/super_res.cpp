#include "diffpipe/stages/super_res.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "nn.h"

namespace diffpipe {

struct SuperResolution::Impl {
  std::vector<nn::Conv2d> convs;
};

SuperResolution::SuperResolution(const SuperResConfig& c, const Weights& w) : cfg_(c) {
  auto m = std::make_shared<Impl>();
  for (int64_t i = 0; i < c.layers; ++i) {
    const int64_t in = i == 0 ? 3 : c.channels, out = i == c.layers - 1 ? 3 : c.channels;
    m->convs.emplace_back(w, "convs." + std::to_string(i), in, out, 3, 1, 1);
  }
  impl_ = m;
}

std::shared_ptr<SuperResolution> SuperResolution::load(const std::string& dir, const DeviceSpec& spec) {
  const auto cfg = SuperResConfig::load(path_join(dir, "config.json"));
  return std::make_shared<SuperResolution>(cfg, Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec));
}

at::Tensor SuperResolution::forward(const at::Tensor& x) const {
  DP_CHECK(x.dim() == 4 && x.size(1) == 3, "super-resolution: images must be [B, 3, H, W]");
  if (nn::batch_invariant() && x.size(0) > 1)
    return nn::per_sample(x.size(0), [&](int64_t i) { return forward(x.slice(0, i, i + 1)); });
  at::Tensor up = at::upsample_nearest2d(x, {x.size(2) * cfg_.scale, x.size(3) * cfg_.scale});
  at::Tensor h = up;
  for (size_t i = 0; i < impl_->convs.size(); ++i) {
    h = impl_->convs[i](h);
    if (i + 1 < impl_->convs.size()) h = at::silu(h);
  }
  return up + h;
}

}  // namespace diffpipe
