// Stable unCLIP (DALL-E 2 style) beside the Stable Diffusion parts: a diffusion prior turns the prompt into a
// CLIP image embedding, which is noise-augmented and conditions the UNet through its class embedding.
// Folder layout (diffusers StableUnCLIPPipeline): prior_tokenizer/, prior_text_encoder/
// (CLIPTextModelWithProjection), prior/ (PriorTransformer), prior_scheduler/ and image_noising_scheduler/
// (DDPMScheduler), image_normalizer/ (StableUnCLIPImageNormalizer: mean, std), next to the SD components.
// Image variations (StableUnCLIPImg2ImgPipeline): feature_extractor/ (CLIPImageProcessor) and image_encoder/
// (CLIPVisionModelWithProjection) give the image embedding of an image prompt instead of the prior; a folder may
// have either source or both.
//   (the prior's sampler is DdpmSampler, stages/sampler.h)
//   UnclipParts: the components above, and the noise augmentation of an image embedding
//   PriorState / PriorRunner: one request's prior loop and the batched step over many requests, as the
//                pipeline's `prior` stage runs them (stages/src/model_stages.cpp)
// Thread-safety: UnclipParts is immutable after load; a PriorRunner and its states are used by one thread.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/clip_vision.h"
#include "diffpipe/stages/prior.h"
#include "diffpipe/stages/request.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/tokenizer.h"

namespace diffpipe {

// Kandinsky 2.2 (KandinskyV22CombinedPipeline folders: prior_tokenizer/, prior_text_encoder/, prior_prior/,
// prior_scheduler/ (UnCLIPScheduler), prior_image_encoder/, prior_image_processor/ beside the decoder's unet/,
// scheduler/ and movq/; or a KandinskyV22Pipeline decoder folder with a KandinskyV22PriorPipeline folder of
// tokenizer/, text_encoder/, prior/, scheduler/, image_encoder/) fills the same parts (`kandinsky`): its prior's image embedding conditions the decoder's
// UNet as it is (no noise augmentation); the negative prompt's own prior run, or without one the image encoder's
// embedding of an all-zero image, is the unconditional row's.
struct UnclipParts {
  bool kandinsky = false;
  std::shared_ptr<ClipTokenizer> prior_tokenizer;      // the prior (null in an image-variations folder)
  std::shared_ptr<ClipTextModel> prior_text_encoder;
  std::shared_ptr<PriorTransformer> prior;
  std::shared_ptr<ClipVisionModel> image_encoder;      // image variations (null without image_encoder/)
  ClipImageProcessorConfig image_processor;
  SchedulerConfig prior_scheduler, image_noising_scheduler;
  at::Tensor normalizer_mean, normalizer_std;  // [1, E] float32 on the model's device
  at::Tensor noising_alphas_cumprod;           // image_noising_scheduler's, float32 on the CPU

  // The folder's model_index.json names StableUnCLIPPipeline or StableUnCLIPImg2ImgPipeline.
  static bool is_unclip_folder(const std::string& dir);
  static bool has_prior(const std::string& dir);          // prior/ present
  static bool has_image_encoder(const std::string& dir);  // image_encoder/ present
  // Checks the prior components' files and configs (cheap), naming what is wrong.
  static void validate(const std::string& dir);
  static std::shared_ptr<const UnclipParts> load(const std::string& dir, const DeviceSpec& spec);
  // model_index.json names KandinskyV22CombinedPipeline or KandinskyV22Pipeline (the decoder alone)
  static bool is_kandinsky_folder(const std::string& dir);
  // The path of a Kandinsky prior's component `part` (prior, tokenizer, text_encoder, image_encoder, scheduler):
  // prior_dir/part, or without a prior folder dir/prior_part (the combined layout).
  static std::string kandinsky_part(const std::string& dir, const std::string& prior_dir, const std::string& part);
  // The prior's components (files, configs, widths), in `prior_dir` or `dir`'s combined layout.
  static void validate_kandinsky(const std::string& dir, const std::string& prior_dir);
  // A Kandinsky prior's parts: the tokenizer and text encoder with `text`, the prior and image encoder with `prior`.
  static std::shared_ptr<const UnclipParts> load_kandinsky(const std::string& dir, const std::string& prior_dir,
                                                           const DeviceSpec& spec, bool text, bool prior);

