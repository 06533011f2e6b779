// Kandinsky 2.2 (the DALL-E 2 design in its open form: a diffusion prior from text to a CLIP image embedding, a
// decoder UNet conditioned on that embedding alone, a MoVQ decoder) against diffusers, module by module and through
// the pipeline's stages. The reference folder is made by tests/stages/make_kandinsky_golden.py (scripts/test.sh
// makes it under build/golden): $DIFFPIPE_GOLDEN_KANDINSKY, default the sibling tiny-kandinsky of the tiny-sd
// folder; absent, the tests skip. Tolerances: modules max|a-b|/max|b| <= 1e-4, pipelines as the golden README's.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/unclip.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_KANDINSKY(dir) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_KANDINSKY", "tiny-kandinsky", "model/unet", "make_kandinsky_golden.py")
}  // namespace

// MoVQ (VQModel with norm_type "spatial"): every decoder norm is a SpatialNorm conditioned on the latents themselves
// (resized to each resolution), attention in the lowest-resolution up block; decoded without quantisation. Its
// encoder (attention in the last down block) gives the latents as they are.
TEST(GoldenKandinsky, MovqDecoderAndEncoder) {
  DP_REQUIRE_KANDINSKY(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  const auto movq = AutoencoderKL::load(dir + "/model/movq", spec, /*with_encoder=*/false);
  ASSERT_TRUE(movq->config().vq && movq->config().spatial_norm);
  const at::Tensor lat = test::on_device(g.at("movq.latents"), spec);
  const double e = rel_err(movq->decode(lat), g.at("movq.decoded"));
  std::printf("[golden-kandinsky] MoVQ decoder: %.2e\n", e);
  EXPECT_LE(e, test::module_tol(spec));
  // the pipelines decode the latents as they are (no scaling factor)
  EXPECT_TRUE(at::equal(movq->decode_scaled(lat), movq->decode(lat)));
  // its encoder (image-to-image): VQModel.encode's latents, not quantised, no sampling
  const auto both = AutoencoderKL::load(dir + "/model/movq", spec, /*with_encoder=*/true);
  const GaussianLatent enc = both->encode(test::on_device(g.at("movq.image"), spec));
  const double ee = rel_err(enc.mean, g.at("movq.encoded"));
  std::printf("[golden-kandinsky] MoVQ encoder: %.2e\n", ee);
  EXPECT_LE(ee, test::module_tol(spec));
  EXPECT_FALSE(enc.logvar.defined());
}

// The decoder's UNet: the image embedding becomes 10 cross-attention tokens (encoder_hid_proj, image_proj) and joins
// the time embedding (add_embedding, addition_embed_type "image"); scale-shift resnets, added-KV attention.
TEST(GoldenKandinsky, ImageConditionedUNet) {
  DP_REQUIRE_KANDINSKY(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  auto in = [&](const char* k) { return test::on_device(g.at(k), spec); };
  const auto unet = UNet2DConditionModel::load(dir + "/model/unet", spec);
  ASSERT_TRUE(unet->config().image_conditioned());
  const at::Tensor out = unet->forward(in("unet.sample"), g.at("unet.timesteps"), in("unet.image_embeds"));
  const double e = rel_err(out, g.at("unet.out"));
  std::printf("[golden-kandinsky] UNet (image-conditioned): %.2e\n", e);
  EXPECT_LE(e, test::module_tol(spec));
  // text states where an image embedding belongs are refused by shape
  EXPECT_NE(test::error_of([&] {
              (void)unet->forward(in("unet.sample"), g.at("unet.timesteps"), at::zeros({3, 77, 32}, in("unet.sample").options()));
            }).find("conditioned on an image embedding"),
            std::string::npos);
}

// UnCLIPScheduler's timesteps (Karlo's: evenly spaced from 999 to 0, rounded) and its refusal of a single step.
TEST(GoldenKandinsky, UnclipSchedulerTimesteps) {
  DP_REQUIRE_KANDINSKY(dir);
  const SchedulerConfig c = SchedulerConfig::load_ddpm(dir + "/model/prior_scheduler/scheduler_config.json");
  const DdpmSampler s(c, 6);
  ASSERT_TRUE(s.unclip());
  std::vector<int64_t> ts;
  for (int i = 0; i < s.num_steps(); ++i) ts.push_back(s.timestep(i));
  EXPECT_EQ(ts, (std::vector<int64_t>{999, 799, 599, 400, 200, 0}));  // round(i x 999 / 5), i = 5 .. 0
  EXPECT_FALSE(s.adds_noise(5));
  EXPECT_NE(test::error_of([&] { DdpmSampler one(c, 1); }).find("at least 2"), std::string::npos);
}

// The whole KandinskyV22PriorPipeline + KandinskyV22Pipeline run of each golden.json run (as the combined pipeline
// calls them, one generator) through diffpipe's prior and denoise stages and MoVQ, fed the reference's draws in its
// order: the prior's initial latents (the negative prompts' rows after the prompts'), its variance noise per step
// but the last, the decoder's initial latents, each DDPM step's noise. Runs: guided with the zero image's embedding
// as the negative, a negative prompt (its own prior run; the prompts' unconditional rows read it), unguided, a
// variation of an image (the prior's image encoder on the image prompt; the zero image's embedding as the negative),
// and image-to-image (the prompts, from a starting image's MoVQ latents noised at strength 0.6).
namespace {
// Each golden.json run through diffpipe's prior and denoise stages and MoVQ on `model`, against the reference.
void expect_the_reference_runs(const std::string& dir, const SdModel& model) {
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = model.spec;
  ASSERT_TRUE(model.kandinsky && model.unclip && model.unclip->prior && model.vae && !model.img2img());
  const PriorRunner prior(*model.unclip, spec);
  for (const auto& run : meta.at("runs")) {
    const std::string n = run.at("name").get<std::string>();
    const bool variation = run.contains("image");  // one image, no prompt
    const bool img2img = run.contains("start");     // the prompts, from a starting image
    const int64_t B = variation ? 1 : static_cast<int64_t>(meta.at("prompts").size());
    const std::string pre = "pipeline." + n + ".draws.";
    auto draw = [&](int k) { return g.at(pre + std::to_string(k)); };
    const int prior_steps = run.at("prior_steps").get<int>();
    const bool negative = !run.at("negative_prompt").is_null();
    const int steps = run.at("steps").get<int>();
    const int calls = img2img ? static_cast<int>(steps * run.at("strength").get<double>()) : steps;
    ASSERT_EQ(run.at("draws").get<int>(), prior_steps + 1 + calls) << n;
    std::vector<GenerationParams> params;
    std::vector<PriorState> states;
    for (int64_t i = 0; i < B; ++i) {
      GenerationParams p;
      if (variation) p.image_prompt = dir + "/" + run.at("image").get<std::string>();
      else p.prompt = meta.at("prompts")[static_cast<size_t>(i)].get<std::string>();
      p.negative_prompt = negative ? run.at("negative_prompt").get<std::string>() : "";
      p.prior_steps = prior_steps;
      p.prior_guidance = run.at("prior_guidance").get<double>();
      p.steps = run.at("steps").get<int>();
      p.guidance = run.at("guidance").get<double>();
      if (img2img) {  // the output has the image's size
        p.image_prompt = dir + "/" + run.at("start").get<std::string>();
        p.strength = run.at("strength").get<double>();
      } else {
        p.width = p.height = run.at("size").get<int>();
      }
      params.push_back(p);
      // stream -> this request's row of the reference's draw (the negative run's rows follow the prompts')
      auto noise = [&, i, prior_steps](uint64_t stream, const at::Tensor&) -> at::Tensor {
        const bool neg = stream >= kPriorNegativeLatentStream;
        const uint64_t k = stream - (neg ? kPriorNegativeLatentStream : kPriorLatentStream);
        EXPECT_LE(k, static_cast<uint64_t>(prior_steps - 1)) << "the last prior step must not draw noise";
        return draw(static_cast<int>(k))[neg ? B + i : i];
      };
      states.push_back(prior.make_state(p, static_cast<uint64_t>(i), noise));
    }
    std::vector<PriorState*> batch;
    for (auto& s : states) batch.push_back(&s);
    while (!states[0].done()) prior.step(batch);
    std::vector<DenoiseState> ds;
    for (int64_t i = 0; i < B; ++i) {
      const at::Tensor e = prior.image_embeds(states[static_cast<size_t>(i)]);
      const double ee = rel_err(e[0], g.at("pipeline." + n + ".image_embeds")[i]);
      const double en = rel_err(e[1], g.at("pipeline." + n + ".negative_image_embeds")[i]);
      std::printf("[golden-kandinsky] %s, request %lld: image embedding %.2e, negative %.2e\n", n.c_str(),
                  static_cast<long long>(i), ee, en);
      // a prior run in 16 bits: module-level rounding through its steps (bfloat16: 1-3 %)
      const double tol = spec.dtype == at::kFloat ? 1e-3 : 6e-2;
      EXPECT_LE(ee, tol) << n;
      EXPECT_LE(en, tol) << n;
      Embeddings emb;
      emb.cond = e[0].to(spec.device, spec.dtype);
      emb.uncond = e[1].to(spec.device, spec.dtype);
      const GenerationParams& p = params[static_cast<size_t>(i)];
      if (img2img) emb.image_latents = img2img_latents(model, p, resolve_params(model, p).image);
      // the decoder's first draw: its initial latents, or image-to-image's noise on the image's latents
      ds.push_back(make_denoise_state(model, p, emb, static_cast<uint64_t>(i), draw(prior_steps)[i]));
      const int begin = ds.back().begin;
      ds.back().step_noise = [&g, pre, i, prior_steps, begin](int step, const at::Tensor& like) {
        return g.at(pre + std::to_string(prior_steps + 1 + step - begin))[i].reshape(like.sizes()).to(like.device());
      };
    }
    ASSERT_EQ(ds[0].sampler->kind(), SamplerKind::DDPM);
    const std::vector<at::Tensor> lat = test::denoise_to_end(model, ds);
    const double e = rel_err(at::stack(lat), g.at("pipeline." + n + ".final_latents"));
    const at::Tensor img = DecodeStage(model).run_uint8(lat);
    const at::Tensor d = (img.to(at::kInt) - g.at("pipeline." + n + ".image_uint8").to(at::kInt)).abs();
    const double within = d.le(1).to(at::kDouble).mean().item<double>();
    std::printf("[golden-kandinsky] whole pipeline (%s): final latents %.2e, 8-bit values within +-1: %.4f (max %d)\n",
                n.c_str(), e, within, d.max().item<int>());
    // 16 bits: the random tiny decoder amplifies rounding as DeepFloyd IF's does (GoldenIf): finiteness only there
    EXPECT_TRUE(at::isfinite(at::stack(lat)).all().item<bool>()) << n;
    if (spec.dtype == at::kFloat) {
      EXPECT_LE(e, 1e-3) << n;
      EXPECT_GE(within, 0.99) << n;
    }
  }
}
}  // namespace

TEST(GoldenKandinsky, WholePipelineWithTheReferenceDraws) {
  DP_REQUIRE_KANDINSKY(dir);
  expect_the_reference_runs(dir, SdModel::load(dir + "/model", test::device_spec()));
}

// The hub's layout: a KandinskyV22Pipeline decoder folder and its prior (--prior, a KandinskyV22PriorPipeline
// folder) give the combined folder's runs; the decoder alone is refused naming --prior, a prior beside a folder
// that has its own or beside another kind of model is checked.
TEST(GoldenKandinsky, DecoderFolderWithItsPriorFolder) {
  DP_REQUIRE_KANDINSKY(dir);
  ModelAddons with;
  with.prior = dir + "/prior";
  expect_the_reference_runs(dir, SdModel::load(dir + "/decoder", test::device_spec(), kAllComponents, with));
  EXPECT_NE(test::error_of([&] { (void)SdModel::load(dir + "/decoder", test::device_spec(), 0u); }).find("--prior DIR"),
            std::string::npos);
  ModelAddons wrong;
  wrong.prior = dir + "/decoder";  // not a prior folder
  EXPECT_NE(test::error_of([&] { (void)SdModel::load(dir + "/decoder", test::device_spec(), 0u, wrong); })
                .find("is not KandinskyV22PriorPipeline"),
            std::string::npos);
  EXPECT_EQ(SdModel::prompt_tokenizer_dir(dir + "/decoder", with.prior), dir + "/prior/tokenizer");
}

// What a Kandinsky folder refuses, by name: a negative prompt beside a variation's image, an image off the MoVQ grid
// or a mask (image-to-image), clip_skip, one prior step, a size off the MoVQ grid.
TEST(GoldenKandinsky, RequestsCheckedByName) {
  DP_REQUIRE_KANDINSKY(dir);
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), 0u);
  EXPECT_EQ(model.size_multiple(), 16);  // MoVQ factor 4, squared (diffusers' downscale_height_and_width)
  auto error = [&](auto&& edit) {
    GenerationParams p;
    p.prompt = "a red circle";
    p.width = p.height = 32;
    edit(p);
    return test::error_of([&] { (void)resolve_params(model, p); });
  };
  EXPECT_EQ(error([](GenerationParams&) {}), "");
  // an image prompt without a prompt is a variation (no negative prompt beside it), with one image-to-image's start
  EXPECT_NE(error([&](GenerationParams& p) {
              p.prompt = "";
              p.negative_prompt = "blurry";
              p.image_prompt = dir + "/input.png";
            }).find("negative_prompt: a Kandinsky 2.2 image variation"),
            std::string::npos);
  EXPECT_NE(error([&](GenerationParams& p) {
              p.image_prompt = dir + "/input.png";
              p.width = p.height = 0;
            }).find("multiples of 16"),
            std::string::npos);  // 48x40: image-to-image keeps the image's size, off the MoVQ grid
  EXPECT_EQ(error([&](GenerationParams& p) {
              p.image_prompt = dir + "/input32.png";
              p.width = p.height = 0;
            }),
            "");
  EXPECT_NE(error([&](GenerationParams& p) {
              p.image_prompt = dir + "/input32.png";
              p.width = p.height = 0;
              p.mask = dir + "/input32.png";
            }).find("mask: inpainting needs a Kandinsky 2.2 inpainting folder"),
            std::string::npos);
  EXPECT_EQ(error([&](GenerationParams& p) {
              p.prompt = "";
              p.image_prompt = dir + "/input.png";
            }),
            "");
  EXPECT_NE(error([](GenerationParams& p) { p.clip_skip = 1; }).find("clip_skip"), std::string::npos);
  EXPECT_NE(error([](GenerationParams& p) { p.prior_steps = 1; }).find("prior_steps: must be at least 2"),
            std::string::npos);
  EXPECT_NE(error([](GenerationParams& p) { p.width = 40; }).find("width: 40 is not a positive multiple of 16"),
            std::string::npos);
}
