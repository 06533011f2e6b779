#include "diffpipe/stages/clip_vision.h"

#include <cmath>
#include <mutex>

#include "clip_layer.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "nn.h"

namespace diffpipe {

ClipVisionConfig ClipVisionConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  ClipVisionConfig c;
  c.hidden_size = j.integer("hidden_size", c.hidden_size);
  c.intermediate_size = j.integer("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = j.integer("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = j.integer("num_attention_heads", c.num_attention_heads);
  c.image_size = j.integer("image_size", c.image_size);
  c.patch_size = j.integer("patch_size", c.patch_size);
  c.num_channels = j.integer("num_channels", c.num_channels);
  c.projection_dim = j.integer("projection_dim", c.projection_dim);
  c.layer_norm_eps = j.number("layer_norm_eps", c.layer_norm_eps);
  c.hidden_act = j.string("hidden_act", c.hidden_act);
  for (const char* k : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                        "patch_size", "projection_dim"})
    j.at_least(k, j.integer(k, 1), 1);
  if (c.hidden_size % c.num_attention_heads != 0) j.fail("num_attention_heads", "must divide hidden_size");
  if (c.image_size % c.patch_size != 0) j.fail("patch_size", "must divide image_size");
  if (c.num_channels != 3) j.fail("num_channels", "only RGB (3) is supported");
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    j.fail("hidden_act", "unsupported activation '" + c.hidden_act + "' (supported: quick_gelu, gelu)");
  return c;
}

ClipImageProcessorConfig ClipImageProcessorConfig::load_or_default(const std::string& path, int64_t image_size) {
  if (file_exists(path)) return load(path);
  ClipImageProcessorConfig c;
  c.shortest_edge = image_size;
  c.crop_height = c.crop_width = image_size;
  return c;
}

ClipImageProcessorConfig ClipImageProcessorConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  ClipImageProcessorConfig c;
  c.do_resize = j.boolean("do_resize", true);
  c.do_center_crop = j.boolean("do_center_crop", true);
  c.do_rescale = j.boolean("do_rescale", true);
  c.do_normalize = j.boolean("do_normalize", true);
  c.rescale_factor = j.number("rescale_factor", c.rescale_factor);
  const auto& js = j.json();
  if (js.contains("size")) {
    const auto& s = js["size"];
    if (s.is_number_integer()) c.shortest_edge = s.get<int64_t>();
    else if (s.is_object() && s.contains("shortest_edge")) c.shortest_edge = s["shortest_edge"].get<int64_t>();
    else j.fail("size", "supported: {\"shortest_edge\": N} or N");
  }
  if (js.contains("crop_size")) {
    const auto& s = js["crop_size"];
    if (s.is_number_integer()) c.crop_height = c.crop_width = s.get<int64_t>();
    else if (s.is_object() && s.contains("height") && s.contains("width")) {
      c.crop_height = s["height"].get<int64_t>();
      c.crop_width = s["width"].get<int64_t>();
    } else {
      j.fail("crop_size", "supported: {\"height\": H, \"width\": W} or N");
    }
  }
  for (const char* k : {"image_mean", "image_std"})
    if (js.contains(k)) {
      if (!js[k].is_array() || js[k].size() != 3) j.fail(k, "expected 3 numbers (R, G, B)");
      for (int i = 0; i < 3; ++i) (std::string(k) == "image_mean" ? c.mean : c.std)[i] = js[k][i].get<double>();
    }
  if (j.integer("resample", 3) != 3) j.fail("resample", "only bicubic (3) is supported");
  if (c.shortest_edge < 1 || c.crop_height < 1 || c.crop_width < 1) j.fail("size", "sizes must be positive");
  for (double s : c.std)
    if (!(s > 0)) j.fail("image_std", "must be positive");
  return c;
}

at::Tensor preprocess_clip_image(const ClipImageProcessorConfig& c, const Image& rgb) {
  DP_CHECK(rgb.channels == 3 && rgb.width > 0 && rgb.height > 0, "image prompt: expected an RGB image");
  at::Tensor x = at::from_blob(const_cast<uint8_t*>(rgb.pixels.data()), {rgb.height, rgb.width, 3}, at::kByte)
                     .permute({2, 0, 1})
                     .unsqueeze(0);
  if (c.do_resize) {  // transformers' get_resize_output_image_size(shortest_edge, default_to_square=False)
    const int64_t H = rgb.height, W = rgb.width, s = std::min(H, W), l = std::max(H, W);
    const int64_t ns = c.shortest_edge, nl = static_cast<int64_t>(double(c.shortest_edge) * double(l) / double(s));
    const int64_t oh = H <= W ? ns : nl, ow = H <= W ? nl : ns;
    if (oh != H || ow != W)  // torchvision on the CPU: the 8-bit antialiased bicubic kernel (fixed point)
      x = at::_upsample_bicubic2d_aa(x, {oh, ow}, /*align_corners=*/false);
  }
  x = x.to(at::kFloat);
  if (c.do_center_crop) {
    const int64_t H = x.size(2), W = x.size(3);
    DP_CHECK(c.crop_height <= H && c.crop_width <= W, "image prompt: ", W, "x", H, " is smaller than the crop ",
             c.crop_width, "x", c.crop_height, " after resizing");
    const int64_t top = static_cast<int64_t>((H - c.crop_height) / 2.0), left = static_cast<int64_t>((W - c.crop_width) / 2.0);
    x = x.slice(2, top, top + c.crop_height).slice(3, left, left + c.crop_width);
  }
  if (c.do_rescale && c.do_normalize) {  // fused as transformers does: (x - mean / r) / (std / r), float32
    const at::Tensor m = at::tensor({c.mean[0], c.mean[1], c.mean[2]}, at::kFloat) * (1.0 / c.rescale_factor);
    const at::Tensor s = at::tensor({c.std[0], c.std[1], c.std[2]}, at::kFloat) * (1.0 / c.rescale_factor);
    x = (x - m.view({1, 3, 1, 1})) / s.view({1, 3, 1, 1});
  } else if (c.do_rescale) {
    x = x * c.rescale_factor;
  } else if (c.do_normalize) {
    const at::Tensor m = at::tensor({c.mean[0], c.mean[1], c.mean[2]}, at::kFloat);
    const at::Tensor s = at::tensor({c.std[0], c.std[1], c.std[2]}, at::kFloat);
    x = (x - m.view({1, 3, 1, 1})) / s.view({1, 3, 1, 1});
  }
  return x.contiguous();
}

