// Checks the native model stack against outputs computed by diffusers/transformers (shared/golden layout).
// Tolerances from the golden README: modules max|a-b|/max|b| <= 1e-4; pipeline latents <= 1e-3;
// images |a-b| <= 1 on >= 99% of values.
#include <nlohmann/json.hpp>

#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"
#include "diffpipe/stages/stages.h"
#include "test_util.h"

using namespace diffpipe;
using diffpipe::test::rel_err;

namespace {
struct Golden {
  std::string dir;
  std::map<std::string, at::Tensor> t;
  nlohmann::json meta;
  explicit Golden(const std::string& d) : dir(d) {
    t = load_safetensors(d + "/golden.safetensors");
    meta = JsonConfig::load(d + "/golden.json").json();
  }
  const at::Tensor& operator[](const std::string& k) const {
    auto it = t.find(k);
    if (it == t.end()) throw std::runtime_error("golden key missing: " + k);
    return it->second;
  }
};
const DeviceSpec kCpu{};
}  // namespace

TEST(Golden, TokenizerMatchesEveryCase) {
  DP_REQUIRE_GOLDEN(dir);
  const auto tok = ClipTokenizer::load(dir + "/model/tokenizer");
  const auto cases = JsonConfig::load(dir + "/tokenizer_cases.json").json();
  const auto& list = cases.is_array() ? cases : cases.at("cases");
  ASSERT_GT(list.size(), 0u);
  for (const auto& c : list) {
    const std::string prompt = c.at("prompt").get<std::string>();
    EXPECT_EQ(tok.encode_untruncated(prompt), c.at("untruncated_ids").get<std::vector<int64_t>>()) << prompt;
    EXPECT_EQ(tok.encode(prompt), c.at("input_ids").get<std::vector<int64_t>>()) << prompt;
  }
}

TEST(Golden, TextEncoder) {
  DP_REQUIRE_GOLDEN(dir);
  Golden g(dir);
  auto te = ClipTextModel::load(dir + "/model/text_encoder", kCpu);
  auto out = te->forward(g["text_encoder.input_ids"]);
  EXPECT_LE(rel_err(out.last_hidden_state, g["text_encoder.last_hidden_state"]), 1e-4);
  EXPECT_LE(rel_err(out.pooled, g["text_encoder.pooler_output"]), 1e-4);
}

TEST(Golden, UNetPerSampleAndScalarTimesteps) {
  DP_REQUIRE_GOLDEN(dir);
  Golden g(dir);
  auto unet = UNet2DConditionModel::load(dir + "/model/unet", kCpu);
  at::Tensor out = unet->forward(g["unet.sample"], g["unet.timesteps"], g["unet.encoder_hidden_states"]);
  EXPECT_LE(rel_err(out, g["unet.out"]), 1e-4);
  at::Tensor out250 = unet->forward(g["unet.sample"], at::scalar_tensor(250, at::kLong), g["unet.encoder_hidden_states"]);
  EXPECT_LE(rel_err(out250, g["unet.out_scalar_t250"]), 1e-4);
  // Each sample's result must not depend on its batch neighbours beyond rounding.
  at::Tensor one = unet->forward(g["unet.sample"].slice(0, 1, 2), g["unet.timesteps"].slice(0, 1, 2),
                                 g["unet.encoder_hidden_states"].slice(0, 1, 2));
  EXPECT_LE(rel_err(one, g["unet.out"].slice(0, 1, 2)), 1e-4);
}

TEST(Golden, VaeDecodeAndEncode) {
  DP_REQUIRE_GOLDEN(dir);
  Golden g(dir);
  auto vae = AutoencoderKL::load(dir + "/model/vae", kCpu);
  EXPECT_LE(rel_err(vae->decode(g["vae.latents"]), g["vae.decoded"]), 1e-4);
  auto enc = vae->encode(g["vae.image"]);
  EXPECT_LE(rel_err(enc.mean, g["vae.encoded_mean"]), 1e-4);
  EXPECT_LE(rel_err(enc.logvar, g["vae.encoded_logvar"]), 1e-4);
}

// The whole StableDiffusionPipeline loop for every sampler listed in golden.json.
TEST(Golden, PipelineLoopEverySampler) {
  DP_REQUIRE_GOLDEN(dir);
  Golden g(dir);
  SdModel model = SdModel::load(dir + "/model", kCpu);
  const auto prompts = g.meta.at("prompts").get<std::vector<std::string>>();
  const int steps = g.meta.at("num_inference_steps").get<int>();
  const double guidance = g.meta.at("guidance_scale").get<double>();
  const std::string negative = g.meta.value("negative_prompt", std::string());
  ASSERT_FALSE(g.meta.at("schedulers").empty());
  for (auto it = g.meta.at("schedulers").begin(); it != g.meta.at("schedulers").end(); ++it) {
    const std::string name = it.key();
    SCOPED_TRACE("sampler " + name);
    model.scheduler = SchedulerConfig::load(dir + "/model/scheduler/" + name + ".json");
    std::vector<GenerationParams> params(prompts.size());
    std::vector<const GenerationParams*> ptrs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      params[i].prompt = prompts[i];
      params[i].negative_prompt = negative;
      params[i].steps = steps;
      params[i].guidance = guidance;
      ptrs.push_back(&params[i]);
    }
    auto emb = TextEncodeStage(model).run(ptrs);
    const at::Tensor noise = g["pipeline.initial_noise"];
    std::vector<DenoiseState> states;
    for (size_t i = 0; i < prompts.size(); ++i)
      states.push_back(make_denoise_state(model, params[i], emb[i], i, noise[i]));
    // schedule
    const at::Tensor gts = g["pipeline." + name + ".timesteps"].to(at::kDouble);
    ASSERT_EQ(states[0].total_steps(), gts.size(0));
    for (int k = 0; k < gts.size(0); ++k)
      EXPECT_LT(std::abs(states[0].sampler->timestep(k) - gts[k].item<double>()), 1.0) << "timestep " << k;
    if (g.t.count("pipeline." + name + ".sigmas")) {
      const at::Tensor gs = g["pipeline." + name + ".sigmas"].to(at::kDouble);
      ASSERT_EQ(states[0].sampler->sigmas().size(), static_cast<size_t>(gs.size(0)));
      at::Tensor ours = at::tensor(states[0].sampler->sigmas(), at::TensorOptions().dtype(at::kDouble));
      EXPECT_LE(rel_err(ours, gs), 1e-6);
    }
    DenoiseStage denoise(model);
    std::vector<DenoiseState*> batch;
    for (auto& s : states) batch.push_back(&s);
    while (!states[0].done()) denoise.step(batch);
    at::Tensor latents = at::stack({states[0].latents, states[1].latents});
    const double lat_err = rel_err(latents, g["pipeline." + name + ".final_latents"]);
    EXPECT_LE(lat_err, 1e-3);
    at::Tensor img = DecodeStage(model).run_uint8({states[0].latents, states[1].latents});
    at::Tensor ref = g["pipeline." + name + ".image_uint8"];
    ASSERT_EQ(img.sizes(), ref.sizes());
    at::Tensor diff = (img.to(at::kInt) - ref.to(at::kInt)).abs();
    EXPECT_LE(diff.max().item<int>(), 255);
    const double within1 = (diff <= 1).to(at::kDouble).mean().item<double>();
    EXPECT_GE(within1, 0.99) << "fraction of 8-bit values within +-1";
    std::printf("[golden] %-10s final latents rel err %.2e, image values within +-1: %.4f, max diff %d\n",
                name.c_str(), lat_err, within1, diff.max().item<int>());
  }
}
