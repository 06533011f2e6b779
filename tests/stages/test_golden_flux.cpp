// FLUX.1 against diffusers' FluxPipeline, module by module and whole. The reference folder is made by
// tests/stages/make_flux_golden.py (scripts/test.sh makes it under build/golden when it can): $DIFFPIPE_GOLDEN_FLUX,
// default the sibling tiny-flux of the tiny-sd folder; absent, the tests skip.
// Tolerances from the golden README: modules max|a-b|/max|b| <= 1e-4; whole pipeline latents <= 1e-3, images
// within +-1 on >= 99 % of values.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/flux.h"
#include "diffpipe/stages/lora.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/t5.h"
#include "diffpipe/stages/tokenizer.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_FLUX(dir) DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_FLUX", "tiny-flux", "model", "make_flux_golden.py")
}  // namespace

// CLIP's pooled output (final layer norm at the end-of-text token) and T5's 512 tokens without a mask.
TEST(GoldenFlux, TextEncoders) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto prompts = JsonConfig::load(dir + "/golden.json").json().at("prompts");
  const auto tok = ClipTokenizer::load(dir + "/model/tokenizer");
  const auto tok2 = T5Tokenizer::load(dir + "/model/tokenizer_2");
  for (int64_t i = 0; i < static_cast<int64_t>(prompts.size()); ++i) {
    const std::string p = prompts[i].get<std::string>();
    EXPECT_TRUE(at::equal(at::tensor(tok.encode(p), at::kLong), g.at("text_encoder.input_ids")[i])) << p;
    EXPECT_TRUE(at::equal(at::tensor(tok2.encode(p, 512).ids, at::kLong), g.at("text_encoder_2.input_ids")[i])) << p;
  }
  const DeviceSpec spec = test::device_spec();
  const auto clip = ClipTextModel::load(dir + "/model/text_encoder", spec);
  const double a = rel_err(clip->forward(test::on_device(g.at("text_encoder.input_ids"), spec)).pooled,
                           g.at("text_encoder.pooled"));
  const auto t5 = T5EncoderModel::load(dir + "/model/text_encoder_2", spec);
  const at::Tensor ids = test::on_device(g.at("text_encoder_2.input_ids"), spec);
  const double b = rel_err(t5->forward(ids, at::ones_like(ids)), g.at("text_encoder_2.out"));
  std::printf("[golden-flux] CLIP pooled %.2e, T5 (512 tokens) %.2e\n", a, b);
  EXPECT_LE(a, test::module_tol(spec));
  EXPECT_LE(b, test::module_tol(spec));
}

// The transformer on unpacked latents (packed 2x2 inside, rotary ids over rows and columns): [dev]'s form with the
// guidance embedding at three timesteps and scales, [schnell]'s without; a missing or extra guidance is refused.
TEST(GoldenFlux, Transformer) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const DeviceSpec spec = test::device_spec();
  auto in = [&](const char* k) { return test::on_device(g.at(k), spec); };
  const auto dev = FluxTransformer2DModel::load(dir + "/model/transformer", spec);
  const auto schnell = FluxTransformer2DModel::load(dir + "/transformer_schnell", spec);
  ASSERT_TRUE(dev->config().guidance_embeds && !schnell->config().guidance_embeds);
  const at::Tensor x = in("transformer.latents"), c = in("transformer.encoder_hidden_states");
  const at::Tensor pooled = in("transformer.pooled"), t = g.at("transformer.timestep");
  const double e = rel_err(dev->forward(x, t, c, pooled, g.at("transformer.guidance")), g.at("transformer.out"));
  const double s = rel_err(schnell->forward(x, t, c, pooled), g.at("transformer_schnell.out"));
  std::printf("[golden-flux] transformer: [dev] form %.2e, [schnell] form %.2e\n", e, s);
  EXPECT_LE(e, test::module_tol(spec));
  EXPECT_LE(s, test::module_tol(spec));
  EXPECT_NE(test::error_of([&] { (void)dev->forward(x, t, c, pooled); }).find("guidance_embeds"), std::string::npos);
  EXPECT_NE(test::error_of([&] { (void)schnell->forward(x, t, c, pooled, g.at("transformer.guidance")); })
                .find("guidance_embeds"),
            std::string::npos);
}

