// The DALL-E-2-style (Stable unCLIP) reference folder, module by module as diffpipe implements them (#13).
// The folder comes from $DIFFPIPE_GOLDEN_UNCLIP (default ../shared/golden/tiny-unclip); absent, the tests skip.
// Tolerance from the golden README: modules max|a-b|/max|b| <= 1e-4.
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/prior.h"
#include "diffpipe/stages/tokenizer.h"
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