struct ClipVisionModel::Impl {
  at::Tensor patch_weight, class_embedding, position_embedding;
  nn::LayerNorm pre_ln, post_ln;
  std::vector<nn::ClipLayer> layers;
  nn::Linear projection;
};

ClipVisionModel::ClipVisionModel(const ClipVisionConfig& c, const Weights& w0) : cfg_(c) {
  auto m = std::make_shared<Impl>();
  const Weights w = w0.sub("vision_model");
  const int64_t D = c.hidden_size, P = c.patch_size, N = (c.image_size / P) * (c.image_size / P);
  m->patch_weight = w.get("embeddings.patch_embedding.weight", {D, c.num_channels, P, P});
  m->class_embedding = w.get("embeddings.class_embedding", {D});
  m->position_embedding = w.get("embeddings.position_embedding.weight", {N + 1, D});
  m->pre_ln = nn::LayerNorm(w, "pre_layrnorm", D, c.layer_norm_eps);  // transformers' spelling
  m->post_ln = nn::LayerNorm(w, "post_layernorm", D, c.layer_norm_eps);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    m->layers.emplace_back(w.sub("encoder.layers." + std::to_string(i)), D, c.intermediate_size, c.num_attention_heads,
                           c.layer_norm_eps, c.hidden_act == "quick_gelu");
  m->projection = nn::Linear(w0, "visual_projection", D, c.projection_dim, false);
  impl_ = m;
  zero_ = std::make_shared<ZeroCache>();
}

std::shared_ptr<ClipVisionModel> ClipVisionModel::load(const std::string& dir, const DeviceSpec& spec) {
  const auto cfg = ClipVisionConfig::load(path_join(dir, "config.json"));
  const Weights w = Weights::load(path_join(dir, "model.safetensors"), spec);
  auto m = std::make_shared<ClipVisionModel>(cfg, w);
  for (const auto& k : w.unused())
    if (k.find("position_ids") == std::string::npos) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

at::Tensor ClipVisionModel::hidden(const at::Tensor& pixel_values, size_t layers) const {
  const Impl& m = *impl_;
  const int64_t S = cfg_.image_size, D = cfg_.hidden_size, P = cfg_.patch_size;
  DP_CHECK(pixel_values.dim() == 4 && pixel_values.size(1) == 3 && pixel_values.size(2) == S && pixel_values.size(3) == S,
           "image encoder: pixel values must be [B, 3, ", S, ", ", S, "], got ", pixel_values.sizes());
  const int64_t B = pixel_values.size(0);
  if (nn::batch_invariant() && B > 1)
    return nn::per_sample(B, [&](int64_t i) { return hidden(pixel_values.slice(0, i, i + 1), layers); });
  const at::Tensor px = pixel_values.to(m.patch_weight.device(), m.patch_weight.scalar_type());
  at::Tensor patches = at::conv2d(px, m.patch_weight, {}, {P, P}).flatten(2).transpose(1, 2);  // [B, N, D]
  at::Tensor x = at::cat({m.class_embedding.view({1, 1, D}).expand({B, 1, D}), patches}, 1) +
                 m.position_embedding.unsqueeze(0);
  x = m.pre_ln(x);
  for (size_t k = 0; k < layers; ++k) x = m.layers[k](x, at::Tensor());
  return x;
}

at::Tensor ClipVisionModel::image_embeds(const at::Tensor& pixel_values) const {
  const Impl& m = *impl_;
  if (nn::batch_invariant() && pixel_values.size(0) > 1)  // the projection's rows too (ClipTextModel::project)
    return nn::per_sample(pixel_values.size(0), [&](int64_t i) { return image_embeds(pixel_values.slice(0, i, i + 1)); });
  return m.projection(m.post_ln(hidden(pixel_values, m.layers.size()).select(1, 0)));
}

at::Tensor ClipVisionModel::penultimate_hidden_states(const at::Tensor& pixel_values) const {
  DP_CHECK(impl_->layers.size() >= 2, "image encoder: no penultimate layer (", impl_->layers.size(), " layers)");
  return hidden(pixel_values, impl_->layers.size() - 1);
}

struct ClipVisionModel::ZeroCache {
  std::mutex mu;
  at::Tensor hidden;
};

at::Tensor ClipVisionModel::zero_image_hidden_states() const {
  std::lock_guard<std::mutex> lk(zero_->mu);
  if (!zero_->hidden.defined()) {
    const int64_t S = cfg_.image_size;
    zero_->hidden = penultimate_hidden_states(at::zeros({1, 3, S, S}, at::kFloat))[0].to(at::kCPU, at::kFloat);
  }
  return zero_->hidden;
}

}  // namespace diffpipe