// The whole pipeline through diffpipe's stages with the reference's initial noise (unpacked): FluxPipeline's sigmas
// linspace(1, 1/n, n) shifted by mu of the image's token count, the guidance embedded, one row per request; run
// "true_cfg" adds the negative prompt's row (FluxPipeline's true CFG, mixed at true_cfg_scale); "t5_256" runs T5 at 256
// tokens (max_sequence_length).
TEST(GoldenFlux, WholePipelineEveryRun) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const DeviceSpec spec = test::device_spec();
  const SdModel base = SdModel::load(dir + "/model", spec);
  ASSERT_TRUE(base.flux && base.flux_transformer && !base.unet && base.scheduler.use_dynamic_shifting);
  EXPECT_EQ(base.max_sequence_length, 512);
  for (const auto& run : meta.at("runs")) {
    const std::string name = run.at("name").get<std::string>();
    const SdModel own = test::t5_length_model(dir + "/model", spec, run);  // run "t5_256"
    const SdModel& model = own.dir.empty() ? base : own;
    std::vector<GenerationParams> params;
    for (const auto& pr : meta.at("prompts")) {
      GenerationParams p;
      p.prompt = pr.get<std::string>();
      p.steps = run.at("steps").get<int>();
      p.guidance = run.at("guidance").get<double>();
      p.width = run.at("width").get<int>();
      p.height = run.at("height").get<int>();
      p.negative_prompt = run.value("negative_prompt", std::string());
      p.true_cfg_scale = run.value("true_cfg_scale", 1.0);
      params.push_back(p);
    }
    EXPECT_EQ(model.uses_cfg(params[0]), run.contains("true_cfg_scale")) << name;
    std::vector<DenoiseState> ds = test::latent_states(model, params, g.at("pipeline." + name + ".initial_noise"));
    EXPECT_EQ(ds[0].sampler->kind(), SamplerKind::FlowMatchEuler);
    const std::vector<at::Tensor> lat = test::denoise_to_end(model, ds);
    const double e = rel_err(at::stack(lat), g.at("pipeline." + name + ".final_latents"));
    const at::Tensor img = DecodeStage(model).run_uint8(lat);
    const at::Tensor d = (img.to(at::kInt) - g.at("pipeline." + name + ".image_uint8").to(at::kInt)).abs();
    const double within = d.le(1).to(at::kDouble).mean().item<double>();
    std::printf("[golden-flux] whole pipeline (%s): final latents %.2e, image values within +-1: %.4f (max %d)\n",
                name.c_str(), e, within, d.max().item<int>());
    EXPECT_LE(e, test::pipeline_tol(spec)) << name;
    if (spec.dtype == at::kFloat) EXPECT_GE(within, 0.99) << name;
  }
}

// Image-to-image (FluxImg2ImgPipeline) with the reference's draws: the image's latents shifted and scaled,
// scale_noise at the first step that runs, the sigmas shifted for the image's tokens; the default strength 0.6 and 0.3.
TEST(GoldenFlux, ImageToImage) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  ASSERT_TRUE(model.img2img() && model.strength(GenerationParams{}) == 0.6);
  test::check_dit_img2img_runs(model, dir, meta, g, "[golden-flux]");
}

// Inpainting (FluxInpaintPipeline: the kept region is the image's latents noised to the next sigma after every step,
// clean after the last) with the reference's draws and DIR/inpaint_mask.png: the default strength 0.6, and 1 (from
// pure noise).
TEST(GoldenFlux, Inpainting) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("inpaint_runs")) GTEST_SKIP() << dir << " predates the inpainting runs (remake it)";
  const SdModel model = SdModel::load(dir + "/model", test::device_spec());
  test::check_dit_img2img_runs(model, dir, meta, g, "[golden-flux]", "inpaint_runs");
}

// A diffusers LoRA file (transformer and CLIP layers, peft metadata) fused at load, against diffusers with the adapters.
TEST(GoldenFlux, Lora) {
  DP_REQUIRE_FLUX(dir);
  test::check_dit_lora_run(dir, JsonConfig::load(dir + "/golden.json").json(),
                           load_safetensors(dir + "/golden.safetensors"), test::device_spec(), "[golden-flux]");
}

// kohya-ss's FLUX.1 LoRA format (the original model's layer names: fused qkv, block-sparse and dense, the blocks'
// modulations, single-block and feed-forward layers), against diffusers' load_lora_weights of the same file.
TEST(GoldenFlux, LoraKohyaFormat) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  if (!g.count("pipeline.lora_kohya.final_latents")) GTEST_SKIP() << dir << " predates the kohya LoRA run (remake it)";
  test::check_dit_lora_run(dir, JsonConfig::load(dir + "/golden.json").json(), g, test::device_spec(), "[golden-flux]",
                           "lora_kohya.safetensors", "pipeline.lora_kohya");
}

