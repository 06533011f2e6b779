// A Stable Diffusion model folder in the diffusers layout (model_index.json, tokenizer/, text_encoder/,
// unet/, vae/, scheduler/), loaded component by component so a rank loads only the stages it runs.
// validate() checks files and configs without loading weights (cheap; every rank runs it at start-up).
// Thread-safety: immutable after load; models are shared read-only between stage threads.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/clip_vision.h"
#include "diffpipe/stages/controlnet.h"
#include "diffpipe/stages/flux.h"
#include "diffpipe/stages/request.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/sd3.h"
#include "diffpipe/stages/super_res.h"
#include "diffpipe/stages/t5.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"

namespace diffpipe {

// kVae loads the VAE's decoder, kVaeEncoder its encoder; kImageLatents the encoder only where the folder does
// image-to-image (SdModel::img2img(): SD and SDXL). kSuperRes loads super_resolution/ when the folder has one, kPrior
// the Stable unCLIP prior components when the folder is a StableUnCLIPPipeline, kStage3 a DeepFloyd IF folder's
// upscaler/, kRefiner the text encoder and UNet of the run's SDXL refiner (ModelAddons::refiner; no-ops otherwise).
enum Component : unsigned {
  kTextEncoder = 1, kUNet = 2, kVae = 4, kVaeEncoder = 8, kSuperRes = 16, kPrior = 32, kStage3 = 64,
  kImageLatents = 128, kRefiner = 256,
  kAllComponents = kTextEncoder | kUNet | kVae | kSuperRes | kPrior | kStage3 | kImageLatents | kRefiner
};
struct UnclipParts;

struct SdModel {
  std::string dir;
  DeviceSpec spec;
  std::shared_ptr<ClipTokenizer> tokenizer;  // Kandinsky 2.2: the prior's (always loaded: prompt lengths)
  std::shared_ptr<ClipTextModel> text_encoder;
  // SDXL (StableDiffusionXLPipeline folders): the second tokenizer and text encoder (CLIPTextModelWithProjection);
  // prompt embeddings are both encoders' penultimate states side by side, the pooled embedding is the second's.
  std::shared_ptr<ClipTokenizer> tokenizer_2;
  std::shared_ptr<ClipTextModel> text_encoder_2;
  // DeepFloyd IF (IFPipeline folders): T5 text side, a pixel-space UNet, no VAE (the decode stage only converts
  // [-1, 1] pixels to 8 bits).
  std::shared_ptr<T5Tokenizer> t5_tokenizer;
  std::shared_ptr<T5EncoderModel> t5;
  std::shared_ptr<UNet2DConditionModel> unet;
  // Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline folders): two CLIP text encoders with projections (tokenizer,
  // text_encoder, tokenizer_2, text_encoder_2) and T5 (tokenizer_3, text_encoder_3: t5_tokenizer, t5; optional, as
  // diffusers: without it the T5 tokens are zeros); the MMDiT transformer/ denoises (kUNet loads it) with the
  // flow-matching sampler; the VAE decodes latents / scaling_factor + shift_factor. unet_config carries the
  // transformer's in/out channels and sample_size for the shared code; transformer_config the rest.
  bool sd3 = false;
  bool sd3_t5 = false;  // the folder has text_encoder_3
  int64_t max_sequence_length = 256;  // T5 tokens per prompt (the SD3 pipelines' default)
  std::shared_ptr<Sd3Transformer2DModel> transformer;
  Sd3TransformerConfig transformer_config;
  // FLUX.1 (FluxPipeline folders): CLIP's pooled output (tokenizer, text_encoder) and T5's 512 tokens (tokenizer_2,
  // text_encoder_2: t5_tokenizer, t5); the Flux transformer (kUNet) on 2x2-packed latents, its guidance scale embedded
  // ([dev]; an unconditional row only for true CFG); flow matching with the pipelines' sigmas linspace(1, 1/n, n)
  // shifted by the image's token count. unet_config carries the latent channels and the pipelines' default sample
  // size (128).
  bool flux = false;
  // a diffusion-transformer folder (SD3 or FLUX.1): pooled + token embeddings, flow matching, 16-channel-style VAE
  bool dit() const { return sd3 || flux; }
  std::shared_ptr<FluxTransformer2DModel> flux_transformer;
  FluxTransformerConfig flux_config;
  std::shared_ptr<AutoencoderKL> vae;
  std::shared_ptr<SuperResolution> super_res;  // optional super_resolution/ (kSuperRes): enlarges decoded images
  std::shared_ptr<const UnclipParts> unclip;   // Stable unCLIP's prior components (kPrior; stages/unclip.h)
  SchedulerConfig scheduler;
  at::ScalarType vae_dtype = at::kFloat;  // spec.dtype, or float32 for float16 when the VAE config says force_upcast
  // Configs (always loaded, small): enough to plan shapes on any rank.
  ClipTextConfig text_config;
  ClipTextConfig text_config_2;            // SDXL only
  bool sdxl = false;                       // an SDXL folder (is_sdxl)
  // model_index.json names LatentConsistencyModelPipeline (or its Img2Img variant): with the LCM sampler,
  // image-to-image runs every step over the strength's share of the schedule (LatentConsistencyModelImg2ImgPipeline)
  bool lcm_pipeline = false;
  bool force_zeros_for_empty_prompt = false;  // SDXL: no negative prompt -> zero unconditional embeddings
  // the SDXL refiner (model_index.json's requires_aesthetics_score): the UNet's time ids are (original size, crop,
  // aesthetic score), the unconditional row's with the negative score
  bool aesthetic = false;
  bool second_encoder_only = false;        // SDXL without text_encoder/ (the refiner): tokenizer_2 + text_encoder_2
  bool deepfloyd_if = false;               // model_index.json names IFPipeline (or IFSuperResolutionPipeline)
  // Kandinsky 2.2 (model_index.json names KandinskyV22CombinedPipeline, or KandinskyV22Pipeline with
  // ModelAddons::prior; the DALL-E 2 design): the encode stage
  // runs the prior's text encoder (kTextEncoder loads it into `unclip`), the prior stage the diffusion prior and
  // the image encoder (kPrior), the decoder's UNet is conditioned on the image embedding alone, and vae is its
  // MoVQ (movq/, kVae), decoding the latents as they are.
  bool kandinsky = false;
  // DeepFloyd IF stage I with super_resolution/ (an IFSuperResolutionPipeline folder): its configs (always) and
  // UNet (with kSuperRes), scheduler and image-noising schedule, as a model of its own (no text encoder: stage I's
  // embeddings).
  std::shared_ptr<const SdModel> stage2;
  // DeepFloyd IF with upscaler/ (a StableDiffusionUpscalePipeline folder): stage III, the SD x4 upscaler run on
  // the decoded stage-II images with the same prompt; its configs always, its text encoder, UNet and VAE with
  // kStage3.
  std::shared_ptr<const SdModel> stage3;
  // SDXL with a refiner (addons.refiner, an SDXL folder whose latents match): the refine stage's model, configs
  // always (requests are checked against them), its text encoder(s) and UNet with kRefiner; the base's VAE decodes.
  std::shared_ptr<const SdModel> refiner;
  SchedulerConfig image_noising;           // IF stage II, and the x4 upscaler's low_res_scheduler
  // The SD x4 upscaler (StableDiffusionUpscalePipeline folders): a request's image_prompt is the low-resolution
  // image; noised to noise_level (<= max_noise_level) by low_res_scheduler, it joins the latents at every step and
  // its level is the UNet's class label; the VAE decodes 4x (its latent factor) larger.
  bool upscaler = false;
  int max_noise_level = 350;
  // An inpainting folder (StableDiffusionInpaintPipeline: a UNet of 2 x latent_channels + 1 inputs): every request
  // brings an image and a mask; the latent-size mask and the masked image's latents join the latents at every step.
  bool inpaint_unet = false;
  T5Config t5_config;                      // DeepFloyd IF only
  UNetConfig unet_config;
  VaeConfig vae_config;
  // Stable unCLIP folders: num_train_timesteps of prior_scheduler and image_noising_scheduler (0 otherwise), so
  // that requests are checked (prior_steps, noise_level) on any rank before work.
  int64_t prior_train_timesteps = 0, noise_levels = 0;
  bool image_variations = false;  // the folder has image_encoder/ (image prompts)

