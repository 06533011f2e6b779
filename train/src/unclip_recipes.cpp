// diffpipe's own DALL-E-2-style model (models/shapes-unclip): the shapes model's CLIP pair gives the embeddings
// (text tower -> text embedding and hidden states; image tower -> image embedding), a diffusion prior learns
// text -> image embedding, and a decoder UNet (the shapes UNet grown by a class embedding) learns to draw from
// the noise-augmented image embedding next to the caption. The folder is diffusers' Stable unCLIP layout.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <map>
#include <random>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/model_writer.h"
#include "diffpipe/stages/prior.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/unclip.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"
#include "diffpipe/train/image_tower.h"
#include "diffpipe/train/recipes.h"
#include "diffpipe/train/shapes.h"
#include "diffpipe/train/trainer.h"

namespace diffpipe::train {

namespace {
namespace fs = std::filesystem;

constexpr uint64_t kUnclipSeed = kTrainSeed + 3;  // the scenes both unCLIP modules train on
constexpr int kNormalizerSamples = 4096;

// The caption's CLIP features through the shapes model's text tower: text_embeds [E], hidden states [77, D],
// the tokenizer's attention mask [77]. Cached by caption (scenes repeat).
struct TextFeatures {
  at::Tensor embeds, hidden, mask;
};

class Features {
 public:
  explicit Features(const std::string& from)
      : tok_(ClipTokenizer::load(path_join(from, "tokenizer"))),
        te_(ClipTextModel::load(path_join(from, "text_encoder"), DeviceSpec{})),
        tower_(ImageTower::load(path_join(from, "image_encoder"), DeviceSpec{})) {}

  const TextFeatures& text(const std::string& caption) {
    auto it = text_.find(caption);
    if (it != text_.end()) return it->second;
    at::NoGradGuard ng;
    const auto ids = tok_.encode(caption);
    const int64_t n = tok_.length(caption);
    const at::Tensor input = at::tensor(ids, at::kLong).view({1, 77});
    const ClipTextOutput o = te_->forward(input);
    at::Tensor mask = at::zeros({77}, at::kLong);
    mask.slice(0, 0, n).fill_(1);
    return text_[caption] = {te_->project(o.pooled)[0], o.last_hidden_state[0], mask};
  }
  // The image tower's embedding of the scene's 64-px image (the size the CLIP pair trained on).
  const at::Tensor& image(uint64_t seed, uint64_t index, const std::string& caption) {
    auto it = image_.find(caption);
    if (it != image_.end()) return it->second;
    at::NoGradGuard ng;
    return image_[caption] = tower_->embed(scene_batch(seed, index, 1, 64))[0];
  }
  int64_t embedding_dim() const { return tower_->config().projection_dim; }
  int64_t hidden_size() const { return te_->config().hidden_size; }

 private:
  ClipTokenizer tok_;
  std::shared_ptr<ClipTextModel> te_;
  std::shared_ptr<ImageTower> tower_;
  std::map<std::string, TextFeatures> text_;
  std::map<std::string, at::Tensor> image_;
};

void copy_dir(const std::string& from, const std::string& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from))
    if (e.is_regular_file() && e.path().filename() != "checkpoint.safetensors")
      fs::copy_file(e.path(), fs::path(to) / e.path().filename(), fs::copy_options::overwrite_existing);
}

