// Shared by the golden pipeline tests: runs denoising states to their end in one batch, as the denoise stage does.
#pragma once
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "diffpipe/stages/stages.h"
#include "device_util.h"
#include "test_util.h"

namespace diffpipe::test {

// The text embeddings of `params`, one encoder call for all (as the encode stage makes them).
inline std::vector<Embeddings> encode_all(const SdModel& model, const std::vector<GenerationParams>& params) {
  std::vector<const GenerationParams*> ptrs;
  for (const auto& p : params) ptrs.push_back(&p);
  return TextEncodeStage(model).run(ptrs);
}

// An image-to-image state from a reference's draws: `image` (ResolvedParams::image) through the VAE encoder with the
// posterior's sample `sample`, then noised with `noise` to the first call that runs.
inline DenoiseState img2img_state(const SdModel& model, const GenerationParams& p, Embeddings emb, uint64_t id,
                                  const at::Tensor& image, const at::Tensor& sample, const at::Tensor& noise) {
  emb.image_latents = img2img_latents(model, p, image, sample);
  return make_denoise_state(model, p, std::move(emb), id, noise);
}

// States for `params` (their embeddings from one encoder call), request i starting from row i of `latents`
// ([B, C, h, w], a reference's initial latents).
inline std::vector<DenoiseState> latent_states(const SdModel& model, const std::vector<GenerationParams>& params,
                                               const at::Tensor& latents) {
  auto embs = encode_all(model, params);
  std::vector<DenoiseState> ds;
  for (size_t i = 0; i < params.size(); ++i)
    ds.push_back(make_denoise_state(model, params[i], embs[i], i, latents[static_cast<int64_t>(i)]));
  return ds;
}

// Image-to-image states for `params` from a reference's draws `run`.draws.0 (the posterior's samples) and .draws.1
// (the noise), rows in order; SDXL requests get the image's size first (as the encode stage sets it: the size
// conditioning is the image's), so `params` is updated.
inline std::vector<DenoiseState> img2img_states(const SdModel& model, std::vector<GenerationParams>& params,
                                                const std::map<std::string, at::Tensor>& g, const std::string& run) {
  std::vector<at::Tensor> images;
  for (auto& p : params) {
    const ResolvedParams r = resolve_params(model, p);
    p.width = r.width;
    p.height = r.height;
    images.push_back(r.image);
  }
  auto embs = encode_all(model, params);
  std::vector<DenoiseState> ds;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto row = static_cast<int64_t>(i);
    ds.push_back(img2img_state(model, params[i], embs[i], i, images[i], g.at(run + ".draws.0")[row],
                               g.at(run + ".draws.1")[row]));
  }
  return ds;
}

// Inpainting states for `params` (each with an image and a mask) from a reference's draws `run`.draws.ROLE, roles
// "image" (the image's posterior sample), "noise" and "masked" (the masked image's sample); a role the reference did
// not draw is not used. SDXL requests get the image's size first, as img2img_states.
inline std::vector<DenoiseState> inpaint_states(const SdModel& model, std::vector<GenerationParams>& params,
                                                const std::map<std::string, at::Tensor>& g, const std::string& run) {
  for (auto& p : params) {
    const ResolvedParams r = resolve_params(model, p);
    p.width = r.width;
    p.height = r.height;
  }
  auto embs = encode_all(model, params);
  auto draw = [&](const std::string& role, int64_t row) {
    const std::string k = run + ".draws." + role;
    return g.count(k) ? g.at(k)[row] : at::zeros_like(g.at(run + ".draws.noise")[row]);
  };
  std::vector<DenoiseState> ds;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto row = static_cast<int64_t>(i);
    const ResolvedParams r = resolve_params(model, params[i]);
    EXPECT_TRUE(r.mask.defined()) << run;
    embs[i].image_latents = img2img_latents(model, params[i], r.image, draw("image", row));
    inpaint_conditioning(model, params[i], r.image, r.mask, embs[i], draw("masked", row));
    ds.push_back(make_denoise_state(model, params[i], embs[i], i, draw("noise", row)));
  }
  return ds;
}

