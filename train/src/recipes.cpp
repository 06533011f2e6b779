#include "diffpipe/train/recipes.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>

#include "diffpipe/train/bpe.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/philox.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/model_writer.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/super_res.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"
#include "diffpipe/train/image_tower.h"
#include "diffpipe/train/shapes.h"

#include "diffpipe/train/trainer.h"

namespace diffpipe::train {

// ------------------------------------------------------------------ VAE
nlohmann::json vae_config(double scaling) {
  return {{"_class_name", "AutoencoderKL"}, {"in_channels", 3}, {"out_channels", 3}, {"latent_channels", 8},
          {"block_out_channels", {32, 64, 64}}, {"layers_per_block", 1},
          {"down_block_types", std::vector<std::string>(3, "DownEncoderBlock2D")},
          {"up_block_types", std::vector<std::string>(3, "UpDecoderBlock2D")}, {"norm_num_groups", 32},
          {"act_fn", "silu"}, {"scaling_factor", scaling}, {"sample_size", 32}, {"force_upcast", true}};
}

void train_vae(const TrainOptions& o) {
  const std::string dir = path_join(o.model, "vae");
  make_dirs(dir);
  write_json(path_join(dir, "config.json"), vae_config(1.0));
  const VaeConfig cfg = VaeConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::initializer(101);
  AutoencoderKL vae(cfg, w, true);
  auto params = trainable(w);
  Trainer tr("vae", o, dir, params);
  for (int64_t step = tr.start(); step < o.steps; ++step) {
    at::Tensor x = scene_batch(kTrainSeed, static_cast<uint64_t>(step * o.batch), static_cast<int>(o.batch), 32);
    auto g = vae.encode(x);
    at::Tensor z = g.mean + at::exp(0.5 * g.logvar) * at::randn_like(g.mean);
    at::Tensor rec = vae.decode(z);
    at::Tensor kl = 0.5 * (g.mean.pow(2) + g.logvar.exp() - 1 - g.logvar).mean();
    // objects are a small part of each image: their pixels (those unlike the corner, always background) count 5x,
    // so that small shapes are reconstructed sharply rather than averaged into the background
    at::Tensor fg = ((x - x.slice(2, 0, 1).slice(3, 0, 1)).abs().amax(1, true) > 0.05).to(x.scalar_type());
    at::Tensor wgt = 1 + 4 * fg;
    wgt = wgt / wgt.mean();
    at::Tensor loss = (wgt * (rec - x).abs()).mean() + (wgt * (rec - x).pow(2)).mean() + 1e-4 * kl;
    tr.step(step, loss);
  }
  tr.finish();
  // scaling factor: 1 / std of the latent means (SD's convention), measured on 512 training images
  at::NoGradGuard ng;
  at::Tensor lat = vae.encode(scene_batch(kTrainSeed, 0, 512, 32)).mean;
  const double scaling = 1.0 / lat.std().item<double>();
  write_component(dir, vae_config(scaling), "diffusion_pytorch_model.safetensors", strip(params));
  std::fprintf(stderr, "[train vae] done: scaling_factor %.5f\n", scaling);
}

// ------------------------------------------------------------------ text encoder + image tower (CLIP-style)
void train_text(const TrainOptions& o) {
  const std::string tok_dir = path_join(o.model, "tokenizer"), te_dir = path_join(o.model, "text_encoder"),
                    it_dir = path_join(o.model, "image_encoder");
  const int64_t vocab = write_clip_tokenizer(tok_dir, data::train_bpe(data::vocabulary_words()));
  const ClipTokenizer tok = ClipTokenizer::load(tok_dir);
  for (const auto& w : data::vocabulary_words())
    DP_CHECK(tok.encode_untruncated(w).size() == 3, "tokenizer: word '", w, "' is not a single token");
  const int64_t D = 64, P = 64;
  nlohmann::json tc = {{"architectures", {"CLIPTextModelWithProjection"}}, {"model_type", "clip_text_model"},
                       {"vocab_size", vocab}, {"hidden_size", D}, {"intermediate_size", 4 * D},
                       {"num_hidden_layers", 3}, {"num_attention_heads", 4}, {"max_position_embeddings", 77},
                       {"hidden_act", "quick_gelu"}, {"layer_norm_eps", 1e-5}, {"bos_token_id", tok.bos_id()},
                       {"eos_token_id", tok.eos_id()}, {"pad_token_id", tok.pad_id()}, {"projection_dim", P}};
  make_dirs(te_dir);
  make_dirs(it_dir);
  write_json(path_join(te_dir, "config.json"), tc);
  const ClipTextConfig tcfg = ClipTextConfig::load(path_join(te_dir, "config.json"));
  Weights tw = Weights::initializer(202);
  tw.get("text_projection.weight", {P, D});
  ClipTextModel te(tcfg, tw);
  ImageTowerConfig icfg;
  icfg.projection_dim = P;
  icfg.grid = 4;  // position-aware: a mean-pooled tower lets the text encoder ignore "top left" vs "bottom right"
  nlohmann::json ic = {{"channels", icfg.channels}, {"projection_dim", P}, {"image_size", icfg.image_size},
                       {"grid", icfg.grid}};
  write_json(path_join(it_dir, "config.json"), ic);
  Weights iw = Weights::initializer(203);
  ImageTower tower(icfg, iw);
  auto tparams = trainable(tw);
  auto iparams = trainable(iw);
  std::map<std::string, at::Tensor> params;
  for (auto& [k, v] : tparams) params["text." + k] = v;
  for (auto& [k, v] : iparams) params["image." + k] = v;
  at::Tensor logit_scale = at::full({1}, std::log(1 / 0.07)).requires_grad_(true);
  params["logit_scale"] = logit_scale;
  Trainer tr("text", o, te_dir, params);
  for (int64_t step = tr.start(); step < o.steps; ++step) {
    std::vector<std::string> caps;
    at::Tensor x = scene_batch(kTrainSeed + 1, static_cast<uint64_t>(step * o.batch), static_cast<int>(o.batch), 64, &caps);
    std::vector<int64_t> ids;
    for (const auto& c : caps) {
      auto t = tok.encode(c);
      ids.insert(ids.end(), t.begin(), t.end());
    }
    at::Tensor input = at::tensor(ids, at::kLong).view({o.batch, 77});
    at::Tensor te_emb = te.text_embeds(input), im_emb = tower.embed(x);
    te_emb = te_emb / te_emb.norm(2, 1, true);
    im_emb = im_emb / im_emb.norm(2, 1, true);
    at::Tensor logits = at::matmul(im_emb, te_emb.t()) * logit_scale.clamp_max(std::log(100.0)).exp();
    // identical captions in a batch are positives too
    at::Tensor same = at::zeros({o.batch, o.batch});
    for (int64_t i = 0; i < o.batch; ++i)
      for (int64_t j = 0; j < o.batch; ++j) same[i][j] = caps[i] == caps[j] ? 1.0 : 0.0;
    at::Tensor target = same / same.sum(1, true);
    at::Tensor loss = -(target * at::log_softmax(logits, 1)).sum(1).mean() - (target * at::log_softmax(logits.t(), 1)).sum(1).mean();
    loss = loss / 2;
    tr.step(step, loss);
  }
  tr.finish();
  std::map<std::string, at::Tensor> named;  // transformers' layout: text_model.* plus text_projection
  for (auto& [k, v] : strip(tparams)) named[k == "text_projection.weight" ? k : "text_model." + k] = v;
  write_component(te_dir, tc, "model.safetensors", named);
  write_component(it_dir, ic, "model.safetensors", strip(iparams));
}

// ------------------------------------------------------------------ denoiser
void train_unet(const TrainOptions& o) {
  const DeviceSpec cpu{};
  auto vae = AutoencoderKL::load(path_join(o.model, "vae"), cpu, true);
  auto te = ClipTextModel::load(path_join(o.model, "text_encoder"), cpu);
  const ClipTokenizer tok = ClipTokenizer::load(path_join(o.model, "tokenizer"));
  const std::string dir = path_join(o.model, "unet"), sdir = path_join(o.model, "scheduler");
  make_dirs(dir);
  make_dirs(sdir);
  nlohmann::json sc = {{"_class_name", "DDIMScheduler"}, {"num_train_timesteps", 1000}, {"beta_start", 0.00085},
                       {"beta_end", 0.012}, {"beta_schedule", "scaled_linear"}, {"clip_sample", false},
                       {"set_alpha_to_one", false}, {"steps_offset", 1}, {"prediction_type", "epsilon"},
                       {"timestep_spacing", "leading"}};
  write_json(path_join(sdir, "scheduler_config.json"), sc);
  const int64_t L = vae->config().latent_channels;
  nlohmann::json uc = {{"_class_name", "UNet2DConditionModel"}, {"in_channels", L}, {"out_channels", L},
                       {"block_out_channels", {64, 128}},
                       {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D"}},
                       {"up_block_types", {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
                       {"mid_block_type", "UNetMidBlock2DCrossAttn"}, {"layers_per_block", 1},
                       {"attention_head_dim", 4}, {"cross_attention_dim", te->config().hidden_size},
                       {"norm_num_groups", 32}, {"norm_eps", 1e-5}, {"flip_sin_to_cos", true}, {"freq_shift", 0},
                       {"sample_size", 8}, {"act_fn", "silu"}, {"use_linear_projection", false}};
  write_json(path_join(dir, "config.json"), uc);
  const UNetConfig cfg = UNetConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::initializer(303);
  UNet2DConditionModel unet(cfg, w);
  auto params = trainable(w);
  const at::Tensor ac = alphas_cumprod(SchedulerConfig::load(path_join(sdir, "scheduler_config.json")));
  const double scaling = vae->config().scaling_factor;
  std::map<std::string, at::Tensor> emb_cache;
  auto embed = [&](const std::string& c) {
    auto it = emb_cache.find(c);
    if (it != emb_cache.end()) return it->second;
    at::NoGradGuard ng;
    auto ids = tok.encode(c);
    at::Tensor e = te->forward(at::tensor(ids, at::kLong).view({1, 77})).last_hidden_state[0];
    emb_cache[c] = e;
    return e;
  };
  Trainer tr("unet", o, dir, params, /*weight_decay=*/0.01);
  const int64_t start = tr.start();
  std::mt19937_64 rng(start + 7);
  // scenes are deterministic (about 21k distinct), so each one's latent is encoded once and cached by caption
  std::map<std::string, at::Tensor> lat_cache;
  // min-SNR-gamma loss weights (Hang et al. 2023, gamma 5): high-noise steps, where layout and colour are decided,
  // are not drowned out by the many low-noise steps; for epsilon prediction the weight is min(snr, 5) / snr
  const at::Tensor snr = ac / (1 - ac), snr_weight = at::clamp_max(snr, 5.0) / snr;
  for (int64_t step = start; step < o.steps; ++step) {
    std::vector<std::string> caps;
    std::vector<at::Tensor> lats(static_cast<size_t>(o.batch));
    std::vector<int> missing;
    for (int64_t i = 0; i < o.batch; ++i) {
      caps.push_back(data::caption(data::sample_scene(kTrainSeed + 2, static_cast<uint64_t>(step * o.batch + i))));
      auto it = lat_cache.find(caps.back());
      if (it != lat_cache.end()) lats[i] = it->second;
      else missing.push_back(static_cast<int>(i));
    }
    if (!missing.empty()) {
      at::NoGradGuard ng;
      std::vector<at::Tensor> imgs;
      for (int i : missing) imgs.push_back(scene_batch(kTrainSeed + 2, static_cast<uint64_t>(step * o.batch + i), 1, 32)[0]);
      at::Tensor enc = vae->encode(at::stack(imgs)).mean * scaling;
      for (size_t k = 0; k < missing.size(); ++k) lat_cache[caps[missing[k]]] = lats[missing[k]] = enc[k].clone();
    }
    at::Tensor lat = at::stack(lats);
    std::vector<at::Tensor> ctx;
    for (auto& c : caps) ctx.push_back(embed(rng() % 10 == 0 ? std::string() : c));  // 10 % caption dropout
    at::Tensor t = at::randint(0, 1000, {o.batch}, at::kLong);
    at::Tensor a = ac.index_select(0, t).view({o.batch, 1, 1, 1});
    at::Tensor eps = at::randn_like(lat);
    at::Tensor noisy = a.sqrt() * lat + (1 - a).sqrt() * eps;
    at::Tensor pred = unet.forward(noisy, t, at::stack(ctx));
    at::Tensor loss = ((pred - eps).pow(2).mean({1, 2, 3}) * snr_weight.index_select(0, t)).mean();
    tr.step(step, loss);
  }
  tr.finish();
  write_component(dir, uc, "diffusion_pytorch_model.safetensors", strip(params));
  write_json(path_join(o.model, "model_index.json"),
             {{"_class_name", "StableDiffusionPipeline"}, {"text_encoder", {"transformers", "CLIPTextModelWithProjection"}},
              {"tokenizer", {"transformers", "CLIPTokenizer"}}, {"unet", {"diffusers", "UNet2DConditionModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}}, {"scheduler", {"diffusers", "DDIMScheduler"}},
              {"super_resolution", {"diffpipe", "SuperResolution"}}, {"image_encoder", {"diffpipe", "ImageTower"}}});
}

// ------------------------------------------------------------------ super-resolution 32 -> 64
void train_sr(const TrainOptions& o) {
  const std::string dir = path_join(o.model, "super_resolution");
  make_dirs(dir);
  nlohmann::json c = {{"_class_name", "SuperResolution"}, {"scale", 2}, {"channels", 32}, {"layers", 4}};
  write_json(path_join(dir, "config.json"), c);
  const SuperResConfig cfg = SuperResConfig::load(path_join(dir, "config.json"));
  Weights w = Weights::initializer(404);
  SuperResolution sr(cfg, w);
  auto params = trainable(w);
  {  // start as nearest upsampling: the residual branch's last layer at zero
    at::NoGradGuard ng;
    params.at("convs." + std::to_string(cfg.layers - 1) + ".weight").zero_();
  }
  Trainer tr("sr", o, dir, params);
  for (int64_t step = tr.start(); step < o.steps; ++step) {
    at::Tensor hi = scene_batch(kTrainSeed + 3, static_cast<uint64_t>(step * o.batch), static_cast<int>(o.batch), 64);
    at::Tensor lo = at::avg_pool2d(hi, {2, 2});
    at::Tensor loss = (sr.forward(lo) - hi).abs().mean();
    tr.step(step, loss);
  }
  tr.finish();
  write_component(dir, c, "diffusion_pytorch_model.safetensors", strip(params));
}

}  // namespace diffpipe::train
