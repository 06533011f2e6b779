// Image-to-image on Stable Diffusion folders against diffusers' StableDiffusionImg2ImgPipeline: the starting
// image through the VAE encoder (the posterior sampled and scaled), noised by each sampler's add_noise to the first
// timestep that runs (int(steps x strength) steps from the end of the schedule), then denoised as usual. The
// reference is made by tests/stages/make_img2img_golden.py on the tiny-sd folder (scripts/test.sh makes it under
// build/golden when it can): $DIFFPIPE_GOLDEN_IMG2IMG, default the sibling tiny-img2img of the tiny-sd folder;
// absent, the tests skip.
#include <filesystem>

#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/memory.h"
#include "diffpipe/stages/stages.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_IMG2IMG(dir) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_IMG2IMG", "tiny-img2img", "golden.json", "make_img2img_golden.py")

GenerationParams request(const std::string& dir, const nlohmann::json& meta, const nlohmann::json& run, size_t i) {
  GenerationParams p;
  p.prompt = meta.at("prompts")[i].get<std::string>();
  p.negative_prompt = run.at("negative_prompt").is_null() ? "" : run.at("negative_prompt").get<std::string>();
  p.steps = run.at("steps").get<int>();
  p.guidance = run.at("guidance").get<double>();
  p.sampler = run.contains("sampler") && !run.at("sampler").is_null() ? run.at("sampler").get<std::string>() : "";
  p.strength = run.at("strength").is_null() ? -1.0 : run.at("strength").get<double>();  // null: the default
  p.image_prompt = dir + "/" + meta.at("images")[i].get<std::string>();
  return p;
}

// How many UNet calls diffusers makes: int(steps x strength) of the schedule's end (PNDM's schedule has one more;
// Heun's steps are two calls each but the last).
int reference_calls(const GenerationParams& p) {
  const int n = std::min(static_cast<int>(p.steps * p.strength), p.steps);
  return p.sampler == "heun" ? 2 * n - 1 : n + (p.sampler == "pndm" ? 1 : 0);
}
}  // namespace

// The input image's latents: the VAE encoder's posterior, sampled with the reference's draw and scaled.
TEST(GoldenImg2Img, LatentsOfTheImage) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec, kImageLatents);
  ASSERT_TRUE(model.img2img());
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    const GenerationParams p = request(dir, meta, meta.at("runs")[0], i);
    const auto row = static_cast<int64_t>(i);
    const at::Tensor mine = img2img_latents(model, p, resolve_params(model, p).image, g.at("ddim.draws.0")[row]);
    const at::Tensor want = g.at("ddim.image_latents")[row];
    ASSERT_EQ(mine.sizes(), want.sizes());  // [4, 8, 10]: 32 high, 40 wide at a latent factor of 4
    const double e = rel_err(mine, want);
    std::printf("[golden-img2img] image %zu latents: %.2e\n", i, e);
    EXPECT_LE(e, test::module_tol(spec));
  }
}

// The whole pipeline with the reference's draws, six runs: DDIM at strength 0.8, Euler at 0.5 with a negative
// prompt, DPM-Solver++ at 0.75, PNDM at 0.6, DDIM at strength 1 without guidance, and Heun at 0.6 (its correction
// calls: from timesteps[t_start x 2]).
TEST(GoldenImg2Img, WholePipeline) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec);
  for (const auto& run : meta.at("runs")) {
    const std::string n = run.at("name").get<std::string>();
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) params.push_back(request(dir, meta, run, i));
    std::vector<DenoiseState> ds = test::img2img_states(model, params, g, n);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(params[i].width, 40);  // the image's size
      EXPECT_EQ(params[i].height, 32);
      EXPECT_EQ(ds[i].total_steps(), reference_calls(params[i])) << n;
      EXPECT_EQ(ds[i].steps_done(), 0) << n;
    }
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(n + ".images"), "[golden-img2img] " + n + " at strength " +
                                                                            std::to_string(params[0].strength)));
  }
}

