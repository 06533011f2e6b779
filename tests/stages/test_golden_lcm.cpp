// Latent Consistency Models against diffusers (tests/stages/make_lcm_golden.py; scripts/test.sh makes the folder under
// build/golden): the LCM sampler on tiny-sd's own UNet, as an LCM-LoRA runs (StableDiffusionPipeline and
// StableDiffusionImg2ImgPipeline with LCMScheduler, with and without classifier-free guidance), and an LCM-distilled
// UNet (time_cond_proj_dim: the guidance scale embedded into the time embedding, one UNet row per request) through
// LatentConsistencyModelPipeline, LatentConsistencyModelImg2ImgPipeline and StableDiffusionPipeline, and on SDXL. Every run replays the reference's draws:
// the initial latents, then the sampler's noise at each step. $DIFFPIPE_GOLDEN_LCM, default the sibling tiny-lcm of
// the tiny-sd folder; absent, the tests skip.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/stages.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_LCM(dir) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_LCM", "tiny-lcm", "golden.json", "make_lcm_golden.py")

using Golden = std::map<std::string, at::Tensor>;

// The requests of run `run` (golden.json's settings, one per prompt); the folders with an LCMScheduler need no
// sampler name, tiny-sd's own folder is told `lcm`.
std::vector<GenerationParams> run_params(const std::string& dir, const nlohmann::json& meta, const nlohmann::json& run) {
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < meta.at("prompts").size(); ++i) {
    GenerationParams p;
    p.prompt = meta.at("prompts")[i].get<std::string>();
    p.steps = run.at("steps").get<int>();
    p.guidance = run.at("guidance").get<double>();
    if (!run.at("negative_prompt").is_null()) p.negative_prompt = run.at("negative_prompt").get<std::string>();
    if (run.at("model").get<std::string>() == "model") p.sampler = "lcm";
    const std::string pipeline = run.at("pipeline").get<std::string>();
    if (pipeline == "img2img" || pipeline == "lcm_img2img") {
      p.image_prompt = dir + "/input_" + std::to_string(i) + ".png";
      p.strength = run.at("strength").get<double>();
    }
    if (run.at("pipeline").get<std::string>() == "sdxl") p.width = p.height = 32;
    params.push_back(p);
  }
  return params;
}

// Run `name`'s states with its draws: the initial latents (image-to-image: the posterior's sample and the noise),
// then draw `first` + (call - begin) as each step's noise, row by row.
std::vector<DenoiseState> replayed_states(const SdModel& model, std::vector<GenerationParams>& params, const Golden& g,
                                          const std::string& name) {
  const bool img2img = !params[0].image_prompt.empty();
  std::vector<DenoiseState> ds = img2img ? test::img2img_states(model, params, g, name)
                                         : test::latent_states(model, params, g.at(name + ".draws.0"));
  const int first = img2img ? 2 : 1;
  for (size_t i = 0; i < ds.size(); ++i) {
    const int begin = ds[i].begin;
    const auto row = static_cast<int64_t>(i);
    ds[i].step_noise = [&g, name, first, begin, row](int step, const at::Tensor& like) {
      const std::string k = name + ".draws." + std::to_string(first + step - begin);
      return g.at(k)[row].unsqueeze(0).to(like.device(), like.scalar_type());
    };
  }
  return ds;
}
}  // namespace

// Every run of the reference: the schedule, the guidance embedding and the images (every 8-bit value within +-1).
TEST(GoldenLcm, PipelinesMatchDiffusers) {
  DP_REQUIRE_LCM(dir);
  const Golden g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  std::map<std::string, std::unique_ptr<SdModel>> models;
  for (const auto& run : meta.at("runs")) {
    const std::string name = run.at("name").get<std::string>(), folder = run.at("model").get<std::string>();
    if (!models.count(folder))
      models[folder] = std::make_unique<SdModel>(SdModel::load(dir + "/" + folder, test::device_spec()));
    const SdModel& model = *models.at(folder);
    std::vector<GenerationParams> params = run_params(dir, meta, run);
    std::vector<DenoiseState> ds = replayed_states(model, params, g, name);
    ASSERT_EQ(ds[0].sampler->kind(), SamplerKind::LCM) << name;
    const at::Tensor ts = g.at(name + ".timesteps").to(at::kDouble);
    EXPECT_EQ(ds[0].sampler->timesteps(), std::vector<double>(ts.data_ptr<double>(), ts.data_ptr<double>() + ts.numel()))
        << name;
    const bool distilled = g.count(name + ".w_embedding") > 0;
    EXPECT_EQ(distilled, model.unet_config.time_cond_proj_dim > 0) << name;
    if (distilled) {  // no unconditional row; the guidance scale embedded, as the pipeline's w_embedding
      EXPECT_FALSE(ds[0].uncond.defined()) << name;
      EXPECT_EQ(ds[0].guidance, 1.0) << name;
      EXPECT_LE(rel_err(ds[0].timestep_cond, g.at(name + ".w_embedding")[0]), 1e-6) << name;
    }
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(name + ".images"), "[golden-lcm] " + name)) << name;
  }
}

// A distilled UNet takes the guidance only through its embedding: without it the images change, a negative prompt
// changes nothing (it is not encoded), and a batch of two guidance scales gives each request its own image.
TEST(GoldenLcm, DistilledGuidanceIsAnInput) {
  DP_REQUIRE_LCM(dir);
  const Golden g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/lcm-model", test::device_spec());
  nlohmann::json run;
  for (const auto& r : meta.at("runs"))
    if (r.at("name") == "distilled") run = r;
  ASSERT_FALSE(run.is_null());
  auto images = [&](std::vector<GenerationParams> params, bool drop_embedding = false) {
    std::vector<DenoiseState> ds = replayed_states(model, params, g, "distilled");
    if (drop_embedding)
      for (auto& s : ds) s.timestep_cond = at::Tensor();
    return test::images_of(model, ds);
  };
  const std::vector<GenerationParams> base = run_params(dir, meta, run);
  const at::Tensor plain = images(base);
  EXPECT_GT((images(base, true).to(at::kInt) - plain.to(at::kInt)).abs().max().item<int>(), 1);
  std::vector<GenerationParams> negative = base;
  for (auto& p : negative) p.negative_prompt = "blurry, dark";
  EXPECT_TRUE(at::equal(images(negative), plain));
  std::vector<GenerationParams> mixed = base;
  mixed[1].guidance = 2.0;
  const at::Tensor m = images(mixed);
  EXPECT_TRUE(at::equal(m[0], plain[0]));
  EXPECT_GT((m[1].to(at::kInt) - plain[1].to(at::kInt)).abs().max().item<int>(), 1);
}
