// The Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline) against diffusers: its UNet layout (7 channels
// in, the noise level's learned class embedding, only_cross_attention blocks) and the whole pipeline through
// diffpipe's stages (CLIP encode, the low-resolution image noised by low_res_scheduler and joined to the latents at
// every step, DDIM with v-prediction and guidance, the factor-4 VAE). The reference folder is made by
// tests/stages/make_upscale_golden.py (scripts/test.sh makes it under build/golden when it can):
// $DIFFPIPE_GOLDEN_UPSCALE, default the sibling tiny-upscale of the tiny-sd folder; absent, the tests skip.
#include <unistd.h>

#include <dirent.h>
#include <limits.h>
#include <stdlib.h>

#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/memory.h"
#include "diffpipe/stages/model_stages.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/unet.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_UPSCALE(dir, inside) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_UPSCALE", "tiny-upscale", inside, "make_upscale_golden.py")

GenerationParams request(const std::string& dir, const nlohmann::json& meta, const nlohmann::json& run, size_t i) {
  GenerationParams p;
  p.prompt = meta.at("prompts")[i].get<std::string>();
  p.negative_prompt = run.at("negative_prompt").is_null() ? "" : run.at("negative_prompt").get<std::string>();
  p.steps = run.at("steps").get<int>();
  p.guidance = run.at("guidance").get<double>();
  p.noise_level = run.at("noise_level").get<int>();
  p.image_prompt = dir + "/" + meta.at("images")[i].get<std::string>();
  return p;
}
}  // namespace

// Levels 20 and 349 select rows of the class table; only_cross_attention on one block (attn1 attends to the text),
// off on the other; labels that are not whole numbers in range are refused.
TEST(GoldenUpscale, UNetLayoutWithNoiseLevelClasses) {
  DP_REQUIRE_UPSCALE(dir, "model/unet");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  auto in = [&](const char* k) { return test::on_device(g.at(k), spec); };
  const auto unet = UNet2DConditionModel::load(dir + "/model/unet", spec);
  ASSERT_EQ(unet->config().num_class_embeds, 1000);
  ASSERT_EQ(unet->config().only_cross_attention, (std::vector<bool>{false, true, false}));
  const at::Tensor x = in("unet.sample"), ctx = in("unet.encoder_hidden_states");
  const at::Tensor out = unet->forward(x, g.at("unet.timesteps"), ctx, g.at("unet.class_labels").to(at::kFloat));
  const double e = rel_err(out, g.at("unet.out"));
  std::printf("[golden-upscale] UNet (x4 upscaler layout): %.2e\n", e);
  EXPECT_LE(e, test::module_tol(spec));
  const at::Tensor swapped = g.at("unet.class_labels").flip(0).to(at::kFloat);  // the level matters
  EXPECT_GT(rel_err(unet->forward(x, g.at("unet.timesteps"), ctx, swapped), g.at("unet.out")), 10 * test::module_tol(spec));
  const std::string bad = test::error_of([&] {
    (void)unet->forward(x, g.at("unet.timesteps"), ctx, at::tensor(std::vector<float>{20.5f, 1.f}));
  });
  EXPECT_NE(bad.find("class labels must be whole numbers in [0, 1000)"), std::string::npos) << bad;
  EXPECT_NE(test::error_of([&] { (void)unet->forward(x, g.at("unet.timesteps"), ctx, at::full({2}, 1000.f)); })
                .find("[0, 1000)"),
            std::string::npos);
}

bool matches_reference(const SdModel& model, std::vector<DenoiseState>& ds, const at::Tensor& ref, const std::string& what) {
  return test::matches_reference(model, ds, ref, "[golden-upscale] " + what);
}

// The whole pipeline, two runs (guidance 7.5 at noise level 20; a negative prompt, guidance 4 at level 150), with
// the reference's draws (the image noise, then the initial latents): 16x16 PNGs become 64x64 images.
TEST(GoldenUpscale, WholePipeline) {
  DP_REQUIRE_UPSCALE(dir, "model/unet");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec);
  ASSERT_TRUE(model.upscaler);
  ASSERT_EQ(model.latent_factor(), 4);
  ASSERT_EQ(model.max_noise_level, 350);
  for (const auto& run : meta.at("runs")) {
    const std::string n = run.at("name").get<std::string>();
    const std::string pre = "pipeline." + n + ".draws.";
    std::vector<GenerationParams> params;
    for (size_t i = 0; i < meta.at("prompts").size(); ++i) params.push_back(request(dir, meta, run, i));
    const ResolvedParams rp = resolve_params(model, params[0]);
    EXPECT_EQ(rp.width, 64);
    EXPECT_EQ(rp.height, 64);
    auto embs = test::encode_all(model, params);
    std::vector<DenoiseState> ds;
    for (size_t i = 0; i < params.size(); ++i) {
      const auto row = static_cast<int64_t>(i);
      ds.push_back(make_denoise_state(model, params[i], embs[i], i, g.at(pre + "1")[row], g.at(pre + "0")[row]));
    }
    EXPECT_TRUE(matches_reference(model, ds, g.at("pipeline." + n + ".images"),
                                  "whole pipeline (" + n + ", noise level " + std::to_string(params[0].noise_level) + ")"));
  }
}