// Requests are checked by field: strength in [0, 1] and leaving at least one step, the size is the image's (and
// a multiple of the UNet's), strength without an image is refused, a missing file is named.
TEST(GoldenImg2Img, RequestsAreCheckedByField) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kUNet);
  const auto& run = meta.at("runs")[0];
  auto error = [&](const GenerationParams& p) { return test::error_of([&] { (void)resolve_params(model, p); }); };
  GenerationParams p = request(dir, meta, run, 0);
  EXPECT_EQ(resolve_params(model, p).begin, 2);  // 6 steps at 0.8: int(4.8) = 4 run, from index 2
  p.strength = 1.5;
  EXPECT_NE(error(p).find("strength: must be in [0, 1], got 1.5"), std::string::npos) << error(p);
  p.strength = 0.1;  // int(6 x 0.1) = 0 steps
  EXPECT_NE(error(p).find("strength: 0.1 x 6 steps leaves no denoising step"), std::string::npos) << error(p);
  p = request(dir, meta, run, 0);
  p.width = 64;
  EXPECT_NE(error(p).find("image-to-image makes an image of its input's size, 40x32"), std::string::npos) << error(p);
  p.width = 40;  // the size it makes anyway: accepted
  EXPECT_EQ(resolve_params(model, p).width, 40);
  p = request(dir, meta, run, 0);
  p.image_prompt.clear();
  p.strength = 0.5;
  EXPECT_NE(error(p).find("strength: only image-to-image uses it"), std::string::npos) << error(p);
  p.strength = GenerationParams{}.strength;  // the default without an image: text-to-image
  EXPECT_EQ(resolve_params(model, p).begin, 0);
  p = request(dir, meta, run, 0);
  p.image_prompt = dir + "/no-such.png";
  EXPECT_NE(error(p).find("no-such.png"), std::string::npos) << error(p);
  // an image whose sides are not multiples of 8 (the latent factor 4 x the UNet's one downsampling)
  Image odd;
  odd.width = 36;
  odd.height = 32;
  odd.pixels.assign(size_t(36) * 32 * 3, 128);
  p.image_prompt = "data:image/png;base64," + base64_encode(encode_png(odd));
  EXPECT_NE(error(p).find("is 36x32; image-to-image needs sides that are multiples of 8"), std::string::npos) << error(p);
}

// The encode stage's rank loads the VAE's encoder alone (kImageLatents); the decode stage's rank its decoder alone;
// the memory estimate of the encode stage counts the encoder's weights.
TEST(GoldenImg2Img, EncodeRankLoadsTheEncoderOnly) {
  DP_REQUIRE_IMG2IMG(dir);
  const SdModel enc = SdModel::load(dir + "/model", test::device_spec(), kTextEncoder | kImageLatents);
  ASSERT_TRUE(enc.vae);
  EXPECT_TRUE(enc.vae->has_encoder());
  EXPECT_FALSE(enc.vae->has_decoder());
  EXPECT_NE(test::error_of([&] { (void)enc.vae->decode(at::zeros({1, 4, 8, 8})); }).find("without its decoder"),
            std::string::npos);
  const SdModel dec = SdModel::load(dir + "/model", test::device_spec(), kVae);
  ASSERT_TRUE(dec.vae);
  EXPECT_FALSE(dec.vae->has_encoder());
  EXPECT_TRUE(dec.vae->has_decoder());
  // weights: the text encoder's and the VAE encoder's (encoder.*, quant_conv.*), float32
  auto elems = [](const std::string& file, bool vae_encoder_only) {
    const auto f = SafetensorsFile::open(file);
    double n = 0;
    for (const auto& k : f->names())
      if (!vae_encoder_only || k.rfind("encoder.", 0) == 0 || k.rfind("quant_conv.", 0) == 0)
        n += static_cast<double>(f->get(k).numel());
    return n;
  };
  const double want = 4 * (elems(dir + "/model/text_encoder/model.safetensors", false) +
                           elems(dir + "/model/vae/diffusion_pytorch_model.safetensors", true));
  EXPECT_EQ(estimate_rank_memory(dir + "/model", {"encode"}, 40, 32, 1, true, at::kFloat).weights, want);
}

// SDXL through StableDiffusionXLImg2ImgPipeline (the run exists when the reference was made with --sdxl): the size
// conditioning comes from the image (40x32, as the encode stage sets it), Euler from the folder's scheduler.
TEST(GoldenImg2Img, SdxlWholePipeline) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null())
    GTEST_SKIP() << dir << " has no sdxl run (make_img2img_golden.py --sdxl MODEL makes one)";
  const auto& run = meta.at("sdxl");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(run.at("model").get<std::string>(), spec);
  ASSERT_TRUE(model.sdxl && model.img2img());
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    GenerationParams p = request(dir, meta, run, i);
    p.sampler.clear();  // the folder's
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::img2img_states(model, params, g, "sdxl");
  for (const auto& s : ds) EXPECT_EQ(s.total_steps(), 3);  // int(5 x 0.6)
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("sdxl.images"), "[golden-img2img] sdxl at strength 0.6"));
}

