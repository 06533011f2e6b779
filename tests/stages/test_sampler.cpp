// Sampler schedules and steps: exact algebra on constructed inputs (golden checks are in test_golden.cpp).
#include <fstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/model_writer.h"
#include "diffpipe/stages/sampler.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;

namespace {
SchedulerConfig sd_config(const std::string& spacing, const std::string& prediction = "epsilon") {
  SchedulerConfig c;  // as Stable Diffusion's scheduler_config.json
  c.steps_offset = 1;
  c.clip_sample = false;
  c.set_alpha_to_one = false;
  c.timestep_spacing = spacing;
  c.prediction_type = prediction;
  return c;
}
std::vector<double> ints(std::initializer_list<int> v) { return std::vector<double>(v.begin(), v.end()); }
}  // namespace

TEST(Sampler, TimestepSpacings) {
  EXPECT_EQ(Sampler::create(SamplerKind::DDIM, sd_config("leading"), 4)->timesteps(), ints({751, 501, 251, 1}));
  EXPECT_EQ(Sampler::create(SamplerKind::DDIM, sd_config("trailing"), 4)->timesteps(), ints({999, 749, 499, 249}));
  EXPECT_EQ(Sampler::create(SamplerKind::DDIM, sd_config("linspace"), 4)->timesteps(), ints({999, 666, 333, 0}));
  // PNDM (PLMS): one extra call, the second timestep repeated
  EXPECT_EQ(Sampler::create(SamplerKind::PNDM, sd_config("leading"), 4)->timesteps(), ints({751, 501, 501, 251, 1}));
  // DPM-Solver: linspace over steps + 1 points, the last dropped
  EXPECT_EQ(Sampler::create(SamplerKind::DPMSolverMultistep, sd_config("linspace"), 4)->timesteps(),
            ints({999, 749, 500, 250}));
  // trailing where 1000 / steps is not exact: np.arange's entry count, not a running difference (6 steps once gave a
  // 7th timestep, -1); the same for every sampler that spaces so
  const std::vector<double> six = ints({999, 832, 666, 499, 332, 166});
  for (SamplerKind k : {SamplerKind::DDIM, SamplerKind::Euler, SamplerKind::DPMSolverMultistep, SamplerKind::UniPC,
                        SamplerKind::DPMSolverSDE})
    EXPECT_EQ(Sampler::create(k, sd_config("trailing"), 6)->timesteps(), six) << sampler_kind_name(k);
  EXPECT_EQ(Sampler::create(SamplerKind::DDIM, sd_config("trailing"), 7)->timesteps().size(), 7u);
}

TEST(Sampler, EulerSigmasAndInitNoise) {
  auto s = Sampler::create(SamplerKind::Euler, sd_config("leading"), 10);
  const auto& sig = s->sigmas();
  ASSERT_EQ(sig.size(), 11u);
  EXPECT_EQ(sig.back(), 0.0);
  for (size_t i = 1; i < sig.size(); ++i) EXPECT_LT(sig[i], sig[i - 1]);
  EXPECT_NEAR(s->init_noise_sigma(), std::sqrt(sig[0] * sig[0] + 1), 1e-9);  // leading spacing
  auto lin = Sampler::create(SamplerKind::Euler, sd_config("linspace"), 10);
  EXPECT_NEAR(lin->init_noise_sigma(), lin->sigmas()[0], 1e-9);
}

TEST(Sampler, KarrasSigmasFollowTheRhoSchedule) {
  auto s = Sampler::create(SamplerKind::DPMSolverMultistep, sd_config("linspace"), 8, /*karras=*/true);
  const auto& sig = s->sigmas();
  ASSERT_EQ(sig.size(), 9u);
  const double smax = sig.front(), smin = sig[7], rho = 7;
  for (int i = 0; i < 8; ++i) {
    const double want = std::pow(std::pow(smax, 1 / rho) + i / 7.0 * (std::pow(smin, 1 / rho) - std::pow(smax, 1 / rho)), rho);
    EXPECT_NEAR(sig[i], want, want * 1e-6) << i;
  }
  EXPECT_GT(smax, 10.0);  // sqrt((1 - a_999) / a_999) of SD's schedule is about 14.6
  EXPECT_LT(smin, 0.05);
  const auto& ts = s->timesteps();
  for (size_t i = 1; i < ts.size(); ++i) EXPECT_LE(ts[i], ts[i - 1]);
}

