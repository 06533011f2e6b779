// What a user asks for: one image's generation settings. Plain value type (no LibTorch), so the scheduler,
// the wire format and the command line share it. Validation names the offending field.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace diffpipe {

// One ControlNet's input to a request.
struct ControlInput {
  // the conditioning image (edges, depth, pose... as the ControlNet was trained; a PNG of the output's size, path or
  // data: URI; "" = this ControlNet does not act) and its scale
  std::string image;
  double scale = 1.0;
  // the part of the loop it acts in, as fractions of its steps (diffusers' control_guidance_start/end): step i of n
  // uses it unless i / n < start or (i + 1) / n > end
  double start = 0.0, end = 1.0;
  bool operator==(const ControlInput& o) const {
    return image == o.image && scale == o.scale && start == o.start && end == o.end;
  }
};

// Image-to-image's default strength, without and with a mask, as the folder's diffusers pipelines set it:
// StableDiffusionImg2ImgPipeline 0.8 / StableDiffusionInpaintPipeline 1; SDXL 0.3 / 0.9999 (the image's latents
// noised to the second timestep); Kandinsky 2.2 0.3; SD3 0.6.
struct StrengthDefaults {
  double image = 0.8, inpaint = 1.0;
};

struct GenerationParams {
  std::string prompt;
  std::string negative_prompt;  // "" = the unconditional embedding of the empty prompt
  int steps = 25;               // inference steps
  double guidance = 7.5;        // classifier-free guidance scale; <= 1 skips the unconditional pass
  // diffusers' guidance_rescale (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed"): the
  // guided prediction rescaled to the conditional one's standard deviation, mixed in at this share, in [0, 1]
  double guidance_rescale = 0;
  // FLUX.1 folders only (FluxPipeline's true_cfg_scale): > 1 adds an unconditional row on the negative prompt ("" when
  // none) and mixes the two predictions with this scale, beside the embedded `guidance`; 1 = one row per request
  double true_cfg_scale = 1.0;
  // SD3 folders only (StableDiffusion3Pipeline's skip-layer guidance; SD3.5 Medium recommends [7, 8, 9]): at loop
  // steps i with steps x start < i < steps x stop a third row runs the prompt with these transformer blocks skipped,
  // and the guided prediction adds scale x (conditional - skipped). Empty: off.
  std::vector<int> skip_guidance_layers;
  double skip_layer_guidance_scale = 2.8, skip_layer_guidance_start = 0.01, skip_layer_guidance_stop = 0.2;
  std::string sampler;          // "" = the model's scheduler_config.json class; else a sampler name (parse_sampler_name)
  uint64_t seed = 0;
  int width = 0, height = 0;    // 0 = the model's default size
  int clip_skip = 0;            // 0 = last text-encoder layer, 1 = penultimate, ...
  int previews = 0;             // partial images: the denoised estimate decoded this many times on the way (0-3)
  // Stable unCLIP folders only (a diffusion prior makes the image embedding); other folders ignore them.
  int prior_steps = 25;         // the prior's DDPM steps
  double prior_guidance = 4.0;  // the prior's classifier-free guidance; <= 1 skips its unconditional pass
  int noise_level = 0;          // noise augmentation of the image embedding, in [0, image_noising_scheduler steps)
  std::string image_prompt;     // image variations: a PNG whose CLIP image embedding replaces the prior's ("" = none);
                                // read where the prior stage runs (a path every node sees, or a data: URI). SD and
                                // SDXL folders: image-to-image's starting image; the x4 upscaler: the image to enlarge
  // Image-to-image (SD, SDXL and SD3 folders with an image_prompt): how much of the schedule runs on the noised image,
  // in [0, 1] (diffusers' strength; 1 keeps the least of the image, small values keep most); < 0: the pipeline's
  // default (StrengthDefaults, effective_strength())
  double strength = -1;
  // Inpainting (SD 1.x/2.x and SDXL folders, with an image_prompt): a PNG as large as the image whose white (>= 50 % grey)
  // pixels are repainted and black ones kept; a path or a data: URI ("" = none)
  std::string mask;
  // ControlNet (a run started with --controlnet DIR[,DIR...]): entry k is the k-th ControlNet's input; fewer entries
  // than ControlNets, or an entry without an image, leave those ControlNets out of this request.
  std::vector<ControlInput> controls;
  // diffusers' guess_mode: the ControlNets see the conditional row alone (the unconditional one gets no residuals)
  // and their residuals ramp from 0.1 x scale at the first skip to 1 x at the mid block
  bool guess_mode = false;
  // Per-request LoRA: adapters of the run (started with --lora-adapters NAME=FILE,...) this request uses, as
  // "NAME[:SCALE],..." (scale 1 when left out; "" = none). Applied to the UNet and the text encoders for this
  // request's rows only, beside the weights (diffusers' unfused adapters); other requests of the batch are unaffected.
  std::string lora;
  // SDXL folders only (size micro-conditioning, diffusers' original_size and crops_coords_top_left); others ignore
  // them. The target size is the image's own.
  int original_width = 0, original_height = 0;  // 0 = the image's size
  int crop_top = 0, crop_left = 0;
  // SDXL refiner folders only (requires_aesthetics_score): the aesthetic score conditioning the prompt's row and the
  // unconditional row (< 0: the pipeline's defaults, 6 and 2.5; aesthetic_score_or()); other folders refuse them.
  double aesthetic_score = -1, negative_aesthetic_score = -1;
  // IP-Adapter (a run started with --ip-adapter FILE): the image prompt (a path or a data: URI; "" = none) and how
  // strongly its tokens act in every cross-attention (diffusers' set_ip_adapter_scale)
  std::string ip_adapter_image;
  double ip_adapter_scale = 1.0;
  // SDXL with a refiner (a run started with --refiner DIR: the base's latents go on to the refiner's UNet): the
  // fraction of the base's schedule it runs before handing its latents over, in (0, 1] (diffusers' denoising_end on
  // the base and denoising_start on the refiner, the "ensemble of expert denoisers"; < 0: 0.8). 1: the base finishes
  // and the refiner runs image-to-image on its latents at refiner_strength (< 0: 0.3). refiner_steps: the refiner's
  // schedule (0: steps). Other runs refuse them.
  double denoising_end = -1;
  int refiner_steps = 0;
  bool skip_refiner = false;  // this request skips the run's refiner: the base runs its whole schedule alone
  double refiner_strength = -1;
  double denoising_end_or() const { return denoising_end >= 0 ? denoising_end : 0.8; }
  double refiner_strength_or() const { return refiner_strength >= 0 ? refiner_strength : 0.3; }
  int refiner_steps_or() const { return refiner_steps > 0 ? refiner_steps : steps; }
  double aesthetic_score_or() const { return aesthetic_score >= 0 ? aesthetic_score : 6.0; }
  double negative_aesthetic_score_or() const { return negative_aesthetic_score >= 0 ? negative_aesthetic_score : 2.5; }
  // DeepFloyd IF folders with super_resolution/ (stage II) only: its DDPM steps, guidance, and the noise level of the
  // enlarged stage-I image (diffusers' IFSuperResolutionPipeline defaults).
  int sr_steps = 50;
  double sr_guidance = 4.0;
  int sr_noise_level = 250;
  // DeepFloyd IF folders with upscaler/ (stage III: the SD x4 upscaler on stage II's images) only: its steps,
  // guidance and the noise level of its input (StableDiffusionUpscalePipeline's defaults).
  int x4_steps = 75;
  double x4_guidance = 9.0;
  int x4_noise_level = 20;