namespace {
// Runs golden.json's inpainting `runs` (each names its model: a path relative to `dir`, or absolute) with the
// reference's draws (roles "image", "noise", "masked") and compares the images.
void check_inpainting_runs(const std::string& dir, const nlohmann::json& meta, const nlohmann::json& runs) {
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  for (const auto& run : runs) {
    const std::string n = run.at("name").get<std::string>(), folder = run.at("model").get<std::string>();
    const SdModel model = SdModel::load(folder.rfind('/', 0) == 0 ? folder : dir + "/" + folder, spec);
    EXPECT_EQ(model.inpaint_unet, n.find("unet9") != std::string::npos) << n;
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
      GenerationParams p = request(dir, meta, run, i);
      p.mask = dir + "/" + meta.at("masks")[i].get<std::string>();
      params.push_back(p);
    }
    std::vector<DenoiseState> ds = test::inpaint_states(model, params, g, n);
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(n + ".images"), "[golden-img2img] inpainting " + n));
  }
}
}  // namespace

// Inpainting through StableDiffusionInpaintPipeline, four runs: tiny-sd's 4-channel UNet (the kept region blended
// back after every step) with DDIM at strength 1 and Euler at 0.7 with a negative prompt; a 9-channel inpainting
// UNet (mask and masked image in) with DDIM at strength 1 and DPM-Solver++ at 0.75. mask_0 is white on black with a
// grey 127 column (kept) beside a 128 one (repainted); mask_1 marks the repainted region transparent (OpenAI's rule).
TEST(GoldenImg2Img, InpaintingWholePipeline) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("inpaint")) GTEST_SKIP() << dir << " predates the inpainting runs (remake it)";
  check_inpainting_runs(dir, meta, meta.at("inpaint"));
}

// SDXL inpainting through StableDiffusionXLInpaintPipeline (runs made with --sdxl): the SDXL folder's 4-channel UNet
// at the pipeline's default strength (0.9999: 4 of 5 steps, from the image noised to the second timestep), and a
// 9-channel UNet folder saved as StableDiffusionXLInpaintPipeline at strength 1 with a negative prompt (the folder's
// Euler in both).
TEST(GoldenImg2Img, SdxlInpaintingWholePipeline) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null() || !meta.at("sdxl").contains("inpaint"))
    GTEST_SKIP() << dir << " has no SDXL inpainting runs (make_img2img_golden.py --sdxl MODEL makes them)";
  const auto& runs = meta.at("sdxl").at("inpaint");
  const SdModel xl = SdModel::load(runs[0].at("model").get<std::string>(), test::device_spec(), kUNet);
  GenerationParams p = request(dir, meta, runs[0], 0);  // no strength: the pipeline's default
  p.mask = dir + "/mask_0.png";
  EXPECT_EQ(xl.strength(p), 0.9999);
  EXPECT_EQ(resolve_params(xl, p).begin, 1);  // int(5 x 0.9999) = 4 of 5 steps
  check_inpainting_runs(dir, meta, runs);
}

