// LoRA files fused at load time against diffusers' load_lora_weights + fuse_lora (peft) on tiny-sd: a random LoRA on
// the UNet (attention projections, proj_in, the feed-forward input, the resnets' 3x3 conv1) and the text encoder
// (q_proj, v_proj, fc1), in diffusers' own format with ranks and alphas in its header, and the same deltas in
// kohya-ss's format. The reference is made by tests/stages/make_lora_golden.py (scripts/test.sh makes it under
// build/golden when peft is installed): $DIFFPIPE_GOLDEN_LORA, default the sibling tiny-lora of the tiny-sd folder;
// absent, the tests skip.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/stages/embeddings.h"
#include "diffpipe/stages/lora.h"
#include "diffpipe/stages/memory.h"
#include "diffpipe/stages/stages.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_LORA(dir) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_LORA", "tiny-lora", "golden.json", "make_lora_golden.py")

// The reference's images from its initial latents, through a model loaded with `loras`.
bool run_matches(const std::string& dir, const std::vector<LoraSpec>& loras, const std::string& name) {
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, ModelAddons{loras, {}});
  std::vector<GenerationParams> params;
  for (const auto& pr : meta.at("prompts")) {
    GenerationParams p;
    p.prompt = pr.get<std::string>();
    p.steps = meta.at("steps").get<int>();
    p.guidance = meta.at("guidance").get<double>();
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::latent_states(model, params, g.at("latents"));
  return test::matches_reference(model, ds, g.at(name + ".images"), "[golden-lora] " + name);
}

// A LoRA file of `tensors` (and header metadata) in the test's scratch folder.
std::string lora_file(const std::string& name, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {}) {
  static const std::string d = test::scratch_dir("lora");
  const std::string p = d + "/" + name + ".safetensors";
  save_safetensors(p, tensors, metadata);
  return p;
}
}  // namespace

// No LoRA gives the plain images; the peft file at scale 0.7 and the kohya file (UNet part) at 1 give diffusers'.
TEST(GoldenLora, FusedPipelineMatchesDiffusers) {
  DP_REQUIRE_LORA(dir);
  EXPECT_TRUE(run_matches(dir, {}, "base"));
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  for (const auto& run : meta.at("runs"))
    EXPECT_TRUE(run_matches(dir, {{dir + "/" + run.at("file").get<std::string>(), run.at("scale").get<double>()}},
                            run.at("name").get<std::string>()));
}

// kohya-ss's names reach the same layers with the same alphas as diffusers' own format: the text encoder (whose
// kohya keys diffusers here cannot load) and the UNet give the same outputs either way, and not the plain ones.
TEST(GoldenLora, KohyaNamesEqualPeftKeys) {
  DP_REQUIRE_LORA(dir);
  const DeviceSpec spec = test::device_spec();
  const auto peft = read_lora({dir + "/lora_peft.safetensors", 0.5}, dir + "/model");
  const auto kohya = read_lora({dir + "/lora_kohya.safetensors", 0.5}, dir + "/model");
  ASSERT_EQ(peft.size(), kohya.size());
  size_t te = 0;
  for (const auto& l : peft) te += l.component == "text_encoder";
  EXPECT_EQ(te, 2u * 3u);  // 2 layers x q_proj, v_proj, fc1
  const auto base = ClipTextModel::load(dir + "/model/text_encoder", spec);
  const auto a = ClipTextModel::load(dir + "/model/text_encoder", spec, peft);
  const auto b = ClipTextModel::load(dir + "/model/text_encoder", spec, kohya);
  const at::Tensor ids = at::arange(1, 12, at::kLong).unsqueeze(0).to(spec.device);
  const at::Tensor ha = a->forward(ids).last_hidden_state, hb = b->forward(ids).last_hidden_state;
  std::printf("[golden-lora] text encoder: kohya vs peft %.2e, LoRA vs none %.2e\n", rel_err(hb, ha),
              rel_err(ha, base->forward(ids).last_hidden_state));
  EXPECT_LE(rel_err(hb, ha), test::module_tol(spec));
  EXPECT_GT(rel_err(ha, base->forward(ids).last_hidden_state), 1e-3);
  for (size_t i = 0; i < peft.size(); ++i) {  // the same factor (scale x alpha / rank) on every layer
    EXPECT_EQ(peft[i].weight_key, kohya[i].weight_key);
    EXPECT_NEAR(peft[i].factor, kohya[i].factor, 1e-12) << peft[i].weight_key;
  }
  EXPECT_NEAR(peft[0].factor, 0.5 * (peft[0].component == "unet" ? 8.0 / 4.0 : 4.0 / 2.0), 1e-12);
}