nlohmann::json ddpm(const char* prediction, const char* variance, double clip_range) {
  return {{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", 1000}, {"beta_schedule", "squaredcos_cap_v2"},
          {"beta_start", 0.0001}, {"beta_end", 0.02}, {"prediction_type", prediction}, {"variance_type", variance},
          {"clip_sample", true}, {"clip_sample_range", clip_range}, {"timestep_spacing", "leading"},
          {"steps_offset", 0}};
}

// The folder around the two trained modules: the shapes model's tokenizer and text encoder (also as the
// prior's), its VAE and DDIM scheduler, the DDPM schedulers, the image normaliser (mean and std of the image
// embeddings of kNormalizerSamples training scenes) and model_index.json. Returns the normaliser's mean, std.
std::pair<at::Tensor, at::Tensor> write_unclip_folder(const std::string& from, const std::string& out, Features& f) {
  for (const char* c : {"tokenizer", "text_encoder", "vae", "scheduler"}) copy_dir(path_join(from, c), path_join(out, c));
  const bool sr = dir_exists(path_join(from, "super_resolution"));  // the cascade's upscale stage, as in `from`
  if (sr) copy_dir(path_join(from, "super_resolution"), path_join(out, "super_resolution"));
  copy_dir(path_join(from, "tokenizer"), path_join(out, "prior_tokenizer"));
  copy_dir(path_join(from, "text_encoder"), path_join(out, "prior_text_encoder"));
  make_dirs(path_join(out, "prior_scheduler"));
  write_json(path_join(out, "prior_scheduler/scheduler_config.json"), ddpm("sample", "fixed_small_log", 5.0));
  make_dirs(path_join(out, "image_noising_scheduler"));
  write_json(path_join(out, "image_noising_scheduler/scheduler_config.json"), ddpm("epsilon", "fixed_small", 1.0));
  std::vector<at::Tensor> e;
  for (int i = 0; i < kNormalizerSamples; ++i) {
    const data::Scene s = data::sample_scene(kUnclipSeed, static_cast<uint64_t>(i));
    e.push_back(f.image(kUnclipSeed, static_cast<uint64_t>(i), data::caption(s)));
  }
  const at::Tensor all = at::stack(e);
  const at::Tensor mean = all.mean(0, true), std = all.std(0, /*unbiased=*/true, /*keepdim=*/true).clamp_min(1e-6);
  write_component(path_join(out, "image_normalizer"),
                  {{"_class_name", "StableUnCLIPImageNormalizer"}, {"embedding_dim", f.embedding_dim()}},
                  "diffusion_pytorch_model.safetensors", {{"mean", mean}, {"std", std}});
  nlohmann::json index = {{"_class_name", "StableUnCLIPPipeline"}, {"prior_tokenizer", {"transformers", "CLIPTokenizer"}},
              {"prior_text_encoder", {"transformers", "CLIPTextModelWithProjection"}},
              {"prior", {"diffusers", "PriorTransformer"}}, {"prior_scheduler", {"diffusers", "DDPMScheduler"}},
              {"image_normalizer", {"stable_diffusion", "StableUnCLIPImageNormalizer"}},
              {"image_noising_scheduler", {"diffusers", "DDPMScheduler"}},
              {"tokenizer", {"transformers", "CLIPTokenizer"}}, {"text_encoder", {"transformers", "CLIPTextModelWithProjection"}},
              {"unet", {"diffusers", "UNet2DConditionModel"}}, {"scheduler", {"diffusers", "DDIMScheduler"}},
              {"vae", {"diffusers", "AutoencoderKL"}}};
  if (sr) index["super_resolution"] = {"diffpipe", "SuperResolution"};
  write_json(path_join(out, "model_index.json"), index);
  return {mean, std};
}

std::pair<at::Tensor, at::Tensor> read_normalizer(const std::string& out) {
  const auto t = load_safetensors(path_join(out, "image_normalizer/diffusion_pytorch_model.safetensors"));
  return {t.at("mean"), t.at("std")};
}
}  // namespace