// The SDXL refiner (runs made with --sdxl): a folder with text_encoder_2 alone whose UNet is conditioned on (original
// size, crop, aesthetic score), the unconditional row on the negative score. StableDiffusionXLImg2ImgPipeline at its
// default strength (0.3: 3 of 10 steps) and with the scores set (7.5 / 1.5, a negative prompt), and
// StableDiffusionXLInpaintPipeline on the same folder. Scores reach the image; other folders refuse them.
TEST(GoldenImg2Img, SdxlRefiner) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null() || !meta.at("sdxl").contains("refiner"))
    GTEST_SKIP() << dir << " has no SDXL refiner runs (make_img2img_golden.py --sdxl MODEL makes them)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const SdModel model = SdModel::load(dir + "/sdxl-refiner-model", test::device_spec());
  ASSERT_TRUE(model.sdxl && model.aesthetic && model.second_encoder_only && model.img2img());
  EXPECT_FALSE(model.text_encoder || model.tokenizer);
  EXPECT_FALSE(model.force_zeros_for_empty_prompt);  // the refiner's model_index.json
  auto params_of = [&](const nlohmann::json& run) {
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
      GenerationParams p = request(dir, meta, run, i);
      if (!run.at("aesthetic_score").is_null()) p.aesthetic_score = run.at("aesthetic_score").get<double>();
      if (!run.at("negative_aesthetic_score").is_null())
        p.negative_aesthetic_score = run.at("negative_aesthetic_score").get<double>();
      if (run.at("mask").get<bool>()) p.mask = dir + "/" + meta.at("masks")[i].get<std::string>();
      params.push_back(p);
    }
    return params;
  };
  for (const auto& run : meta.at("sdxl").at("refiner")) {
    const std::string n = run.at("name").get<std::string>();
    std::vector<GenerationParams> params = params_of(run);
    std::vector<DenoiseState> ds = run.at("mask").get<bool>() ? test::inpaint_states(model, params, g, n)
                                                              : test::img2img_states(model, params, g, n);
    if (n == "refiner_default") {
      for (const auto& s : ds) EXPECT_EQ(s.total_steps(), 3);  // int(10 x 0.3): the pipeline's default strength
      EXPECT_EQ(ds[0].time_ids.sizes(), (std::vector<int64_t>{5}));
      EXPECT_FLOAT_EQ(ds[0].time_ids[4].item<float>(), 6.0f);
      EXPECT_FLOAT_EQ(ds[0].uncond_time_ids[4].item<float>(), 2.5f);
    }
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(n + ".images"), "[golden-img2img] refiner " + n)) << n;
  }
  // the score reaches the image: another score, another image
  const auto& run = meta.at("sdxl").at("refiner")[1];
  std::vector<GenerationParams> params = params_of(run);
  std::vector<DenoiseState> a = test::img2img_states(model, params, g, "refiner_scores");
  for (auto& p : params) p.aesthetic_score = 2.0;
  std::vector<DenoiseState> b = test::img2img_states(model, params, g, "refiner_scores");
  EXPECT_GT((test::images_of(model, a).to(at::kInt) - test::images_of(model, b).to(at::kInt)).abs().max().item<int>(), 1);
  // a folder that is not a refiner refuses the scores
  const SdModel base = SdModel::load(meta.at("sdxl").at("model").get<std::string>(), test::device_spec(), kUNet);
  GenerationParams q = request(dir, meta, run, 0);
  q.aesthetic_score = 6.0;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(base, q); })
                .find("aesthetic_score: only an SDXL refiner folder (model_index.json's requires_aesthetics_score)"),
            std::string::npos);
}

