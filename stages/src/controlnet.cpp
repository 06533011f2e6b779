#include "diffpipe/stages/controlnet.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "nn.h"

namespace diffpipe {

ControlNetConfig ControlNetConfig::load(const std::string& path) {
  nlohmann::json j = JsonConfig::load(path).json();
  // the encoder half's keys are a UNet's; its missing up blocks mirror the down blocks (never built)
  if (!j.contains("up_block_types") && j.contains("down_block_types") && j["down_block_types"].is_array()) {
    nlohmann::json up = nlohmann::json::array();
    for (auto it = j["down_block_types"].rbegin(); it != j["down_block_types"].rend(); ++it) {
      std::string t = it->is_string() ? it->get<std::string>() : "";
      const size_t d = t.find("Down");
      if (d != std::string::npos) t.replace(d, 4, "Up");
      up.push_back(t);
    }
    j["up_block_types"] = up;
  }
  const JsonConfig cfg(j, path);
  ControlNetConfig c;
  c.unet = UNetConfig::from(cfg);
  if (cfg.has("conditioning_embedding_out_channels"))
    c.conditioning_embedding_out_channels = cfg.int_list("conditioning_embedding_out_channels");
  if (c.conditioning_embedding_out_channels.empty()) cfg.fail("conditioning_embedding_out_channels", "must not be empty");
  c.conditioning_channels = cfg.integer("conditioning_channels", 3);
  const std::string order = cfg.string("controlnet_conditioning_channel_order", "rgb");
  if (order != "rgb" && order != "bgr") cfg.fail("controlnet_conditioning_channel_order", "must be \"rgb\" or \"bgr\"");
  c.bgr = order == "bgr";
  c.global_pool = cfg.boolean("global_pool_conditions", false);
  if (!c.unet.addition_embed_type.empty() && !c.unet.text_time())
    cfg.fail("addition_embed_type", "only null (Stable Diffusion 1.x/2.x) or \"text_time\" (SDXL) is supported in a "
                                    "ControlNet");
  if (c.unet.class_embed_type.size() > 0) cfg.fail("class_embed_type", "is not supported in a ControlNet");
  return c;
}

struct ControlNetModel::Impl {
  std::unique_ptr<UNet2DConditionModel> encoder;
  nn::Conv2d cond_in, cond_out;
  std::vector<nn::Conv2d> cond_blocks;
  std::vector<nn::Conv2d> zero_down;
  nn::Conv2d zero_mid;
};

ControlNetModel::ControlNetModel(const ControlNetConfig& c, const Weights& w) : cfg_(c) {
  auto m = std::make_shared<Impl>();
  const UNetConfig& u = c.unet;
  m->encoder = std::make_unique<UNet2DConditionModel>(u, w, /*encoder_only=*/true);
  const auto& ch = c.conditioning_embedding_out_channels;
  const Weights e = w.sub("controlnet_cond_embedding");
  m->cond_in = nn::Conv2d(e, "conv_in", c.conditioning_channels, ch[0], 3, 1, 1);
  for (size_t i = 0; i + 1 < ch.size(); ++i) {
    m->cond_blocks.emplace_back(e, "blocks." + std::to_string(2 * i), ch[i], ch[i], 3, 1, 1);
    m->cond_blocks.emplace_back(e, "blocks." + std::to_string(2 * i + 1), ch[i], ch[i + 1], 3, 2, 1);
  }
  m->cond_out = nn::Conv2d(e, "conv_out", ch.back(), u.block_out_channels[0], 3, 1, 1);
  // one zero convolution per skip: conv_in's output, every layer of each down block, each downsampler
  std::vector<int64_t> skips{u.block_out_channels[0]};
  for (size_t i = 0; i < u.block_out_channels.size(); ++i) {
    for (int64_t j = 0; j < u.layers_per_block[i]; ++j) skips.push_back(u.block_out_channels[i]);
    if (i + 1 < u.block_out_channels.size()) skips.push_back(u.block_out_channels[i]);
  }
  for (size_t k = 0; k < skips.size(); ++k)
    m->zero_down.emplace_back(w, "controlnet_down_blocks." + std::to_string(k), skips[k], skips[k], 1);
  m->zero_mid = nn::Conv2d(w, "controlnet_mid_block", u.block_out_channels.back(), u.block_out_channels.back(), 1);
  impl_ = m;
}

std::shared_ptr<ControlNetModel> ControlNetModel::load(const std::string& dir, const DeviceSpec& spec) {
  const auto cfg = ControlNetConfig::load(path_join(dir, "config.json"));
  const Weights w = Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec);
  auto m = std::make_shared<ControlNetModel>(cfg, w);
  for (const auto& k : w.unused()) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

int64_t ControlNetModel::num_skips() const { return static_cast<int64_t>(impl_->zero_down.size()); }

UNetResiduals ControlNetModel::forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& context,
                                       const at::Tensor& cond_in, const at::Tensor& scales,
                                       const at::Tensor& class_labels, const at::Tensor& time_ids) const {
  const Impl& m = *impl_;
  const int64_t B = sample.size(0);
  DP_CHECK(cond_in.dim() == 4 && cond_in.size(0) == B && cond_in.size(1) == cfg_.conditioning_channels,
           "controlnet: the conditioning image must be [", B, ", ", cfg_.conditioning_channels, ", H, W], got ",
           shape_str(cond_in.sizes()));
  const int64_t f = int64_t(1) << (cfg_.conditioning_embedding_out_channels.size() - 1);
  DP_CHECK(cond_in.size(2) == sample.size(2) * f && cond_in.size(3) == sample.size(3) * f, "controlnet: the ",
           "conditioning image ", shape_str(cond_in.sizes()), " must be ", f, "x the latents ", shape_str(sample.sizes()));
  const at::Tensor w0 = m.cond_in.weight;
  at::Tensor x = (cfg_.bgr ? cond_in.flip(1) : cond_in).to(w0.device(), w0.scalar_type());
  x = at::silu(m.cond_in(nn::in_layout_of(w0, x)));
  for (const auto& b : m.cond_blocks) x = at::silu(b(x));
  const at::Tensor emb = m.cond_out(x);
  UNetResiduals r = m.encoder->encode(sample, timesteps, context, emb, class_labels, time_ids);
  DP_CHECK(r.down.size() == m.zero_down.size(), "controlnet: ", r.down.size(), " skips for ", m.zero_down.size(),
           " zero convolutions");
  const auto K = static_cast<int64_t>(r.down.size());
  DP_CHECK((scales.dim() == 1 && scales.size(0) == B) || (scales.dim() == 2 && scales.size(0) == B && scales.size(1) == K + 1),
           "controlnet: scales must be [", B, "] or [", B, ", ", K + 1, "], got ", shape_str(scales.sizes()));
  const at::Tensor s = scales.to(sample.device(), r.mid.scalar_type());
  auto scale = [&](int64_t k) { return (s.dim() == 1 ? s : s.select(1, k)).reshape({B, 1, 1, 1}); };
  auto pool = [&](const at::Tensor& x) { return cfg_.global_pool ? x.mean({2, 3}, /*keepdim=*/true) : x; };
  for (int64_t k = 0; k < K; ++k) r.down[k] = pool(m.zero_down[k](r.down[k]) * scale(k));
  r.mid = pool(m.zero_mid(r.mid) * scale(K));
  return r;
}

}  // namespace diffpipe