// With the exact noise as the model output, deterministic samplers reproduce the forward process exactly:
// DDIM maps x_t = sqrt(a_t) x0 + sqrt(1-a_t) e to sqrt(a_prev) x0 + sqrt(1-a_prev) e.
TEST(Sampler, DdimIsExactForExactEpsilonAndV) {
  for (const std::string pred : {"epsilon", "v_prediction", "sample"}) {
    SchedulerConfig c = sd_config("leading", pred);
    auto s = Sampler::create(SamplerKind::DDIM, c, 10);
    const at::Tensor ac = alphas_cumprod(c).to(at::kDouble);
    at::Tensor x0 = at::randn({1, 4, 8, 8}, at::kDouble), e = at::randn({1, 4, 8, 8}, at::kDouble);
    const int t = static_cast<int>(s->timestep(0)), prev = static_cast<int>(s->timestep(1));
    const double a = ac[t].item<double>(), ap = ac[prev].item<double>();
    at::Tensor x = std::sqrt(a) * x0 + std::sqrt(1 - a) * e;
    at::Tensor out = pred == "epsilon" ? e : pred == "v_prediction" ? std::sqrt(a) * e - std::sqrt(1 - a) * x0 : x0;
    at::Tensor next = s->step(out.to(at::kFloat), 0, x.to(at::kFloat), nullptr);
    at::Tensor want = std::sqrt(ap) * x0 + std::sqrt(1 - ap) * e;
    EXPECT_LE(test::rel_err(next, want), 1e-5) << pred;
  }
}

TEST(Sampler, EulerAncestralUsesTheRequestsNoise) {
  auto run = [](int seed_offset) {
    auto s = Sampler::create(SamplerKind::EulerAncestral, sd_config("leading"), 5);
    at::Tensor x = at::ones({1, 4, 4, 4}) * s->init_noise_sigma();
    StepNoise noise = [&](int step, const at::Tensor& like) {
      return at::full(like.sizes(), 0.1 * (step + 1 + seed_offset));
    };
    for (int i = 0; i < s->num_calls(); ++i) x = s->step(at::zeros_like(x), i, x, noise);
    return x;
  };
  EXPECT_TRUE(at::equal(run(0), run(0)));
  EXPECT_FALSE(at::allclose(run(0), run(1)));
  auto s = Sampler::create(SamplerKind::EulerAncestral, sd_config("leading"), 5);
  EXPECT_THROW(s->step(at::zeros({1, 1}), 0, at::zeros({1, 1}), nullptr), Error);
}