void train_prior(const TrainOptions& o, const std::string& from) {
  DP_CHECK(dir_exists(path_join(from, "image_encoder")), "train prior: --from ", from,
           " needs the shapes model's text encoder and image tower (image_encoder/)");
  Features f(from);
  const auto [mean, std] = write_unclip_folder(from, o.model, f);
  const std::string dir = path_join(o.model, "prior");
  make_dirs(dir);
  const int64_t E = f.embedding_dim();
  DP_CHECK(f.hidden_size() == E, "train prior: the text encoder's hidden size ", f.hidden_size(),
           " must equal the image embedding's ", E, " (the prior's tokens share one width)");
  nlohmann::json pc = {{"_class_name", "PriorTransformer"}, {"num_attention_heads", 4}, {"attention_head_dim", 16},
                       {"num_layers", 4}, {"embedding_dim", E}, {"num_embeddings", 77}, {"additional_embeddings", 4},
                       {"dropout", 0.0}, {"time_embed_act_fn", "silu"}, {"norm_in_type", nullptr},
                       {"embedding_proj_norm_type", nullptr}, {"encoder_hid_proj_type", "linear"},
                       {"added_emb_type", "prd"}, {"time_embed_dim", nullptr}, {"embedding_proj_dim", nullptr},
                       {"clip_embed_dim", nullptr}};
  write_json(path_join(dir, "config.json"), pc);
  Weights w = Weights::initializer(505);
  PriorTransformer prior(PriorConfig::load(path_join(dir, "config.json")), w);
  auto params = trainable(w);
  std::map<std::string, at::Tensor> stats;  // not trained: the embeddings' statistics (post_process_latents)
  for (const char* k : {"clip_mean", "clip_std"}) {
    at::NoGradGuard ng;
    params.at(k).requires_grad_(false).copy_(std::string(k) == "clip_mean" ? mean : std);
    stats[k] = params.at(k);
    params.erase(k);
  }
  const SchedulerConfig sc = SchedulerConfig::load_ddpm(path_join(o.model, "prior_scheduler/scheduler_config.json"));
  const at::Tensor ac = alphas_cumprod(sc);
  Trainer tr("prior", o, dir, params, /*weight_decay=*/0.01);
  std::mt19937_64 rng(static_cast<uint64_t>(tr.start()) + 11);
  for (int64_t step = tr.start(); step < o.steps; ++step) {
    std::vector<at::Tensor> x0, proj, hid, mask;
    for (int64_t i = 0; i < o.batch; ++i) {
      const uint64_t index = static_cast<uint64_t>(step * o.batch + i);
      const std::string cap = data::caption(data::sample_scene(kUnclipSeed, index));
      x0.push_back((f.image(kUnclipSeed, index, cap) - mean[0]) / std[0]);
      // 10 % of the captions dropped to the empty prompt: the unconditional prediction guidance needs
      const TextFeatures& t = f.text(rng() % 10 == 0 ? std::string() : cap);
      proj.push_back(t.embeds);
      hid.push_back(t.hidden);
      mask.push_back(t.mask);
    }
    const at::Tensor x = at::stack(x0), t = at::randint(0, sc.num_train_timesteps, {o.batch}, at::kLong);
    const at::Tensor a = ac.index_select(0, t).view({o.batch, 1});
    const at::Tensor noisy = a.sqrt() * x + (1 - a).sqrt() * at::randn_like(x);
    const at::Tensor pred = prior.forward(noisy, t, at::stack(proj), at::stack(hid), at::stack(mask));
    tr.step(step, (pred - x).pow(2).mean());  // prediction_type "sample": the clean (normalised) embedding
  }
  tr.finish();
  auto out = strip(params);
  for (auto& [k, v] : stats) out[k] = v.detach().clone();
  write_component(dir, pc, "diffusion_pytorch_model.safetensors", out);
}

