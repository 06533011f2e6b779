// CLIPVisionModelWithProjection (transformers) and CLIPImageProcessor on ATen: the image encoder of Stable
// unCLIP's image variations (StableUnCLIPImg2ImgPipeline: feature_extractor/ + image_encoder/).
//   ClipImageProcessorConfig / preprocess_clip_image: RGB 8-bit -> pixel values as transformers' CLIPImageProcessor
//     (torchvision backend, on a CPU) makes them: shortest edge resized with the 8-bit antialiased bicubic kernel,
//     centre crop, (x - mean/r) / (std/r) in float32 with r the rescale factor.
//   ClipVisionModel: patch embedding (conv, no bias), class token, learned positions, pre-LN ("pre_layrnorm"),
//     CLIP encoder layers, post-LN of the class token, visual_projection -> image_embeds.
// Unsupported config values are refused naming the key. Thread-safety: immutable after load.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "diffpipe/runtime/image.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct ClipVisionConfig {
  int64_t hidden_size = 768, intermediate_size = 3072, num_hidden_layers = 12, num_attention_heads = 12;
  int64_t image_size = 224, patch_size = 32, num_channels = 3, projection_dim = 512;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";
  static ClipVisionConfig load(const std::string& config_json);
};

struct ClipImageProcessorConfig {
  bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true;
  int64_t shortest_edge = 224, crop_height = 224, crop_width = 224;
  double rescale_factor = 1.0 / 255.0;
  double mean[3] = {0.48145466, 0.4578275, 0.40821073};
  double std[3] = {0.26862954, 0.26130258, 0.27577711};
  static ClipImageProcessorConfig load(const std::string& preprocessor_config_json);
  // The file when it is there, else what diffusers builds without one: CLIPImageProcessor(size=crop_size=image_size)
  static ClipImageProcessorConfig load_or_default(const std::string& preprocessor_config_json, int64_t image_size);
};

// One RGB image -> pixel values [1, 3, crop_height, crop_width] float32 on the CPU.
at::Tensor preprocess_clip_image(const ClipImageProcessorConfig& cfg, const Image& rgb);

class ClipVisionModel {
 public:
  ClipVisionModel(const ClipVisionConfig& cfg, const Weights& w);
  static std::shared_ptr<ClipVisionModel> load(const std::string& dir, const DeviceSpec& spec);
  // pixel_values [B, 3, image_size, image_size] -> image_embeds [B, projection_dim]
  at::Tensor image_embeds(const at::Tensor& pixel_values) const;
  // pixel_values -> the penultimate encoder layer's output [B, 1 + patches, hidden_size] (transformers'
  // hidden_states[-2]: IP-Adapter Plus's input)
  at::Tensor penultimate_hidden_states(const at::Tensor& pixel_values) const;
  // ... of an all-zero pixel_values image (IP-Adapter Plus's unconditional input), computed once [1 + patches, hidden]
  at::Tensor zero_image_hidden_states() const;
  const ClipVisionConfig& config() const { return cfg_; }

 private:
  at::Tensor hidden(const at::Tensor& pixel_values, size_t layers) const;  // after `layers` encoder layers
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  struct ZeroCache;
  std::shared_ptr<ZeroCache> zero_;
  ClipVisionConfig cfg_;
};

}  // namespace diffpipe