TEST(Sampler, NamesAndConfigErrors) {
  bool karras = false;
  EXPECT_EQ(parse_sampler_name("dpmpp_2m_karras", &karras), SamplerKind::DPMSolverMultistep);
  EXPECT_TRUE(karras);
  try {
    parse_sampler_name("dpm_fast", &karras);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown sampler 'dpm_fast' (valid: ddim"), std::string::npos);
  }
  EXPECT_EQ(parse_sampler_name("euler_karras", &karras), SamplerKind::Euler);
  EXPECT_TRUE(karras);
  const std::string dir = test::scratch_dir("sched");
  // a class no sampler here implements loads (a request may choose its sampler); the folder's default refuses
  write_json(dir + "/a.json", {{"_class_name", "DEISMultistepScheduler"}});
  write_json(dir + "/b.json", {{"_class_name", "DDIMScheduler"}, {"thresholding", true}});
  write_json(dir + "/c.json", {{"_class_name", "DDIMScheduler"}, {"prediction_type", "flow"}});
  auto err = [](const std::string& p) {
    try {
      SchedulerConfig::load(p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(err(dir + "/a.json"), "");
  EXPECT_NE(test::error_of([] { (void)sampler_kind_of_class("DEISMultistepScheduler"); })
                .find("'DEISMultistepScheduler' is not supported"),
            std::string::npos);
  EXPECT_NE(err(dir + "/b.json").find("b.json: key 'thresholding'"), std::string::npos);
  EXPECT_NE(err(dir + "/c.json").find("c.json: key 'prediction_type': unsupported 'flow'"), std::string::npos);
  EXPECT_THROW(Sampler::create(SamplerKind::DDIM, SchedulerConfig{}, 0), Error);
}

// Keys a folder's scheduler_config.json leaves out take the defaults of the class that runs, as diffusers'
// DDIMScheduler.from_config(another class's config) does: DDIM clips the predicted x0 to [-1, 1] and ends at
// alpha = 1 unless the file says otherwise (SDXL's Euler configs saved by recent diffusers carry neither key).
TEST(Sampler, MissingKeysTakeTheRunningClassDefaults) {
  const std::string dir = test::scratch_dir("sched-defaults");
  const nlohmann::json euler = {{"_class_name", "EulerDiscreteScheduler"}, {"steps_offset", 1},
                                {"timestep_spacing", "leading"}};
  write_json(dir + "/bare.json", euler);
  nlohmann::json expl = euler;
  expl["clip_sample"] = false;
  expl["set_alpha_to_one"] = false;
  write_json(dir + "/explicit.json", expl);
  const SchedulerConfig bare = SchedulerConfig::load(dir + "/bare.json"), given = SchedulerConfig::load(dir + "/explicit.json");
  EXPECT_FALSE(bare.clip_sample.has_value());
  EXPECT_EQ(given.clip_sample, std::optional<bool>(false));
  const at::Tensor ac = alphas_cumprod(bare);
  // one DDIM step of 2 from x = 0 with a large predicted noise: x0 = -sqrt(1 - a) e / sqrt(a) is far below -1
  const at::Tensor x = at::zeros({1, 1, 2, 2}), e = at::full({1, 1, 2, 2}, 3.0);
  auto ddim = [&](const SchedulerConfig& c, int i) { return Sampler::create(SamplerKind::DDIM, c, 2)->step(e, i, x, {}); };
  const double a = ac[501].item<double>(), a_prev = ac[1].item<double>();
  const double x0 = -std::sqrt(1 - a) * 3.0 / std::sqrt(a);
  ASSERT_LT(x0, -1.0);
  EXPECT_NEAR(ddim(bare, 0)[0][0][0][0].item<double>(), -std::sqrt(a_prev) + std::sqrt(1 - a_prev) * 3.0, 1e-5);
  EXPECT_NEAR(ddim(given, 0)[0][0][0][0].item<double>(), std::sqrt(a_prev) * x0 + std::sqrt(1 - a_prev) * 3.0, 1e-4);
  // the last step (timestep 1, previous -249): set_alpha_to_one's default lands exactly on the clipped x0
  const double a1 = ac[1].item<double>(), x0_last = -std::sqrt(1 - a1) * 3.0 / std::sqrt(a1);
  EXPECT_NEAR(ddim(bare, 1)[0][0][0][0].item<double>(), std::max(-1.0, x0_last), 1e-5);
  const double a0 = ac[0].item<double>();
  EXPECT_NEAR(ddim(given, 1)[0][0][0][0].item<double>(), std::sqrt(a0) * x0_last + std::sqrt(1 - a0) * 3.0, 1e-4);
}

// LCMScheduler: `steps` evenly spaced entries of the distillation's 50-step schedule (values from diffusers 0.42's
// set_timesteps); each step is c_out x0 + c_skip x, then (not at the last step) noised to the next timestep with the
// request's noise. At most original_inference_steps steps.
TEST(Sampler, LcmScheduleAndStep) {
  SchedulerConfig c = sd_config("leading");
  c.class_name = "LCMScheduler";
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 4)->timesteps(), ints({999, 759, 499, 259}));
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 6)->timesteps(), ints({999, 839, 679, 499, 339, 179}));
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 1)->timesteps(), ints({999}));
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 7)->timesteps(), ints({999, 859, 719, 579, 439, 299, 159}));
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 50)->timesteps().back(), 19);
  // LatentConsistencyModelImg2ImgPipeline's schedule: every step within the strength's share
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 4, false, 0.5)->timesteps(), ints({499, 379, 259, 139}));
  EXPECT_EQ(test::error_of([&] { Sampler::create(SamplerKind::LCM, c, 4, false, 0.05); }),
            "strength: 0.05 leaves int(50 x 0.05) = 2 of the LCM schedule's timesteps (original_inference_steps 50), "
            "fewer than the 4 steps; raise strength or lower steps");
  EXPECT_THROW(Sampler::create(SamplerKind::DDIM, c, 4, false, 0.5), Error);
  c.original_inference_steps = 8;  // k = 125
  EXPECT_EQ(Sampler::create(SamplerKind::LCM, c, 3)->timesteps(), ints({999, 749, 374}));
  EXPECT_EQ(test::error_of([&] { Sampler::create(SamplerKind::LCM, c, 9); }),
            "steps: the LCM sampler runs at most original_inference_steps (8, the distillation's schedule) steps, got 9");
  c.original_inference_steps = 50;
  auto s = Sampler::create(SamplerKind::LCM, c, 2);
  const at::Tensor ac = alphas_cumprod(c);
  const at::Tensor x = at::full({1, 1, 2, 2}, 0.5), e = at::full({1, 1, 2, 2}, -0.25);
  int drawn = 0;
  StepNoise noise = [&](int step, const at::Tensor& like) {
    ++drawn;
    return at::full(like.sizes(), 0.1 * (step + 1));
  };
  auto expect = [&](int64_t t, double xv) {  // c_out x0 + c_skip x
    const double a = ac[t].item<double>(), st = t * 10.0;
    const double x0 = (xv - std::sqrt(1 - a) * -0.25) / std::sqrt(a);
    return st / std::sqrt(st * st + 0.25) * x0 + 0.25 / (st * st + 0.25) * xv;
  };
  const double d0 = expect(999, 0.5), a1 = ac[499].item<double>();
  const at::Tensor x1 = s->step(e, 0, x, noise);
  EXPECT_NEAR(x1[0][0][0][0].item<double>(), std::sqrt(a1) * d0 + std::sqrt(1 - a1) * 0.1, 1e-5);
  EXPECT_EQ(drawn, 1);
  const at::Tensor x2 = s->step(e, 1, x1, noise);  // the last step: the estimate itself, no noise
  EXPECT_NEAR(x2[0][0][0][0].item<double>(), expect(499, x1[0][0][0][0].item<double>()), 1e-5);
  EXPECT_EQ(drawn, 1);
  bool karras = true;
  EXPECT_EQ(parse_sampler_name("lcm", &karras), SamplerKind::LCM);
  EXPECT_FALSE(karras);
  EXPECT_EQ(sampler_kind_of_class("LCMScheduler"), SamplerKind::LCM);
  const std::string dir = test::scratch_dir("sched-lcm");
  write_json(dir + "/bad.json", {{"_class_name", "LCMScheduler"}, {"original_inference_steps", 2000}});
  EXPECT_NE(test::error_of([&] { SchedulerConfig::load(dir + "/bad.json"); })
                .find("bad.json: key 'original_inference_steps': must be at most num_train_timesteps (1000)"),
            std::string::npos);
}