  // Checks the folder: model_index.json, each component's config and weights file present and parseable,
  // cross-component shapes consistent (cross_attention_dim == text hidden size, latent channels).
  static void validate(const std::string& dir);
  // addons.loras are fused into the UNet and text encoders as they load (stages/lora.h); every file is checked
  // against the folder whatever the components (a rank that loads none of its layers still refuses a bad file).
  // addons.controlnets: ControlNets loaded with the UNet (kUNet), their configs checked on every rank.
  static SdModel load(const std::string& dir, const DeviceSpec& spec, unsigned components = kAllComponents,
                      const ModelAddons& addons = {});
  ModelAddons addons;  // what load() added
  std::vector<std::shared_ptr<ControlNetModel>> controlnets;  // addons.controlnets, loaded with kUNet
  std::vector<std::string> embedding_tokens;  // the tokens addons.embeddings add (known on every rank)
  // IP-Adapter (addons.ip_adapter, checked on every rank; its layers join the UNet's with kUNet): the image encoder
  // and its preprocessing (the folder's feature_extractor/, else CLIP's at the encoder's image size), with kTextEncoder
  bool ip_adapter = false;
  bool ip_plus = false;  // IP-Adapter Plus: the image encoder's penultimate hidden states, resampled in the UNet
  std::shared_ptr<ClipVisionModel> ip_image_encoder;
  ClipImageProcessorConfig ip_image_processor;