// Files that do not fit are refused naming the file and the key, whatever the rank loads.
TEST(GoldenLora, BadFilesAreRefusedByName) {
  DP_REQUIRE_LORA(dir);
  const std::string m = dir + "/model";
  auto error = [&](const std::string& file) { return test::error_of([&] { (void)read_lora({file, 1.0}, m); }); };
  const at::Tensor d4 = at::ones({4, 32}), u4 = at::ones({32, 4});
  const std::string q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
  EXPECT_NE(error(lora_file("nolayer", {{"lora_unet_input_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_down.weight", d4}}))
                .find("names no layer"),
            std::string::npos);
  // the original layout's name of a layer tiny-sd has (input_blocks.1.1 = down_blocks.0.attentions.0) reaches it
  const auto sgm = read_lora({lora_file("sgm", {{"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight", d4},
                                               {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight", u4}}),
                              1.0},
                             m);
  ASSERT_EQ(sgm.size(), 1u);
  EXPECT_EQ(sgm[0].weight_key, q + ".weight");
  EXPECT_NE(error(lora_file("lonely", {{"unet." + q + ".lora_A.weight", d4}})).find("has no up (lora_B / lora_up) partner"),
            std::string::npos);
  const std::string shape = error(lora_file("shape", {{"unet." + q + ".lora_A.weight", at::ones({4, 31})},
                                                     {"unet." + q + ".lora_B.weight", u4}}));
  EXPECT_NE(shape.find("do not fit unet's " + q + ".weight [32, 32]"), std::string::npos) << shape;
  EXPECT_NE(error(lora_file("format", {{"model.diffusion_model.x.weight", d4}})).find("unknown LoRA format"),
            std::string::npos);
  EXPECT_NE(error(lora_file("dora", {{"unet." + q + ".lora_A.weight", d4}, {"unet." + q + ".lora_B.weight", u4}},
                            {{"lora_adapter_metadata", "{\"unet.lora_alpha\": 4, \"unet.use_dora\": true}"}}))
                .find("DoRA"),
            std::string::npos);
  EXPECT_NE(error(dir + "/none.safetensors").find("none.safetensors: LoRA file not found"), std::string::npos);
  // without an alpha anywhere the update is applied as stored (alpha = rank)
  const auto plain = read_lora({lora_file("plain", {{"unet." + q + ".lora_A.weight", d4}, {"unet." + q + ".lora_B.weight", u4}}), 0.25}, m);
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_DOUBLE_EQ(plain[0].factor, 0.25);
  // FILE[:SCALE] lists
  const auto specs = parse_lora_list("a.safetensors:0.5,dir:with:colons/b.safetensors,c.safetensors:-1");
  ASSERT_EQ(specs.size(), 3u);
  EXPECT_EQ(specs[0].path, "a.safetensors");
  EXPECT_DOUBLE_EQ(specs[0].scale, 0.5);
  EXPECT_EQ(specs[1].path, "dir:with:colons/b.safetensors");
  EXPECT_DOUBLE_EQ(specs[1].scale, 1.0);
  EXPECT_DOUBLE_EQ(specs[2].scale, -1.0);
  EXPECT_NE(test::error_of([] { (void)parse_lora_list("a.safetensors,,b"); }).find("an empty entry"), std::string::npos);
  EXPECT_NE(test::error_of([] { (void)parse_lora_spec("a.safetensors:inf"); }).find("not a finite number"),
            std::string::npos);
}

// An SDXL LoRA in kohya's names of the original (SGM) layout (input_blocks/middle_block/output_blocks, in_layers,
// time_embed, label_emb...), as most published SDXL LoRAs are: the reference was checked in diffusers to read it as
// the same deltas in diffusers' format; here it gives diffusers' images (made with --sdxl).
TEST(GoldenLora, SdxlOriginalLayoutNames) {
  DP_REQUIRE_LORA(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null())
    GTEST_SKIP() << dir << " has no sdxl run (make_lora_golden.py --sdxl MODEL makes one)";
  const auto& run = meta.at("sdxl");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const std::string model_dir = run.at("model").get<std::string>();
  const auto layers = read_lora({dir + "/" + run.at("file").get<std::string>(), 1.0}, model_dir);
  const auto same = read_lora({dir + "/lora_sdxl_peft.safetensors", 1.0}, model_dir);
  ASSERT_EQ(layers.size(), same.size());  // every layer of the diffusers-format file, reached by its SGM name
  for (size_t i = 0; i < layers.size(); ++i) EXPECT_EQ(layers[i].weight_key, same[i].weight_key);
  const SdModel model = SdModel::load(model_dir, test::device_spec(), kAllComponents,
                                      ModelAddons{{{dir + "/" + run.at("file").get<std::string>(), run.at("scale").get<double>()}}, {}});
  std::vector<GenerationParams> params;
  for (const auto& pr : meta.at("prompts")) {
    GenerationParams p;
    p.prompt = pr.get<std::string>();
    p.steps = run.at("steps").get<int>();
    p.guidance = run.at("guidance").get<double>();
    p.width = p.height = run.at("size").get<int>();
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::latent_states(model, params, g.at("sdxl.latents"));
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("sdxl.images"), "[golden-lora] sdxl, kohya original-layout names"));
  // the same file as a per-request adapter (both SDXL text encoders and the UNet, unfused)
  ModelAddons addons;
  addons.adapters = {{"sgm", dir + "/" + run.at("file").get<std::string>()}};
  const SdModel adapted = SdModel::load(model_dir, test::device_spec(), kAllComponents, addons);
  for (auto& p : params) p.lora = "sgm:" + std::to_string(run.at("scale").get<double>());
  std::vector<DenoiseState> ads = test::latent_states(adapted, params, g.at("sdxl.latents"));
  EXPECT_TRUE(test::matches_reference(adapted, ads, g.at("sdxl.images"), "[golden-lora] sdxl, the same as an adapter"));
  // textual inversion in SDXL's layout: clip_l's vectors into text_encoder, clip_g's into text_encoder_2
  if (!run.contains("ti")) return;
  const auto& ti = run.at("ti");
  ModelAddons emb;
  emb.embeddings = {{dir + "/" + ti.at("file").get<std::string>(), ti.at("token").get<std::string>()}};
  const SdModel with_ti = SdModel::load(model_dir, test::device_spec(), kAllComponents, emb);
  std::vector<GenerationParams> tp = params;
  for (size_t i = 0; i < tp.size(); ++i) {
    tp[i].prompt = ti.at("prompts")[i].get<std::string>();
    tp[i].lora.clear();
  }
  std::vector<DenoiseState> tds = test::latent_states(with_ti, tp, g.at("sdxl.latents"));
  EXPECT_TRUE(test::matches_reference(with_ti, tds, g.at("sdxl.ti.images"), "[golden-lora] sdxl textual inversion"));
}

namespace {
// Requests of one batch, each with its own initial latents and adapters, stepped to the end: their 8-bit images.
at::Tensor batch_images(const SdModel& model, const std::vector<GenerationParams>& params, const std::vector<at::Tensor>& latents) {
  std::vector<DenoiseState> ds = test::latent_states(model, params, at::stack(latents));
  return test::images_of(model, ds);
}
}  // namespace

// Per-request adapters (--lora-adapters): the files stay beside the weights and each request picks its own. One
// batch mixes the peft file at 0.7 (UNet and text encoder), no adapter, and the kohya UNet file at 1: each request
// gets diffusers' image for its own choice (the fused references: unfused branches differ from them by rounding).
TEST(GoldenLora, PerRequestAdaptersInOneBatch) {
  DP_REQUIRE_LORA(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  ModelAddons addons;
  addons.adapters = {{"style", dir + "/lora_peft.safetensors"}, {"unet-only", dir + "/lora_kohya_unet.safetensors"}};
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, addons);
  auto request = [&](size_t prompt, const std::string& lora) {
    GenerationParams p;
    p.prompt = meta.at("prompts")[prompt].get<std::string>();
    p.steps = meta.at("steps").get<int>();
    p.guidance = meta.at("guidance").get<double>();
    p.lora = lora;
    return p;
  };
  std::vector<GenerationParams> params{request(0, "style:0.7"), request(1, ""), request(1, "unet-only")};
  std::vector<at::Tensor> latents{g.at("latents")[0], g.at("latents")[1], g.at("latents")[1]};
  std::vector<DenoiseState> ds = test::latent_states(model, params, at::stack(latents));
  const at::Tensor ref = at::stack({g.at("peft_07.images")[0], g.at("base.images")[1], g.at("kohya_unet_10.images")[1]});
  EXPECT_TRUE(test::matches_reference(model, ds, ref, "[golden-lora] per-request adapters: peft 0.7, none, kohya 1"));
  // scale 0 is no adapter; the text encoder's branch acts too (the peft file's text-encoder part alone changes it)
  EXPECT_TRUE(at::equal(batch_images(model, {request(1, "style:0")}, {latents[1]}),
                        batch_images(model, {request(1, "")}, {latents[1]})));
  const Embeddings with = test::encode_all(model, {request(0, "style:0.7")})[0];
  const Embeddings without = test::encode_all(model, {request(0, "")})[0];
  EXPECT_GT((with.cond - without.cond).abs().max().item<double>(), 1e-3);
  // batch-invariant runs (one sample at a time): the mixed batch gives each request exactly its image alone
  DeviceSpec inv = test::device_spec();
  inv.batch_invariant = true;
  if (inv.device.is_cpu()) {
    const SdModel bi = SdModel::load(dir + "/model", inv, kAllComponents, addons);
    const at::Tensor mixed = batch_images(bi, params, latents);
    for (size_t i = 0; i < params.size(); ++i)
      EXPECT_TRUE(at::equal(mixed[static_cast<int64_t>(i)], batch_images(bi, {params[i]}, {latents[i]})[0])) << i;
  }
}

// Requests naming adapters are checked by name: one the run does not have, one named twice, a bad scale, any adapter
// in a run without them; adapter lists are parsed with their names.
TEST(GoldenLora, AdapterChoicesAreChecked) {
  DP_REQUIRE_LORA(dir);
  ModelAddons addons;
  addons.adapters = parse_lora_adapters("style=" + dir + "/lora_peft.safetensors," + dir + "/lora_kohya_unet.safetensors");
  ASSERT_EQ(addons.adapters.size(), 2u);
  EXPECT_EQ(addons.adapters[1].name, "lora_kohya_unet");
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), 0, addons);
  const SdModel plain = SdModel::load(dir + "/model", test::device_spec(), 0);
  GenerationParams p;
  p.prompt = "x";
  auto error = [&](const SdModel& m, const std::string& lora) {
    GenerationParams q = p;
    q.lora = lora;
    return test::error_of([&] { (void)resolve_params(m, q); });
  };
  EXPECT_EQ(error(model, "style:0.5,lora_kohya_unet"), "");
  EXPECT_EQ(adapter_scales(model, [&] { GenerationParams q = p; q.lora = "lora_kohya_unet:2,style:0.5"; return q; }()),
            (std::vector<float>{0.5f, 2.0f}));
  EXPECT_NE(error(model, "other").find("lora: no adapter 'other' in this run (its adapters: style, lora_kohya_unet)"),
            std::string::npos) << error(model, "other");
  EXPECT_NE(error(model, "style,style:2").find("named twice"), std::string::npos);
  EXPECT_NE(error(model, "style:abc").find("lora: 'style:abc' is not NAME[:SCALE]"), std::string::npos)
      << error(model, "style:abc");
  EXPECT_NE(error(model, "style:inf").find("lora: the scale in \"style:inf\" is not a finite number"), std::string::npos)
      << error(model, "style:inf");
  EXPECT_NE(error(plain, "style").find("it has none: start it with --lora-adapters"), std::string::npos);
  EXPECT_NE(test::error_of([] { (void)parse_lora_adapters("a=x.safetensors,a=y.safetensors"); }).find("given twice"),
            std::string::npos);
  EXPECT_NE(test::error_of([] { (void)parse_lora_adapters("=x.safetensors"); }).find("is not NAME=FILE"), std::string::npos);
  // the memory estimate counts the adapters' tensors where the UNet or the text encoders load, in the run's dtype
  double n = 0;
  for (const auto& a : addons.adapters) {
    const auto f = SafetensorsFile::open(a.path);
    for (const auto& k : f->names()) n += static_cast<double>(f->get(k).numel());
  }
  for (const char* stage : {"encode", "denoise"})
    EXPECT_EQ(estimate_rank_memory(dir + "/model", {stage}, 0, 0, 1, true, at::kFloat, addons).weights -
                  estimate_rank_memory(dir + "/model", {stage}, 0, 0, 1, true, at::kFloat).weights,
              4 * n) << stage;
  EXPECT_EQ(estimate_rank_memory(dir + "/model", {"decode"}, 0, 0, 1, true, at::kFloat, addons).weights,
            estimate_rank_memory(dir + "/model", {"decode"}, 0, 0, 1, true, at::kFloat).weights);
}