// The SDXL base hands its latents to the refiner (runs made with --sdxl; a run with ModelAddons::refiner): the base
// stops at denoising_end (StableDiffusionXLPipeline's denoising_end, output_type "latent") and the refiner continues
// from its first timestep below the cutoff without new noise (StableDiffusionXLImg2ImgPipeline's denoising_start):
// the folder's Euler at 0.75 (6 + 2 calls), DPM-Solver++ at 0.5 with 10 refiner steps (its history starts empty at
// the handover), a negative prompt and an aesthetic score; and at denoising_end 1 the finished latents refined image-to-image at strength 0.4. The handed-over latents
// and the images against the reference; the base's VAE decodes.
TEST(GoldenImg2Img, SdxlHandoffToTheRefiner) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null() || !meta.at("sdxl").contains("handoff"))
    GTEST_SKIP() << dir << " has no base-to-refiner runs (make_img2img_golden.py --sdxl MODEL makes them)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  ModelAddons addons;
  addons.refiner = dir + "/sdxl-refiner-model";
  const SdModel base = SdModel::load(meta.at("sdxl").at("model").get<std::string>(), spec, kAllComponents, addons);
  ASSERT_TRUE(base.refiner && base.refiner->unet && base.refiner->text_encoder_2 && !base.refiner->vae);
  for (const auto& run : meta.at("sdxl").at("handoff")) {
    const std::string n = run.at("name").get<std::string>();
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
      GenerationParams p;
      p.prompt = meta.at("prompts")[i].get<std::string>();
      p.negative_prompt = run.at("negative_prompt").is_null() ? "" : run.at("negative_prompt").get<std::string>();
      p.sampler = run.at("sampler").is_null() ? "" : run.at("sampler").get<std::string>();
      p.steps = run.at("steps").get<int>();
      p.guidance = run.at("guidance").get<double>();
      p.width = 40;
      p.height = 32;
      p.denoising_end = run.at("denoising_end").get<double>();
      if (!run.at("refiner_steps").is_null()) p.refiner_steps = run.at("refiner_steps").get<int>();
      if (!run.at("refiner_strength").is_null()) p.refiner_strength = run.at("refiner_strength").get<double>();
      if (!run.at("aesthetic_score").is_null()) p.aesthetic_score = run.at("aesthetic_score").get<double>();
      params.push_back(p);
    }
    std::vector<DenoiseState> ds = test::latent_states(base, params, g.at(n + ".draws.noise"));
    for (const auto& s : ds) EXPECT_EQ(s.total_steps(), run.at("base_calls").get<int>()) << n;
    const std::vector<at::Tensor> handed = test::denoise_to_end(base, ds);
    const double e = rel_err(at::stack(handed).to(at::kCPU, at::kFloat), g.at(n + ".base_latents"));
    std::printf("[golden-img2img] %s: the base's latents at the handover %.2e\n", n.c_str(), e);
    EXPECT_LE(e, test::pipeline_tol(spec)) << n;
    std::vector<GenerationParams> rq;
    for (const auto& p : params) rq.push_back(refiner_request(p, 40, 32));
    const std::vector<Embeddings> embs = test::encode_all(*base.refiner, rq);
    std::vector<DenoiseState> rs;
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string k = n + ".draws.refiner_noise";
      rs.push_back(make_refine_state(*base.refiner, params[i], handed[i], embs[i], i,
                                     g.count(k) ? g.at(k)[static_cast<int64_t>(i)] : at::Tensor()));
      EXPECT_EQ(rs.back().total_steps(), run.at("refiner_calls").get<int>()) << n;
    }
    EXPECT_EQ(rs[0].time_ids.sizes(), (std::vector<int64_t>{5}));  // the refiner's (size, crop, aesthetic score)
    const at::Tensor images = DecodeStage(base).run_uint8(test::denoise_to_end(*base.refiner, rs)).to(at::kCPU);
    EXPECT_TRUE(test::matches_reference_images(images, spec.dtype, g.at(n + ".images"), "[golden-img2img] " + n)) << n;
  }
  // the refine rank's memory: the refiner's text encoder and UNet (its weights as stored, float32 here), and the
  // activations of its UNet on the base's latents; nothing without a refiner
  const std::string xl_dir = meta.at("sdxl").at("model").get<std::string>();
  const MemoryNeed rm = estimate_rank_memory(xl_dir, {"refine"}, 40, 32, 2, true, at::kFloat, addons);
  const MemoryNeed ru = estimate_rank_memory(addons.refiner, {"denoise"}, 40, 32, 2, true, at::kFloat);
  const double te = static_cast<double>(std::filesystem::file_size(addons.refiner + "/text_encoder_2/model.safetensors"));
  EXPECT_NEAR(rm.weights, ru.weights + te, 0.01 * te) << "the refiner's UNet and text_encoder_2 (float32 files)";
  EXPECT_DOUBLE_EQ(rm.activations, ru.activations);
  const MemoryNeed none = estimate_rank_memory(xl_dir, {"refine"}, 40, 32, 2, true, at::kFloat);
  EXPECT_EQ(none.weights + none.activations, 0.0);
  {  // Heun on the refiner starts on a first-order call: 4 calls below the cutoff 250 of 11, made 5 (diffusers' +1 for
     // an even count of an order-2 scheduler), so call 6 (timestep 333, 167, 167, 1, 1 remain)
    GenerationParams h;
    h.prompt = "x";
    h.steps = 6;
    h.sampler = "heun";
    h.denoising_end = 0.75;
    const RefinePlan plan = plan_refine(*base.refiner, h, 40, 32);
    EXPECT_EQ(plan.sampler->num_calls(), 11);
    EXPECT_EQ(plan.begin, 6);
    EXPECT_EQ(plan.sampler->timestep(plan.begin), 333);
  }
  // settings the run checks by name
  GenerationParams p;
  p.prompt = "x";
  p.width = 40;
  p.height = 32;
  p.steps = 4;
  auto refused = [&](GenerationParams q, const std::string& what) {
    const std::string e = test::error_of([&] { (void)resolve_params(base, q); });
    EXPECT_NE(e.find(what), std::string::npos) << what << " -> " << e;
  };
  GenerationParams q = p;
  q.denoising_end = 0.05;  // the base's first timestep is already below 950
  refused(q, "denoising_end: 0.05 leaves the base no step");
  q = p;
  q.denoising_end = 0.9995;  // the cutoff round(0.5) = 0: the refiner's last timestep, 1, is not below it
  refused(q, "denoising_end: 0.9995 leaves the refiner no step");
  q = p;
  q.refiner_strength = 0.5;  // only with denoising_end 1
  refused(q, "refiner_strength: only with denoising_end 1");
  q.denoising_end = 1;
  q.refiner_strength = 0.1;  // int(4 x 0.1) = 0 steps
  refused(q, "refiner_strength: 0.1 x 4 refiner steps leaves no step");
  q = p;
  q.refiner_steps = 5000;
  refused(q, "refiner_steps: must be in [1, 1000]");
  q = p;
  q.denoising_end = 1.5;
  refused(q, "denoising_end: must be in (0, 1]");
  q = p;
  q.mask = dir + "/mask_0.png";
  q.image_prompt = dir + "/input_0.png";
  q.width = q.height = 0;
  refused(q, "mask: a run with a refiner does not inpaint");
  // without a refiner the settings are refused by name; folders that do not fit are refused at load
  const SdModel plain = SdModel::load(meta.at("sdxl").at("model").get<std::string>(), spec, 0);
  q = p;
  q.denoising_end = 0.8;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(plain, q); })
                .find("denoising_end: only a run with an SDXL refiner uses it (start the run with --refiner DIR)"),
            std::string::npos);
  ModelAddons bad;
  bad.refiner = dir + "/model";  // an SD 1.x folder
  EXPECT_NE(test::error_of([&] { (void)SdModel::load(meta.at("sdxl").at("model").get<std::string>(), spec, 0, bad); })
                .find("is not an SDXL pipeline"),
            std::string::npos);
  bad.refiner = meta.at("sdxl").at("model").get<std::string>();
  EXPECT_NE(test::error_of([&] { (void)SdModel::load(dir + "/model", spec, 0, bad); }).find("is not an SDXL folder"),
            std::string::npos);
}

