#include "diffpipe/stages/vae.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "unet_blocks.h"

namespace diffpipe {

struct AutoencoderKL::Impl {
  // zq: a MoVQ decoder's conditioning map (its latents), undefined otherwise
  struct Mid {
    nn::ResnetBlock2D res0, res1;
    bool has_attn = false;
    nn::SpatialSelfAttention attn;
    at::Tensor operator()(const at::Tensor& x, const at::Tensor& zq) const {
      at::Tensor h = res0(x, zq);
      if (has_attn) h = attn(h, zq);
      return res1(h, zq);
    }
  };
  struct Block {
    std::vector<nn::ResnetBlock2D> resnets;
    std::vector<nn::SpatialSelfAttention> attentions;  // Attn*Block2D: one after each resnet
    at::Tensor resnets_and_attentions(at::Tensor x, const at::Tensor& zq) const {
      for (size_t j = 0; j < resnets.size(); ++j) {
        x = resnets[j](x, zq);
        if (!attentions.empty()) x = attentions[j](x, zq);
      }
      return x;
    }
    bool has_sampler = false;
    nn::Downsample2D down;
    nn::Upsample2D up;
  };
  bool has_encoder = false, has_decoder = false;
  nn::Conv2d enc_conv_in, enc_conv_out, quant_conv;
  std::vector<Block> enc_blocks;
  Mid enc_mid;
  nn::GroupNorm enc_norm_out;
  nn::Conv2d post_quant_conv, dec_conv_in, dec_conv_out;
  std::vector<Block> dec_blocks;
  Mid dec_mid;
  nn::GroupNorm dec_norm_out;
  nn::SpatialNorm dec_spatial_out;
  bool use_quant_conv = true, use_post_quant_conv = true;
};

AutoencoderKL::AutoencoderKL(const VaeConfig& c, const Weights& w0, bool with_encoder, bool with_decoder) : cfg_(c) {
  DP_CHECK(with_encoder || with_decoder, "vae: build the encoder, the decoder or both");
  Weights w = w0;
  // Legacy attention names (pre-0.14 diffusers / original checkpoints converted without renaming).
  for (const char* part : {"encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0."}) {
    const std::string p(part);
    if (w.has(p + "query.weight")) {
      w.rename_part(p + "query.", p + "to_q.");
      w.rename_part(p + "key.", p + "to_k.");
      w.rename_part(p + "value.", p + "to_v.");
      w.rename_part(p + "proj_attn.", p + "to_out.0.");
    }
  }
  auto m = std::make_shared<Impl>();
  const auto& boc = c.block_out_channels;
  const size_t n = boc.size();
  const int64_t G = c.norm_num_groups, L = c.latent_channels;
  const double eps = 1e-6;
  // zq_channels > 0: the MoVQ decoder's spatially normalised blocks
  auto make_mid = [&](const Weights& mw, int64_t ch, int64_t zq_channels) {
    Impl::Mid mid;
    nn::ResnetOptions o;
    o.spatial_channels = zq_channels;
    mid.res0 = nn::ResnetBlock2D(mw.sub("resnets.0"), ch, ch, 0, G, eps, 1.0, o);
    mid.has_attn = c.mid_block_add_attention;
    if (mid.has_attn) mid.attn = nn::SpatialSelfAttention(mw.sub("attentions.0"), ch, G, eps, zq_channels);
    mid.res1 = nn::ResnetBlock2D(mw.sub("resnets.1"), ch, ch, 0, G, eps, 1.0, o);
    return mid;
  };
  auto add_attentions = [&](Impl::Block& b, const Weights& bw, int64_t ch, int64_t zq_channels) {
    for (size_t j = 0; j < b.resnets.size(); ++j)
      b.attentions.emplace_back(bw.sub("attentions." + std::to_string(j)), ch, G, eps, zq_channels);
  };
  m->use_quant_conv = c.use_quant_conv;
  m->use_post_quant_conv = c.use_post_quant_conv;
  m->has_encoder = with_encoder;
  if (with_encoder) {
    const Weights e = w.sub("encoder");
    m->enc_conv_in = nn::Conv2d(e, "conv_in", c.in_channels, boc[0], 3, 1, 1);
    int64_t out = boc[0];
    for (size_t i = 0; i < n; ++i) {
      const int64_t in = out;
      out = boc[i];
      Impl::Block b;
      const Weights bw = e.sub("down_blocks." + std::to_string(i));
      for (int64_t j = 0; j < c.layers_per_block; ++j)
        b.resnets.emplace_back(bw.sub("resnets." + std::to_string(j)), j == 0 ? in : out, out, 0, G, eps, 1.0);
      if (c.down_attention.at(i)) add_attentions(b, bw, out, 0);
      if (i + 1 < n) {
        b.has_sampler = true;
        b.down = nn::Downsample2D(bw.sub("downsamplers.0"), out, 0);
      }
      m->enc_blocks.push_back(std::move(b));
    }
    m->enc_mid = make_mid(e.sub("mid_block"), boc[n - 1], 0);
    m->enc_norm_out = nn::GroupNorm(e, "conv_norm_out", G, boc[n - 1], eps);
    // a VQModel's encoder makes the latents themselves (double_z false), an AutoencoderKL's mean and log-variance
    const int64_t Z = c.vq ? L : 2 * L;
    m->enc_conv_out = nn::Conv2d(e, "conv_out", boc[n - 1], Z, 3, 1, 1);
    if (c.use_quant_conv) m->quant_conv = nn::Conv2d(w, "quant_conv", Z, Z, 1);
  }
  m->has_decoder = with_decoder;
  if (!with_decoder) {
    impl_ = m;
    return;
  }
  if (c.use_post_quant_conv) m->post_quant_conv = nn::Conv2d(w, "post_quant_conv", L, L, 1);
  const Weights d = w.sub("decoder");
  const int64_t zq = c.spatial_norm ? L : 0;
  nn::ResnetOptions o;
  o.spatial_channels = zq;
  m->dec_conv_in = nn::Conv2d(d, "conv_in", L, boc[n - 1], 3, 1, 1);
  m->dec_mid = make_mid(d.sub("mid_block"), boc[n - 1], zq);
  int64_t out = boc[n - 1];
  for (size_t i = 0; i < n; ++i) {
    const int64_t prev = out;
    out = boc[n - 1 - i];
    Impl::Block b;
    const Weights bw = d.sub("up_blocks." + std::to_string(i));
    for (int64_t j = 0; j < c.layers_per_block + 1; ++j)
      b.resnets.emplace_back(bw.sub("resnets." + std::to_string(j)), j == 0 ? prev : out, out, 0, G, eps, 1.0, o);
    if (c.up_attention.at(i)) add_attentions(b, bw, out, zq);
    if (i + 1 < n) {
      b.has_sampler = true;
      b.up = nn::Upsample2D(bw.sub("upsamplers.0"), out);
    }
    m->dec_blocks.push_back(std::move(b));
  }
  if (c.spatial_norm) m->dec_spatial_out = nn::SpatialNorm(d.sub("conv_norm_out"), boc[0], zq);
  else m->dec_norm_out = nn::GroupNorm(d, "conv_norm_out", G, boc[0], eps);
  m->dec_conv_out = nn::Conv2d(d, "conv_out", boc[0], c.out_channels, 3, 1, 1);
  impl_ = m;
}

std::shared_ptr<AutoencoderKL> AutoencoderKL::load(const std::string& dir, const DeviceSpec& spec, bool with_encoder,
                                                  bool with_decoder) {
  const auto cfg = VaeConfig::load(path_join(dir, "config.json"));
  const Weights w = Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec);
  auto m = std::make_shared<AutoencoderKL>(cfg, w, with_encoder, with_decoder);
  if (with_encoder && with_decoder)
    for (const auto& k : w.unused()) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

bool AutoencoderKL::has_encoder() const { return impl_->has_encoder; }
bool AutoencoderKL::has_decoder() const { return impl_->has_decoder; }

GaussianLatent AutoencoderKL::encode(const at::Tensor& image) const {
  const Impl& m = *impl_;
  DP_CHECK(m.has_encoder, "vae: loaded without its encoder");
  DP_CHECK(image.dim() == 4 && image.size(1) == cfg_.in_channels, "vae: image must be [B, ", cfg_.in_channels,
           ", H, W], got ", shape_str(image.sizes()));
  DP_CHECK(image.size(2) % downscale() == 0 && image.size(3) % downscale() == 0, "vae: image size ", image.size(2),
           "x", image.size(3), " is not a multiple of ", downscale());
  if (nn::batch_invariant() && image.size(0) > 1) {
    std::vector<at::Tensor> means, logvars;
    for (int64_t i = 0; i < image.size(0); ++i) {
      GaussianLatent g = encode(image.slice(0, i, i + 1));
      means.push_back(g.mean);
      logvars.push_back(g.logvar);
    }
    return {at::cat(means), at::cat(logvars)};
  }
  at::Tensor x = m.enc_conv_in(nn::in_layout_of(m.enc_conv_in.weight, image));
  for (const auto& b : m.enc_blocks) {
    x = b.resnets_and_attentions(x, at::Tensor());
    if (b.has_sampler) x = b.down(x);
  }
  x = m.enc_mid(x, at::Tensor());
  x = m.enc_conv_out(m.enc_norm_out.silu(x));
  if (m.use_quant_conv) x = m.quant_conv(x);
  if (cfg_.vq) return {x.contiguous(), at::Tensor()};  // VQModel.encode: the latents, not quantised
  auto parts = x.contiguous().chunk(2, 1);
  return {parts[0], at::clamp(parts[1], -30.0, 20.0)};
}

at::Tensor AutoencoderKL::decode(const at::Tensor& latents) const {
  const Impl& m = *impl_;
  DP_CHECK(m.has_decoder, "vae: loaded without its decoder");
  DP_CHECK(latents.dim() == 4 && latents.size(1) == cfg_.latent_channels, "vae: latents must be [B, ",
           cfg_.latent_channels, ", h, w], got ", shape_str(latents.sizes()));
  if (nn::batch_invariant() && latents.size(0) > 1)
    return nn::per_sample(latents.size(0), [&](int64_t i) { return decode(latents.slice(0, i, i + 1)); });
  at::Tensor x = m.use_post_quant_conv ? m.post_quant_conv(latents) : latents;
  x = m.dec_conv_in(nn::in_layout_of(m.dec_conv_in.weight, x));
  // MoVQ: the norms are conditioned on the latents before post_quant_conv (VQModel.decode's `quant`)
  const at::Tensor zq = cfg_.spatial_norm ? nn::in_layout_of(m.dec_conv_in.weight, latents) : at::Tensor();
  x = m.dec_mid(x, zq);
  for (const auto& b : m.dec_blocks) {
    x = b.resnets_and_attentions(x, zq);
    if (b.has_sampler) x = b.up(x);
  }
  x = cfg_.spatial_norm ? at::silu(m.dec_spatial_out(x, zq)) : m.dec_norm_out.silu(x);
  return m.dec_conv_out(x).contiguous();
}

at::Tensor AutoencoderKL::decode_scaled(const at::Tensor& latents) const {
  if (cfg_.vq) return decode(latents);
  return decode(latents / cfg_.scaling_factor + cfg_.shift_factor);
}

at::Tensor to_uint8_hwc(const at::Tensor& images) {
  at::Tensor x = at::clamp(images.to(at::kFloat) / 2 + 0.5, 0.0, 1.0);
  return at::round(x * 255.0).to(at::kByte).permute({0, 2, 3, 1}).contiguous().to(at::kCPU);
}

}  // namespace diffpipe
