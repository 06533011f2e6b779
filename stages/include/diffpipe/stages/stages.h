// The pipeline stages, each with one job, each batching whatever requests it is handed:
//   TextEncodeStage: prompts -> embeddings (conditional and, with guidance, unconditional)
//   DenoiseStage:    one UNet call over many requests, each at its own step, with its own sampler
//   DecodeStage:     latents -> 8-bit images at the base resolution (VAE decoder)
//   UpscaleStage:    8-bit images -> 8-bit images enlarged by the model's super_resolution/ (cascade models)
// The upscaler takes the 8-bit base image, so a result is the same whether it crosses ranks or not.
// A request's result depends only on its own inputs (seed, prompt, settings), never on batch neighbours,
// up to the kernel batch-invariance documented in docs/. Thread-safety: a stage object is used by one
// worker thread; the models it holds are shared read-only.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "diffpipe/runtime/image.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/request.h"

namespace diffpipe {

struct Embeddings {
  at::Tensor cond;    // [L, D]
  at::Tensor uncond;  // [L, D]; undefined when guidance <= 1
  at::Tensor class_labels;  // Stable unCLIP: the noise-augmented image embedding [2E] (the unconditional row gets
                            // zeros); SDXL: the pooled text embedding [P]; undefined for other UNets
  at::Tensor uncond_class_labels;  // SDXL: the negative prompt's pooled embedding [P] (undefined: zeros)
  at::Tensor time_ids;             // SDXL: [6] float32 (original height, width, crop top, left, target height, width);
                                   // the refiner (SdModel::aesthetic): [5] (original height, width, crop, aesthetic score)
  at::Tensor uncond_time_ids;      // the refiner: the unconditional row's (the negative aesthetic score); else undefined
  at::Tensor image_latents;  // image-to-image: the input image's VAE latents, sampled and scaled [C, h, w] float32
  at::Tensor mask;           // inpainting: the mask at the latents' size [1, h, w] (1 = repaint), float32
  at::Tensor masked_image_latents;  // inpainting UNets: the masked image's latents [C, h, w] float32
  at::Tensor ip_embeds;             // IP-Adapter: the image prompt's embedding [E] float32 (ip_image_embeds; Plus:
                                    // [2, tokens, width], the zero image's hidden states, then the image's)
};

class TextEncodeStage {
 public:
  explicit TextEncodeStage(const SdModel& model) : model_(model) {}
  // One text-encoder call over every prompt (and negative prompt where needed) of the batch.
  std::vector<Embeddings> run(const std::vector<const GenerationParams*>& batch) const;