void train_decoder(const TrainOptions& o, const std::string& from) {
  DP_CHECK(file_exists(path_join(o.model, "image_normalizer/diffusion_pytorch_model.safetensors")),
           "train decoder: run `train prior` into ", o.model, " first (it writes the folder and the normaliser)");
  Features f(from);
  const auto [mean, std] = read_normalizer(o.model);
  auto vae = AutoencoderKL::load(path_join(from, "vae"), DeviceSpec{}, true);
  const double scaling = vae->config().scaling_factor;
  const int64_t E = f.embedding_dim();
  // the shapes UNet, grown by a projection class embedding of [image embedding; noise-level embedding]
  nlohmann::json uc = JsonConfig::load(path_join(from, "unet/config.json")).json();
  uc["class_embed_type"] = "projection";
  uc["projection_class_embeddings_input_dim"] = 2 * E;
  const std::string dir = path_join(o.model, "unet");
  make_dirs(dir);
  write_json(path_join(dir, "config.json"), uc);
  std::map<std::string, at::Tensor> trained;  // owned copies (the file's tensors are read-only mapped memory)
  for (auto& [k, v] : load_safetensors(path_join(from, "unet/diffusion_pytorch_model.safetensors")))
    trained[k] = v.to(at::kFloat).clone();
  Weights w = Weights::initializer_from(std::move(trained), 606);
  UNet2DConditionModel unet(UNetConfig::load(path_join(dir, "config.json")), w);
  auto params = trainable(w);
  {  // the new branch starts silent: the decoder begins as the text-only UNet it grew from
    at::NoGradGuard ng;
    params.at("class_embedding.linear_2.weight").zero_();
  }
  const at::Tensor ac = alphas_cumprod(SchedulerConfig::load(path_join(from, "scheduler/scheduler_config.json")));
  const at::Tensor noising = alphas_cumprod(
      SchedulerConfig::load_ddpm(path_join(o.model, "image_noising_scheduler/scheduler_config.json")));
  const at::Tensor snr = ac / (1 - ac), snr_weight = at::clamp_max(snr, 5.0) / snr;  // min-SNR-5, as the UNet
  std::map<std::string, at::Tensor> lat_cache;
  Trainer tr("decoder", o, dir, params, /*weight_decay=*/0.01);
  std::mt19937_64 rng(static_cast<uint64_t>(tr.start()) + 13);
  for (int64_t step = tr.start(); step < o.steps; ++step) {
    std::vector<at::Tensor> lats, ctx, labels;
    for (int64_t i = 0; i < o.batch; ++i) {
      const uint64_t index = static_cast<uint64_t>(step * o.batch + i);
      const std::string cap = data::caption(data::sample_scene(kUnclipSeed, index));
      auto it = lat_cache.find(cap);
      if (it == lat_cache.end()) {
        at::NoGradGuard ng;
        it = lat_cache.emplace(cap, vae->encode(scene_batch(kUnclipSeed, index, 1, 32)).mean[0] * scaling).first;
      }
      lats.push_back(it->second);
      // noise augmentation at a random level (as Stable unCLIP trains), the level's sinusoidal embedding joined
      const int64_t level = static_cast<int64_t>(rng() % 1000);
      const at::Tensor e = f.image(kUnclipSeed, index, cap).unsqueeze(0);
      const at::Tensor aug = noise_image_embeds(e, at::full({1}, level, at::kLong), at::randn_like(e), mean, std, noising);
      const bool drop = rng() % 10 == 0;  // 10 %: the unconditional row (empty caption, zero class labels)
      labels.push_back(drop ? at::zeros({2 * E}) : aug[0]);
      ctx.push_back(f.text(drop ? std::string() : cap).hidden);
    }
    const at::Tensor lat = at::stack(lats), t = at::randint(0, 1000, {o.batch}, at::kLong);
    const at::Tensor a = ac.index_select(0, t).view({o.batch, 1, 1, 1}), eps = at::randn_like(lat);
    const at::Tensor pred = unet.forward(a.sqrt() * lat + (1 - a).sqrt() * eps, t, at::stack(ctx), at::stack(labels));
    tr.step(step, ((pred - eps).pow(2).mean({1, 2, 3}) * snr_weight.index_select(0, t)).mean());
  }
  tr.finish();
  write_component(dir, uc, "diffusion_pytorch_model.safetensors", strip(params), at::kHalf);
}

}  // namespace diffpipe::train
