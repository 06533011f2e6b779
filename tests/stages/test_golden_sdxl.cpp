// Stable Diffusion XL against diffusers' StableDiffusionXLPipeline, module by module and whole. The reference
// folder is made by tests/stages/make_sdxl_golden.py (scripts/test.sh makes it under build/golden when it can):
// $DIFFPIPE_GOLDEN_SDXL, default the sibling tiny-sdxl of the tiny-sd folder; absent, the tests skip.
// Tolerances from the golden README: modules max|a-b|/max|b| <= 1e-4; whole pipeline latents <= 1e-3, images
// within +-1 on >= 99 % of values.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/unet.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_SDXL(dir) DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SDXL", "tiny-sdxl", "model", "make_sdxl_golden.py")
}  // namespace

// Both tokenizers (the second pads with "!"), both encoders' hidden_states[-2] (no final layer norm) and the
// second encoder's projected pooled output.
TEST(GoldenSdxl, TextEncodersPenultimateAndPooled) {
  DP_REQUIRE_SDXL(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto prompts = JsonConfig::load(dir + "/golden.json").json().at("prompts");
  const auto tok = ClipTokenizer::load(dir + "/model/tokenizer"), tok2 = ClipTokenizer::load(dir + "/model/tokenizer_2");
  for (int64_t i = 0; i < static_cast<int64_t>(prompts.size()); ++i) {
    const std::string p = prompts[i].get<std::string>();
    EXPECT_TRUE(at::equal(at::tensor(tok.encode(p), at::kLong), g.at("text_encoder.input_ids")[i])) << p;
    EXPECT_TRUE(at::equal(at::tensor(tok2.encode(p), at::kLong), g.at("text_encoder_2.input_ids")[i])) << p;
  }
  const DeviceSpec spec = test::device_spec();
  const double tol = test::module_tol(spec);
  const auto e1 = ClipTextModel::load(dir + "/model/text_encoder", spec);
  const auto e2 = ClipTextModel::load(dir + "/model/text_encoder_2", spec);
  const double a = rel_err(e1->forward(test::on_device(g.at("text_encoder.input_ids"), spec)).penultimate,
                           g.at("text_encoder.hidden_states_m2"));
  const ClipTextOutput o2 = e2->forward(test::on_device(g.at("text_encoder_2.input_ids"), spec));
  const double b = rel_err(o2.penultimate, g.at("text_encoder_2.hidden_states_m2"));
  const double c = rel_err(e2->project(o2.pooled), g.at("text_encoder_2.text_embeds"));
  std::printf("[golden-sdxl] text encoders: hidden_states[-2] %.2e / %.2e, text_embeds %.2e\n", a, b, c);
  EXPECT_LE(a, tol);
  EXPECT_LE(b, tol);
  EXPECT_LE(c, tol);
}

// The UNet with addition_embed_type "text_time" (pooled text + sinusoids of the six size ids), per-block heads
// and transformer depths; the size ids include non-square, cropped and 1024-px values.
TEST(GoldenSdxl, UNetWithTextTimeEmbedding) {
  DP_REQUIRE_SDXL(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  auto in = [&](const char* k) { return test::on_device(g.at(k), spec); };
  const auto unet = UNet2DConditionModel::load(dir + "/model/unet", spec);
  ASSERT_TRUE(unet->config().text_time());
  const at::Tensor out = unet->forward(in("unet.sample"), g.at("unet.timesteps"), in("unet.encoder_hidden_states"),
                                       in("unet.text_embeds"), g.at("unet.time_ids"));
  const double e = rel_err(out, g.at("unet.out"));
  std::printf("[golden-sdxl] unet (text_time): %.2e\n", e);
  EXPECT_LE(e, test::module_tol(spec));
  // without the size conditioning the call is refused, naming what is missing
  try {
    (void)unet->forward(in("unet.sample"), g.at("unet.timesteps"), in("unet.encoder_hidden_states"),
                        in("unet.text_embeds"));
    ADD_FAILURE() << "a text_time UNet ran without time_ids";
  } catch (const std::exception& ex) {
    EXPECT_NE(std::string(ex.what()).find("time_ids"), std::string::npos) << ex.what();
  }
}

// The whole pipeline through diffpipe's stages (encode, step-level denoise, decode) with the reference's initial
// noise, for each run of golden.json: no negative prompt (zero unconditional embeddings), a negative prompt, and
// a non-square image with another original size and a crop corner (the size micro-conditioning).
TEST(GoldenSdxl, WholePipelineEveryRun) {
  DP_REQUIRE_SDXL(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec);
  ASSERT_TRUE(model.sdxl && model.force_zeros_for_empty_prompt);
  for (const auto& run : meta.at("runs")) {
    const std::string name = run.at("name").get<std::string>();
    std::vector<GenerationParams> params;
    for (const auto& pr : meta.at("prompts")) {
      GenerationParams p;
      p.prompt = pr.get<std::string>();
      p.negative_prompt = run.at("negative_prompt").is_null() ? "" : run.at("negative_prompt").get<std::string>();
      p.steps = run.at("steps").get<int>();
      p.guidance = run.at("guidance").get<double>();
      p.width = run.at("width").get<int>();
      p.height = run.at("height").get<int>();
      if (run.contains("original_size")) {  // [height, width], as diffusers takes it
        p.original_height = run.at("original_size")[0].get<int>();
        p.original_width = run.at("original_size")[1].get<int>();
      }
      if (run.contains("clip_skip")) p.clip_skip = run.at("clip_skip").get<int>();
      if (run.contains("crops_coords_top_left")) {
        p.crop_top = run.at("crops_coords_top_left")[0].get<int>();
        p.crop_left = run.at("crops_coords_top_left")[1].get<int>();
      }
      params.push_back(p);
    }
    std::vector<const GenerationParams*> ptrs;
    for (const auto& p : params) ptrs.push_back(&p);
    auto embs = TextEncodeStage(model).run(ptrs);
    const at::Tensor noise = g.at("pipeline." + name + ".initial_noise");
    std::vector<DenoiseState> ds;
    for (size_t i = 0; i < params.size(); ++i)
      ds.push_back(make_denoise_state(model, params[i], embs[i], i, noise[static_cast<int64_t>(i)]));
    const std::vector<at::Tensor> lat = test::denoise_to_end(model, ds);
    const double e = rel_err(at::stack(lat), g.at("pipeline." + name + ".final_latents"));
    const at::Tensor img = DecodeStage(model).run_uint8(lat);
    const at::Tensor d = (img.to(at::kInt) - g.at("pipeline." + name + ".image_uint8").to(at::kInt)).abs();
    const double within = d.le(1).to(at::kDouble).mean().item<double>();
    std::printf("[golden-sdxl] whole pipeline (%s): final latents %.2e, image values within +-1: %.4f (max %d)\n",
                name.c_str(), e, within, d.max().item<int>());
    EXPECT_LE(e, test::pipeline_tol(spec)) << name;
    if (spec.dtype == at::kFloat) EXPECT_GE(within, 0.99) << name;
  }
}