  // Image-to-image (a request's image_prompt is the starting image, encoded by the VAE and noised to `strength`):
  // Stable Diffusion, SDXL, SD3 and FLUX.1 folders; the upscaler, Stable unCLIP and DeepFloyd IF read their images
  // otherwise.
  bool img2img() const { return !deepfloyd_if && !upscaler && noise_levels == 0 && !image_variations && !kandinsky; }
  // Whether request `p` starts from its image_prompt (image-to-image): on img2img() folders, and on Kandinsky 2.2
  // folders when it also has a prompt (without one the image is varied instead)
  bool starts_from_image(const GenerationParams& p) const {
    return !p.image_prompt.empty() && (img2img() || (kandinsky && !p.prompt.empty()));
  }
  // Image-to-image's strength: the request's, or the folder's pipeline default
  double strength(const GenerationParams& p) const { return p.effective_strength(strength_defaults()); }
  StrengthDefaults strength_defaults() const { return strength_defaults(sdxl, kandinsky, dit()); }
  static StrengthDefaults strength_defaults(const std::string& dir) {
    return strength_defaults(is_sdxl(dir), is_kandinsky(dir), is_sd3(dir) || is_flux(dir));
  }
  // (`dit`: SD3 and FLUX.1, whose image-to-image and inpainting pipelines default to 0.6)
  static StrengthDefaults strength_defaults(bool sdxl, bool kandinsky, bool dit) {
    return sdxl ? StrengthDefaults{0.3, 0.9999} : kandinsky ? StrengthDefaults{0.3, 1.0}
                                                : dit ? StrengthDefaults{0.6, 0.6} : StrengthDefaults{};
  }
  // The denoiser's own downsampling of the latents: the UNet's (2 per downsampler) or the transformer's patch size
  int64_t denoiser_downscale() const {
    return sd3 ? transformer_config.patch_size : flux ? 2 : int64_t(1) << (unet_config.block_out_channels.size() - 1);
  }
  int64_t latent_factor() const {
    return deepfloyd_if ? 1 : int64_t(1) << (vae_config.block_out_channels.size() - 1);
  }
  // Image size must be a multiple of this (VAE factor x UNet downsampling).
  int64_t size_multiple() const;
  // Whether request `p` runs classifier-free guidance here (an unconditional row beside its own): guidance above 1
  // and a UNet without time_cond_proj_dim; a Latent Consistency Model's UNet embeds the guidance scale instead
  // (diffusers' do_classifier_free_guidance), so it ignores the negative prompt.
  // FLUX.1 runs one only for true CFG (true_cfg_scale above 1, FluxPipeline's do_true_cfg: its [dev] transformer
  // embeds the guidance scale).
  bool uses_cfg(const GenerationParams& p) const { return uses_cfg(flux, unet_config.time_cond_proj_dim > 0, p); }
  // The same rule from what a folder is (`flux`, `lcm`: its UNet embeds the guidance), before any model loads.
  static bool uses_cfg(bool flux, bool lcm, const GenerationParams& p) {
    return flux ? p.true_cfg_scale > 1.0 : p.uses_cfg() && !lcm;
  }
  // The scale that mixes a request's unconditional and conditional predictions (FLUX.1: true_cfg_scale)
  double cfg_scale(const GenerationParams& p) const { return flux ? p.true_cfg_scale : p.guidance; }
  int64_t default_size() const { return unet_config.sample_size * latent_factor(); }
  bool has_super_resolution() const { return has_super_resolution(dir); }
  static bool has_super_resolution(const std::string& dir);  // the folder has super_resolution/ (a cascade model)
  static bool is_unclip(const std::string& dir);  // model_index.json names StableUnCLIPPipeline
  // model_index.json names KandinskyV22CombinedPipeline, or KandinskyV22Pipeline (a decoder: its prior comes from
  // ModelAddons::prior)
  static bool is_kandinsky(const std::string& dir);
  // The CLIP tokenizer that reads a folder's prompts: tokenizer/, else tokenizer_2/ (the SDXL refiner) or the
  // Kandinsky prior's (ModelAddons::prior's, or the folder's prior_tokenizer/)
  static std::string prompt_tokenizer_dir(const std::string& dir, const std::string& prior_dir = "");
  // model_index.json names StableDiffusionXLPipeline, or its Img2Img or Inpaint variant (same components)
  static bool is_sdxl(const std::string& dir);
  static bool is_sd3(const std::string& dir);  // model_index.json names StableDiffusion3Pipeline
  static bool is_flux(const std::string& dir);  // model_index.json names FluxPipeline
  // The guidance scale a request without one gets: the folder's diffusers pipeline default (FluxPipeline 3.5,
  // Kandinsky 2.2's 4, SDXL's 5, SD3's and DeepFloyd IF's 7), else Stable Diffusion's 7.5
  static double default_guidance(const std::string& dir);
  static bool is_lcm_pipeline(const std::string& dir);
  static bool is_upscaler(const std::string& dir);  // model_index.json names StableDiffusionUpscalePipeline
  static bool is_if(const std::string& dir);      // model_index.json names IFPipeline (DeepFloyd IF stage I)
  static bool is_img2img_folder(const std::string& dir);  // what img2img() says of the folder's loaded model
  static bool has_if_stage2(const std::string& dir);  // super_resolution/ is an IFSuperResolutionPipeline folder
  static bool has_if_stage3(const std::string& dir);  // upscaler/ is a StableDiffusionUpscalePipeline folder
  // IF stage II's enlargement of stage I's size (its UNet's sample_size over stage I's); 1 without stage II
  int64_t sr_factor() const { return stage2 ? stage2->unet_config.sample_size / unet_config.sample_size : 1; }
};

// Waits until the work queued on `device` has run (a no-op on CPUs): for timing.
void device_sync(const at::Device& device);

}  // namespace diffpipe
