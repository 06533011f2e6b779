// ControlNet against diffusers' StableDiffusionControlNetPipeline on tiny-sd: a ControlNetModel made from its UNet
// with random weights (zero convolutions included), conditioning images of 32x32, three runs (scale 1 with guidance
// 7.5, scale 0.5 with a negative prompt, scale 1.5 without guidance), the same initial latents. The reference is made
// by tests/stages/make_controlnet_golden.py (scripts/test.sh makes it under build/golden):
// $DIFFPIPE_GOLDEN_CONTROLNET, default the sibling tiny-controlnet of the tiny-sd folder; absent, the tests skip.
#include <fstream>

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

namespace {
#define DP_REQUIRE_CONTROLNET(dir) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_CONTROLNET", "tiny-controlnet", "golden.json", "make_controlnet_golden.py")

GenerationParams request(const std::string& dir, const nlohmann::json& meta, const nlohmann::json& run, size_t i) {
  GenerationParams p;
  p.prompt = meta.at("prompts")[i].get<std::string>();
  p.steps = meta.at("steps").get<int>();
  p.guidance = run.at("guidance").get<double>();
  p.negative_prompt = run.at("negative_prompt").is_null() ? "" : run.at("negative_prompt").get<std::string>();
  ControlInput c;
  c.image = dir + "/" + meta.at("controls")[i].get<std::string>();
  c.scale = run.at("scale").get<double>();
  c.start = run.value("start", 0.0);
  c.end = run.value("end", 1.0);
  p.controls = {c};
  return p;
}

// Runs `params` (one batch) from the reference's latents, decoded, against `ref` rows `rows`.
bool batch_matches(const SdModel& model, const std::vector<GenerationParams>& params, const at::Tensor& latents,
                   const at::Tensor& ref, const std::string& what) {
  std::vector<DenoiseState> ds = test::latent_states(model, params, latents);
  return test::matches_reference(model, ds, ref, "[golden-controlnet] " + what);
}
}  // namespace

// Each run's images (the last acts in the middle two of four steps only); the UNet alone (no control image) gives the plain images with the ControlNet loaded.
TEST(GoldenControlNet, WholePipeline) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, ModelAddons{{}, {dir + "/controlnet"}});
  ASSERT_EQ(model.controlnets.size(), 1u);
  for (const auto& run : meta.at("runs")) {
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) params.push_back(request(dir, meta, run, i));
    const std::string n = run.at("name").get<std::string>();
    EXPECT_TRUE(batch_matches(model, params, g.at("latents"), g.at(n + ".images"), n)) << n;
  }
  std::vector<GenerationParams> plain;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    GenerationParams p = request(dir, meta, meta.at("runs")[0], i);
    p.controls.clear();
    plain.push_back(p);
  }
  EXPECT_TRUE(batch_matches(model, plain, g.at("latents"), g.at("plain.images"), "no control image"));
}

// A batch mixing a controlled request and a plain one: each gets its own image (the plain row's residuals are zero).
TEST(GoldenControlNet, MixedBatchKeepsEachRequestsImage) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, ModelAddons{{}, {dir + "/controlnet"}});
  std::vector<GenerationParams> params{request(dir, meta, meta.at("runs")[0], 0), request(dir, meta, meta.at("runs")[0], 1)};
  params[1].controls.clear();
  const at::Tensor ref = at::stack({g.at("scale_1.images")[0], g.at("plain.images")[1]});
  EXPECT_TRUE(batch_matches(model, params, g.at("latents"), ref, "controlled and plain in one batch"));
}