// Requests are checked against the folder: the image is required, the size follows from it, and the noise level
// is at most max_noise_level; all by name.
TEST(GoldenUpscale, RequestsAreCheckedByField) {
  DP_REQUIRE_UPSCALE(dir, "model/unet");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kUNet);
  GenerationParams p = request(dir, meta, meta.at("runs")[0], 0);
  p.image_prompt.clear();
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, p); }).find("image_prompt: the x4 upscaler needs"),
            std::string::npos);
  p = request(dir, meta, meta.at("runs")[0], 0);
  p.noise_level = 351;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, p); }).find("noise_level: must be in [0, 350]"),
            std::string::npos);
  p = request(dir, meta, meta.at("runs")[0], 0);
  p.width = 32;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, p); }).find("the x4 upscaler makes 64x64"),
            std::string::npos);
  p.width = 64;  // the size it makes anyway: accepted
  EXPECT_EQ(resolve_params(model, p).width, 64);
  p.image_prompt = dir + "/no-such.png";
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, p); }).find("no-such.png"), std::string::npos);
}

// DeepFloyd IF's stage III builds its state from an image tensor (the decoded stage-II image) and its own settings
// (make_x4_state): on the reference's low-resolution images, noises and run settings it gives diffusers' images.
TEST(GoldenUpscale, StageThreeStateFromAnImage) {
  DP_REQUIRE_UPSCALE(dir, "model/unet");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec);
  const auto& run = meta.at("runs")[0];
  const std::string pre = "pipeline.plain.draws.";
  std::vector<DenoiseState> ds;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    const GenerationParams p = request(dir, meta, run, i);
    const Image img = read_png(p.image_prompt);
    const at::Tensor u8 = at::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.height, img.width, 3}, at::kByte);
    const Embeddings e = TextEncodeStage(model).run({&p}).at(0);
    const auto row = static_cast<int64_t>(i);
    ds.push_back(make_x4_state(model, {p.steps, p.guidance, p.noise_level}, image_to_unit_range(u8), e, 0, i,
                               g.at(pre + "1")[row], g.at(pre + "0")[row]));
  }
  EXPECT_TRUE(matches_reference(model, ds, g.at("pipeline.plain.images"), "stage III state (plain)"));
  // its settings are checked by name
  EXPECT_NE(test::error_of([&] { check_x4_settings(model, {0, 9.0, 20}); }).find("x4_steps: must be in [1, 1000]"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { check_x4_settings(model, {75, 9.0, 351}); }).find("x4_noise_level: must be in [0, 350]"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { check_x4_settings(model, {75, -1.0, 20}); }).find("x4_guidance"), std::string::npos);
}

// A DeepFloyd IF folder with upscaler/ (made here from the IF and upscaler references by links): the x4 stage's
// memory is the upscaler's weights (text encoder, UNet, VAE) and activations at stage II's size times 4, and the
// whole pipeline loads with stage III's configs.
TEST(GoldenUpscale, IfFolderWithStageThree) {
  DP_REQUIRE_UPSCALE(dir, "model/unet");
  DP_REQUIRE_GENERATED(ifdir, "DIFFPIPE_GOLDEN_IF", "tiny-if", "model/super_resolution", "make_if_golden.py");
  // plain POSIX calls: std::filesystem's mutating calls resolve into LibTorch's own copy of libstdc++ and crash
  char buf[] = "/tmp/diffpipe-ifx4-XXXXXX";
  ASSERT_NE(mkdtemp(buf), nullptr);
  const std::string tmp = buf;
  std::vector<std::string> links;
  auto link = [&](const std::string& target, const std::string& name) {
    char abs[PATH_MAX];
    ASSERT_NE(realpath(target.c_str(), abs), nullptr) << target;
    links.push_back(tmp + "/" + name);
    ASSERT_EQ(symlink(abs, links.back().c_str()), 0) << links.back();
  };
  DIR* d = opendir((ifdir + "/model").c_str());
  ASSERT_NE(d, nullptr);
  while (const dirent* e = readdir(d))
    if (e->d_name[0] != '.') link(ifdir + "/model/" + e->d_name, e->d_name);
  closedir(d);
  link(dir + "/model", "upscaler");
  struct Cleanup {
    const std::vector<std::string>& links;
    const std::string& tmp;
    ~Cleanup() {
      for (const auto& l : links) unlink(l.c_str());
      rmdir(tmp.c_str());
    }
  } cleanup{links, tmp};
  const MemoryNeed x4 = estimate_rank_memory(tmp, {"x4"}, 0, 0, 2, true, at::kFloat);
  const MemoryNeed direct = estimate_rank_memory(dir + "/model", {"encode", "denoise", "decode"}, 128, 128, 2, true,
                                                 at::kFloat);  // 16 px stage I -> 32 px stage II -> 128 px
  EXPECT_GT(x4.weights, 0);
  EXPECT_DOUBLE_EQ(x4.weights, direct.weights);
  EXPECT_NEAR(x4.activations, direct.activations, 1e-6 * direct.activations);
  const SdModel configs = SdModel::load(tmp, test::device_spec(), 0);
  ASSERT_TRUE(configs.stage3 && configs.stage3->upscaler);
  EXPECT_FALSE(configs.stage3->unet) << "weights load only with kStage3";
  GenerationParams p;
  p.prompt = "x";
  p.x4_noise_level = 351;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(configs, p); }).find("x4_noise_level: must be in [0, 350]"),
            std::string::npos);
  const auto layout = pipeline_layout(tmp);
  ASSERT_FALSE(layout.empty());
  EXPECT_EQ(layout.back().name, "x4");
}