// Steps every state of `ds` (one batch, one UNet call per step) until done; returns each one's final latents.
inline std::vector<at::Tensor> denoise_to_end(const SdModel& model, std::vector<DenoiseState>& ds) {
  const DenoiseStage den(model);
  std::vector<DenoiseState*> batch;
  for (auto& s : ds) batch.push_back(&s);
  while (!ds.empty() && !ds[0].done()) den.step(batch);
  std::vector<at::Tensor> out;
  for (auto& s : ds) out.push_back(s.latents);
  return out;
}

// The 8-bit images [B, H, W, 3] of `ds` stepped to the end and decoded, on the CPU.
inline at::Tensor images_of(const SdModel& model, std::vector<DenoiseState>& ds) {
  return DecodeStage(model).run_uint8(denoise_to_end(model, ds)).to(at::kCPU);
}

// The 8-bit images of a run's denoising states, decoded, against the reference's [B, 3, H, W] in [0, 1]: true when
// (float32) at least 99 % of the 8-bit values are within +-1, (16-bit) the images within 10 % (printed with `what`).
inline bool matches_reference_images(const at::Tensor& mine, at::ScalarType dtype, const at::Tensor& ref,
                                     const std::string& what);
inline bool matches_reference(const SdModel& model, std::vector<DenoiseState>& ds, const at::Tensor& ref,
                              const std::string& what) {
  return matches_reference_images(images_of(model, ds), model.spec.dtype, ref, what);
}
// ... for 8-bit images [B, H, W, 3] made otherwise (`dtype`: the model's).
inline bool matches_reference_images(const at::Tensor& mine, at::ScalarType dtype, const at::Tensor& ref,
                                     const std::string& what) {
  const at::Tensor r = ref.permute({0, 2, 3, 1}).contiguous();
  EXPECT_EQ(mine.sizes(), r.sizes()) << what;
  if (mine.sizes() != r.sizes()) return false;
  const at::Tensor d = (mine.to(at::kInt) - r.mul(255).round().clamp(0, 255).to(at::kInt)).abs();
  const double within = d.le(1).to(at::kDouble).mean().item<double>();
  const double e = rel_err(mine.to(at::kFloat) / 255.0, r);
  std::printf("%s: 8-bit within +-1: %.4f (max %d), images %.2e\n", what.c_str(), within, d.max().item<int>(), e);
  return dtype == at::kFloat ? within >= 0.99 : e <= 0.1;
}

// The image-to-image or inpainting runs of an SD3 or Flux reference (golden.json's `key`: img2img_runs or
// inpaint_runs; make_sd3_golden.py and make_flux_golden.py write them alike): each run's requests from
// DIR/input_K.png (and the run's mask) with the reference's draws, 48x32 images at the run's strength (default 0.6):
// of S steps, S - int(S - S x strength) run (0.3 of 5: 2, where SD's rule runs 1), the images compared with the
// reference's. `tag` prefixes the printed figures.
template <class Json>
void check_dit_img2img_runs(const SdModel& model, const std::string& dir, const Json& meta,
                            const std::map<std::string, at::Tensor>& g, const std::string& tag,
                            const char* key = "img2img_runs") {
  for (const auto& run : meta.at(key)) {
    const std::string n = run.at("name").template get<std::string>();
    const bool mask = run.contains("mask");
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
      GenerationParams p;
      p.prompt = meta.at("prompts")[i].template get<std::string>();
      if (run.contains("negative_prompt") && !run.at("negative_prompt").is_null())
        p.negative_prompt = run.at("negative_prompt").template get<std::string>();
      p.steps = run.at("steps").template get<int>();
      p.guidance = run.at("guidance").template get<double>();
      if (!run.at("strength").is_null()) p.strength = run.at("strength").template get<double>();
      p.image_prompt = dir + "/input_" + std::to_string(i) + ".png";
      if (mask) p.mask = dir + "/" + run.at("mask").template get<std::string>();
      params.push_back(p);
    }
    const double strength = run.at("strength").is_null() ? 0.6 : run.at("strength").template get<double>();
    const int steps = params[0].steps, runs = steps - static_cast<int>(std::max(steps - steps * strength, 0.0));
    EXPECT_EQ(model.strength(params[0]), strength) << n << ": the pipeline's default strength";
    std::vector<DenoiseState> ds = mask ? inpaint_states(model, params, g, n) : img2img_states(model, params, g, n);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(params[i].width, 48) << n;  // the image's size
      EXPECT_EQ(ds[i].total_steps(), runs) << n;
      EXPECT_EQ(ds[i].blend_mask.defined(), mask) << n << ": inpainting blends the kept region back after each step";
    }
    EXPECT_TRUE(matches_reference(model, ds, g.at(n + ".images"), tag + " " + n));
  }
}