// Textual inversion (--embeddings) against diffusers' load_textual_inversion: a one-vector file in diffusers' layout
// ("<shape-style>") and a two-vector A1111 file (emb_params, as "badstyle": the name stands for both vectors). The
// tokenizer gives the pipeline's ids (the added tokens matched case-insensitively, anywhere, the multi-vector name
// expanded), and the images match, the embedding in the negative prompt too; wrong widths and reused tokens are refused.
TEST(GoldenLora, TextualInversion) {
  DP_REQUIRE_LORA(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("textual_inversion")) GTEST_SKIP() << dir << " predates the textual inversion run (remake it)";
  const auto& ti = meta.at("textual_inversion");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  ModelAddons addons;
  for (const auto& f : ti.at("files"))
    addons.embeddings.push_back({dir + "/" + f.at("file").get<std::string>(),
                                 f.at("token").is_null() ? "" : f.at("token").get<std::string>()});
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, addons);
  for (size_t i = 0; i < ti.at("texts").size(); ++i) {
    const std::string text = ti.at("texts")[i].get<std::string>();
    EXPECT_EQ(model.tokenizer->encode_untruncated(text), ti.at("ids")[i].get<std::vector<int64_t>>()) << text;
  }
  std::vector<GenerationParams> params;
  for (const auto& pr : ti.at("prompts")) {
    GenerationParams p;
    p.prompt = pr.get<std::string>();
    p.negative_prompt = ti.at("negative_prompt").get<std::string>();
    p.steps = meta.at("steps").get<int>();
    p.guidance = meta.at("guidance").get<double>();
    params.push_back(p);
  }
  std::vector<DenoiseState> ds = test::latent_states(model, params, g.at("latents"));
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("ti.images"), "[golden-lora] textual inversion"));
  // refusals name the file: a token the run already has, vectors of another width, a pickled file
  const std::string d = test::scratch_dir("embeddings");
  save_safetensors(d + "/wide.safetensors", {{"emb_params", at::zeros({1, 7})}}, {});
  save_safetensors(d + "/circle.safetensors", {{"<|endoftext|>", at::zeros({32})}}, {});
  auto error = [&](const std::vector<EmbeddingSpec>& specs) {
    ModelAddons a;
    a.embeddings = specs;
    return test::error_of([&] { (void)SdModel::load(dir + "/model", test::device_spec(), 0, a); });
  };
  EXPECT_NE(error({{d + "/wide.safetensors", ""}}).find("wide.safetensors: 'emb_params' is [1, 7]; text_encoder takes vectors of 32"),
            std::string::npos) << error({{d + "/wide.safetensors", ""}});
  EXPECT_NE(error({{d + "/circle.safetensors", ""}}).find("the token '<|endoftext|>' is already in the tokenizer"),
            std::string::npos) << error({{d + "/circle.safetensors", ""}});
  EXPECT_NE(error({addons.embeddings[1], {addons.embeddings[1].path, "BadStyle"}}).find("is already in the tokenizer"),
            std::string::npos);
  EXPECT_NE(error({{d + "/x.pt", ""}}).find("only .safetensors files are read"), std::string::npos);
  EXPECT_EQ(parse_embedding_list("a.safetensors:tok,b.safetensors").at(0).token, "tok");
  EXPECT_EQ(parse_embedding_list("a.safetensors:tok,b.safetensors").at(1).token, "");
}