// DDPMScheduler against diffusers, step by step on recorded trajectories (tests/stages/make_ddpm_golden.py; test.sh
// makes the folder under build/golden): DeepFloyd IF's learned_range variance with Imagen's dynamic thresholding,
// a learned variance with sample prediction, fixed_large with v prediction and trailing spacing, thresholding with
// a fixed variance. $DIFFPIPE_GOLDEN_DDPM, default the sibling tiny-ddpm of the tiny-sd folder; absent, skipped.
TEST(GoldenDdpm, EveryVarianceTypeAndThresholding) {
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_DDPM", "tiny-ddpm", "golden.json", "make_ddpm_golden.py");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  for (const auto& c : meta.at("cases")) {
    const std::string n = c.at("name").get<std::string>();
    const SchedulerConfig cfg = SchedulerConfig::load_ddpm(dir + "/" + n + "/scheduler_config.json");
    const DdpmSampler s(cfg, c.at("steps").get<int>());
    const at::Tensor ts = g.at(n + ".timesteps");
    ASSERT_EQ(s.num_steps(), ts.size(0)) << n;
    double worst = 0;
    for (int k = 0; k < s.num_steps(); ++k) {
      ASSERT_EQ(s.timestep(k), ts[k].item<int64_t>()) << n << " step " << k;
      const std::string p = n + "." + std::to_string(k) + ".";
      const at::Tensor noise = g.count(p + "noise") ? g.at(p + "noise") : at::Tensor();
      EXPECT_EQ(noise.defined(), s.adds_noise(k)) << n << " step " << k << ": noise drawn exactly when t > 0";
      at::Tensor x0;
      const at::Tensor prev = s.step(g.at(p + "model_output"), k, g.at(p + "sample"), noise, &x0);
      worst = std::max({worst, test::rel_err(prev, g.at(p + "prev_sample")), test::rel_err(x0, g.at(p + "x0"))});
    }
    std::printf("[golden-ddpm] %s: %d steps, worst rel err %.2e\n", n.c_str(), s.num_steps(), worst);
    EXPECT_LE(worst, 1e-5) << n;
  }
  // a learned variance needs the model's extra channels; the refusal names both shapes
  const SchedulerConfig cfg = SchedulerConfig::load_ddpm(dir + "/if_learned_range/scheduler_config.json");
  const DdpmSampler s(cfg, 4);
  EXPECT_NE(test::error_of([&] { (void)s.step(at::zeros({1, 3, 4, 4}), 0, at::zeros({1, 3, 4, 4}), at::zeros({1, 3, 4, 4})); })
                .find("needs a model output of twice the sample's 3 channels"),
            std::string::npos);
}

