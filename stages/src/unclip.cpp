#include "diffpipe/stages/unclip.h"

#include <cmath>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/profile.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/unet.h"

namespace diffpipe {

bool UnclipParts::is_unclip_folder(const std::string& dir) {
  const std::string index = path_join(dir, "model_index.json");
  if (!file_exists(index)) return false;
  const std::string c = JsonConfig::load(index).string("_class_name", "");
  return c == "StableUnCLIPPipeline" || c == "StableUnCLIPImg2ImgPipeline";
}
bool UnclipParts::has_prior(const std::string& dir) { return dir_exists(path_join(dir, "prior")); }
bool UnclipParts::has_image_encoder(const std::string& dir) { return dir_exists(path_join(dir, "image_encoder")); }

void UnclipParts::validate(const std::string& dir) {
  const JsonConfig index = JsonConfig::load(path_join(dir, "model_index.json"));
  const bool prior = has_prior(dir), image = has_image_encoder(dir);
  DP_CHECK(prior || image, dir, ": a Stable unCLIP folder needs prior/ (text to image embedding) or image_encoder/ ",
           "(image variations)");
  std::vector<const char*> comps{"image_normalizer", "image_noising_scheduler"};
  if (prior) comps.insert(comps.end(), {"prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler"});
  if (image) comps.insert(comps.end(), {"feature_extractor", "image_encoder"});
  for (const char* c : comps)
    if (!index.has(c)) index.fail(c, "component of a Stable unCLIP pipeline missing from model_index.json");
  (void)SchedulerConfig::load_ddpm(path_join(dir, "image_noising_scheduler/scheduler_config.json"));
  std::vector<std::string> weights{"image_normalizer/diffusion_pytorch_model.safetensors"};
  int64_t E = 0;
  if (prior) {
    const auto tcfg = ClipTextConfig::load(path_join(dir, "prior_text_encoder/config.json"));
    const auto pcfg = PriorConfig::load(path_join(dir, "prior/config.json"));
    (void)SchedulerConfig::load_ddpm(path_join(dir, "prior_scheduler/scheduler_config.json"));
    for (const char* f : {"prior_tokenizer/vocab.json", "prior_tokenizer/merges.txt"})
      DP_CHECK(file_exists(path_join(dir, f)), path_join(dir, f), ": file not found");
    weights.insert(weights.end(), {"prior_text_encoder/model.safetensors", "prior/diffusion_pytorch_model.safetensors"});
    DP_CHECK(tcfg.projection_dim == pcfg.embedding_dim, path_join(dir, "prior_text_encoder/config.json"),
             ": projection_dim ", tcfg.projection_dim, " does not match the prior's embedding_dim ", pcfg.embedding_dim);
    E = pcfg.embedding_dim;
  }
  if (image) {
    const auto vcfg = ClipVisionConfig::load(path_join(dir, "image_encoder/config.json"));
    const auto icfg = ClipImageProcessorConfig::load(path_join(dir, "feature_extractor/preprocessor_config.json"));
    DP_CHECK(icfg.crop_height == vcfg.image_size && icfg.crop_width == vcfg.image_size,
             path_join(dir, "feature_extractor/preprocessor_config.json"), ": crop_size ", icfg.crop_width, "x",
             icfg.crop_height, " does not match the image encoder's image_size ", vcfg.image_size);
    DP_CHECK(E == 0 || E == vcfg.projection_dim, path_join(dir, "image_encoder/config.json"), ": projection_dim ",
             vcfg.projection_dim, " does not match the prior's embedding_dim ", E);
    E = vcfg.projection_dim;
    weights.push_back("image_encoder/model.safetensors");
  }
  for (const auto& f : weights) {
    DP_CHECK(file_exists(path_join(dir, f)), path_join(dir, f), ": weights file not found");
    SafetensorsFile::open(path_join(dir, f));
  }
  const auto ucfg = UNetConfig::load(path_join(dir, "unet/config.json"));
  DP_CHECK(ucfg.class_embed_type == "projection" && ucfg.projection_class_embeddings_input_dim == 2 * E,
           path_join(dir, "unet/config.json"), ": a Stable unCLIP UNet needs class_embed_type \"projection\" with ",
           "projection_class_embeddings_input_dim ", 2 * E, " (twice the image embedding's ", E, ")");
}

std::shared_ptr<const UnclipParts> UnclipParts::load(const std::string& dir, const DeviceSpec& spec) {
  auto u = std::make_shared<UnclipParts>();
  if (has_prior(dir)) {
    u->prior_tokenizer = std::make_shared<ClipTokenizer>(ClipTokenizer::load(path_join(dir, "prior_tokenizer")));
    u->prior_text_encoder = ClipTextModel::load(path_join(dir, "prior_text_encoder"), spec);
    u->prior = PriorTransformer::load(path_join(dir, "prior"), spec);
    u->prior_scheduler = SchedulerConfig::load_ddpm(path_join(dir, "prior_scheduler/scheduler_config.json"));
  }
  if (has_image_encoder(dir)) {
    u->image_encoder = ClipVisionModel::load(path_join(dir, "image_encoder"), spec);
    u->image_processor = ClipImageProcessorConfig::load(path_join(dir, "feature_extractor/preprocessor_config.json"));
  }
  u->image_noising_scheduler = SchedulerConfig::load_ddpm(path_join(dir, "image_noising_scheduler/scheduler_config.json"));
  u->noising_alphas_cumprod = alphas_cumprod(u->image_noising_scheduler);
  // The normaliser's statistics stay float32 (tiny): the augmentation runs in float32 on the model's device.
  DeviceSpec f32 = spec;
  f32.dtype = at::kFloat;
  const std::string nfile = path_join(dir, "image_normalizer/diffusion_pytorch_model.safetensors");
  const Weights w = Weights::load(nfile, f32);
  const int64_t E = u->embedding_dim();
  u->normalizer_mean = w.get("mean", {1, E});
  u->normalizer_std = w.get("std", {1, E});
  return u;
}

bool UnclipParts::is_kandinsky_folder(const std::string& dir) {
  const std::string index = path_join(dir, "model_index.json");
  if (!file_exists(index)) return false;
  const std::string c = JsonConfig::load(index).string("_class_name", "");
  return c == "KandinskyV22CombinedPipeline" || c == "KandinskyV22Pipeline";
}

std::string UnclipParts::kandinsky_part(const std::string& dir, const std::string& prior_dir, const std::string& part) {
  return prior_dir.empty() ? path_join(dir, "prior_" + part) : path_join(prior_dir, part);
}

void UnclipParts::validate_kandinsky(const std::string& dir, const std::string& prior_dir) {
  auto part = [&](const char* p) { return kandinsky_part(dir, prior_dir, p); };
  if (prior_dir.empty()) {
    const JsonConfig index = JsonConfig::load(path_join(dir, "model_index.json"));
    for (const char* c : {"prior_tokenizer", "prior_text_encoder", "prior_prior", "prior_scheduler", "prior_image_encoder"})
      if (!index.has(c)) index.fail(c, "component of a Kandinsky 2.2 pipeline missing from model_index.json");
  } else {
    DP_CHECK(dir_exists(prior_dir), "prior: ", prior_dir, ": folder not found");
    const JsonConfig index = JsonConfig::load(path_join(prior_dir, "model_index.json"));
    const std::string c = index.string("_class_name", "");
    if (c != "KandinskyV22PriorPipeline")
      index.fail("_class_name", "'" + c + "' is not KandinskyV22PriorPipeline (kandinsky-2-2-prior's layout)");
    for (const char* k : {"tokenizer", "text_encoder", "prior", "scheduler", "image_encoder"})
      if (!index.has(k)) index.fail(k, "component of a Kandinsky 2.2 prior missing from model_index.json");
  }
  for (const std::string f : {part("tokenizer") + "/vocab.json", part("tokenizer") + "/merges.txt"})
    DP_CHECK(file_exists(f), f, ": file not found (the CLIP tokenizer's vocabulary)");
  const auto tcfg = ClipTextConfig::load(part("text_encoder") + "/config.json");
  const auto pcfg = PriorConfig::load(part("prior") + "/config.json");
  const auto vcfg = ClipVisionConfig::load(part("image_encoder") + "/config.json");
  (void)SchedulerConfig::load_ddpm(part("scheduler") + "/scheduler_config.json");
  for (const std::string f : {part("text_encoder") + "/model.safetensors",
                              part("prior") + "/diffusion_pytorch_model.safetensors",
                              part("image_encoder") + "/model.safetensors"}) {
    DP_CHECK(file_exists(f), f, ": weights file not found");
    SafetensorsFile::open(f);
  }
  DP_CHECK(tcfg.projection_dim == pcfg.embedding_dim, part("text_encoder"), "/config.json: projection_dim ",
           tcfg.projection_dim, " does not match the prior's embedding_dim ", pcfg.embedding_dim);
  DP_CHECK(vcfg.projection_dim == pcfg.embedding_dim, part("image_encoder"), "/config.json: projection_dim ",
           vcfg.projection_dim, " does not match the prior's embedding_dim ", pcfg.embedding_dim,
           " (its zero image's embedding is the negative image embedding)");
}

std::shared_ptr<const UnclipParts> UnclipParts::load_kandinsky(const std::string& dir, const std::string& prior_dir,
                                                               const DeviceSpec& spec, bool text, bool prior) {
  auto part = [&](const char* p) { return kandinsky_part(dir, prior_dir, p); };
  auto u = std::make_shared<UnclipParts>();
  u->kandinsky = true;
  u->prior_scheduler = SchedulerConfig::load_ddpm(part("scheduler") + "/scheduler_config.json");
  if (text) {
    u->prior_tokenizer = std::make_shared<ClipTokenizer>(ClipTokenizer::load(part("tokenizer")));
    u->prior_text_encoder = ClipTextModel::load(part("text_encoder"), spec);
  }
  if (prior) {
    u->prior = PriorTransformer::load(part("prior"), spec);
    u->image_encoder = ClipVisionModel::load(part("image_encoder"), spec);
    // image prompts (variations): the folder's image processor, else CLIP's at the encoder's image size
    u->image_processor = ClipImageProcessorConfig::load_or_default(part("image_processor") + "/preprocessor_config.json",
                                                                   u->image_encoder->config().image_size);
  }
  return u;
}

at::Tensor noise_image_embeds(const at::Tensor& embeds, const at::Tensor& levels, const at::Tensor& noise,
                              const at::Tensor& mean, const at::Tensor& std, const at::Tensor& alphas_cumprod) {
  const int64_t B = embeds.size(0);
  at::Tensor x = embeds.to(at::kFloat);
  const at::Tensor m = mean.to(x.device()), s = std.to(x.device());
  x = (x - m) * (1.0 / s);  // StableUnCLIPImageNormalizer.scale
  const at::Tensor a = alphas_cumprod.index_select(0, levels.to(at::kCPU)).view({B, 1});  // float32, as add_noise
  x = a.pow(0.5).to(x.device()) * x + (1 - a).pow(0.5).to(x.device()) * noise.to(x.device(), at::kFloat);
  x = x * s + m;  // unscale
  const at::Tensor emb = timestep_embedding(levels.to(at::kCPU), embeds.size(1), /*flip_sin_to_cos=*/true, 0);
  return at::cat({x, emb.to(x.device())}, 1);
}

at::Tensor UnclipParts::noise_image_embeds(const at::Tensor& embeds, int noise_level, const at::Tensor& noise) const {
  const int64_t N = noising_alphas_cumprod.size(0);
  DP_CHECK(noise_level >= 0 && noise_level < N, "noise_level: must be in [0, ", N, ") (image_noising_scheduler's ",
           "num_train_timesteps), got ", noise_level);
  const at::Tensor levels = at::full({embeds.size(0)}, static_cast<int64_t>(noise_level), at::kLong);
  return diffpipe::noise_image_embeds(embeds, levels, noise, normalizer_mean, normalizer_std, noising_alphas_cumprod);
}

void check_prior_params(const GenerationParams& p, int64_t prior_train_timesteps, int64_t noise_levels,
                        const std::string& folder) {
  DP_CHECK(noise_levels == 0 || (p.noise_level >= 0 && p.noise_level < noise_levels), "noise_level: must be in [0, ",
           noise_levels, ") (the image_noising_scheduler's steps), got ", p.noise_level);
  DP_CHECK(noise_levels > 0 || p.prior_steps >= 2, "prior_steps: must be at least 2 (Kandinsky 2.2's UnCLIPScheduler ",
           "divides by prior_steps - 1), got ", p.prior_steps);
  if (!p.image_prompt.empty()) return;
  DP_CHECK(prior_train_timesteps > 0, folder, " makes image variations only (it has no prior/): give an image ",
           "prompt (--image-prompt FILE, or \"image_prompt\" in a JSONL line)");
  DP_CHECK(p.prior_steps >= 1 && p.prior_steps <= prior_train_timesteps, "prior_steps: must be in [1, ",
           prior_train_timesteps, "], got ", p.prior_steps);
  DP_CHECK(std::isfinite(p.prior_guidance) && p.prior_guidance >= 0,
           "prior_guidance: must be a finite number >= 0, got ", p.prior_guidance);
}

PriorState PriorRunner::make_state(const GenerationParams& p, uint64_t id,
                                   std::function<at::Tensor(uint64_t, const at::Tensor&)> noise) const {
  check_prior_params(p, parts_.prior ? parts_.prior_scheduler.num_train_timesteps : 0,
                     parts_.kandinsky ? 0 : parts_.image_noising_scheduler.num_train_timesteps, "this folder");
  PriorState s;
  s.id = id;
  s.seed = p.seed;
  s.guidance = p.prior_guidance;
  s.noise_level = p.noise_level;
  s.prompt = p.prompt;
  if (parts_.kandinsky) s.negative_prompt = p.negative_prompt;
  const uint64_t seed = p.seed;
  s.noise = noise ? std::move(noise) : [seed](uint64_t stream, const at::Tensor& like) {
    return seeded_noise(seed, stream, like.sizes());
  };
  // image variations: the image encoder's embedding replaces the prior's (Kandinsky 2.2: without a prompt; with one
  // the image is image-to-image's start, the decoder's business)
  if (!p.image_prompt.empty() && !(parts_.kandinsky && !p.prompt.empty())) {
    DP_CHECK(parts_.image_encoder, "image_prompt: this folder has no image_encoder/ (image variations need a ",
             "StableUnCLIPImg2ImgPipeline folder)");
    s.pixel_values = preprocess_clip_image(parts_.image_processor, read_image_ref(p.image_prompt));
    return s;
  }
  s.sampler = std::make_unique<DdpmSampler>(parts_.prior_scheduler, p.prior_steps);
  const at::Tensor like = at::empty({parts_.embedding_dim()}, at::kFloat);
  s.latents = s.noise(kPriorLatentStream, like).to(spec_.device, at::kFloat);  // init_noise_sigma is 1 for DDPM
  if (!s.negative_prompt.empty())  // Kandinsky 2.2: the negative prompt's own run
    s.negative_latents = s.noise(kPriorNegativeLatentStream, like).to(spec_.device, at::kFloat);
  return s;
}

void PriorRunner::encode(const std::vector<PriorState*>& states) const {
  // Rows: each state's prompt, then the unconditional text where needed: "" (Stable unCLIP's prior always uses the
  // empty prompt), the negative prompt (Kandinsky 2.2's)
  DP_CHECK(parts_.prior_tokenizer && parts_.prior_text_encoder, "prior: its text encoder was not loaded");
  const ClipTokenizer& tok = *parts_.prior_tokenizer;
  const int L = tok.max_length();
  std::vector<std::pair<PriorState*, bool>> rows;
  for (PriorState* s : states) {
    rows.push_back({s, false});
    if (s->needs_uncond()) rows.push_back({s, true});
  }
  std::vector<int64_t> ids, mask;
  for (const auto& [s, uncond] : rows) {
    const std::string& text = uncond ? s->negative_prompt : s->prompt;
    const auto t = tok.encode(text);
    ids.insert(ids.end(), t.begin(), t.end());
    // CLIPTokenizer's attention mask: 1 for the real tokens (start, text, end), 0 for the padding after them
    const int64_t n = tok.length(text);
    for (int64_t i = 0; i < L; ++i) mask.push_back(i < n ? 1 : 0);
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  const at::Tensor input = at::tensor(ids, at::kLong).view({R, L}).to(spec_.device);
  const at::Tensor m = at::tensor(mask, at::kLong).view({R, L}).to(spec_.device);
  // As StableUnCLIPPipeline: the prior text encoder sees the ids alone (its causal mask keeps real tokens from
  // the padding); the prior masks the padding through `mask`.
  const ClipTextOutput out = parts_.prior_text_encoder->forward(input);
  const at::Tensor embeds = parts_.prior_text_encoder->project(out.pooled);
  for (int64_t r = 0; r < R; ++r) {
    auto [s, uncond] = rows[static_cast<size_t>(r)];
    (uncond ? s->u_embeds : s->embeds) = embeds[r];
    (uncond ? s->u_hidden : s->hidden) = out.last_hidden_state[r];
    (uncond ? s->u_mask : s->mask) = m[r];
    s->encoded = true;
  }
}

void PriorRunner::step(const std::vector<PriorState*>& batch) const {
  if (batch.empty()) return;
  profile::Scope prof(profile::Section::TextEncoder);  // the prior is text-to-embedding work
  std::vector<PriorState*> fresh, images, loop;
  for (PriorState* s : batch) {
    DP_CHECK(!s->done(), "prior: request ", s->id, " already finished");
    (s->image_mode() ? images : loop).push_back(s);
    if (!s->image_mode() && !s->encoded) fresh.push_back(s);
  }
  if (!images.empty()) {  // image prompts: one image-encoder call, and they are done
    std::vector<at::Tensor> px;
    for (PriorState* s : images) px.push_back(s->pixel_values);
    const at::Tensor e = parts_.image_encoder->image_embeds(at::cat(px).to(spec_.device)).to(at::kFloat);
    for (size_t i = 0; i < images.size(); ++i) {
      images[i]->image_embeds = e[static_cast<int64_t>(i)];
      images[i]->step = 1;
    }
  }
  if (loop.empty()) return;
  if (!fresh.empty()) encode(fresh);
  std::vector<at::Tensor> x, t, proj, hid, mask;
  for (PriorState* s : loop) {
    const int64_t ts = s->sampler->timestep(s->step);
    // one PriorTransformer row: latents at this step's timestep under a text's embedding, hidden states and mask
    auto row = [&](const at::Tensor& latents, bool uncond) {
      x.push_back(latents);
      t.push_back(at::scalar_tensor(ts, at::kLong));
      proj.push_back(uncond ? s->u_embeds : s->embeds);
      hid.push_back(uncond ? s->u_hidden : s->hidden);
      mask.push_back(uncond ? s->u_mask : s->mask);
    };
    if (s->guidance > 1.0) row(s->latents, true);
    row(s->latents, false);
    // Kandinsky 2.2: the negative prompt's run, one row
    if (s->negative_latents.defined()) row(s->negative_latents, true);
  }
  const auto dt = spec_.dtype;
  const at::Tensor out = parts_.prior
                             ->forward(at::stack(x).to(dt), at::stack(t).to(spec_.device), at::stack(proj).to(dt),
                                       at::stack(hid).to(dt), at::stack(mask))
                             .to(at::kFloat);
  int64_t row = 0;
  for (PriorState* s : loop) {
    at::Tensor pred;
    if (s->guidance > 1.0) {
      const at::Tensor u = out[row], c = out[row + 1];
      pred = u + s->guidance * (c - u);
      row += 2;
    } else {
      pred = out[row++];
    }
    auto advance = [&](at::Tensor& latents, const at::Tensor& prediction, uint64_t stream) {
      at::Tensor noise;
      if (s->sampler->adds_noise(s->step)) noise = s->noise(stream, latents).unsqueeze(0);
      latents = s->sampler->step(prediction.unsqueeze(0), s->step, latents.unsqueeze(0), noise).squeeze(0);
    };
    advance(s->latents, pred, prior_step_stream(s->step));
    if (s->negative_latents.defined()) advance(s->negative_latents, out[row++], prior_negative_step_stream(s->step));
    ++s->step;
  }
}

at::Tensor PriorRunner::image_embeds(const PriorState& s) const {
  DP_CHECK(parts_.kandinsky && s.done(), "prior: request ", s.id, " has no Kandinsky image embedding");
  auto post = [&](const at::Tensor& l) {
    return parts_.prior->post_process_latents(l.unsqueeze(0).to(spec_.dtype)).to(at::kFloat)[0];
  };
  if (!s.negative_latents.defined() && !zero_embeds_.defined()) {  // diffusers' get_zero_embed: zeros, unprocessed
    const int64_t S = parts_.image_encoder->config().image_size;
    zero_embeds_ = parts_.image_encoder->image_embeds(at::zeros({1, 3, S, S}, at::TensorOptions().dtype(spec_.dtype)
                                                                              .device(spec_.device)))
                       .to(at::kFloat)[0];
  }
  // an image prompt (variations, diffusers' interpolate of one image): the image encoder's embedding as it is
  const at::Tensor e = s.image_mode() ? s.image_embeds.to(at::kFloat) : post(s.latents);
  return at::stack({e, s.negative_latents.defined() ? post(s.negative_latents) : zero_embeds_});
}

at::Tensor PriorRunner::class_labels(const PriorState& s) const {
  DP_CHECK(s.done(), "prior: request ", s.id, " has not finished its prior loop");
  const at::Tensor embeds =
      s.image_mode() ? s.image_embeds.unsqueeze(0)
                     : parts_.prior->post_process_latents(s.latents.unsqueeze(0).to(spec_.dtype)).to(at::kFloat);
  const at::Tensor noise = s.noise(kImageEmbedNoiseStream, embeds[0]).unsqueeze(0);
  return parts_.noise_image_embeds(embeds, s.noise_level, noise).squeeze(0);
}

}  // namespace diffpipe