// Requests and folders are checked by name: a control image without a ControlNet, of another size, a scale without
// an image; a ControlNet that does not fit the UNet.
TEST(GoldenControlNet, RequestsAndFoldersAreChecked) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel with = SdModel::load(dir + "/model", test::device_spec(), kTextEncoder, ModelAddons{{}, {dir + "/controlnet"}});
  EXPECT_TRUE(with.controlnets.empty());  // its weights load with the UNet only
  const SdModel without = SdModel::load(dir + "/model", test::device_spec(), kTextEncoder);
  GenerationParams p = request(dir, meta, meta.at("runs")[0], 0);
  auto error = [&](const SdModel& m, const GenerationParams& q) { return test::error_of([&] { (void)resolve_params(m, q); }); };
  EXPECT_EQ(error(with, p), "");
  EXPECT_NE(error(without, p).find("control_image: " + dir + "/model runs without a ControlNet"), std::string::npos)
      << error(without, p);
  Image wide;
  wide.width = 40;
  wide.height = 32;
  wide.pixels.assign(40 * 32 * 3, 0);
  p.controls[0].image = "data:image/png;base64," + base64_encode(encode_png(wide));
  EXPECT_NE(error(with, p).find("is 40x32; the image is 32x32"), std::string::npos) << error(with, p);
  p.controls[0].image = dir + "/control_0.png";
  p.controls[0].start = 0.5;
  p.controls[0].end = 0.5;
  EXPECT_NE(error(with, p).find("need 0 <= start < end <= 1"), std::string::npos) << error(with, p);
  p.controls[0].start = 0;
  p.controls[0].end = 1;
  p.controls[0].image.clear();
  p.controls[0].scale = 0.5;
  EXPECT_NE(error(with, p).find("control_scale: only a request with a control_image"), std::string::npos);
  // a ControlNet for another UNet: its config disagrees
  const std::string bad = test::scratch_dir("controlnet-bad");
  nlohmann::json cfg = JsonConfig::load(dir + "/controlnet/config.json").json();
  cfg["block_out_channels"] = {64, 64};
  std::ofstream(bad + "/config.json") << cfg.dump();
  EXPECT_NE(test::error_of([&] { (void)SdModel::load(dir + "/model", test::device_spec(), kTextEncoder, ModelAddons{{}, {bad}}); })
                .find("does not fit " + dir + "/model/unet/config.json"),
            std::string::npos);
}

// The memory estimate of a denoise rank counts the ControlNet's weights (and more activations).
TEST(GoldenControlNet, MemoryEstimateCountsTheControlNet) {
  DP_REQUIRE_CONTROLNET(dir);
  const MemoryNeed plain = estimate_rank_memory(dir + "/model", {"denoise"}, 32, 32, 2, true, at::kFloat);
  const MemoryNeed with = estimate_rank_memory(dir + "/model", {"denoise"}, 32, 32, 2, true, at::kFloat, ModelAddons{{}, {dir + "/controlnet"}});
  const auto f = SafetensorsFile::open(dir + "/controlnet/diffusion_pytorch_model.safetensors");
  double n = 0;
  for (const auto& k : f->names()) n += static_cast<double>(f->get(k).numel());
  EXPECT_EQ(with.weights - plain.weights, 4 * n);
  EXPECT_GT(with.activations, plain.activations);
  EXPECT_EQ(estimate_rank_memory(dir + "/model", {"encode"}, 32, 32, 2, true, at::kFloat, ModelAddons{{}, {dir + "/controlnet"}}).weights,
            estimate_rank_memory(dir + "/model", {"encode"}, 32, 32, 2, true, at::kFloat).weights);
}

// ControlNet on image-to-image (StableDiffusionControlNetImg2ImgPipeline): the starting images at strength 0.75 (3 of
// 4 steps run), the ControlNet in the first two thirds of those, the reference's draws.
TEST(GoldenControlNet, OnImageToImage) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("img2img")) GTEST_SKIP() << dir << " predates the image-to-image run (remake it)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, ModelAddons{{}, {dir + "/controlnet"}});
  const auto& run = meta.at("img2img");
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    GenerationParams p = request(dir, meta, run, i);
    p.image_prompt = dir + "/" + meta.at("starts")[i].get<std::string>();
    p.strength = run.at("strength").get<double>();
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::img2img_states(model, params, g, "img2img");
  for (const auto& s : ds) EXPECT_EQ(s.total_steps(), 3);
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("img2img.images"), "[golden-controlnet] on image-to-image"));
}

