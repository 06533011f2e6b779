// IP-Adapter against diffusers' load_ip_adapter on tiny-sd (tests/stages/make_ip_adapter_golden.py; scripts/test.sh
// makes the folder under build/golden): a random adapter in h94's format and a random CLIPVisionModelWithProjection;
// each request brings its own image prompt. $DIFFPIPE_GOLDEN_IP_ADAPTER, default the sibling tiny-ip-adapter of the
// tiny-sd folder; absent, the tests skip.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/ip_adapter.h"
#include "diffpipe/stages/memory.h"
#include "diffpipe/stages/stages.h"
#include "denoise_util.h"
#include "device_util.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
#define DP_REQUIRE_IP(dir) \
  DP_REQUIRE_GENERATED(dir, "DIFFPIPE_GOLDEN_IP_ADAPTER", "tiny-ip-adapter", "golden.json", "make_ip_adapter_golden.py")

ModelAddons with_adapter(const std::string& dir) {
  ModelAddons a;
  a.ip_adapter = dir + "/ip/ip-adapter.safetensors";
  return a;
}

// Requests of run `run` (golden.json's settings), request k with image_k.png unless `without` names it.
std::vector<GenerationParams> run_params(const std::string& dir, const nlohmann::json& meta, const nlohmann::json& run,
                                         int without = -1) {
  std::vector<GenerationParams> params;
  for (size_t k = 0; k < meta.at("prompts").size(); ++k) {
    GenerationParams p;
    p.prompt = meta.at("prompts")[k].get<std::string>();
    p.steps = run.at("steps").get<int>();
    p.guidance = run.at("guidance").get<double>();
    if (run.contains("negative_prompt") && !run.at("negative_prompt").is_null())
      p.negative_prompt = run.at("negative_prompt").get<std::string>();
    if (static_cast<int>(k) != without) {
      p.ip_adapter_image = dir + "/" + meta.at("images")[k].get<std::string>();
      p.ip_adapter_scale = run.at("scale").get<double>();
    }
    params.push_back(p);
  }
  return params;
}

// States from the reference's latents, each request's image prompt embedded as the encode stage does.
std::vector<DenoiseState> ip_states(const SdModel& model, const std::vector<GenerationParams>& params,
                                    const at::Tensor& latents) {
  auto embs = test::encode_all(model, params);
  std::vector<DenoiseState> ds;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].ip_adapter_image.empty()) embs[i].ip_embeds = ip_image_embeds(model, params[i]);
    ds.push_back(make_denoise_state(model, params[i], embs[i], i, latents[static_cast<int64_t>(i)]));
  }
  return ds;
}
}  // namespace

// The image encoder's embeddings and the images of three runs: scale 1 with guidance, 0.5 with a negative prompt,
// 0.8 without guidance (every 8-bit value within +-1).
TEST(GoldenIpAdapter, PipelineMatchesDiffusers) {
  DP_REQUIRE_IP(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, with_adapter(dir));
  ASSERT_TRUE(model.ip_adapter && model.ip_image_encoder);
  for (const auto& run : meta.at("runs")) {
    const std::string n = run.at("name").get<std::string>();
    const std::vector<GenerationParams> params = run_params(dir, meta, run);
    for (size_t k = 0; k < params.size(); ++k) {
      const double e = rel_err(ip_image_embeds(model, params[k]), g.at(n + ".image_embeds")[static_cast<int64_t>(k)]);
      EXPECT_LE(e, test::module_tol(model.spec)) << n << " image " << k;
    }
    std::vector<DenoiseState> ds = ip_states(model, params, g.at("latents"));
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(n + ".images"), "[golden-ip-adapter] " + n)) << n;
  }
}

