// The DALL-E-2-style (Stable unCLIP) reference folder, module by module as diffpipe implements them (#13).
// The folder comes from $DIFFPIPE_GOLDEN_UNCLIP (default ../shared/golden/tiny-unclip); absent, the tests skip.
// Tolerance from the golden README: modules max|a-b|/max|b| <= 1e-4.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/clip_vision.h"
#include "diffpipe/stages/prior.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/unclip.h"
#include "diffpipe/stages/unet.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
std::string unclip_dir() {
  const char* env = std::getenv("DIFFPIPE_GOLDEN_UNCLIP");
  if (env && *env) return env;
  const std::string sd = test::golden_dir();  // .../tiny-sd: its sibling
  return sd.substr(0, sd.rfind('/')) + "/tiny-unclip";
}
// The image-variations reference (StableUnCLIPImg2ImgPipeline), made by tests/stages/make_unclip_img2img_golden.py:
// $DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG, default the sibling tiny-unclip-img2img.
std::string img2img_dir() {
  const char* env = std::getenv("DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG");
  if (env && *env) return env;
  const std::string u = unclip_dir();
  return u.substr(0, u.rfind('/')) + "/tiny-unclip-img2img";
}
#define DP_REQUIRE_IMG2IMG(dir)                                                                            \
  const std::string dir = img2img_dir();                                                                   \
  if (!dir_exists(dir + "/model"))                                                                         \
  GTEST_SKIP() << "reference folder " << dir << " is absent (make it with "                               \
               << "tests/stages/make_unclip_img2img_golden.py, or set DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG)"
#define DP_REQUIRE_UNCLIP(dir)                                                                           \
  const std::string dir = unclip_dir();                                                                  \
  if (!dir_exists(dir + "/model"))                                                                       \
  GTEST_SKIP() << "reference folder " << dir << " is absent (set DIFFPIPE_GOLDEN_UNCLIP to a Stable unCLIP " \
               << "folder in the shared/golden layout to run this test)"
}  // namespace