 private:
  const SdModel& model_;
};

// Per-request denoising state: the latents, the request's own sampler, and its position in the loop.
struct DenoiseState {
  uint64_t id = 0;
  double guidance = 7.5;
  double guidance_rescale = 0;  // GenerationParams::guidance_rescale (guided rows only)
  uint64_t seed = 0;
  at::Tensor cond, uncond;  // [L, D]
  at::Tensor class_labels, uncond_class_labels, time_ids, uncond_time_ids;  // as in Embeddings
  at::Tensor timestep_cond;  // an LCM UNet (time_cond_proj_dim): the request's guidance embedded [D] float32 (the
                             // UNet's timestep_cond; guidance is then 1: no unconditional row)
  at::Tensor concat;        // joined to the UNet input along channels (DeepFloyd IF stage II: the noised upscaled
                            // stage-I image [3, H, W]); undefined otherwise
  StepNoise step_noise;     // stochastic samplers' noise; unset: the request's counter-based stream 1 + step
                            // (tests replay a reference's draws)
  at::Tensor latents;       // [C, h, w], float32
  // inpainting with a plain UNet: after every step the kept region (mask 0) is the image's latents noised to the
  // next call (blend_noise: the initial noise), as diffusers' StableDiffusionInpaintPipeline blends 4-channel UNets
  at::Tensor blend_mask, blend_image, blend_noise;
  // ControlNets: entry k for the run's k-th (fewer entries, or an undefined image: that ControlNet stays out)
  struct Control {
    at::Tensor image;  // the conditioning image [3, H, W] in [0, 1] on the device
    double scale = 0;
    double start = 0, end = 1;  // its share of the loop (ControlInput::start/end)
  };
  std::vector<Control> controls;
  bool guess_mode = false;  // GenerationParams::guess_mode
  bool has_control(size_t k) const { return k < controls.size() && controls[k].image.defined(); }
  // ControlNet k's scale at the next call: its scale inside [start, end] of the loop, else 0.
  double control_scale_now(size_t k) const {
    if (!has_control(k)) return 0.0;
    const Control& c = controls[k];
    const double i = steps_done(), n = total_steps();
    return i / n < c.start || (i + 1) / n > c.end ? 0.0 : c.scale;
  }
  std::vector<float> adapter_scales;  // per-request LoRA: each of the run's adapters' scale (0: not chosen)
  // SD3's skip-layer guidance (GenerationParams::skip_guidance_layers): the blocks a third row skips (empty: off),
  // the scale of its difference from the prompt's row, and the share of the loop it acts on
  std::vector<int64_t> skip_layers;
  double skip_scale = 0, skip_start = 0, skip_stop = 0;
  // Whether the next call runs the skipped row: loop step i with n x start < i < n x stop (StableDiffusion3Pipeline's
  // window, n its num_inference_steps: this text-to-image request's calls)
  bool skip_now() const {
    const double i = steps_done(), n = total_steps();
    return !skip_layers.empty() && i > n * skip_start && i < n * skip_stop;
  }
  at::Tensor ip_embeds;      // IP-Adapter: the image prompt's embedding [E] (undefined: none; the unconditional row
  double ip_scale = 0;       // gets zeros, as diffusers) and the request's ip_adapter_scale
  at::Tensor ip_uncond;      // IP-Adapter Plus: the unconditional row's input (the zero image's hidden states)
  std::unique_ptr<Sampler> sampler;
  int step = 0;             // next UNet call index
  int begin = 0;            // the first call index (image-to-image starts part-way down the schedule: strength)
  at::Tensor first_bad;     // int64 scalar on the device: the first call after which latents were not finite, or -1
  std::string failure;      // set by the last step when the latents went non-finite: the request failed
  std::vector<int> preview_at;  // call indices after which a preview is made (GenerationParams::previews)
  at::Tensor preview;       // set by step(): the denoised estimate x0 [C, h, w] when a preview is due (else undefined)
  int preview_index = 0;    // 1-based number of that preview
  // an SDXL base with a refiner: the call before which its latents go to the refiner (denoising_end; -1: the end)
  int end = -1;
  int last() const { return end >= 0 ? end : sampler->num_calls(); }  // one past the last call this request makes
  bool done() const { return step >= last(); }
  int total_steps() const { return last() - begin; }  // the calls this request makes
  int steps_done() const { return step - begin; }
};

// IP-Adapter: the request's image prompt (p.ip_adapter_image) through the model's image encoder: [E] float32 on the
// CPU (diffusers' encode_image: preprocessed by CLIPImageProcessor, image_embeds); IP-Adapter Plus: [2, 1 + patches,
// hidden] (the penultimate hidden states of an all-zero image, the unconditional input, then of the image's).
at::Tensor ip_image_embeds(const SdModel& model, const GenerationParams& p);

// Resolves the sampler and size of `p` against the model and validates them (errors name the field).
struct ResolvedParams {
  SamplerKind kind;
  bool karras = false;
  int width = 0, height = 0;
  std::unique_ptr<Sampler> sampler;  // built (and its schedule checked) for p.steps
  at::Tensor image;                  // the x4 upscaler's or image-to-image's input image [3, h, w] in [-1, 1], read
                                     // once here (not read when image-to-image's latents are given)
  int begin = 0;                     // image-to-image: the first call (steps - int(steps x strength))
  at::Tensor mask;                   // inpainting: the mask binarised [1, H, W] (1 = repaint), read with the image
  std::vector<at::Tensor> controls;  // ControlNets: each entry's conditioning image [3, H, W] in [0, 1] (undefined: none)
  std::vector<float> adapter_scales; // per-request LoRA (GenerationParams::lora): each of the run's adapters' scale
  int end = -1;                      // a run with a refiner: the base's call that hands over (DenoiseState::end)
};
// Per-request LoRA: the scale of each of the run's adapters (model.addons.adapters) that `p.lora` chooses, 0 for the
// others; throws naming the field for an adapter the run does not have, one named twice, or a bad scale.
std::vector<float> adapter_scales(const SdModel& model, const GenerationParams& p);
// `image_latents` (image-to-image, where they arrived from the encode stage): the image's size comes from them and
// the image is not read again.
ResolvedParams resolve_params(const SdModel& model, const GenerationParams& p,
                              const at::Tensor& image_latents = at::Tensor());

// Image-to-image (SdModel::img2img()): the request's image `image` ([3, H, W] in [-1, 1], ResolvedParams::image)
// through the VAE encoder, sampled from its Gaussian with the seed's stream kImg2ImgLatentStream (or `sample_noise`, tests) and
// scaled by scaling_factor: [C, h, w] float32 on the CPU, as diffusers' img2img pipelines make init_latents.
constexpr uint64_t kImg2ImgLatentStream = (uint64_t(1) << 34) + 4, kMaskedLatentStream = (uint64_t(1) << 34) + 5;
at::Tensor img2img_latents(const SdModel& model, const GenerationParams& p, const at::Tensor& image,
                           const at::Tensor& sample_noise = at::Tensor());
// Inpainting (a request with a mask): `mask` [1, H, W] (binarised, as ResolvedParams::mask) at the latents' size
// (nearest, as torch's interpolate) into emb.mask; for an inpainting UNet also the latents of the image with the
// repainted region zeroed (grey), sampled with stream kMaskedLatentStream (or `sample_noise`), into
// emb.masked_image_latents.
void inpaint_conditioning(const SdModel& model, const GenerationParams& p, const at::Tensor& image,
                          const at::Tensor& mask, Embeddings& emb, const at::Tensor& sample_noise = at::Tensor());

// Initial state: noise from the request's seed (counter-based) x init_noise_sigma, or `initial_noise`
// ([C, h, w]) when given (tests use the reference's noise). Image-to-image: emb.image_latents noised by the sampler
// (add_noise) to the first call that runs, `begin`. The x4 upscaler (SdModel::upscaler): the request's
// image, noised with stream kSrImageNoiseStream (or `image_noise`, [3, h, w]), joins the latents at every step.
DenoiseState make_denoise_state(const SdModel& model, const GenerationParams& p, Embeddings emb,
                                uint64_t id = 0, const at::Tensor& initial_noise = at::Tensor(),
                                const at::Tensor& image_noise = at::Tensor());

// The SDXL refiner (SdModel::refiner) on the base's latents. With denoising_end d < 1 (the ensemble of expert
// denoisers): the base stops before its first timestep below round(T - d x T) (T: num_train_timesteps;
// handover_call) and the refiner, on its own schedule of refiner_steps, starts at its first timestep below that
// cutoff, from the latents as they are (diffusers' denoising_start: no noise added). With d = 1: the base finishes
// and the refiner runs image-to-image at refiner_strength (the latents noised by add_noise, stream
// kRefinerNoiseStream or `noise`). The request as the refiner sees it (refiner_request): the same prompts, guidance,
// seed, sampler and aesthetic scores; the base's adapters, image prompts and ControlNets stay with the base.
constexpr uint64_t kRefinerNoiseStream = (uint64_t(1) << 34) + 6;
int handover_call(const Sampler& s, int64_t num_train_timesteps, double denoising_end);
GenerationParams refiner_request(const GenerationParams& p, int width, int height);
struct RefinePlan {
  std::unique_ptr<Sampler> sampler;  // plan_refine's (make_refine_state uses its state's own)
  int begin = 0;           // the refiner's first call
  bool add_noise = false;  // image-to-image (denoising_end 1): the latents are noised to `begin` first
};
// Checks the refiner's settings of `p` (errors name the field) and plans its loop for an image of that size.
RefinePlan plan_refine(const SdModel& refiner, const GenerationParams& p, int width, int height);
// `latents` [C, h, w]: the base's; `emb`: the refiner's text embeddings of refiner_request(p, ...).
DenoiseState make_refine_state(const SdModel& refiner, const GenerationParams& p, const at::Tensor& latents,
                               Embeddings emb, uint64_t id = 0, const at::Tensor& noise = at::Tensor());

// DeepFloyd IF stage II (IFSuperResolutionPipeline), as a denoising state on `stage2` (SdModel::stage2): the
// stage-I image [3, h, w] in [-1, 1] is enlarged (bilinear, corners aligned) to the target size, noised to
// `noise_level` with the image-noising schedule, and joined to the sample at every step; the noise level is the
// UNet's class label (both guidance rows); text embeddings are stage I's. Noise comes from the request's seed
// (streams kSrInitialStream, kSrImageNoiseStream, then the sampler's), or the given tensors (tests).
struct IfSuperResSettings {
  int steps = 50;
  double guidance = 4.0;
  int noise_level = 250;
  int width = 0, height = 0;  // 0: the stage-II UNet's sample_size
};
constexpr uint64_t kSrInitialStream = (uint64_t(1) << 34), kSrImageNoiseStream = (uint64_t(1) << 34) + 1;
DenoiseState make_if_sr_state(const SdModel& stage2, const IfSuperResSettings& s, const at::Tensor& image,
                              const Embeddings& emb, uint64_t seed, uint64_t id = 0,
                              const at::Tensor& initial_noise = at::Tensor(), const at::Tensor& image_noise = at::Tensor());

// DeepFloyd IF stage III (the SD x4 upscaler, SdModel::stage3) on a decoded stage-II image [3, h, w] in [-1, 1]:
// noised to noise_level by its low_res_scheduler and joined to the latents at every step (the level is the class
// label), its folder's scheduler for `steps`, text embeddings from its own text encoder. Noise from the request's
// seed (streams kX4InitialStream, kX4ImageNoiseStream), or the given tensors (tests).
struct UpscaleSettings {
  int steps = 75;
  double guidance = 9.0;
  int noise_level = 20;
};
constexpr uint64_t kX4InitialStream = (uint64_t(1) << 34) + 2, kX4ImageNoiseStream = (uint64_t(1) << 34) + 3;
void check_x4_settings(const SdModel& x4, const UpscaleSettings& s);  // errors name the x4_ field
DenoiseState make_x4_state(const SdModel& x4, const UpscaleSettings& s, const at::Tensor& image, const Embeddings& emb,
                           uint64_t seed, uint64_t id = 0, const at::Tensor& initial_noise = at::Tensor(),
                           const at::Tensor& image_noise = at::Tensor());
// An 8-bit RGB image [H, W, 3] as [3, H, W] float32 in [-1, 1] (diffusers' image processor: x / 255 * 2 - 1).
at::Tensor image_to_unit_range(const at::Tensor& rgb_u8);

// The denoised estimate x0 at call i from the model's output (epsilon, v or sample prediction) and the sample.
at::Tensor predicted_original(const SdModel& model, const Sampler& sampler, const at::Tensor& output, int i,
                              const at::Tensor& sample);

// Counter-based standard normal noise for (seed, stream), shaped `shape`, float32 on the CPU.
at::Tensor seeded_noise(uint64_t seed, uint64_t stream, at::IntArrayRef shape);

class DenoiseStage {
 public:
  explicit DenoiseStage(const SdModel& model) : model_(model) {}
  // Advances every state by one step with ONE UNet call: rows [uncond_i, cond_i] for guided requests,
  // [cond_i] otherwise; each row with its own timestep. States must not be done(). Latents are checked for NaN /
  // Inf after every step without a device synchronisation; a request whose latents went non-finite throws
  // ("non-finite values after step k of N") when its last step is done, never passing a black image on; with
  // throw_on_failure false the message is left in the state's `failure` and the other requests go on.
  void step(const std::vector<DenoiseState*>& batch, bool throw_on_failure = true) const;

 private:
  const SdModel& model_;
};

class DecodeStage {
 public:
  explicit DecodeStage(const SdModel& model) : model_(model) {}
  // latents: each [C, h, w] (float32) -> base-resolution RGB images, one VAE call for the batch (same-size
  // latents), as uint8 HWC tensors [B, H, W, 3]. A non-finite image throws, or, given `failures`, gets its
  // message there (one entry per image, empty = fine).
  at::Tensor run_uint8(const std::vector<at::Tensor>& latents, std::vector<std::string>* failures = nullptr) const;

 private:
  const SdModel& model_;
};

class UpscaleStage {
 public:
  explicit UpscaleStage(const SdModel& model) : model_(model) {}
  // images: uint8 [B, H, W, 3] (any device) -> uint8 [B, s*H, s*W, 3], one super-resolution call.
  at::Tensor run_uint8(const at::Tensor& images) const;

 private:
  const SdModel& model_;
};

// Decode, then upscale when the model has super-resolution loaded: what the pipeline delivers, in-process.
at::Tensor decode_final_uint8(const SdModel& model, const std::vector<at::Tensor>& latents);
std::vector<Image> decode_final(const SdModel& model, const std::vector<at::Tensor>& latents);

}  // namespace diffpipe