// One batch mixes a request with an image prompt and one without: each keeps its own image (the first as the
// scale-1 run, the second as the reference run at scale 0), and the adapter moves the first far from the plain one.
TEST(GoldenIpAdapter, MixedBatchAndRefusals) {
  DP_REQUIRE_IP(dir);
  const auto g = load_safetensors(dir + "/golden.safetensors");
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, with_adapter(dir));
  const auto& run = meta.at("runs")[0];  // scale 1, guidance 7.5, 5 steps: the settings of the no_adapter run
  std::vector<DenoiseState> ds = ip_states(model, run_params(dir, meta, run, /*without=*/1), g.at("latents"));
  const at::Tensor mixed = test::images_of(model, ds);
  auto max_diff = [](const at::Tensor& mine, const at::Tensor& ref) {
    return (mine.to(at::kInt) - ref.permute({1, 2, 0}).mul(255).round().to(at::kInt)).abs().max().item<int>();
  };
  const int tol = model.spec.dtype == at::kFloat ? 1 : 16;  // 16-bit: the golden images' 10 % band, in levels
  EXPECT_LE(max_diff(mixed[0], g.at("scale_1.images")[0]), tol);
  EXPECT_LE(max_diff(mixed[1], g.at("no_adapter.images")[1]), tol);
  EXPECT_GT(max_diff(mixed[0], g.at("no_adapter.images")[0]), 20);
  // refusals: an image prompt without an adapter, a scale without an image, adapters of other kinds or models
  const SdModel plain = SdModel::load(dir + "/model", test::device_spec(), kUNet);
  GenerationParams p = run_params(dir, meta, run)[0];
  EXPECT_NE(test::error_of([&] { (void)resolve_params(plain, p); }).find("ip_adapter_image: "), std::string::npos);
  GenerationParams q;
  q.prompt = "x";
  q.ip_adapter_scale = 0.5;
  EXPECT_EQ(test::error_of([&] { (void)resolve_params(model, q); }),
            "ip_adapter_scale: only a request with an ip_adapter_image uses it");
  auto tensors = load_safetensors(dir + "/ip/ip-adapter.safetensors");
  const std::string scratch = test::scratch_dir("ip-adapter");
  auto refused = [&](const std::map<std::string, at::Tensor>& t, const std::string& want) {
    save_safetensors(scratch + "/bad.safetensors", t);
    const std::string e = test::error_of([&] { (void)read_ip_adapter(scratch + "/bad.safetensors", model.unet_config); });
    EXPECT_NE(e.find(want), std::string::npos) << e;
  };
  auto faceid = tensors;
  faceid["image_proj.proj.0.weight"] = at::zeros({64, 24});
  refused(faceid, "'image_proj.proj.0.weight' marks an IP-Adapter Full-face / FaceID file");
  auto missing = tensors;
  missing.erase("ip_adapter.11.to_v_ip.weight");
  refused(missing, "bad.safetensors: tensor 'ip_adapter.11.to_v_ip.weight' missing");
  auto extra = tensors;
  extra["ip_adapter.13.to_k_ip.weight"] = at::zeros({32, 32});
  refused(extra, "tensor 'ip_adapter.13.to_k_ip.weight' is not one of the 6 cross-attentions'");
  auto wide = tensors;
  wide["ip_adapter.1.to_k_ip.weight"] = at::zeros({32, 40});
  refused(wide, "ip_adapter.1.to_k_ip.weight is [32, 40]; the UNet's cross-attention "
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2 needs [32, 32]");
}

// IP-Adapter Plus (golden.json's plus_runs): the image encoder's penultimate hidden states (the unconditional row: an
// all-zero image's) through the resampler's 4 blocks make 6 tokens; scale 0.6 with guidance and 1 without, every 8-bit
// value within +-1. A resampler whose shapes do not fit is refused naming the tensor.
TEST(GoldenIpAdapter, PlusMatchesDiffusers) {
  DP_REQUIRE_IP(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("plus_runs")) GTEST_SKIP() << dir << " predates IP-Adapter Plus (remake it)";
  const auto g = load_safetensors(dir + "/golden.safetensors");
  ModelAddons a;
  a.ip_adapter = dir + "/" + meta.at("plus_adapter").get<std::string>();
  const SdModel model = SdModel::load(dir + "/model", test::device_spec(), kAllComponents, a);
  ASSERT_TRUE(model.ip_adapter && model.ip_plus);
  const IpAdapterFile f = read_ip_adapter(a.ip_adapter, model.unet_config);
  EXPECT_TRUE(f.plus);
  EXPECT_EQ(f.tokens, 6);
  EXPECT_EQ(f.depth, 4);
  EXPECT_EQ(f.heads, 1);
  for (const auto& run : meta.at("plus_runs")) {
    const std::string n = run.at("name").get<std::string>();
    const std::vector<GenerationParams> params = run_params(dir, meta, run);
    for (size_t k = 0; k < params.size(); ++k) {
      const at::Tensor e = ip_image_embeds(model, params[k]);  // [2, 1 + 16 patches, 32]
      ASSERT_EQ(e.sizes(), (std::vector<int64_t>{2, 17, 32}));
      const double eh = rel_err(e[1], g.at(n + ".hidden_states")[static_cast<int64_t>(k)]);
      const double eu = rel_err(e[0], g.at(n + ".uncond_hidden_states"));
      std::printf("[golden-ip-adapter] %s image %zu: hidden states %.2e, the zero image's %.2e\n", n.c_str(), k, eh, eu);
      EXPECT_LE(eh, test::module_tol(model.spec)) << n;
      EXPECT_LE(eu, test::module_tol(model.spec)) << n;
    }
    std::vector<DenoiseState> ds = ip_states(model, params, g.at("latents"));
    EXPECT_TRUE(test::matches_reference(model, ds, g.at(n + ".images"), "[golden-ip-adapter] " + n)) << n;
  }
  // the tokens act: the same requests at scale 0 are far from the reference's images
  std::vector<GenerationParams> zero = run_params(dir, meta, meta.at("plus_runs")[0]);
  for (auto& p : zero) p.ip_adapter_scale = 0.0;
  std::vector<DenoiseState> zs = ip_states(model, zero, g.at("latents"));
  const at::Tensor ref = g.at("plus.images").permute({0, 2, 3, 1}).mul(255).round().to(at::kInt);
  EXPECT_GT((test::images_of(model, zs).to(at::kInt) - ref).abs().max().item<int>(), 20);
  auto tensors = load_safetensors(a.ip_adapter);
  const std::string scratch = test::scratch_dir("ip-adapter-plus");
  tensors["image_proj.layers.2.0.to_kv.weight"] = at::zeros({64, 32});
  save_safetensors(scratch + "/bad.safetensors", tensors);
  const std::string e = test::error_of([&] { (void)read_ip_adapter(scratch + "/bad.safetensors", model.unet_config); });
  EXPECT_NE(e.find("bad.safetensors: tensor 'image_proj.layers.2.0.to_kv.weight' is [64, 32], expected [128, 32]"),
            std::string::npos) << e;
}