// UniPCMultistepScheduler, DPM-Solver++ (its sigma_min end, its SDE form with recorded noise), Heun and LMS against
// diffusers, step by step on recorded trajectories
// (tests/stages/make_sampler_golden.py; test.sh makes the folder under build/golden): bh2 and bh1, orders 1 to 3,
// epsilon, v and sample prediction, linspace, leading and trailing spacing, Karras sigmas with a sigma_min end,
// disable_corrector, a run begun at step 3 (image-to-image); then StableDiffusionPipeline with UniPC on tiny-sd.
// $DIFFPIPE_GOLDEN_SAMPLERS, default the sibling tiny-samplers of the tiny-sd folder; absent, skipped.
TEST(GoldenSamplers, UniPcAndDpmSolverSteps) {
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SAMPLERS", "tiny-samplers", "golden.json", "make_sampler_golden.py");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  for (const auto& c : meta.at("cases")) {
    const std::string n = c.at("name").get<std::string>();
    const SchedulerConfig cfg = SchedulerConfig::load(dir + "/" + n + "/scheduler_config.json");
    auto s = Sampler::create(sampler_kind_of_class(cfg.class_name, cfg.algorithm_type), cfg, c.at("steps").get<int>());
    EXPECT_EQ(s->kind() == SamplerKind::DPMSolverSDE, cfg.algorithm_type == "sde-dpmsolver++") << n;
    const at::Tensor ts = g.at(n + ".timesteps").to(at::kDouble), sig = g.at(n + ".sigmas").to(at::kDouble);
    // exact, but KDPM2's interpolated timesteps (diffusers' _sigma_to_t in float32): within 1e-3
    const double ttol = s->kind() == SamplerKind::KDPM2 ? 1e-3 : 0.0;
    ASSERT_EQ(s->timesteps().size(), static_cast<size_t>(ts.numel())) << n;
    for (int64_t k = 0; k < ts.numel(); ++k) EXPECT_NEAR(s->timesteps()[k], ts[k].item<double>(), ttol) << n << " " << k;
    ASSERT_EQ(s->sigmas().size(), static_cast<size_t>(sig.numel())) << n;
    for (int64_t k = 0; k < sig.numel(); ++k) EXPECT_NEAR(s->sigmas()[k], sig[k].item<double>(), 1e-6 * (1 + sig[k].item<double>())) << n;
    const int begin = c.at("begin").get<int>();
    double worst = 0;
    for (int i = begin; i < s->num_calls(); ++i) {
      const std::string p = n + "." + std::to_string(i - begin) + ".";
      StepNoise noise;  // DPM++ 2M SDE: the recorded noise of this step
      if (g.count(p + "noise")) noise = [&g, p](int, const at::Tensor&) { return g.at(p + "noise"); };
      const at::Tensor prev = s->step(g.at(p + "model_output"), i, g.at(p + "sample"), noise);
      worst = std::max(worst, test::rel_err(prev, g.at(p + "prev_sample")));
    }
    std::printf("[golden-samplers] %s: %d steps from %d, worst rel err %.2e\n", n.c_str(), s->num_calls(), begin, worst);
    EXPECT_LE(worst, 1e-5) << n;
  }
  bool karras = false;
  EXPECT_EQ(parse_sampler_name("unipc_karras", &karras), SamplerKind::UniPC);
  EXPECT_TRUE(karras);
  const std::string sd = test::scratch_dir("sched-unipc");
  write_json(sd + "/x0.json", {{"_class_name", "UniPCMultistepScheduler"}, {"predict_x0", false}});
  EXPECT_NE(test::error_of([&] { SchedulerConfig::load(sd + "/x0.json"); }).find("x0.json: key 'predict_x0'"),
            std::string::npos);
}