// A FLUX.1 LoRA in XLabs-AI's format (x-flux's attention processors: fused image and text qkv split q/k/v, the
// output projections, a single block's qkv, keys with and without the "diffusion_model." prefix, no alphas),
// against diffusers with the same file loaded by its own converter. x-flux's single-block proj_lora (added to
// linear2's output, no weight's change) and a layer named twice are refused.
TEST(GoldenFlux, LoraXlabsFormat) {
  DP_REQUIRE_FLUX(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  if (!g.count("pipeline.lora_xlabs.final_latents")) GTEST_SKIP() << dir << " predates the XLabs LoRA run (remake it)";
  test::check_dit_lora_run(dir, JsonConfig::load(dir + "/golden.json").json(), g, test::device_spec(), "[golden-flux]",
                           "lora_xlabs.safetensors", "pipeline.lora_xlabs");
  const std::string model = dir + "/model", tmp = ::testing::TempDir();
  const FluxTransformerConfig c = FluxTransformerConfig::load(model + "/transformer/config.json");
  const int64_t D = c.num_attention_heads * c.attention_head_dim;
  const at::Tensor down = at::randn({2, D}), up = at::randn({D, 2});
  save_safetensors(tmp + "/xlabs_proj.safetensors", {{"single_blocks.0.processor.proj_lora.down.weight", down},
                                               {"single_blocks.0.processor.proj_lora.up.weight", up}});
  EXPECT_NE(test::error_of([&] { (void)read_lora(LoraSpec{tmp + "/xlabs_proj.safetensors", 1.0}, model); })
                .find("acts on linear2's output"),
            std::string::npos);
  save_safetensors(tmp + "/xlabs_twice.safetensors", {{"double_blocks.0.processor.proj_lora1.down.weight", down},
                                                {"diffusion_model.double_blocks.0.processor.proj_lora1.down.weight", down},
                                                {"double_blocks.0.processor.proj_lora1.up.weight", up}});
  EXPECT_NE(test::error_of([&] { (void)read_lora(LoraSpec{tmp + "/xlabs_twice.safetensors", 1.0}, model); })
                .find("name the same layer"),
            std::string::npos);
}

// The kohya layers the reference run above leaves out, against the equivalent diffusers-format file: a single
// block's fused linear1 (q, k, v and the MLP's input: up rows split in order, the down matrix shared; diffusers'
// converter assumes FLUX.1's full widths), an embedder, and the final layer (its modulation's up rows swap halves:
// (shift, scale) -> diffusers' (scale, shift)); every alpha applied. Wrong widths and unknown names are refused.
TEST(GoldenFlux, LoraKohyaFusedAndFinalLayers) {
  DP_REQUIRE_FLUX(dir);
  const std::string model = dir + "/model";
  const FluxTransformerConfig c = FluxTransformerConfig::load(model + "/transformer/config.json");
  const int64_t D = c.num_attention_heads * c.attention_head_dim, M = 4 * D, r = 3;
  struct Case {
    std::string kohya;
    std::vector<std::pair<std::string, int64_t>> modules;  // diffusers module, its rows
    int64_t in;
    bool swap;
  };
  const std::string s1 = "single_transformer_blocks.1.";
  const std::vector<Case> cases{
      {"single_blocks_1_linear1", {{s1 + "attn.to_q", D}, {s1 + "attn.to_k", D}, {s1 + "attn.to_v", D}, {s1 + "proj_mlp", M}},
       D, false},
      {"time_in_in_layer", {{"time_text_embed.timestep_embedder.linear_1", D}}, 256, false},
      {"final_layer_adaLN_modulation_1", {{"norm_out.linear", 2 * D}}, D, true},
      {"final_layer_linear", {{"proj_out", c.out_channels}}, D, false}};
  at::manual_seed(3);
  std::map<std::string, at::Tensor> kohya, diffusers;
  for (const Case& k : cases) {
    int64_t rows = 0;
    for (const auto& m : k.modules) rows += m.second;
    const at::Tensor down = at::randn({r, k.in}), up = at::randn({rows, r});
    kohya["lora_unet_" + k.kohya + ".lora_down.weight"] = down;
    kohya["lora_unet_" + k.kohya + ".lora_up.weight"] = up;
    kohya["lora_unet_" + k.kohya + ".alpha"] = at::full({}, 1.5);
    int64_t row = 0;
    for (const auto& [m, n] : k.modules) {  // no alpha in a diffusers file without metadata: the scale folded into up
      at::Tensor u = up.narrow(0, row, n) * (1.5 / r);
      if (k.swap) u = at::cat({u.narrow(0, n / 2, n - n / 2), u.narrow(0, 0, n / 2)});
      diffusers["transformer." + m + ".lora_A.weight"] = down;
      diffusers["transformer." + m + ".lora_B.weight"] = u;
      row += n;
    }
  }
  const std::string tmp = ::testing::TempDir();
  save_safetensors(tmp + "/kohya.safetensors", kohya);
  save_safetensors(tmp + "/diffusers.safetensors", diffusers);
  auto updates = [&](const std::string& f) {
    std::map<std::string, at::Tensor> out;
    for (const LoraLayer& l : read_lora(LoraSpec{f, 1.0}, model))
      out[l.weight_key] = at::matmul(l.up.to(at::kDouble), l.down.to(at::kDouble)) * l.factor;
    return out;
  };
  const auto a = updates(tmp + "/kohya.safetensors"), b = updates(tmp + "/diffusers.safetensors");
  ASSERT_EQ(a.size(), 7u);
  ASSERT_EQ(b.size(), 7u);
  for (const auto& [k, v] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_LE((v - b.at(k)).abs().max().item<double>(), 1e-12) << k;
  }
  // refusals: up rows that do not add up to the fused widths, a name of no layer
  const at::Tensor down = at::randn({r, D}), up = at::randn({3 * D, r});
  save_safetensors(tmp + "/bad_rows.safetensors", {{"lora_unet_single_blocks_1_linear1.lora_down.weight", down},
                                                   {"lora_unet_single_blocks_1_linear1.lora_up.weight", up}});
  EXPECT_NE(test::error_of([&] { (void)read_lora(LoraSpec{tmp + "/bad_rows.safetensors", 1.0}, model); })
                .find("lora_unet_single_blocks_1_linear1.lora_up.weight has " + std::to_string(3 * D) + " rows"),
            std::string::npos);
  save_safetensors(tmp + "/bad_name.safetensors", {{"lora_unet_double_blocks_0_img_attn_norm.lora_down.weight", down},
                                                   {"lora_unet_double_blocks_0_img_attn_norm.lora_up.weight", up}});
  EXPECT_NE(test::error_of([&] { (void)read_lora(LoraSpec{tmp + "/bad_name.safetensors", 1.0}, model); })
                .find("names no layer of the FLUX.1 transformer"),
            std::string::npos);
}

// Requests Flux cannot serve are refused before any work, naming the setting.
TEST(GoldenFlux, Refusals) {
  DP_REQUIRE_FLUX(dir);
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), 0u);
  auto refused = [&](const GenerationParams& p) {
    return test::error_of([&] { (void)resolve_params(model, p, at::Tensor()); });
  };
  GenerationParams p;
  p.prompt = "a red circle";
  p.width = p.height = 32;
  EXPECT_EQ(refused(p), "");
  EXPECT_EQ(model.default_size(), 512);  // FluxPipeline: 128 x the VAE's factor (4 here; 1024 px for FLUX.1)
  p.negative_prompt = "blurry";
  EXPECT_NE(refused(p).find("without true CFG it runs no unconditional row"), std::string::npos) << refused(p);
  p.true_cfg_scale = 4;  // true CFG: the negative prompt is used
  EXPECT_EQ(refused(p), "");
  EXPECT_TRUE(model.uses_cfg(p));
  p.guidance_rescale = 0.7;  // FluxPipeline has no guidance_rescale
  EXPECT_NE(refused(p).find("guidance_rescale: only a guided"), std::string::npos) << refused(p);
  p.guidance_rescale = 0;
  p.true_cfg_scale = 0.5;
  EXPECT_NE(refused(p).find("true_cfg_scale: must be in [1, 100]"), std::string::npos) << refused(p);
  p.true_cfg_scale = 1;
  p.negative_prompt.clear();
  p.skip_guidance_layers = {1};  // SD3's skip-layer guidance
  EXPECT_NE(refused(p).find("skip_guidance_layers: SD3 folders only"), std::string::npos) << refused(p);
  p.skip_guidance_layers.clear();
  p.sampler = "euler";
  EXPECT_NE(refused(p).find("flow_euler"), std::string::npos) << refused(p);
  p.sampler.clear();
  p.clip_skip = 1;
  EXPECT_NE(refused(p).find("clip_skip"), std::string::npos) << refused(p);
  p.clip_skip = 0;
  p.width = 36;  // not a multiple of 8 (the VAE's 4 x the 2x2 packing)
  EXPECT_NE(refused(p).find("multiple of 8"), std::string::npos) << refused(p);
  p.width = p.height = 0;  // image-to-image: the image's size
  p.image_prompt = dir + "/input_0.png";
  p.mask = dir + "/input_1.png";  // any image serves as a mask (grey, binarised at 50 %)
  EXPECT_EQ(refused(p), "");
  EXPECT_TRUE(resolve_params(model, p).mask.defined());
  EXPECT_EQ(model.strength(p), 0.6) << "FluxInpaintPipeline's default strength";
}