// An SDXL ControlNet (made from tiny-sdxl's UNet; the reference was made with --sdxl): its add_embedding takes the
// pooled text embedding and the size ids as the UNet's does. StableDiffusionXLControlNetPipeline at scale 1, and at
// 0.7 with a negative prompt in the middle of the steps; StableDiffusionXLControlNetImg2ImgPipeline at strength 0.6.
TEST(GoldenControlNet, Sdxl) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null())
    GTEST_SKIP() << dir << " has no SDXL runs (make_controlnet_golden.py --sdxl MODEL makes them)";
  const auto& xl = meta.at("sdxl");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const std::string cn = dir + "/" + xl.at("controlnet").get<std::string>();
  const SdModel model =
      SdModel::load(xl.at("model").get<std::string>(), test::device_spec(), kAllComponents, ModelAddons{{}, {cn}});
  ASSERT_TRUE(model.sdxl && model.controlnets.size() == 1);
  const int steps = xl.at("steps").get<int>();
  for (const auto& run : xl.at("runs")) {
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
      params.push_back(request(dir, meta, run, i));
      params.back().steps = steps;
    }
    const std::string n = run.at("name").get<std::string>();
    EXPECT_TRUE(batch_matches(model, params, g.at("latents"), g.at(n + ".images"), n)) << n;
  }
  const auto& run = xl.at("img2img");
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    GenerationParams p = request(dir, meta, run, i);
    p.steps = steps;
    p.image_prompt = dir + "/" + meta.at("starts")[i].get<std::string>();
    p.strength = run.at("strength").get<double>();
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::img2img_states(model, params, g, "sdxl_img2img");
  for (const auto& s : ds) EXPECT_EQ(s.total_steps(), 3);  // int(5 x 0.6)
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("sdxl_img2img.images"), "[golden-controlnet] SDXL on image-to-image"));
  // an SD 1.x ControlNet on the SDXL folder (and the reverse) is refused naming both files
  EXPECT_NE(test::error_of([&] {
              (void)SdModel::load(xl.at("model").get<std::string>(), test::device_spec(), kTextEncoder,
                                  ModelAddons{{}, {dir + "/controlnet"}});
            }).find("does not fit"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] {
              (void)SdModel::load(dir + "/model", test::device_spec(), kTextEncoder, ModelAddons{{}, {cn}});
            }).find("does not fit"),
            std::string::npos);
}

// Two ControlNets at once (diffusers' MultiControlNetModel: residuals summed in order), each with its own images,
// scale (1 and 0.6) and share of the steps (all; the middle half). A request that leaves the first out (an empty
// entry) and uses the second, in a batch beside one with both, gets the image of a run that has only the second.
TEST(GoldenControlNet, TwoControlNets) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("multi")) GTEST_SKIP() << dir << " predates the two-ControlNet run (remake it)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto& run = meta.at("multi");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents,
                                      ModelAddons{{}, {dir + "/controlnet", dir + "/controlnet2"}});
  ASSERT_EQ(model.controlnets.size(), 2u);
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    GenerationParams p;
    p.prompt = meta.at("prompts")[i].get<std::string>();
    p.steps = meta.at("steps").get<int>();
    p.guidance = run.at("guidance").get<double>();
    for (size_t k = 0; k < 2; ++k) {
      ControlInput c;
      c.image = dir + "/" + meta.at(k == 0 ? "controls" : "controls2")[i].get<std::string>();
      c.scale = run.at("scales")[k].get<double>();
      c.start = run.at("starts")[k].get<double>();
      c.end = run.at("ends")[k].get<double>();
      p.controls.push_back(c);
    }
    params.push_back(p);
  }
  EXPECT_TRUE(batch_matches(model, params, g.at("latents"), g.at("multi.images"), "two ControlNets"));
  // the second ControlNet alone for request 1 (the first entry empty) beside request 0 with both: request 1 gets the
  // image of a model that has only the second ControlNet, given as its first
  std::vector<GenerationParams> mixed = params;
  mixed[1].controls[0] = ControlInput{};
  const SdModel second = SdModel::load(dir + "/model", test::device_spec(), kAllComponents,
                                       ModelAddons{{}, {dir + "/controlnet2"}});
  GenerationParams alone = params[1];
  alone.controls = {params[1].controls[1]};
  auto images = [&](const SdModel& m, const std::vector<GenerationParams>& ps, const std::vector<int64_t>& rows) {
    std::vector<DenoiseState> ds = test::latent_states(m, ps, g.at("latents").index_select(0, at::tensor(rows)));
    return test::images_of(m, ds);
  };
  const at::Tensor both = images(model, mixed, {0, 1}), one = images(second, {alone}, {1});
  const int d = (both[1].to(at::kInt) - one[0].to(at::kInt)).abs().max().item<int>();
  std::printf("[golden-controlnet] second ControlNet alone in a batch beside both: max 8-bit difference %d\n", d);
  EXPECT_LE(d, 1);
  // entries are checked by position: a second image on a run with one ControlNet is refused naming the entry
  const SdModel one_net = SdModel::load(dir + "/model", test::device_spec(), kTextEncoder, ModelAddons{{}, {dir + "/controlnet"}});
  EXPECT_NE(test::error_of([&] { (void)resolve_params(one_net, params[0]); })
                .find("control_image (entry 2): " + dir + "/model runs with 1 ControlNet (--controlnet), not 2"),
            std::string::npos)
      << test::error_of([&] { (void)resolve_params(one_net, params[0]); });
}