namespace {
// The states of golden.json's pipeline run `key` (its prompts, steps, guidance and sampler) from the reference's
// latents; empty (skipped) when the reference predates it.
std::vector<DenoiseState> pipeline_run_states(const std::string& dir, const SdModel& model, const std::string& key,
                                              const std::map<std::string, at::Tensor>& g) {
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains(key)) return {};
  std::vector<GenerationParams> params;
  for (const auto& pr : meta.at(key).at("prompts")) {
    GenerationParams p;
    p.prompt = pr.get<std::string>();
    p.steps = meta.at(key).at("steps").get<int>();
    p.guidance = meta.at(key).at("guidance").get<double>();
    p.sampler = meta.at(key).at("sampler").get<std::string>();
    p.guidance_rescale = meta.at(key).value("guidance_rescale", 0.0);
    params.push_back(p);
  }
  return test::latent_states(model, params, g.at("pipeline.latents"));
}
}  // namespace

// DPM++ 2M SDE Karras and DPM++ 3M SDE Karras through StableDiffusionPipeline (DPMSolverMultistepScheduler,
// sde-dpmsolver++, solver_order 2 / 3), each step's noise the reference's draw for that request's row; without those
// draws (the request's own noise) the image differs.
TEST(GoldenSamplers, DpmSdePipelinesMatchDiffusers) {
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SAMPLERS", "tiny-samplers", "golden.json", "make_sampler_golden.py");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  for (const auto& [key, kind] : {std::pair<std::string, SamplerKind>{"pipeline_sde", SamplerKind::DPMSolverSDE},
                                  {"pipeline_3m", SamplerKind::DPMSolver3MSDE}}) {
    std::vector<DenoiseState> ds = pipeline_run_states(dir, model, key, g);
    if (ds.empty()) GTEST_SKIP() << dir << " predates " << key << " (remake it)";
    std::vector<DenoiseState> own = pipeline_run_states(dir, model, key, g);
    for (size_t i = 0; i < ds.size(); ++i) {
      EXPECT_EQ(ds[i].sampler->kind(), kind) << key;
      const auto row = static_cast<int64_t>(i);
      const std::string draws = key + ".draws.";
      ds[i].step_noise = [&g, row, draws](int step, const at::Tensor& like) {
        return g.at(draws + std::to_string(step))[row].unsqueeze(0).to(like.device(), like.scalar_type());
      };
    }
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(key + ".images"), "[golden-samplers] " + key)) << key;
    const at::Tensor ref = g.at(key + ".images").permute({0, 2, 3, 1}).mul(255).round().to(at::kInt);
    EXPECT_GT((test::images_of(model, own).to(at::kInt) - ref).abs().max().item<int>(), 1) << key;  // the noise matters
  }
  bool karras = false;
  EXPECT_EQ(parse_sampler_name("dpmpp_2m_sde", &karras), SamplerKind::DPMSolverSDE);
  EXPECT_FALSE(karras);
  EXPECT_EQ(parse_sampler_name("dpmpp_2m_sde_karras", &karras), SamplerKind::DPMSolverSDE);
  EXPECT_TRUE(karras);
  EXPECT_EQ(parse_sampler_name("dpmpp_3m_sde_karras", &karras), SamplerKind::DPMSolver3MSDE);
  EXPECT_TRUE(karras);
  EXPECT_EQ(sampler_kind_of_class("DPMSolverMultistepScheduler", "sde-dpmsolver++"), SamplerKind::DPMSolverSDE);
}