// The prior's text encoder is CLIPTextModelWithProjection: its projected pooled output (text_embeds) and its
// last hidden state (computed with the prompt's padding mask, as the pipeline does) feed the prior; the prior
// tokenizer gives the reference ids for the README's three prompts.
TEST(GoldenUnclip, PriorTextEncoderWithProjection) {
  DP_REQUIRE_UNCLIP(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const at::Tensor ids = g.at("prior_text_encoder.input_ids");
  const auto tok = ClipTokenizer::load(dir + "/model/prior_tokenizer");
  const char* prompts[] = {"a photo of a cat", "", "A Red CIRCLE above a blue square!"};
  for (int i = 0; i < 3; ++i) {
    const auto mine = tok.encode(prompts[i]);
    EXPECT_TRUE(at::equal(at::tensor(mine, at::kLong), ids[i])) << "prompt " << i << ": token ids differ";
  }
  const auto enc = ClipTextModel::load(dir + "/model/prior_text_encoder", DeviceSpec{});
  const at::Tensor embeds = enc->text_embeds(ids);
  const at::Tensor hidden = enc->forward(ids, 0, g.at("prior_text_encoder.attention_mask")).last_hidden_state;
  const double e1 = rel_err(embeds, g.at("prior_text_encoder.text_embeds"));
  const double e2 = rel_err(hidden, g.at("prior_text_encoder.last_hidden_state"));
  std::printf("[golden-unclip] prior text encoder: text_embeds %.2e, last_hidden_state %.2e\n", e1, e2);
  EXPECT_LE(e1, 1e-4);
  EXPECT_LE(e2, 1e-4);
}

// The unCLIP UNet: class_embed_type "projection" adds the projected (noise-augmented) image embedding to the time
// embedding; linear projections and upcast attention as in SD 2.x.
TEST(GoldenUnclip, UNetWithProjectionClassEmbedding) {
  DP_REQUIRE_UNCLIP(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto unet = UNet2DConditionModel::load(dir + "/model/unet", DeviceSpec{});
  EXPECT_EQ(unet->config().class_embed_type, "projection");
  const at::Tensor out = unet->forward(g.at("unet.sample"), g.at("unet.timesteps"), g.at("unet.encoder_hidden_states"),
                                       g.at("unet.class_labels"));
  const double e = rel_err(out, g.at("unet.out"));
  std::printf("[golden-unclip] unet with class embedding: %.2e\n", e);
  EXPECT_LE(e, 1e-4);
  EXPECT_NE(test::error_of([&] {
              unet->forward(g.at("unet.sample"), g.at("unet.timesteps"), g.at("unet.encoder_hidden_states"));
            }).find("class_labels must be [2, 64]"),
            std::string::npos);
}

// One PriorTransformer call (Karlo layout: linear encoder projection, prd token, causal plus padding mask) and
// post_process_latents (clip_std, clip_mean), against the reference.
TEST(GoldenUnclip, PriorTransformerCall) {
  DP_REQUIRE_UNCLIP(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto prior = PriorTransformer::load(dir + "/model/prior", DeviceSpec{});
  const at::Tensor out = prior->forward(g.at("prior.latents"), g.at("prior.timesteps"), g.at("prior.proj_embedding"),
                                        g.at("prior.encoder_hidden_states"), g.at("prior.attention_mask"));
  const double e = rel_err(out, g.at("prior.predicted_image_embedding"));
  const double p = rel_err(prior->post_process_latents(g.at("prior.latents")), g.at("prior.post_processed"));
  std::printf("[golden-unclip] prior transformer: %.2e, post_process_latents: %.2e\n", e, p);
  EXPECT_LE(e, 1e-4);
  EXPECT_LE(p, 1e-4);
}

// The whole StableUnCLIPPipeline run of golden.json (prior 6 DDPM steps with guidance 4, noise_level 0, 8 DDIM
// steps with guidance 7.5, 16 px) through diffpipe's own stages -- the prior runner batching both prompts, the
// denoiser, the VAE -- fed the reference's random draws in its order (golden.json `draws`): the prior's initial
// latents, one DDPM variance noise per prior step but the last, the image-embedding noise, the initial latents.
TEST(GoldenUnclip, WholePipelineWithTheReferenceDraws) {
  DP_REQUIRE_UNCLIP(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const auto& run = meta.at("run");
  const SdModel model = SdModel::load(dir + "/model", DeviceSpec{});
  ASSERT_TRUE(model.unclip);
  const auto prompts = meta.at("prompts").get<std::vector<std::string>>();
  const int prior_steps = run.at("prior_steps").get<int>();
  const size_t n_draws = meta.at("draws").size();
  ASSERT_EQ(n_draws, static_cast<size_t>(prior_steps + 2)) << "draws: initial, " << prior_steps - 1
                                                           << " DDPM noises, image embedding, latents";
  auto draw = [&](size_t k) { return g.at("pipeline.draw." + std::to_string(k)); };
  GenerationParams p;
  p.prior_steps = prior_steps;
  p.prior_guidance = run.at("prior_guidance").get<double>();
  p.noise_level = run.at("noise_level").get<int>();
  p.steps = run.at("steps").get<int>();
  p.guidance = run.at("guidance").get<double>();
  p.width = p.height = run.at("H").get<int>();
  p.negative_prompt = meta.at("negative_prompt").get<std::string>();
  PriorRunner prior(*model.unclip, model.spec);
  std::vector<PriorState> states;
  std::vector<GenerationParams> params;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerationParams pi = p;
    pi.prompt = prompts[i];
    params.push_back(pi);
    const int64_t row = static_cast<int64_t>(i);
    // stream -> the reference's draw for this request (its row of the batch draw)
    auto noise = [&, row](uint64_t stream, const at::Tensor&) -> at::Tensor {
      if (stream == kPriorLatentStream) return draw(0)[row];
      if (stream == kImageEmbedNoiseStream) return draw(n_draws - 2)[row];
      const uint64_t k = stream - kPriorLatentStream;  // 1 + step
      EXPECT_GE(k, 1u);
      EXPECT_LE(k, static_cast<uint64_t>(prior_steps - 1)) << "the last prior step must not draw noise";
      return draw(k)[row];
    };
    states.push_back(prior.make_state(pi, i, noise));
  }
  std::vector<PriorState*> batch;
  for (auto& s : states) batch.push_back(&s);
  while (!states[0].done()) prior.step(batch);
  const TextEncodeStage enc(model);
  std::vector<const GenerationParams*> ptrs;
  for (const auto& pi : params) ptrs.push_back(&pi);
  auto embs = enc.run(ptrs);
  std::vector<DenoiseState> ds;
  for (size_t i = 0; i < prompts.size(); ++i) {
    embs[i].class_labels = prior.class_labels(states[i]);
    ds.push_back(make_denoise_state(model, params[i], embs[i], i, draw(n_draws - 1)[static_cast<int64_t>(i)]));
  }
  const DenoiseStage den(model);
  std::vector<DenoiseState*> dbatch;
  for (auto& s : ds) dbatch.push_back(&s);
  while (!ds[0].done()) den.step(dbatch);
  std::vector<at::Tensor> lat;
  for (auto& s : ds) lat.push_back(s.latents);
  const double e = rel_err(at::stack(lat), g.at("pipeline.final_latents"));
  const at::Tensor img = DecodeStage(model).run_uint8(lat);
  const at::Tensor d = (img.to(at::kInt) - g.at("pipeline.image_uint8").to(at::kInt)).abs();
  const double within = d.le(1).to(at::kDouble).mean().item<double>();
  std::printf("[golden-unclip] whole pipeline: final latents %.2e, image values within +-1: %.4f (max %d)\n", e,
              within, d.max().item<int>());
  EXPECT_LE(e, 1e-3);
  EXPECT_GE(within, 0.99);
}

// Image variations, module by module: the CLIPImageProcessor's pixel values of input.png (48x40: resized on the
// shortest edge with torchvision's antialiased bicubic, centre-cropped to 32, normalised) and the
// CLIPVisionModelWithProjection's image_embeds.
TEST(GoldenUnclip, ImageProcessorAndImageEncoder) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto cfg = ClipImageProcessorConfig::load(dir + "/model/feature_extractor/preprocessor_config.json");
  const at::Tensor px = preprocess_clip_image(cfg, read_png(dir + "/input.png"));
  const double e1 = rel_err(px, g.at("feature_extractor.pixel_values"));
  const auto enc = ClipVisionModel::load(dir + "/model/image_encoder", DeviceSpec{});
  const double e2 = rel_err(enc->image_embeds(g.at("feature_extractor.pixel_values")), g.at("image_encoder.image_embeds"));
  const double e3 = rel_err(enc->image_embeds(px), g.at("image_encoder.image_embeds"));
  std::printf("[golden-unclip] image processor: %.2e, image encoder: %.2e (from our pixels: %.2e)\n", e1, e2, e3);
  EXPECT_LE(e1, 1e-4);
  EXPECT_LE(e2, 1e-4);
  EXPECT_LE(e3, 1e-4);
}

// The whole StableUnCLIPImg2ImgPipeline run (golden.json `run`: prompt, noise_level 100, 8 DDIM steps, guidance
// 7.5, 16 px) through the prior stage's image path and the denoiser, with the reference's draws (the
// image-embedding noise, then the initial latents).
TEST(GoldenUnclip, ImageVariationsWholePipeline) {
  DP_REQUIRE_IMG2IMG(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto run = JsonConfig::load(dir + "/golden.json").json().at("run");
  const SdModel model = SdModel::load(dir + "/model", DeviceSpec{});
  ASSERT_TRUE(model.unclip && model.unclip->image_encoder && !model.unclip->prior);
  GenerationParams p;
  p.prompt = run.at("prompt").get<std::string>();
  p.steps = run.at("steps").get<int>();
  p.guidance = run.at("guidance").get<double>();
  p.noise_level = run.at("noise_level").get<int>();
  p.width = p.height = run.at("H").get<int>();
  p.image_prompt = dir + "/input.png";
  PriorRunner prior(*model.unclip, model.spec);
  PriorState s = prior.make_state(p, 0, [&](uint64_t stream, const at::Tensor&) {
    EXPECT_EQ(stream, kImageEmbedNoiseStream) << "image variations draw only the embedding's noise";
    return g.at("pipeline.draw.0")[0];
  });
  EXPECT_EQ(s.total_steps(), 1);
  std::vector<PriorState*> b{&s};
  prior.step(b);
  ASSERT_TRUE(s.done());
  const TextEncodeStage enc(model);
  auto embs = enc.run({&p});
  embs[0].class_labels = prior.class_labels(s);
  DenoiseState d = make_denoise_state(model, p, embs[0], 0, g.at("pipeline.draw.1")[0]);
  const DenoiseStage den(model);
  std::vector<DenoiseState*> db{&d};
  while (!d.done()) den.step(db);
  const double e = rel_err(d.latents.unsqueeze(0), g.at("pipeline.final_latents"));
  const at::Tensor img = DecodeStage(model).run_uint8({d.latents});
  const at::Tensor diff = (img.to(at::kInt) - g.at("pipeline.image_uint8").to(at::kInt)).abs();
  const double within = diff.le(1).to(at::kDouble).mean().item<double>();
  std::printf("[golden-unclip] image variations: final latents %.2e, image values within +-1: %.4f (max %d)\n", e,
              within, diff.max().item<int>());
  EXPECT_LE(e, 1e-3);
  EXPECT_GE(within, 0.99);
  // the folder makes variations only: a request without an image prompt is refused, naming what to give
  GenerationParams text = p;
  text.image_prompt.clear();
  EXPECT_NE(test::error_of([&] { (void)resolve_params(model, text); }).find("give an image prompt"), std::string::npos);
}