  bool uses_cfg() const { return guidance > 1.0; }
  // The strength, or the folder's pipeline default without and with a mask (SdModel::strength_defaults)
  double effective_strength(const StrengthDefaults& d) const {
    return strength >= 0 ? strength : mask.empty() ? d.image : d.inpaint;
  }
};

}  // namespace diffpipe

#include <nlohmann/json.hpp>

namespace diffpipe {

// The SDXL size keys appear only when set: other runs' JSON lines and run identities stay as they were.
inline nlohmann::json params_to_json(const GenerationParams& p) {
  nlohmann::json j = {{"prompt", p.prompt}, {"negative_prompt", p.negative_prompt}, {"steps", p.steps},
                      {"guidance", p.guidance}, {"sampler", p.sampler}, {"seed", p.seed}, {"width", p.width},
                      {"height", p.height}, {"clip_skip", p.clip_skip}, {"previews", p.previews},
                      {"prior_steps", p.prior_steps}, {"prior_guidance", p.prior_guidance},
                      {"noise_level", p.noise_level}, {"image_prompt", p.image_prompt}};
  if (p.original_width || p.original_height || p.crop_top || p.crop_left) {
    j["original_width"] = p.original_width;
    j["original_height"] = p.original_height;
    j["crop_top"] = p.crop_top;
    j["crop_left"] = p.crop_left;
  }
  const GenerationParams d;  // IF stage II's and III's settings, likewise only when not the defaults
  if (p.sr_steps != d.sr_steps || p.sr_guidance != d.sr_guidance || p.sr_noise_level != d.sr_noise_level) {
    j["sr_steps"] = p.sr_steps;
    j["sr_guidance"] = p.sr_guidance;
    j["sr_noise_level"] = p.sr_noise_level;
  }
  if (p.x4_steps != d.x4_steps || p.x4_guidance != d.x4_guidance || p.x4_noise_level != d.x4_noise_level) {
    j["x4_steps"] = p.x4_steps;
    j["x4_guidance"] = p.x4_guidance;
    j["x4_noise_level"] = p.x4_noise_level;
  }
  if (p.strength != d.strength) j["strength"] = p.strength;
  if (p.aesthetic_score != d.aesthetic_score) j["aesthetic_score"] = p.aesthetic_score;
  if (!p.ip_adapter_image.empty()) {
    j["ip_adapter_image"] = p.ip_adapter_image;
    j["ip_adapter_scale"] = p.ip_adapter_scale;
  }
  if (p.negative_aesthetic_score != d.negative_aesthetic_score) j["negative_aesthetic_score"] = p.negative_aesthetic_score;
  if (p.denoising_end != d.denoising_end) j["denoising_end"] = p.denoising_end;
  if (p.guidance_rescale != d.guidance_rescale) j["guidance_rescale"] = p.guidance_rescale;
  if (p.true_cfg_scale != d.true_cfg_scale) j["true_cfg_scale"] = p.true_cfg_scale;
  if (!p.skip_guidance_layers.empty()) {
    j["skip_guidance_layers"] = p.skip_guidance_layers;
    j["skip_layer_guidance_scale"] = p.skip_layer_guidance_scale;
    j["skip_layer_guidance_start"] = p.skip_layer_guidance_start;
    j["skip_layer_guidance_stop"] = p.skip_layer_guidance_stop;
  }
  if (p.refiner_steps != d.refiner_steps) j["refiner_steps"] = p.refiner_steps;
  if (p.skip_refiner) j["refiner"] = false;
  if (p.refiner_strength != d.refiner_strength) j["refiner_strength"] = p.refiner_strength;
  if (!p.mask.empty()) j["mask"] = p.mask;
  if (!p.lora.empty()) j["lora"] = p.lora;
  if (p.guess_mode) j["guess_mode"] = true;
  size_t used = p.controls.size();  // entries up to the last with an image (trailing empty ones change nothing)
  while (used > 0 && p.controls[used - 1].image.empty()) --used;
  if (used == 1) {  // the first ControlNet alone: the keys of single-ControlNet runs
    const ControlInput& c = p.controls[0];
    j["control_image"] = c.image;
    j["control_scale"] = c.scale;
    if (c.start != 0.0 || c.end != 1.0) {
      j["control_start"] = c.start;
      j["control_end"] = c.end;
    }
  } else if (used > 1) {
    nlohmann::json list = nlohmann::json::array();
    for (size_t k = 0; k < used; ++k) {
      const ControlInput& c = p.controls[k];
      list.push_back({{"image", c.image}, {"scale", c.scale}, {"start", c.start}, {"end", c.end}});
    }
    j["controls"] = list;
  }
  return j;
}

inline GenerationParams params_from_json(const nlohmann::json& j) {
  GenerationParams p;
  p.prompt = j.at("prompt").get<std::string>();
  p.negative_prompt = j.value("negative_prompt", std::string());
  p.steps = j.value("steps", p.steps);
  p.guidance = j.value("guidance", p.guidance);
  p.sampler = j.value("sampler", std::string());
  p.seed = j.value("seed", uint64_t(0));
  p.width = j.value("width", 0);
  p.height = j.value("height", 0);
  p.clip_skip = j.value("clip_skip", 0);
  p.previews = j.value("previews", 0);
  p.prior_steps = j.value("prior_steps", p.prior_steps);
  p.prior_guidance = j.value("prior_guidance", p.prior_guidance);
  p.noise_level = j.value("noise_level", p.noise_level);
  p.image_prompt = j.value("image_prompt", std::string());
  p.original_width = j.value("original_width", 0);
  p.original_height = j.value("original_height", 0);
  p.crop_top = j.value("crop_top", 0);
  p.crop_left = j.value("crop_left", 0);
  p.sr_steps = j.value("sr_steps", p.sr_steps);
  p.sr_guidance = j.value("sr_guidance", p.sr_guidance);
  p.sr_noise_level = j.value("sr_noise_level", p.sr_noise_level);
  p.x4_steps = j.value("x4_steps", p.x4_steps);
  p.x4_guidance = j.value("x4_guidance", p.x4_guidance);
  p.x4_noise_level = j.value("x4_noise_level", p.x4_noise_level);
  p.strength = j.value("strength", p.strength);
  p.aesthetic_score = j.value("aesthetic_score", p.aesthetic_score);
  p.ip_adapter_image = j.value("ip_adapter_image", std::string());
  p.ip_adapter_scale = j.value("ip_adapter_scale", p.ip_adapter_scale);
  p.negative_aesthetic_score = j.value("negative_aesthetic_score", p.negative_aesthetic_score);
  p.denoising_end = j.value("denoising_end", p.denoising_end);
  p.guidance_rescale = j.value("guidance_rescale", p.guidance_rescale);
  p.true_cfg_scale = j.value("true_cfg_scale", p.true_cfg_scale);
  p.skip_guidance_layers = j.value("skip_guidance_layers", std::vector<int>{});
  p.skip_layer_guidance_scale = j.value("skip_layer_guidance_scale", p.skip_layer_guidance_scale);
  p.skip_layer_guidance_start = j.value("skip_layer_guidance_start", p.skip_layer_guidance_start);
  p.skip_layer_guidance_stop = j.value("skip_layer_guidance_stop", p.skip_layer_guidance_stop);
  p.refiner_steps = j.value("refiner_steps", p.refiner_steps);
  p.skip_refiner = !j.value("refiner", true);
  p.refiner_strength = j.value("refiner_strength", p.refiner_strength);
  p.mask = j.value("mask", std::string());
  p.lora = j.value("lora", std::string());
  if (j.contains("control_image")) {
    ControlInput c;
    c.image = j.at("control_image").get<std::string>();
    c.scale = j.value("control_scale", c.scale);
    c.start = j.value("control_start", c.start);
    c.end = j.value("control_end", c.end);
    p.controls.push_back(c);
  }
  p.guess_mode = j.value("guess_mode", false);
  if (j.contains("controls"))
    for (const auto& e : j.at("controls")) {
      ControlInput c;
      c.image = e.value("image", std::string());
      c.scale = e.value("scale", c.scale);
      c.start = e.value("start", c.start);
      c.end = e.value("end", c.end);
      p.controls.push_back(c);
    }
  return p;
}

}  // namespace diffpipe