// SDXL (the reference made with --sdxl): an adapter for tiny-sdxl's UNet (its 12 cross-attentions, two transformer
// blocks deep in places), StableDiffusionXLPipeline at scale 0.7 with the folder's Euler.
TEST(GoldenIpAdapter, Sdxl) {
  DP_REQUIRE_IP(dir);
  const auto meta = JsonConfig::load(dir + "/golden.json").json();
  if (!meta.contains("sdxl") || meta.at("sdxl").is_null())
    GTEST_SKIP() << dir << " has no sdxl run (make_ip_adapter_golden.py --sdxl MODEL makes one)";
  const auto& run = meta.at("sdxl");
  const auto g = load_safetensors(dir + "/golden.safetensors");
  ModelAddons a;
  a.ip_adapter = dir + "/" + run.at("adapter").get<std::string>();
  const SdModel model = SdModel::load(run.at("model").get<std::string>(), test::device_spec(), kAllComponents, a);
  ASSERT_TRUE(model.sdxl && model.ip_adapter);
  EXPECT_EQ(cross_attention_layers(model.unet_config).size(), 12u);
  std::vector<GenerationParams> params = run_params(dir, meta, run);
  for (auto& p : params) p.width = p.height = 32;
  std::vector<DenoiseState> ds = ip_states(model, params, g.at("sdxl.latents"));
  EXPECT_TRUE(test::matches_reference(model, ds, g.at("sdxl.images"), "[golden-ip-adapter] sdxl"));
  if (!run.contains("plus")) return;
  // IP-Adapter Plus on the SDXL UNet (as ip-adapter-plus_sdxl_vit-h): the resampler's tokens in its 12 cross-attentions
  const auto& plus = run.at("plus");
  a.ip_adapter = dir + "/" + plus.at("adapter").get<std::string>();
  const SdModel xl_plus = SdModel::load(run.at("model").get<std::string>(), test::device_spec(), kAllComponents, a);
  ASSERT_TRUE(xl_plus.ip_plus);
  std::vector<GenerationParams> pp = run_params(dir, meta, plus);
  for (auto& p : pp) p.width = p.height = 32;
  std::vector<DenoiseState> ps = ip_states(xl_plus, pp, g.at("sdxl.latents"));
  EXPECT_TRUE(test::matches_reference(xl_plus, ps, g.at("sdxl_plus.images"), "[golden-ip-adapter] sdxl plus"));
}

// The memory estimate counts the adapter's layers on the denoise rank and its image encoder on the encode rank.
TEST(GoldenIpAdapter, MemoryEstimateCountsTheAdapter) {
  DP_REQUIRE_IP(dir);
  auto elems = [](const std::string& file) {
    const auto f = SafetensorsFile::open(file);
    double n = 0;
    for (const auto& k : f->names()) n += static_cast<double>(f->get(k).numel());
    return n;
  };
  const ModelAddons a = with_adapter(dir);
  for (const auto& [stage, file] : {std::pair<std::string, std::string>{"denoise", a.ip_adapter},
                                    {"encode", dir + "/ip/image_encoder/model.safetensors"}}) {
    const MemoryNeed plain = estimate_rank_memory(dir + "/model", {stage}, 32, 32, 2, true, at::kFloat);
    const MemoryNeed with = estimate_rank_memory(dir + "/model", {stage}, 32, 32, 2, true, at::kFloat, a);
    EXPECT_EQ(with.weights - plain.weights, 4 * elems(file)) << stage;
  }
}