// guidance_rescale 0.7 (diffusers' rescale_noise_cfg after the guidance) with the folder's DDIM; 0 gives another image;
// requests that cannot use it are refused by name.
TEST(GoldenSamplers, GuidanceRescaleMatchesDiffusers) {
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SAMPLERS", "tiny-samplers", "golden.json", "make_sampler_golden.py");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  std::vector<DenoiseState> ds = pipeline_run_states(dir, model, "pipeline_rescale", g);
  if (ds.empty()) GTEST_SKIP() << dir << " predates guidance_rescale (remake it)";
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("pipeline_rescale.images"), "[golden-samplers] guidance_rescale"));
  std::vector<DenoiseState> plain = pipeline_run_states(dir, model, "pipeline_rescale", g);
  for (auto& s : plain) s.guidance_rescale = 0;
  const at::Tensor ref = g.at("pipeline_rescale.images").permute({0, 2, 3, 1}).mul(255).round().to(at::kInt);
  EXPECT_GT((test::images_of(model, plain).to(at::kInt) - ref).abs().max().item<int>(), 1);
  GenerationParams q;
  q.prompt = "x";
  q.guidance_rescale = 1.5;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, q); }).find("guidance_rescale: must be in [0, 1], got 1.5"),
            std::string::npos);
  q.guidance_rescale = 0.5;
  q.guidance = 1.0;
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, q); }).find("guidance_rescale: only a guided request"),
            std::string::npos);
}


// Heun and KDPM2 (HeunDiscreteScheduler, KDPM2DiscreteScheduler from the folder's config: 5 steps, 9 UNet calls) and
// LMS (LMSDiscreteScheduler, 6 steps) through StableDiffusionPipeline.
TEST(GoldenSamplers, HeunAndLmsPipelinesMatchDiffusers) {
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SAMPLERS", "tiny-samplers", "golden.json", "make_sampler_golden.py");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  for (const auto& [key, kind] : {std::pair<std::string, SamplerKind>{"pipeline_heun", SamplerKind::Heun},
                                  {"pipeline_kdpm2", SamplerKind::KDPM2}, {"pipeline_lms", SamplerKind::LMS}}) {
    std::vector<DenoiseState> ds = pipeline_run_states(dir, model, key, g);
    if (ds.empty()) GTEST_SKIP() << dir << " predates " << key << " (remake it)";
    EXPECT_EQ(ds[0].sampler->kind(), kind);
    EXPECT_EQ(ds[0].total_steps(), kind == SamplerKind::LMS ? 6 : 9);
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(key + ".images"), "[golden-samplers] " + key));
  }
  bool karras = false;
  EXPECT_EQ(parse_sampler_name("heun_karras", &karras), SamplerKind::Heun);
  EXPECT_TRUE(karras);
  EXPECT_EQ(parse_sampler_name("lms_karras", &karras), SamplerKind::LMS);
  EXPECT_TRUE(karras);
  EXPECT_EQ(sampler_kind_of_class("HeunDiscreteScheduler"), SamplerKind::Heun);
  EXPECT_EQ(sampler_kind_of_class("LMSDiscreteScheduler"), SamplerKind::LMS);
  EXPECT_EQ(sampler_kind_of_class("KDPM2DiscreteScheduler"), SamplerKind::KDPM2);
  EXPECT_EQ(parse_sampler_name("kdpm2_karras", &karras), SamplerKind::KDPM2);
  EXPECT_TRUE(karras);
  EXPECT_EQ(Sampler::create(SamplerKind::Heun, model.scheduler, 5)->order(), 2);
}

TEST(GoldenSamplers, UniPcPipelineMatchesDiffusers) {
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SAMPLERS", "tiny-samplers", "golden.json", "make_sampler_golden.py");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto run = JsonConfig::load(dir + "/golden.json").json().at("pipeline");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  std::vector<GenerationParams> params;
  for (const auto& pr : run.at("prompts")) {
    GenerationParams p;
    p.prompt = pr.get<std::string>();
    p.steps = run.at("steps").get<int>();
    p.guidance = run.at("guidance").get<double>();
    p.sampler = "unipc";  // UniPCMultistepScheduler.from_config(the folder's DDIM config)
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::latent_states(model, params, g.at("pipeline.latents"));
  EXPECT_EQ(ds[0].sampler->kind(), SamplerKind::UniPC);
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("pipeline.images"), "[golden-samplers] unipc pipeline"));
}