// Inpainting's masks: binarised at 50 % grey, transparency (when present) marks the repainted region, the mask must
// cover its image, needs an image, and an inpainting folder needs both.
TEST(GoldenImg2Img, InpaintingMasksAndRefusals) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("inpaint")) GTEST_SKIP() << dir << " predates the inpainting runs (remake it)";
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kUNet);
  GenerationParams p = request(dir, meta, meta.at("runs")[0], 0);
  p.mask = dir + "/mask_0.png";
  const at::Tensor m0 = resolve_params(model, p).mask;
  ASSERT_EQ(m0.sizes(), (std::vector<int64_t>{1, 32, 40}));
  EXPECT_EQ(m0[0][0][30].item<float>(), 0.f);   // grey 127: kept
  EXPECT_EQ(m0[0][0][31].item<float>(), 1.f);   // grey 128: repainted
  EXPECT_EQ(m0[0][10][10].item<float>(), 1.f);  // the white rectangle
  EXPECT_EQ(m0[0][25][10].item<float>(), 0.f);
  EXPECT_EQ(m0.sum().item<float>(), 16 * 20 + 32);  // the rectangle and the grey-128 column
  p.mask = dir + "/mask_1.png";  // black and opaque where kept, transparent where repainted
  const at::Tensor m1 = resolve_params(model, p).mask;
  EXPECT_EQ(m1.sum().item<float>(), 20 * 20);
  EXPECT_EQ(m1[0][15][5].item<float>(), 1.f);
  auto error = [&](const GenerationParams& q) { return test::error_of([&] { (void)resolve_params(model, q); }); };
  Image small;
  small.width = 16;
  small.height = 16;
  small.pixels.assign(16 * 16 * 3, 255);
  p.mask = "data:image/png;base64," + base64_encode(encode_png(small));
  EXPECT_NE(error(p).find("is 16x16, the image 40x32"), std::string::npos) << error(p);
  p.mask = dir + "/no-such-mask.png";
  EXPECT_NE(error(p).find("mask: " + dir + "/no-such-mask.png"), std::string::npos) << error(p);
  p.mask = dir + "/mask_0.png";
  p.image_prompt.clear();
  EXPECT_NE(error(p).find("mask: inpainting needs an image"), std::string::npos) << error(p);
  const SdModel nine = SdModel::load(dir + "/inpaint-model", test::device_spec(), kUNet);
  GenerationParams q = request(dir, meta, meta.at("runs")[0], 0);
  EXPECT_NE(test::error_of([&] { (void)resolve_params(nine, q); }).find("is an inpainting folder"), std::string::npos);
  q.mask = dir + "/mask_0.png";
  EXPECT_EQ(resolve_params(nine, q).begin, 2);  // 6 steps at strength 0.8 (the run's): 4 run, from call 2
  q.strength = -1;
  EXPECT_EQ(resolve_params(nine, q).begin, 0);  // the default with a mask: strength 1
}