  int64_t embedding_dim() const { return prior ? prior->config().embedding_dim : image_encoder->config().projection_dim; }
  // noise_image_embeds (below) with this folder's normaliser and noising schedule, every row at noise_level
  // (checked): [B, E] -> [B, 2E], the UNet's class_labels.
  at::Tensor noise_image_embeds(const at::Tensor& embeds, int noise_level, const at::Tensor& noise) const;
};

// Stable unCLIP's noise augmentation (diffusers' noise_image_embeddings): normalise with mean and std ([1, E]),
// DDPM add_noise of `noise` ([B, E]) at each row's level (levels [B], int64) under `alphas_cumprod`, un-normalise,
// then append the sinusoidal embedding of the level: [B, E] -> [B, 2E]. Training builds its inputs with it too.
at::Tensor noise_image_embeds(const at::Tensor& embeds, const at::Tensor& levels, const at::Tensor& noise,
                              const at::Tensor& mean, const at::Tensor& std, const at::Tensor& alphas_cumprod);

// A request's prior settings against a Stable unCLIP folder's schedules (errors name the field): noise_level in
// [0, noise_levels); without an image prompt also that the folder has a prior (prior_train_timesteps > 0, else
// an image prompt is asked for, naming `folder`), prior_steps in [1, prior_train_timesteps] and prior_guidance.
// noise_levels 0 (Kandinsky 2.2: no noise augmentation) checks the prior's settings alone.
void check_prior_params(const GenerationParams& p, int64_t prior_train_timesteps, int64_t noise_levels,
                        const std::string& folder);

// Counter-based noise streams of a request's prior (its denoising loop uses streams 0, 1, 2, ...).
constexpr uint64_t kPriorLatentStream = uint64_t(1) << 32;        // the prior's initial latents
inline uint64_t prior_step_stream(int step) { return kPriorLatentStream + 1 + static_cast<uint64_t>(step); }
constexpr uint64_t kImageEmbedNoiseStream = uint64_t(1) << 33;    // the image embedding's noise augmentation
// Kandinsky 2.2 with a negative prompt: the negative prompt's own prior run (initial latents, then per step)
constexpr uint64_t kPriorNegativeLatentStream = kPriorLatentStream + (uint64_t(1) << 24);
inline uint64_t prior_negative_step_stream(int step) {
  return kPriorNegativeLatentStream + 1 + static_cast<uint64_t>(step);
}

// One request's prior loop.
struct PriorState {
  uint64_t id = 0;
  uint64_t seed = 0;
  double guidance = 4.0;     // prior guidance; <= 1 skips the unconditional row
  int noise_level = 0;
  std::unique_ptr<DdpmSampler> sampler;
  bool encoded = false;      // prior text encoder run (PriorRunner::step does it for new requests, batched)
  std::string prompt;
  std::string negative_prompt;  // Kandinsky 2.2: the unconditional rows' text, and a prior run of its own
  at::Tensor embeds, hidden, mask;        // conditional: text_embeds [E], last_hidden_state [L, E], mask [L]
  // unconditional (the empty prompt; Kandinsky 2.2: the negative prompt), when needs_uncond()
  at::Tensor u_embeds, u_hidden, u_mask;
  at::Tensor latents;        // [E] float32
  at::Tensor negative_latents;  // Kandinsky 2.2 with a negative prompt: its run's latents [E] (unguided: its
                                // guided rows would be the same text twice)
  bool needs_uncond() const { return guidance > 1.0 || !negative_prompt.empty(); }
  at::Tensor pixel_values;   // image variations: the image prompt as the image encoder takes it [1, 3, S, S]
  at::Tensor image_embeds;   // image variations: the image encoder's embedding [E] (set by the first step)
  int step = 0;
  // Noise source: (stream, like) -> standard normal shaped like `like`. Default: seeded_noise(seed, stream).
  std::function<at::Tensor(uint64_t stream, const at::Tensor& like)> noise;
  bool image_mode() const { return pixel_values.defined(); }
  bool done() const { return step >= total_steps(); }
  int total_steps() const { return image_mode() ? 1 : sampler->num_steps(); }
};

class PriorRunner {
 public:
  explicit PriorRunner(const UnclipParts& parts, const DeviceSpec& spec) : parts_(parts), spec_(spec) {}
  // A new request's state: checks prior_steps, prior_guidance and noise_level (errors name the field) and draws
  // its initial latents; with an image prompt, reads and preprocesses the image instead (one image-encoder step).
  // `noise` overrides the counter-based streams (tests feed a reference's draws).
  PriorState make_state(const GenerationParams& p, uint64_t id,
                        std::function<at::Tensor(uint64_t, const at::Tensor&)> noise = nullptr) const;
  // One batched prior call over the states (each at its own step): the prior text encoder first for states not
  // yet encoded (one call), then rows [uncond_i, cond_i] (guided) or [cond_i] through the PriorTransformer, the
  // guidance mix and each state's DDPM step.
  void step(const std::vector<PriorState*>& batch) const;
  // After the last step: post_process_latents (or the image encoder's embedding), then the noise augmentation:
  // the UNet's class labels [2E].
  at::Tensor class_labels(const PriorState& s) const;
  // Kandinsky 2.2, after the last step: [image embedding, negative image embedding] [2, E] float32.
  at::Tensor image_embeds(const PriorState& s) const;
  // The prior text encoder over the states' prompts (and unconditional texts where needs_uncond()), one call;
  // sets their embeds/hidden/mask fields and `encoded`. Needs only the tokenizer and text encoder.
  void encode(const std::vector<PriorState*>& states) const;

 private:
  mutable at::Tensor zero_embeds_;  // Kandinsky 2.2: the all-zero image's embedding [E] (computed once)
  const UnclipParts& parts_;
  DeviceSpec spec_;
};

}  // namespace diffpipe
