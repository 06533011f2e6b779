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
#include "test_util.h"

using namespace diffpipe;
using diffpipe::testing::rel_err;

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
