// Stable Diffusion 3 / 3.5 against diffusers' StableDiffusion3Pipeline, module by module and whole. The reference
// folder is made by tests/stages/make_sd3_golden.py (scripts/test.sh makes it under build/golden when it can):
// $DIFFPIPE_GOLDEN_SD3, default the sibling tiny-sd3 of the tiny-sd folder; absent, the tests skip.
// Tolerances from the golden README: modules max|a-b|/max|b| <= 1e-4; whole pipeline latents <= 1e-3, images
// within +-1 on >= 99 % of values.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/sd3.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/t5.h"
#include "diffpipe/stages/tokenizer.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_SD3(dir) DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_SD3", "tiny-sd3", "model", "make_sd3_golden.py")
}  // namespace

// The three text encoders as SD3 reads them: both CLIP encoders' hidden_states[-2] and projected pooled outputs
// (the second tokenizer pads with "!"), T5's last hidden state over 256 tokens without a mask.
TEST(GoldenSd3, TextEncoders) {
  DP_REQUIRE_SD3(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto prompts = JsonConfig::load(dir + "/golden.json").json().at("prompts");
  const auto tok = ClipTokenizer::load(dir + "/model/tokenizer"), tok2 = ClipTokenizer::load(dir + "/model/tokenizer_2");
  const auto tok3 = T5Tokenizer::load(dir + "/model/tokenizer_3");
  for (int64_t i = 0; i < static_cast<int64_t>(prompts.size()); ++i) {
    const std::string p = prompts[i].get<std::string>();
    EXPECT_TRUE(at::equal(at::tensor(tok.encode(p), at::kLong), g.at("text_encoder.input_ids")[i])) << p;
    EXPECT_TRUE(at::equal(at::tensor(tok2.encode(p), at::kLong), g.at("text_encoder_2.input_ids")[i])) << p;
    EXPECT_TRUE(at::equal(at::tensor(tok3.encode(p, 256).ids, at::kLong), g.at("text_encoder_3.input_ids")[i])) << p;
  }
  const DeviceSpec spec = test::device_spec();
  const double tol = test::module_tol(spec);
  for (const char* name : {"text_encoder", "text_encoder_2"}) {
    const auto enc = ClipTextModel::load(dir + "/model/" + name, spec);
    const ClipTextOutput o = enc->forward(test::on_device(g.at(std::string(name) + ".input_ids"), spec));
    const double a = rel_err(o.penultimate, g.at(std::string(name) + ".hidden_states_m2"));
    const double b = rel_err(enc->project(o.pooled), g.at(std::string(name) + ".text_embeds"));
    std::printf("[golden-sd3] %s: hidden_states[-2] %.2e, text_embeds %.2e\n", name, a, b);
    EXPECT_LE(a, tol) << name;
    EXPECT_LE(b, tol) << name;
  }
  const auto t5 = T5EncoderModel::load(dir + "/model/text_encoder_3", spec);
  const at::Tensor ids = test::on_device(g.at("text_encoder_3.input_ids"), spec);
  const double c = rel_err(t5->forward(ids, at::ones_like(ids)), g.at("text_encoder_3.out"));
  std::printf("[golden-sd3] text_encoder_3 (T5, 256 tokens): %.2e\n", c);
  EXPECT_LE(c, tol);
}

// The MMDiT transformer: SD3.5-style (dual attention in two of three blocks, RMS-normed queries and keys) on a
// non-square latent whose patches are a crop of the position table, and an SD3.0-style one, at three timesteps.
TEST(GoldenSd3, Transformer) {
  DP_REQUIRE_SD3(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  auto in = [&](const char* k) { return test::on_device(g.at(k), spec); };
  const auto tr = Sd3Transformer2DModel::load(dir + "/model/transformer", spec);
  ASSERT_TRUE(tr->config().qk_norm);
  ASSERT_EQ(tr->config().dual_attention_layers.size(), 2u);
  const at::Tensor out = tr->forward(in("transformer.sample"), g.at("transformer.timestep"),
                                     in("transformer.encoder_hidden_states"), in("transformer.pooled_projections"));
  const double e = rel_err(out, g.at("transformer.out"));
  const auto tr30 = Sd3Transformer2DModel::load(dir + "/transformer_sd30", spec);
  const double e30 = rel_err(tr30->forward(in("transformer_sd30.sample"), g.at("transformer.timestep"),
                                           in("transformer.encoder_hidden_states"), in("transformer.pooled_projections")),
                             g.at("transformer_sd30.out"));
  std::printf("[golden-sd3] transformer: SD3.5-style %.2e, SD3.0-style %.2e\n", e, e30);
  EXPECT_LE(e, test::module_tol(spec));
  EXPECT_LE(e30, test::module_tol(spec));
  // a latent larger than the position table is refused, naming the limit
  const std::string err = test::error_of([&] {
    (void)tr30->forward(at::zeros({1, 16, 18, 8}, in("transformer.sample").options()), g.at("transformer.timestep")[0],
                        in("transformer.encoder_hidden_states").slice(0, 0, 1),
                        in("transformer.pooled_projections").slice(0, 0, 1));
  });
  EXPECT_NE(err.find("pos_embed_max_size 8"), std::string::npos) << err;
}

// FlowMatchEulerDiscreteScheduler's schedules: the folder's shift 3, shift 1, and the resolution-dependent shift
// (use_dynamic_shifting, mu from the image's token count).
TEST(GoldenSd3, FlowMatchSchedules) {
  DP_REQUIRE_SD3(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  for (const auto& sc : meta.at("schedules")) {
    const std::string name = sc.at("name").get<std::string>();
    SchedulerConfig c;
    c.class_name = "FlowMatchEulerDiscreteScheduler";
    c.shift = sc.at("config").value("shift", 1.0);
    c.use_dynamic_shifting = sc.at("config").value("use_dynamic_shifting", false);
    c.base_shift = sc.at("config").value("base_shift", 0.5);
    c.max_shift = sc.at("config").value("max_shift", 1.15);
    const auto s = Sampler::create(SamplerKind::FlowMatchEuler, c, sc.at("steps").get<int>(), false, 1.0,
                                   sc.value("image_seq_len", 0));
    const at::Tensor ts = at::tensor(s->timesteps(), at::kDouble).to(at::kFloat);
    const at::Tensor sig = at::tensor(s->sigmas(), at::kDouble).to(at::kFloat);
    EXPECT_TRUE(at::equal(ts, g.at("scheduler." + name + ".timesteps"))) << name << ": " << ts << " vs "
                                                                          << g.at("scheduler." + name + ".timesteps");
    EXPECT_TRUE(at::equal(sig, g.at("scheduler." + name + ".sigmas"))) << name << ": " << sig;
  }
}

// The whole pipeline through diffpipe's stages (encode, step-level denoise, decode) with the reference's initial
// noise, for each run of golden.json: guided without a negative prompt (""), a negative prompt, unguided and
// non-square, clip_skip 1, the folder without T5 (zero T5 tokens), T5 at 512 tokens, and skip-layer guidance ("slg":
// block 1 left out of a third row on loop steps 1-3 of 8).
TEST(GoldenSd3, WholePipelineEveryRun) {
  DP_REQUIRE_SD3(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec);
  const SdModel no_t5 = SdModel::load(dir + "/model_no_t5", spec);
  ASSERT_TRUE(model.sd3 && model.sd3_t5 && model.transformer && !model.unet);
  ASSERT_TRUE(no_t5.sd3 && !no_t5.sd3_t5 && !no_t5.t5);
  for (const auto& run : meta.at("runs")) {
    const std::string name = run.at("name").get<std::string>();
    const SdModel own = test::t5_length_model(dir + "/model", spec, run);  // run "t5_512"
    const SdModel& m = !own.dir.empty() ? own : run.value("model", "") == "no_t5" ? no_t5 : model;
    std::vector<GenerationParams> params;
    for (const auto& pr : meta.at("prompts")) {
      GenerationParams p;
      p.prompt = pr.get<std::string>();
      p.negative_prompt = run.at("negative_prompt").is_null() ? "" : run.at("negative_prompt").get<std::string>();
      p.steps = run.at("steps").get<int>();
      p.guidance = run.at("guidance").get<double>();
      p.width = run.at("width").get<int>();
      p.height = run.at("height").get<int>();
      if (run.contains("clip_skip")) p.clip_skip = run.at("clip_skip").get<int>();
      if (run.contains("skip_guidance_layers")) {  // run "slg"
        p.skip_guidance_layers = run.at("skip_guidance_layers").get<std::vector<int>>();
        p.skip_layer_guidance_scale = run.at("skip_layer_guidance_scale").get<double>();
        p.skip_layer_guidance_start = run.at("skip_layer_guidance_start").get<double>();
        p.skip_layer_guidance_stop = run.at("skip_layer_guidance_stop").get<double>();
      }
      params.push_back(p);
    }
    std::vector<const GenerationParams*> ptrs;
    for (const auto& p : params) ptrs.push_back(&p);
    auto embs = TextEncodeStage(m).run(ptrs);
    const double pe = rel_err(at::stack({embs[0].cond, embs[1].cond}), g.at("pipeline." + name + ".prompt_embeds"));
    const double pp = rel_err(at::stack({embs[0].class_labels, embs[1].class_labels}), g.at("pipeline." + name + ".pooled"));
    const at::Tensor noise = g.at("pipeline." + name + ".initial_noise");
    std::vector<DenoiseState> ds;
    for (size_t i = 0; i < params.size(); ++i)
      ds.push_back(make_denoise_state(m, params[i], embs[i], i, noise[static_cast<int64_t>(i)]));
    EXPECT_EQ(ds[0].sampler->kind(), SamplerKind::FlowMatchEuler);
    const std::vector<at::Tensor> lat = test::denoise_to_end(m, ds);
    const double e = rel_err(at::stack(lat), g.at("pipeline." + name + ".final_latents"));
    const at::Tensor img = DecodeStage(m).run_uint8(lat);
    const at::Tensor d = (img.to(at::kInt) - g.at("pipeline." + name + ".image_uint8").to(at::kInt)).abs();
    const double within = d.le(1).to(at::kDouble).mean().item<double>();
    std::printf("[golden-sd3] whole pipeline (%s): prompt embeds %.2e, pooled %.2e, final latents %.2e, image values "
                "within +-1: %.4f (max %d)\n", name.c_str(), pe, pp, e, within, d.max().item<int>());
    EXPECT_LE(pe, test::module_tol(spec)) << name;
    EXPECT_LE(pp, test::module_tol(spec)) << name;
    EXPECT_LE(e, test::pipeline_tol(spec)) << name;
    if (spec.dtype == at::kFloat) EXPECT_GE(within, 0.99) << name;
  }
}

// Image-to-image (StableDiffusion3Img2ImgPipeline) with the reference's draws: the image's latents shifted and
// scaled, scale_noise at the first timestep that runs; the default strength 0.6 and 0.3 (SD3's pipelines skip
// int(steps - steps x strength) steps: 3 of 5 at 0.3, where SD's rule would skip 4).
TEST(GoldenSd3, ImageToImage) {
  DP_REQUIRE_SD3(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel model = SdModel::load(dir + "/model", spec);
  ASSERT_TRUE(model.img2img());
  test::check_dit_img2img_runs(model, dir, meta, g, "[golden-sd3]");
}

// Inpainting (StableDiffusion3InpaintPipeline with its 16-channel transformer: the kept region is the image's latents
// noised to the next timestep after every step, clean after the last) with the reference's draws and
// DIR/inpaint_mask.png: the default strength 0.6, and 1 (from pure noise) with a negative prompt.
TEST(GoldenSd3, Inpainting) {
  DP_REQUIRE_SD3(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("inpaint_runs")) GTEST_SKIP() << dir << " predates the inpainting runs (remake it)";
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  test::check_dit_img2img_runs(model, dir, meta, g, "[golden-sd3]", "inpaint_runs");
}

// A diffusers LoRA file (transformer and CLIP layers, peft metadata) fused at load, against diffusers with the adapters.
TEST(GoldenSd3, Lora) {
  DP_REQUIRE_SD3(dir);
  test::check_dit_lora_run(dir, JsonConfig::load(dir + "/golden.json").json(),
                           load_safetensors(dir + "/golden.safetensors"), test::device_spec(), "[golden-sd3]");
}

// Requests SD3 cannot serve are refused before any work, naming the setting.
TEST(GoldenSd3, Refusals) {
  DP_REQUIRE_SD3(dir);
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), 0u);
  auto refused = [&](const GenerationParams& p) {
    return test::error_of([&] { (void)resolve_params(model, p, at::Tensor()); });
  };
  GenerationParams p;
  p.prompt = "a red circle";
  p.sampler = "ddim";
  EXPECT_NE(refused(p).find("flow_euler"), std::string::npos) << refused(p);
  p.sampler = "";
  // skip-layer guidance: blocks of this transformer (3), guided text-to-image only, a window in [0, 1]
  p.guidance = 5;
  p.skip_guidance_layers = {0, 2};
  EXPECT_EQ(refused(p), "");
  p.skip_guidance_layers = {3};
  EXPECT_NE(refused(p).find("skip_guidance_layers: block 3 is not in [0, 3)"), std::string::npos) << refused(p);
  p.skip_guidance_layers = {1};
  p.guidance = 1;
  EXPECT_NE(refused(p).find("needs classifier-free guidance"), std::string::npos) << refused(p);
  p.guidance = 5;
  p.skip_layer_guidance_start = 0.5;
  p.skip_layer_guidance_stop = 0.2;
  EXPECT_NE(refused(p).find("0 <= start <= stop <= 1"), std::string::npos) << refused(p);
  p.skip_layer_guidance_start = 0.01;
  p.skip_layer_guidance_scale = -1;
  EXPECT_NE(refused(p).find("skip_layer_guidance_scale: must be in [0, 100]"), std::string::npos) << refused(p);
  p.skip_layer_guidance_scale = 2.8;
  p.image_prompt = dir + "/input_0.png";
  EXPECT_NE(refused(p).find("text-to-image only"), std::string::npos) << refused(p);
  p.image_prompt.clear();
  p.skip_guidance_layers.clear();
  p.width = p.height = 1024;  // 12 patches x 2 x the VAE's 4 = 96 pixels at most
  EXPECT_NE(refused(p).find("pos_embed_max_size 12"), std::string::npos) << refused(p);
  p.width = p.height = 36;  // not a multiple of 8 (the VAE's 4 x patch 2)
  EXPECT_NE(refused(p).find("multiple of 8"), std::string::npos) << "[" << refused(p) << "]";
  p.width = p.height = 0;  // image-to-image: the image's size
  p.image_prompt = dir + "/input_0.png";
  p.mask = dir + "/input_1.png";  // any image serves as a mask (grey, binarised at 50 %)
  EXPECT_EQ(refused(p), "");
  EXPECT_EQ(model.strength(p), 0.6) << "StableDiffusion3InpaintPipeline's default strength";
  p.mask.clear();
  p.strength = 0.1;  // SD3 skips int(steps - steps x strength): 0.1 of 1 step still runs it, 0 runs none
  p.steps = 1;
  EXPECT_EQ(resolve_params(model, p).begin, 0);
  p.strength = 0;
  EXPECT_NE(refused(p).find("leaves no denoising step"), std::string::npos) << refused(p);
  p.steps = 25;
  p.strength = -1;
  p.image_prompt.clear();
  p.width = p.height = 32;
  p.clip_skip = 3;  // both encoders have 3 layers (4 hidden states): hidden_states[-(k + 2)] needs k < 3
  EXPECT_NE(refused(p).find("clip_skip"), std::string::npos) << "[" << refused(p) << "]";
  p.clip_skip = 0;
  EXPECT_EQ(refused(p), "");  // the fixed request resolves
  // an SD3 sampler on another folder is refused too
  EXPECT_THROW((void)sampler_kind_of_class("NoSuchScheduler"), Error);
  EXPECT_EQ(sampler_kind_of_class("FlowMatchEulerDiscreteScheduler"), SamplerKind::FlowMatchEuler);
}
