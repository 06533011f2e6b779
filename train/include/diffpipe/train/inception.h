// The Inception-v3 that FID is defined with (the TensorFlow 2015-12-05 graph as pytorch-fid ports it:
// FIDInceptionA/C/E_1/E_2 blocks, average pools that do not count padding, max pool in the last block),
// loaded from a user-supplied safetensors file with torchvision's key names (Conv2d_1a_3x3.conv.weight,
// Mixed_5b.branch1x1.bn.running_var, ...; fc.* is ignored). features() gives the 2048-d pool3 activations
// of images resized to 299x299 (bilinear, as pytorch-fid). Converting pytorch-fid's weights once, in Python:
//   sd = torch.load("pt_inception-2015-12-05-6726825d.pth")
//   safetensors.torch.save_file({k: v for k, v in sd.items() if "num_batches" not in k}, "inception.safetensors")
// Batch norms are folded into the convolutions at load. Thread-safety: features() is const.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "diffpipe/stages/weights.h"

namespace diffpipe {

class FidInception {
 public:
  explicit FidInception(const Weights& w);  // throws naming the file and the missing or mis-shaped tensor
  static std::shared_ptr<FidInception> load(const std::string& safetensors_path, const DeviceSpec& spec = {});
  // images [B, 3, H, W] in [-1, 1] -> [B, 2048]
  at::Tensor features(const at::Tensor& images) const;
  static constexpr int64_t kFeatures = 2048;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

}  // namespace diffpipe