// The LoRA run of an SD3 or Flux reference: golden.json's first run ("plain", no negative prompt) with
// A golden run's own model when the run sets the run-level T5 length ("max_sequence_length", --max-sequence-length):
// MODEL_DIR loaded with it; otherwise an empty SdModel (no folder: the caller's model serves the run).
template <class Json>
SdModel t5_length_model(const std::string& model_dir, const DeviceSpec& spec, const Json& run) {
  ModelAddons addons;
  addons.max_sequence_length = run.value("max_sequence_length", 0);
  if (addons.max_sequence_length == 0) return SdModel();
  SdModel m = SdModel::load(model_dir, spec, kAllComponents, addons);
  EXPECT_EQ(m.max_sequence_length, addons.max_sequence_length);
  return m;
}

// DIR/`file` fused at scale 1 against `ref`.* (diffusers with the adapters active; default DIR/lora.safetensors and
// pipeline.lora), and at scale 0 against the plain run's own latents (the file then changes nothing). `tag` prefixes
// the printed figures.
template <class Json>
void check_dit_lora_run(const std::string& dir, const Json& meta, const std::map<std::string, at::Tensor>& g,
                        const DeviceSpec& spec, const std::string& tag, const std::string& file = "lora.safetensors",
                        const std::string& ref = "pipeline.lora") {
  const auto& run = meta.at("runs")[0];
  std::vector<GenerationParams> params;
  for (const auto& pr : meta.at("prompts")) {
    GenerationParams p;
    p.prompt = pr.template get<std::string>();
    p.steps = run.at("steps").template get<int>();
    p.guidance = run.at("guidance").template get<double>();
    p.width = run.at("width").template get<int>();
    p.height = run.at("height").template get<int>();
    params.push_back(p);
  }
  for (const double scale : {1.0, 0.0}) {
    ModelAddons addons;
    addons.loras.push_back({dir + "/" + file, scale});
    const SdModel model = SdModel::load(dir + "/model", spec, kAllComponents, addons);
    std::vector<DenoiseState> ds = latent_states(model, params, g.at("pipeline.plain.initial_noise"));
    const std::vector<at::Tensor> lat = denoise_to_end(model, ds);
    const std::string want = scale > 0 ? ref : "pipeline.plain";
    const double e = rel_err(at::stack(lat), g.at(want + ".final_latents"));
    const at::Tensor d = (DecodeStage(model).run_uint8(lat).to(at::kInt) - g.at(want + ".image_uint8").to(at::kInt)).abs();
    const double within = d.le(1).to(at::kDouble).mean().item<double>();
    std::printf("%s %s at scale %.0f (vs %s): final latents %.2e, image values within +-1: %.4f (max %d)\n",
                tag.c_str(), file.c_str(), scale, want.c_str(), e, within, d.max().item<int>());
    EXPECT_LE(e, pipeline_tol(spec)) << scale;
    if (spec.dtype == at::kFloat) EXPECT_GE(within, 0.99) << scale;
  }
  // the LoRA does change the run
  EXPECT_GT(rel_err(g.at(ref + ".final_latents"), g.at("pipeline.plain.final_latents")), 1e-2);
}

}  // namespace diffpipe::test