// ControlNet on inpainting (StableDiffusionControlNetInpaintPipeline, strength 1, scale 0.8): tiny-sd's 4-channel UNet
// (the kept region blended back) and a 9-channel inpainting UNet whose mask and masked-image channels the ControlNet
// does not see (it reads the latents alone).
TEST(GoldenControlNet, OnInpainting) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("inpaint")) GTEST_SKIP() << dir << " predates the inpainting runs (remake it)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  for (const auto& run : meta.at("inpaint")) {
    const std::string n = run.at("name").get<std::string>();
    const SdModel model = SdModel::load(dir + "/" + run.at("model").get<std::string>(), test::device_spec(),
                                        kAllComponents, ModelAddons{{}, {dir + "/controlnet"}});
    EXPECT_EQ(model.inpaint_unet, n == "inpaint_unet9");
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
      GenerationParams p = request(dir, meta, run, i);
      p.image_prompt = dir + "/" + meta.at("starts")[i].get<std::string>();
      p.mask = dir + "/" + meta.at("mask").get<std::string>();
      params.push_back(p);
    }
    std::vector<DenoiseState> ds = test::inpaint_states(model, params, g, n);
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(n + ".images"), "[golden-controlnet] inpainting " + n));
  }
}

// Guess mode (diffusers' guess_mode=True): the ControlNet's residuals reach the conditional row alone, ramped from 0.1
// at the first skip to 1 at the mid block; a pooling ControlNet (global_pool_conditions, which the pipeline runs in
// guess mode) averages each residual over its pixels. A guess-mode request beside a plain one keeps its image.
TEST(GoldenControlNet, GuessModeAndPooling) {
  DP_REQUIRE_CONTROLNET(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("guess")) GTEST_SKIP() << dir << " predates the guess-mode runs (remake it)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, ModelAddons{{}, {dir + "/controlnet"}});
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    params.push_back(request(dir, meta, meta.at("guess"), i));
    params.back().guess_mode = true;
  }
  EXPECT_TRUE(batch_matches(model, params, g.at("latents"), g.at("guess.images"), "guess mode"));
  std::vector<GenerationParams> mixed{params[0], request(dir, meta, meta.at("runs")[0], 1)};  // guess + plain scale 1
  const at::Tensor ref = at::stack({g.at("guess.images")[0], g.at("scale_1.images")[1]});
  EXPECT_TRUE(batch_matches(model, mixed, g.at("latents"), ref, "a guess-mode request beside a plain one"));
  const auto& pr = meta.at("pooled");
  const SdModel pooled = SdModel::load(dir + "/model", test::device_spec(), kAllComponents,
                                       ModelAddons{{}, {dir + "/" + pr.at("controlnet").get<std::string>()}});
  ASSERT_TRUE(pooled.controlnets.at(0)->config().global_pool);
  std::vector<GenerationParams> pp;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) pp.push_back(request(dir, meta, pr, i));
  EXPECT_TRUE(batch_matches(pooled, pp, g.at("latents"), g.at("pooled.images"), "pooling ControlNet (global_pool_conditions)"));
}
