#include "diffpipe/stages/unet.h"

#include <cmath>
#include <optional>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "cuda_ops.h"
#include "unet_blocks.h"

namespace diffpipe {

namespace {
template <typename T>
std::vector<T> reversed(std::vector<T> v) {
  std::reverse(v.begin(), v.end());
  return v;
}
}  // namespace

at::Tensor timestep_embedding(const at::Tensor& t, int64_t dim, bool flip_sin_to_cos, double freq_shift,
                              double scale, double max_period) {
  const int64_t half = dim / 2;
  at::Tensor exponent = at::arange(0, half, t.options().dtype(at::kFloat)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - freq_shift);
  at::Tensor emb = t.to(at::kFloat).unsqueeze(1) * at::exp(exponent).unsqueeze(0);
  emb = emb * scale;
  emb = flip_sin_to_cos ? at::cat({at::cos(emb), at::sin(emb)}, -1) : at::cat({at::sin(emb), at::cos(emb)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;
}

at::Tensor guidance_scale_embedding(double w, int64_t dim) {
  DP_CHECK(dim >= 4, "guidance embedding: width must be at least 4, got ", dim);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t half = dim / 2;
  // float32 throughout, in diffusers' order of operations
  const at::Tensor wt = at::full({1}, w, f32) * 1000.0;
  const at::Tensor step = at::log(at::full({}, 10000.0, f32)) / static_cast<double>(half - 1);
  const at::Tensor emb = wt.unsqueeze(1) * at::exp(at::arange(half, f32) * -step).unsqueeze(0);
  at::Tensor out = at::cat({at::sin(emb), at::cos(emb)}, 1);
  if (dim % 2 == 1) out = at::constant_pad_nd(out, {0, 1, 0, 0}, 0);
  return out[0];
}

// addition_embed_type "text" (diffusers' TextTimeEmbedding): the text states layer-normed, attention-pooled by a
// query that is their mean plus a learned position embedding, projected to the time embedding's width and normed.
struct TextTimeEmbedding {
  nn::LayerNorm norm1, norm2;
  at::Tensor pos;  // [1, D]
  nn::Linear q, k, v, proj;
  int64_t heads = 1;
  TextTimeEmbedding() = default;
  TextTimeEmbedding(const Weights& w, int64_t D, int64_t temb, int64_t heads_) : heads(heads_) {
    norm1 = nn::LayerNorm(w, "norm1", D, 1e-5);
    pos = w.get("pool.positional_embedding", {1, D});
    q = nn::Linear(w, "pool.q_proj", D, D);
    k = nn::Linear(w, "pool.k_proj", D, D);
    v = nn::Linear(w, "pool.v_proj", D, D);
    proj = nn::Linear(w, "proj", D, temb);
    norm2 = nn::LayerNorm(w, "norm2", temb, 1e-5);
  }
  at::Tensor operator()(const at::Tensor& states) const {  // [B, L, D] -> [B, temb]
    const at::Tensor x0 = norm1(states);
    const int64_t B = x0.size(0), D = x0.size(2), d = D / heads;
    const at::Tensor cls = x0.mean(1, /*keepdim=*/true) + pos.to(x0.scalar_type());
    const at::Tensor x = at::cat({cls, x0}, 1);
    auto split = [&](const at::Tensor& t) { return t.view({B, -1, heads, d}).transpose(1, 2); };  // [B, h, n, d]
    const double scale = 1.0 / std::sqrt(std::sqrt(static_cast<double>(d)));
    at::Tensor wgt = at::matmul(split(q(cls)) * scale, (split(k(x)) * scale).transpose(-1, -2));  // [B, h, 1, n]
    wgt = at::softmax(wgt.to(at::kFloat), -1).to(wgt.scalar_type());
    const at::Tensor a = at::matmul(wgt, split(v(x))).transpose(1, 2).reshape({B, D});
    return norm2(proj(a));
  }
};

namespace {
// The timesteps of a call as [B] on the CPU: one per sample, or one for all. The sinusoidal embedding is computed on
// the CPU in float32 (tiny, and identical on every device: GPU sin/cos of arguments up to ~1000 rad differ from the
// CPU's by enough to move a float32 UNet output by ~1e-3).
at::Tensor per_sample_timesteps(const at::Tensor& timesteps, int64_t B, const char* who) {
  at::Tensor t = timesteps.to(at::kCPU);
  if (t.dim() == 0) t = t.reshape({1});
  if (t.size(0) == 1 && B > 1) t = t.expand({B});
  DP_CHECK(t.dim() == 1 && t.size(0) == B, who, ": need one timestep or one per sample, got ", shape_str(t.sizes()));
  return t;
}

// An embedding computed on the CPU in float32 (see forward) on the sample's device: pinned and asynchronous to a
// GPU (a pageable copy would wait for the queue to drain), in the sample's dtype.
at::Tensor to_sample_device(const at::Tensor& cpu, const at::Tensor& sample) {
  const at::Tensor d = sample.is_cuda() ? cpu.pin_memory().to(sample.device(), at::kFloat, /*non_blocking=*/true)
                                        : cpu.to(sample.device());
  return d.to(sample.scalar_type());
}
}  // namespace

// IP-Adapter Plus's image_proj (diffusers' IPAdapterPlusImageProjection): learned queries attend, block by block, to
// the image encoder's hidden states (projected to their width) and to themselves; then a GELU feed-forward; finally
// proj_out to the UNet's width and norm_out. Heads of 64; LayerNorms with eps 1e-5; biases only where the file has them.
struct IpResampler {
  struct Block {
    nn::LayerNorm ln0, ln1, ff_norm;
    nn::Linear to_q, to_kv, to_out, ff1, ff2;
  };
  at::Tensor latents;  // [1, Q, H]
  nn::Linear proj_in, proj_out;
  nn::LayerNorm norm_out;
  std::vector<Block> blocks;

  // `root`: the UNet's weights, the resampler's under ip_image_proj. (inserted from the adapter file)
  IpResampler(const Weights& root, int64_t D) {
    const auto& all = root.all();
    const std::string P = "ip_image_proj.";
    const Weights w = root.sub("ip_image_proj");
    const auto ls = all.at(P + "latents").sizes();
    const int64_t Q = ls[1], H = ls[2], E = all.at(P + "proj_in.weight").size(1);
    latents = w.get("latents", {1, Q, H});
    proj_in = nn::Linear(w, "proj_in", E, H);
    proj_out = nn::Linear(w, "proj_out", H, D);
    norm_out = nn::LayerNorm(w, "norm_out", D, 1e-5);
    for (int64_t k = 0; all.count(P + "layers." + std::to_string(k) + ".to_q.weight"); ++k) {
      const Weights b = w.sub("layers." + std::to_string(k));
      const int64_t inner = all.at(P + "layers." + std::to_string(k) + ".to_q.weight").size(0);
      blocks.push_back({nn::LayerNorm(b, "ln0", H, 1e-5), nn::LayerNorm(b, "ln1", H, 1e-5),
                        nn::LayerNorm(b, "ff_norm", H, 1e-5), nn::Linear(b, "to_q", H, inner, false),
                        nn::Linear(b, "to_kv", H, 2 * inner, false), nn::Linear(b, "to_out", inner, H, false),
                        nn::Linear(b, "ff1", H, 4 * H, false), nn::Linear(b, "ff2", 4 * H, H, false)});
    }
  }
  // x [B, N, E] -> tokens [B, Q, D]
  at::Tensor operator()(const at::Tensor& x) const {
    const int64_t B = x.size(0);
    auto heads = [&](const at::Tensor& t) { return t.view({B, t.size(1), -1, 64}).transpose(1, 2); };  // heads of 64
    at::Tensor lat = latents.expand({B, -1, -1});
    const at::Tensor h = proj_in(x);
    for (const Block& b : blocks) {
      const at::Tensor q_in = b.ln1(lat);
      const at::Tensor kv = b.to_kv(at::cat({b.ln0(h), q_in}, 1));
      const int64_t inner = kv.size(2) / 2;
      const at::Tensor a = nn::attention(heads(b.to_q(q_in)), heads(kv.narrow(2, 0, inner)),
                                         heads(kv.narrow(2, inner, inner)), at::Tensor());
      lat = b.to_out(a.transpose(1, 2).reshape({B, -1, inner})) + lat;
      lat = b.ff2(at::gelu(b.ff1(b.ff_norm(lat)))) + lat;
    }
    return norm_out(proj_out(lat));
  }
};

struct UNet2DConditionModel::Impl {
  struct Block {
    std::vector<nn::ResnetBlock2D> resnets;
    std::vector<nn::Transformer2DModel> attentions;  // empty for DownBlock2D / UpBlock2D
    std::vector<nn::AddedKVAttention> simple;        // SimpleCrossAttn blocks
    bool has_sampler = false;
    bool resnet_sampler = false;                     // ResnetDownsample/ResnetUpsample/SimpleCrossAttn blocks
    nn::ResnetBlock2D resample;                      // their sampler: a resnet with down=True / up=True
    nn::Downsample2D down;
    nn::Upsample2D up;
  };
  bool gelu = false;                      // act_fn
  std::string time_act;                   // time_embedding_act_fn
  nn::Linear encoder_hid_proj;            // T5 states -> cross_attention_dim (IF)
  // image_proj (Kandinsky 2.2): the image embedding -> image_tokens x cross_attention_dim, layer-normed; and the
  // time embedding's addition from it (ImageTimeEmbedding)
  nn::Linear image_proj, add_image_proj;
  nn::LayerNorm image_proj_norm, add_image_norm;
  int64_t image_tokens = 0;
  std::unique_ptr<TextTimeEmbedding> add_text;  // addition_embed_type "text"
  bool simple_mid = false;
  nn::AddedKVAttention mid_simple;
  nn::Conv2d conv_in, conv_out;
  nn::Linear time_linear_1, time_linear_2;
  nn::Linear time_cond_proj;                  // time_cond_proj_dim (LCM): the guidance embedding -> C0, no bias
  nn::Linear class_linear_1, class_linear_2;  // class_embed_type "projection" or "timestep"
  at::Tensor class_table;                     // num_class_embeds: [num_class_embeds, temb]
  nn::Linear add_linear_1, add_linear_2;      // addition_embed_type "text_time"
  nn::Linear ip_proj;                         // IP-Adapter's image_proj: embedding -> ip_tokens x cross_attention_dim
  nn::LayerNorm ip_norm;
  int64_t ip_tokens = 0;
  std::unique_ptr<IpResampler> ip_resampler;  // IP-Adapter Plus's image_proj: hidden states -> tokens
  std::vector<Block> down, up;
  nn::ResnetBlock2D mid_res0, mid_res1;
  nn::Transformer2DModel mid_attn;
  nn::GroupNorm conv_norm_out;
  mutable nn::GraphCache graphs{"unet"};  // on a GPU, repeated calls of one shape replay a captured graph
};

UNet2DConditionModel::UNet2DConditionModel(const UNetConfig& c, const Weights& w, bool encoder_only) : cfg_(c) {
  auto m = std::make_shared<Impl>();
  const auto& boc = c.block_out_channels;
  const size_t n = boc.size();
  const int64_t temb = boc[0] * 4, G = c.norm_num_groups;
  m->conv_in = nn::Conv2d(w, "conv_in", c.in_channels, boc[0], 3, 1, 1);
  m->gelu = c.act_fn == "gelu";
  m->time_act = c.time_embedding_act_fn;
  const int64_t ctx_dim = c.cross_attention_dim[0];
  if (c.image_proj) {
    DP_CHECK(w.has("encoder_hid_proj.image_embeds.weight"), w.origin(), ": encoder_hid_proj.image_embeds.weight missing");
    m->image_tokens = w.all().at("encoder_hid_proj.image_embeds.weight").size(0) / ctx_dim;
    m->image_proj = nn::Linear(w, "encoder_hid_proj.image_embeds", c.encoder_hid_dim, m->image_tokens * ctx_dim);
    m->image_proj_norm = nn::LayerNorm(w, "encoder_hid_proj.norm", ctx_dim, 1e-5);
    m->add_image_proj = nn::Linear(w, "add_embedding.image_proj", c.encoder_hid_dim, temb);
    m->add_image_norm = nn::LayerNorm(w, "add_embedding.image_norm", temb, 1e-5);
  } else if (c.encoder_hid_dim > 0) {
    m->encoder_hid_proj = nn::Linear(w, "encoder_hid_proj", c.encoder_hid_dim, ctx_dim);
  }
  if (c.addition_embed_type == "text")
    m->add_text = std::make_unique<TextTimeEmbedding>(w.sub("add_embedding"), c.encoder_hid_dim, temb,
                                                      c.addition_embed_type_num_heads);
  // resnet variants: SD's blocks take only the activation and scale-shift; IF's (Resnet*/SimpleCrossAttn*) also
  // skip_time_act and the output scale
  nn::ResnetOptions sd_opt, if_opt;
  sd_opt.gelu = if_opt.gelu = m->gelu;
  sd_opt.scale_shift = if_opt.scale_shift = c.resnet_scale_shift;
  if_opt.skip_time_act = c.resnet_skip_time_act;
  auto is_if = [](const std::string& t) { return t.rfind("Simple", 0) == 0 || t.rfind("Resnet", 0) == 0; };
  m->time_linear_1 = nn::Linear(w, "time_embedding.linear_1", boc[0], temb);
  m->time_linear_2 = nn::Linear(w, "time_embedding.linear_2", temb, temb);
  if (c.time_cond_proj_dim > 0)
    m->time_cond_proj = nn::Linear(w, "time_embedding.cond_proj", c.time_cond_proj_dim, boc[0], /*has_bias=*/false);
  if (c.class_embed_type == "timestep") {  // TimestepEmbedding of the level's sinusoid, like the timestep's
    m->class_linear_1 = nn::Linear(w, "class_embedding.linear_1", boc[0], temb);
    m->class_linear_2 = nn::Linear(w, "class_embedding.linear_2", temb, temb);
  }
  if (c.class_embed_type == "projection") {
    m->class_linear_1 = nn::Linear(w, "class_embedding.linear_1", c.projection_class_embeddings_input_dim, temb);
    m->class_linear_2 = nn::Linear(w, "class_embedding.linear_2", temb, temb);
  }
  if (c.num_class_embeds > 0) m->class_table = w.get("class_embedding.weight", {c.num_class_embeds, temb});
  if (w.has("ip_image_proj.latents")) {  // IP-Adapter Plus's resampler (ip_adapter.h)
    m->ip_resampler = std::make_unique<IpResampler>(w, c.cross_attention_dim[0]);
    m->ip_tokens = m->ip_resampler->latents.size(1);
  }
  if (w.has("ip_image_proj.proj.weight")) {  // an IP-Adapter's (ip_adapter.h), inserted under these names
    const int64_t D = c.cross_attention_dim[0];
    const auto shape = w.all().at("ip_image_proj.proj.weight").sizes();
    m->ip_tokens = shape[0] / D;
    m->ip_proj = nn::Linear(w, "ip_image_proj.proj", shape[1], m->ip_tokens * D);
    m->ip_norm = nn::LayerNorm(w, "ip_image_proj.norm", D, 1e-5);
  }
  if (c.text_time()) {
    m->add_linear_1 = nn::Linear(w, "add_embedding.linear_1", c.projection_class_embeddings_input_dim, temb);
    m->add_linear_2 = nn::Linear(w, "add_embedding.linear_2", temb, temb);
  }
  int64_t out_ch = boc[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t in_ch = out_ch;
    out_ch = boc[i];
    const std::string& type = c.down_block_types[i];
    const bool final_block = i == n - 1, attn = type == "CrossAttnDownBlock2D", ifb = is_if(type);
    const nn::ResnetOptions& ro = ifb ? if_opt : sd_opt;
    const double scale = ifb ? c.resnet_out_scale_factor : 1.0;
    const Weights bw = w.sub("down_blocks." + std::to_string(i));
    Impl::Block b;
    for (int64_t j = 0; j < c.layers_per_block[i]; ++j) {
      b.resnets.emplace_back(bw.sub("resnets." + std::to_string(j)), j == 0 ? in_ch : out_ch, out_ch, temb, G,
                             c.norm_eps, scale, ro);
      if (attn)
        b.attentions.emplace_back(bw.sub("attentions." + std::to_string(j)), out_ch, c.heads[i],
                                  c.transformer_layers_per_block[i], c.cross_attention_dim[i], G,
                                  c.use_linear_projection, c.only_cross_attention[i]);
      if (type == "SimpleCrossAttnDownBlock2D")
        b.simple.emplace_back(bw.sub("attentions." + std::to_string(j)), out_ch, c.cross_attention_dim[i],
                              out_ch / c.attention_head_dim[i], c.attention_head_dim[i], G, c.norm_eps,
                              c.cross_attention_norm, 32);
    }
    if (!final_block) {
      b.has_sampler = true;
      if (ifb) {
        b.resnet_sampler = true;
        nn::ResnetOptions down = ro;
        down.resample = 1;
        b.resample = nn::ResnetBlock2D(bw.sub("downsamplers.0"), out_ch, out_ch, temb, G, c.norm_eps, scale, down);
      } else {
        b.down = nn::Downsample2D(bw.sub("downsamplers.0"), out_ch, c.downsample_padding);
      }
    }
    m->down.push_back(std::move(b));
  }
  const Weights mw = w.sub("mid_block");
  m->simple_mid = c.mid_block_type == "UNetMidBlock2DSimpleCrossAttn";
  const nn::ResnetOptions& mo = m->simple_mid ? if_opt : sd_opt;
  m->mid_res0 = nn::ResnetBlock2D(mw.sub("resnets.0"), boc[n - 1], boc[n - 1], temb, G, c.norm_eps,
                                  c.mid_block_scale_factor, mo);
  if (m->simple_mid)
    m->mid_simple = nn::AddedKVAttention(mw.sub("attentions.0"), boc[n - 1], c.cross_attention_dim[n - 1],
                                         boc[n - 1] / c.attention_head_dim[n - 1], c.attention_head_dim[n - 1], G,
                                         c.norm_eps, c.cross_attention_norm, 32);
  else
    m->mid_attn = nn::Transformer2DModel(mw.sub("attentions.0"), boc[n - 1], c.heads[n - 1],
                                         c.transformer_layers_per_block[n - 1], c.cross_attention_dim[n - 1], G,
                                         c.use_linear_projection);
  m->mid_res1 = nn::ResnetBlock2D(mw.sub("resnets.1"), boc[n - 1], boc[n - 1], temb, G, c.norm_eps,
                                  c.mid_block_scale_factor, mo);
  if (encoder_only) {
    impl_ = m;
    return;
  }
  const auto rboc = reversed(boc), rheads = reversed(c.heads), rlayers = reversed(c.layers_per_block),
             rcross = reversed(c.cross_attention_dim), rtl = reversed(c.transformer_layers_per_block),
             rhead_dim = reversed(c.attention_head_dim);
  const std::vector<bool> ronly(c.only_cross_attention.rbegin(), c.only_cross_attention.rend());
  out_ch = rboc[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t prev_out = out_ch;
    out_ch = rboc[i];
    const int64_t in_ch = rboc[std::min(i + 1, n - 1)];
    const std::string& type = c.up_block_types[i];
    const bool final_block = i == n - 1, attn = type == "CrossAttnUpBlock2D", ifb = is_if(type);
    const nn::ResnetOptions& ro = ifb ? if_opt : sd_opt;
    const double scale = ifb ? c.resnet_out_scale_factor : 1.0;
    const Weights bw = w.sub("up_blocks." + std::to_string(i));
    Impl::Block b;
    const int64_t layers = rlayers[i] + 1;
    for (int64_t j = 0; j < layers; ++j) {
      const int64_t skip = j == layers - 1 ? in_ch : out_ch;
      const int64_t res_in = j == 0 ? prev_out : out_ch;
      b.resnets.emplace_back(bw.sub("resnets." + std::to_string(j)), res_in + skip, out_ch, temb, G, c.norm_eps,
                             scale, ro);
      if (attn)
        b.attentions.emplace_back(bw.sub("attentions." + std::to_string(j)), out_ch, rheads[i], rtl[i], rcross[i], G,
                                  c.use_linear_projection, ronly[i]);
      if (type == "SimpleCrossAttnUpBlock2D")
        b.simple.emplace_back(bw.sub("attentions." + std::to_string(j)), out_ch, rcross[i],
                              out_ch / rhead_dim[i], rhead_dim[i], G, c.norm_eps, c.cross_attention_norm, 32);
    }
    if (!final_block) {
      b.has_sampler = true;
      if (ifb) {
        b.resnet_sampler = true;
        nn::ResnetOptions up = ro;
        up.resample = 2;
        b.resample = nn::ResnetBlock2D(bw.sub("upsamplers.0"), out_ch, out_ch, temb, G, c.norm_eps, scale, up);
      } else {
        b.up = nn::Upsample2D(bw.sub("upsamplers.0"), out_ch);
      }
    }
    m->up.push_back(std::move(b));
  }
  m->conv_norm_out = nn::GroupNorm(w, "conv_norm_out", G, boc[0], c.norm_eps);
  m->conv_out = nn::Conv2d(w, "conv_out", boc[0], c.out_channels, 3, 1, 1);
  impl_ = m;
}

std::shared_ptr<UNet2DConditionModel> UNet2DConditionModel::load(const std::string& dir, const DeviceSpec& spec,
                                                                 const std::vector<LoraLayer>& lora,
                                                                 const std::map<std::string, at::Tensor>& extra,
                                                                 const std::string& extra_origin) {
  const auto cfg = UNetConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::load(path_join(dir, "diffusion_pytorch_model.safetensors"), spec);
  const auto like = at::TensorOptions().device(spec.device).dtype(spec.dtype);
  for (const auto& [k, t] : extra) w.insert(k, t, like, extra_origin);
  apply_lora(w, lora, "unet");
  auto m = std::make_shared<UNet2DConditionModel>(cfg, w);
  for (const auto& k : w.unused()) DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

int64_t UNet2DConditionModel::downscale() const {
  return int64_t(1) << (cfg_.block_out_channels.size() - 1);
}

size_t UNet2DConditionModel::cuda_graphs() const { return impl_->graphs.graphs(); }

at::Tensor UNet2DConditionModel::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                         const at::Tensor& context, const at::Tensor& class_labels,
                                         const at::Tensor& time_ids, const UNetResiduals* residuals,
                                         const at::Tensor& timestep_cond) const {
  const Impl& m = *impl_;
  DP_CHECK(m.conv_out.weight.defined(), "unet: built without its up blocks (a ControlNet's encoder half)");
  DP_CHECK(sample.dim() == 4 && sample.size(1) == cfg_.in_channels, "unet: sample must be [B, ", cfg_.in_channels,
           ", H, W], got ", shape_str(sample.sizes()));
  const int64_t B = sample.size(0);
  if (cfg_.image_conditioned())
    DP_CHECK(context.dim() == 2 && context.size(0) == B && context.size(1) == cfg_.encoder_hid_dim,
             "unet: this UNet is conditioned on an image embedding [", B, ", ", cfg_.encoder_hid_dim, "], got ",
             shape_str(context.sizes()));
  else
    DP_CHECK(context.dim() == 3 && context.size(0) == B, "unet: encoder_hidden_states must be [", B,
             ", L, D], got ", shape_str(context.sizes()));
  const at::Tensor t = per_sample_timesteps(timesteps, B, "unet");
  // timesteps: [B] -> t_emb [B, C0] -> emb [B, 4*C0]
  if (nn::batch_invariant() && B > 1)
    return nn::per_sample(B, [&](int64_t i) {
      auto row = [&](const at::Tensor& x) { return x.defined() ? x.slice(0, i, i + 1) : x; };
      UNetResiduals r;
      if (residuals) {
        for (const auto& d : residuals->down) r.down.push_back(row(d));
        r.mid = row(residuals->mid);
      }
      return forward(row(sample), row(t), row(context), row(class_labels), row(time_ids), residuals ? &r : nullptr,
                     row(timestep_cond));
    });
  // IP-Adapter: the rows' image embeddings become tokens for the cross-attentions (ImageProjection)
  const nn::AdapterRows* rows = nn::active_adapter_rows();
  std::optional<nn::AdapterRows> with_tokens;
  std::optional<nn::AdapterScope> ip_scope;
  if (rows && rows->ip_embeds.defined()) {
    DP_CHECK(m.ip_proj.weight.defined() || m.ip_resampler, "unet: image prompt embeddings given, but no IP-Adapter is "
             "loaded");
    with_tokens = *rows;
    if (m.ip_resampler) {
      const at::Tensor e = rows->ip_embeds.to(sample.device(), m.ip_resampler->latents.scalar_type());
      DP_CHECK(e.dim() == 3 && e.size(0) == B, "unet: IP-Adapter Plus needs hidden states [", B, ", N, E], got ",
               shape_str(e.sizes()));
      with_tokens->ip_tokens = (*m.ip_resampler)(e);
    } else {
      const at::Tensor e = rows->ip_embeds.to(sample.device(), m.ip_proj.weight.scalar_type());
      with_tokens->ip_tokens = m.ip_norm(m.ip_proj(e).view({B, m.ip_tokens, -1}));
    }
    ip_scope.emplace(&*with_tokens);
  }
  const auto [t_emb, cl] = embeddings(sample, t, class_labels, time_ids, timestep_cond);
  // a ControlNet's residuals change with every call, per-request LoRA branches with the batch's adapters: no graph
  if (residuals || nn::active_adapter_rows())
    return forward_embedded(sample, t_emb, context, cl, residuals);
  return m.graphs.run({sample, t_emb, context, cl}, [this](const std::vector<at::Tensor>& in) {
    return forward_embedded(in[0], in[1], in[2], in[3]);
  });
}

UNetResiduals UNet2DConditionModel::encode(const at::Tensor& sample, const at::Tensor& timesteps,
                                           const at::Tensor& context, const at::Tensor& conv_in_add,
                                           const at::Tensor& class_labels, const at::Tensor& time_ids) const {
  DP_CHECK(sample.dim() == 4 && sample.size(1) == cfg_.in_channels, "controlnet: sample must be [B, ", cfg_.in_channels,
           ", H, W], got ", shape_str(sample.sizes()));
  const int64_t B = sample.size(0);
  const at::Tensor t = per_sample_timesteps(timesteps, B, "controlnet");
  if (nn::batch_invariant() && B > 1) {
    std::vector<UNetResiduals> rows;
    for (int64_t i = 0; i < B; ++i) {
      auto row = [&](const at::Tensor& x) { return x.defined() ? x.slice(0, i, i + 1) : x; };
      rows.push_back(nn::at_row(i, [&] {
        return encode(row(sample), row(t), row(context), row(conv_in_add), row(class_labels), row(time_ids));
      }));
    }
    UNetResiduals out;
    for (size_t k = 0; k < rows[0].down.size(); ++k) {
      std::vector<at::Tensor> parts;
      for (const auto& r : rows) parts.push_back(r.down[k]);
      out.down.push_back(at::cat(parts));
    }
    std::vector<at::Tensor> mids;
    for (const auto& r : rows) mids.push_back(r.mid);
    out.mid = at::cat(mids);
    return out;
  }
  const auto [t_emb, cl] = embeddings(sample, t, class_labels, time_ids);
  UNetResiduals out;
  (void)forward_embedded(sample, t_emb, context, cl, nullptr, conv_in_add, &out);
  return out;
}

std::pair<at::Tensor, at::Tensor> UNet2DConditionModel::embeddings(const at::Tensor& sample, const at::Tensor& t,
                                                                   const at::Tensor& class_labels,
                                                                   const at::Tensor& time_ids,
                                                                   const at::Tensor& timestep_cond) const {
  const Impl& m = *impl_;
  const int64_t B = sample.size(0);
  at::Tensor t_emb =
      to_sample_device(timestep_embedding(t, cfg_.block_out_channels[0], cfg_.flip_sin_to_cos, cfg_.freq_shift), sample);
  if (timestep_cond.defined()) {  // diffusers' TimestepEmbedding(t_emb, condition): t_emb + cond_proj(condition)
    DP_CHECK(cfg_.time_cond_proj_dim > 0, "unet: timestep_cond given, but the config has no time_cond_proj_dim");
    DP_CHECK(timestep_cond.dim() == 2 && timestep_cond.size(0) == B && timestep_cond.size(1) == cfg_.time_cond_proj_dim,
             "unet: timestep_cond must be [", B, ", ", cfg_.time_cond_proj_dim, "], got ", shape_str(timestep_cond.sizes()));
    t_emb = t_emb + m.time_cond_proj(timestep_cond.to(sample.device(), t_emb.scalar_type()));
  }
  at::Tensor cl;
  if (cfg_.class_embed_type == "projection") {  // Stable unCLIP: the noised image embedding joins the time embedding
    DP_CHECK(class_labels.defined() && class_labels.dim() == 2 && class_labels.size(0) == B &&
                 class_labels.size(1) == cfg_.projection_class_embeddings_input_dim,
             "unet: class_labels must be [", B, ", ", cfg_.projection_class_embeddings_input_dim,
             "] for class_embed_type \"projection\"");
    cl = class_labels.to(sample.device(), m.time_linear_1.weight.scalar_type());
  } else if (cfg_.class_embed_type == "timestep") {  // IF stage II: the noise level, embedded as a timestep
    DP_CHECK(class_labels.defined() && class_labels.numel() == B, "unet: class_embed_type \"timestep\" needs one ",
             "class label (a level) per sample: ", B);
    cl = to_sample_device(timestep_embedding(class_labels.to(at::kCPU).reshape({B}), cfg_.block_out_channels[0],
                                             cfg_.flip_sin_to_cos, cfg_.freq_shift),
                          sample);
  } else if (cfg_.num_class_embeds > 0) {  // the SD x4 upscaler: the noise level selects a learned embedding
    DP_CHECK(class_labels.defined() && class_labels.numel() == B, "unet: num_class_embeds needs one class label per ",
             "sample: ", B);
    const at::Tensor f = class_labels.to(at::kCPU, at::kDouble).reshape({B});
    const at::Tensor idx = f.round().to(at::kLong);
    DP_CHECK(at::equal(idx.to(at::kDouble), f) && idx.min().item<int64_t>() >= 0 &&
                 idx.max().item<int64_t>() < cfg_.num_class_embeds,
             "unet: class labels must be whole numbers in [0, ", cfg_.num_class_embeds, "), got ", shape_str(f.sizes()),
             " values from ", f.min().item<double>(), " to ", f.max().item<double>());
    cl = m.class_table.index_select(0, idx.to(m.class_table.device()));
  } else if (cfg_.text_time()) {  // SDXL: [pooled text | sinusoids of the size ids] -> add_embedding
    DP_CHECK(class_labels.defined() && time_ids.defined() && class_labels.dim() == 2 && time_ids.dim() == 2 &&
                 class_labels.size(0) == B && time_ids.size(0) == B &&
                 class_labels.size(1) + time_ids.size(1) * cfg_.addition_time_embed_dim ==
                     cfg_.projection_class_embeddings_input_dim,
             "unet: addition_embed_type \"text_time\" needs text_embeds [", B, ", P] and time_ids [", B,
             ", K] with P + K * ", cfg_.addition_time_embed_dim, " = ", cfg_.projection_class_embeddings_input_dim);
    // on the CPU in float32, as the timestep embedding above
    const at::Tensor ids = time_ids.to(at::kCPU, at::kFloat);
    const at::Tensor sin = to_sample_device(
        timestep_embedding(ids.flatten(), cfg_.addition_time_embed_dim, cfg_.flip_sin_to_cos, cfg_.freq_shift)
            .reshape({B, -1}),
        sample);
    cl = at::cat({class_labels.to(sample.device(), sin.scalar_type()), sin}, 1).to(m.add_linear_1.weight.scalar_type());
  } else {
    DP_CHECK(!class_labels.defined(), "unet: class_labels given, but the config has no class_embed_type");
  }
  return {t_emb, cl};
}

at::Tensor UNet2DConditionModel::forward_embedded(const at::Tensor& sample, const at::Tensor& t_emb,
                                                  const at::Tensor& context_in, const at::Tensor& class_labels,
                                                  const UNetResiduals* residuals, const at::Tensor& conv_in_add,
                                                  UNetResiduals* encoder_out) const {
  const Impl& m = *impl_;
  auto act = [&](const at::Tensor& t) { return m.gelu ? at::gelu(t) : at::silu(t); };
  at::Tensor emb = m.time_linear_2(act(m.time_linear_1(t_emb)));
  if (class_labels.defined())
    emb = emb + (cfg_.num_class_embeds > 0 ? class_labels  // already the table's rows
                 : cfg_.text_time()        ? m.add_linear_2(act(m.add_linear_1(class_labels)))
                                           : m.class_linear_2(act(m.class_linear_1(class_labels))));
  at::Tensor context = context_in;
  if (m.add_text) emb = emb + (*m.add_text)(context);  // from the text encoder's own states
  if (m.image_proj.weight.defined()) {  // Kandinsky 2.2: `context` is the image embedding [B, E]
    const at::Tensor e = context.to(m.image_proj.weight.scalar_type());
    emb = emb + m.add_image_norm(m.add_image_proj(e));
    context = m.image_proj_norm(m.image_proj(e).view({e.size(0), m.image_tokens, -1}));
  }
  if (m.time_act == "gelu") emb = at::gelu(emb);
  else if (m.time_act == "silu") emb = at::silu(emb);
  if (m.encoder_hid_proj.weight.defined()) context = m.encoder_hid_proj(context);
  at::Tensor x = m.conv_in(nn::in_layout_of(m.conv_in.weight, sample));
  if (conv_in_add.defined()) x = x + conv_in_add;
  std::vector<at::Tensor> skips{x};
  for (const auto& b : m.down) {
    for (size_t j = 0; j < b.resnets.size(); ++j) {
      x = b.resnets[j](x, emb);
      if (!b.attentions.empty()) x = b.attentions[j](x, context);
      if (!b.simple.empty()) x = b.simple[j](x, context);
      skips.push_back(x);
    }
    if (b.has_sampler) {
      x = b.resnet_sampler ? b.resample(x, emb) : b.down(x);
      skips.push_back(x);
    }
  }
  x = m.mid_res0(x, emb);
  x = m.simple_mid ? m.mid_simple(x, context) : m.mid_attn(x, context);
  x = m.mid_res1(x, emb);
  if (encoder_out) {
    encoder_out->down = std::move(skips);
    encoder_out->mid = x;
    return x;
  }
  if (residuals) {
    DP_CHECK(residuals->down.size() == skips.size() && residuals->mid.defined(), "unet: ", residuals->down.size(),
             " ControlNet residuals for ", skips.size(), " skip connections");
    for (size_t k = 0; k < skips.size(); ++k) skips[k] = skips[k] + residuals->down[k].to(skips[k].scalar_type());
    x = x + residuals->mid.to(x.scalar_type());
  }
  for (const auto& b : m.up) {
    for (size_t j = 0; j < b.resnets.size(); ++j) {
      at::Tensor s = skips.back();
      skips.pop_back();
      x = b.resnets[j](at::cat({x, s}, 1), emb);
      if (!b.attentions.empty()) x = b.attentions[j](x, context);
      if (!b.simple.empty()) x = b.simple[j](x, context);
    }
    if (b.has_sampler)  // upsample to the next skip's size (a resnet upsampler doubles)
      x = b.resnet_sampler ? b.resample(x, emb) : b.up(x, skips.back().sizes().slice(2));
  }
  return m.conv_out(m.gelu ? at::gelu(m.conv_norm_out(x)) : m.conv_norm_out.silu(x)).contiguous();
}

}  // namespace diffpipe
