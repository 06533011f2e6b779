// The dataset generator, the analytic fidelity checker and the metrics (FID on Gaussians with known distance).
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>

#include "diffpipe/runtime/error.h"
#include "diffpipe/train/fidelity.h"
#include "diffpipe/train/inception.h"
#include "diffpipe/train/metrics.h"
#include "diffpipe/train/shapes.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/model_stages.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/unclip.h"
#include "diffpipe/train/recipes.h"
#include "test_util.h"

using namespace diffpipe;
using test::error_of;

TEST(Shapes, DeterministicCaptionsRoundTrip) {
  for (uint64_t i = 0; i < 300; ++i) {
    const data::Scene s = data::sample_scene(7, i);
    const std::string c = data::caption(s);
    const data::Scene p = data::parse_caption(c);
    ASSERT_EQ(data::caption(p), c);
    ASSERT_EQ(data::caption(data::sample_scene(7, i)), c) << "not deterministic";
  }
  EXPECT_NE(data::caption(data::sample_scene(7, 0)), data::caption(data::sample_scene(8, 0)));
  EXPECT_EQ(data::caption(data::parse_caption("a small red circle at the top left on a black background")),
            "a small red circle at the top left on a black background");
  EXPECT_THROW(data::parse_caption("a red elephant at the top left on a black background"), Error);
  EXPECT_THROW(data::parse_caption("a small red circle"), Error);
}

TEST(Shapes, DatasetCoversTheGrammar) {
  std::set<int> colors, shapes, positions, backgrounds, counts;
  for (uint64_t i = 0; i < 2000; ++i) {
    auto s = data::sample_scene(1, i);
    backgrounds.insert(s.background);
    counts.insert(static_cast<int>(s.objects.size()));
    for (auto& o : s.objects) {
      colors.insert(o.color);
      shapes.insert(o.shape);
      positions.insert(o.position);
    }
  }
  EXPECT_EQ(colors.size(), data::kColors.size());
  EXPECT_EQ(shapes.size(), data::kShapes.size());
  EXPECT_EQ(positions.size(), data::kPositions.size());
  EXPECT_EQ(backgrounds.size(), data::kBackgrounds.size());
  EXPECT_EQ(counts, (std::set<int>{1, 2}));
}

// The checker must accept the ground truth (at 64 and 32 px) and reject wrong captions.
TEST(Fidelity, GroundTruthScoresHighWrongCaptionsLow) {
  std::vector<std::vector<data::ObjectVerdict>> right, right32, wrong;
  for (uint64_t i = 0; i < 300; ++i) {
    const data::Scene s = data::sample_scene(3, i);
    const Image im = data::render(s);
    right.push_back(data::check_image(im, s));
    right32.push_back(data::check_image(data::downsample(im, 2), s));
    data::Scene w = s;
    for (auto& o : w.objects) {
      o.color = (o.color + 1) % static_cast<int>(data::kColors.size());
      o.shape = (o.shape + 1) % static_cast<int>(data::kShapes.size());
      if (w.objects.size() == 1) o.position = (o.position + 1) % static_cast<int>(data::kPositions.size());
    }
    wrong.push_back(data::check_image(im, w));
  }
  const auto r = data::summarize(right), r32 = data::summarize(right32), x = data::summarize(wrong);
  std::printf("[fidelity] ground truth 64px colour %.3f shape %.3f position %.3f; 32px %.3f %.3f %.3f; wrong captions "
              "%.3f %.3f %.3f\n", r.color, r.shape, r.position, r32.color, r32.shape, r32.position, x.color, x.shape,
              x.position);
  EXPECT_GE(r.color, 0.99);
  EXPECT_GE(r.shape, 0.97);
  EXPECT_GE(r.position, 0.99);
  EXPECT_GE(r32.color, 0.97);
  EXPECT_GE(r32.shape, 0.85);
  EXPECT_LE(x.color, 0.02);
  EXPECT_LE(x.shape, 0.10);
}

TEST(Metrics, FrechetDistanceOfKnownGaussians) {
  // diagonal covariances: closed form sum (mu1-mu2)^2 + s1 + s2 - 2 sqrt(s1 s2)
  metrics::Gaussian a{at::tensor({0.0, 1.0, 2.0}, at::kDouble), at::diag(at::tensor({1.0, 4.0, 9.0}, at::kDouble))};
  metrics::Gaussian b{at::tensor({1.0, 1.0, 0.0}, at::kDouble), at::diag(at::tensor({4.0, 1.0, 1.0}, at::kDouble))};
  const double want = (1 + 0 + 4) + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6);
  EXPECT_NEAR(metrics::frechet_distance(a, b), want, 1e-9);
  EXPECT_NEAR(metrics::frechet_distance(a, a), 0.0, 1e-9);
  // a general SPD pair against the symmetric form tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)
  at::manual_seed(0);
  at::Tensor m1 = at::randn({5, 5}, at::kDouble), m2 = at::randn({5, 5}, at::kDouble);
  at::Tensor s1 = at::matmul(m1, m1.t()) + at::eye(5, at::kDouble), s2 = at::matmul(m2, m2.t()) + at::eye(5, at::kDouble);
  auto sym_sqrt = [](const at::Tensor& s) {
    auto [w, v] = at::linalg_eigh(s);
    return at::matmul(v * w.clamp_min(0).sqrt().unsqueeze(0), v.t());
  };
  const at::Tensor r1 = sym_sqrt(s1);
  const double tr = sym_sqrt(at::matmul(at::matmul(r1, s2), r1)).trace().item<double>();
  metrics::Gaussian g1{at::zeros({5}, at::kDouble), s1}, g2{at::zeros({5}, at::kDouble), s2};
  EXPECT_NEAR(metrics::frechet_distance(g1, g2), s1.trace().item<double>() + s2.trace().item<double>() - 2 * tr, 1e-6);
  // singular covariances take the eps retry path and stay finite
  metrics::Gaussian z{at::zeros({3}, at::kDouble), at::zeros({3, 3}, at::kDouble)};
  EXPECT_TRUE(std::isfinite(metrics::frechet_distance(z, z)));
}

TEST(Metrics, FittedGaussiansApproachTheClosedForm) {
  at::manual_seed(1);
  at::Tensor x = at::randn({20000, 4}, at::kDouble), y = at::randn({20000, 4}, at::kDouble) * 2 + 1;
  const double d = metrics::frechet_distance(metrics::fit_gaussian(x), metrics::fit_gaussian(y));
  EXPECT_NEAR(d, 4 * 1 + 4 * (1 + 4 - 2 * 2), 0.15);  // |mu|^2 = 4, per dim 1 + 4 - 2*sqrt(4)
}

TEST(Metrics, ClipScore) {
  at::Tensor t = at::tensor({1.0, 0.0, 1.0, 0.0}, at::kDouble).view({2, 2});
  at::Tensor i = at::tensor({1.0, 0.0, -1.0, 0.0}, at::kDouble).view({2, 2});
  EXPECT_NEAR(metrics::clip_score(t, i), 50.0, 1e-9);  // cos 1 -> 100, cos -1 -> 0
}

// The FID Inception-v3 with random weights: every tensor it reads has torchvision's name and shape, the
// output is the 2048-d pool3 vector, and a file that lacks a tensor or has a foreign one is rejected by name.
// (Numbers against pytorch-fid itself: tests/apps/inception_reference_test.sh.)
TEST(Inception, ArchitectureKeysShapesAndErrors) {
  Weights w = Weights::initializer(5);
  FidInception net(w);
  EXPECT_EQ(w.all().size(), 94u * 5) << "94 conv+batch-norm units, 5 tensors each";
  EXPECT_EQ(w.all().at("Mixed_7c.branch3x3dbl_3b.conv.weight").sizes(), (at::IntArrayRef{384, 384, 3, 1}));
  EXPECT_EQ(w.all().at("Mixed_6e.branch7x7dbl_5.conv.weight").sizes(), (at::IntArrayRef{192, 192, 1, 7}));
  at::NoGradGuard ng;
  const at::Tensor x = at::rand({2, 3, 64, 64}) * 2 - 1;
  const at::Tensor f = net.features(x);
  EXPECT_EQ(f.sizes(), (at::IntArrayRef{2, FidInception::kFeatures}));
  EXPECT_TRUE(at::isfinite(f).all().item<bool>());
  EXPECT_TRUE((f >= 0).all().item<bool>()) << "pool3 follows a ReLU";
  EXPECT_TRUE(at::allclose(net.features(x.slice(0, 1, 2)), f.slice(0, 1, 2), 1e-4, 1e-5)) << "per image";
  auto missing = w.all();
  missing.erase("Mixed_6a.branch3x3.bn.running_var");
  EXPECT_NE(error_of([&] { FidInception(Weights::from_map(missing, "inc.safetensors")); })
                .find("inc.safetensors: missing tensor 'Mixed_6a.branch3x3.bn.running_var'"),
            std::string::npos);
  auto extra = w.all();
  extra["Mixed_8a.conv.weight"] = at::zeros({1});
  extra["fc.weight"] = at::zeros({1008, 2048});  // the classifier is allowed and ignored
  EXPECT_NE(error_of([&] { FidInception(Weights::from_map(extra, "inc.safetensors")); })
                .find("unexpected tensor 'Mixed_8a.conv.weight'"),
            std::string::npos);
}

// The Stable unCLIP recipes on the shipped shapes model, a few steps each: the folder they write validates as a
// Stable unCLIP folder, runs encode -> prior -> denoise -> decode, the prior's clip statistics are the
// normaliser's, and a request goes through the prior and the decoder to a finite image.
TEST(Unclip, RecipesWriteAWorkingStableUnclipFolder) {
  const std::string from = std::string(DIFFPIPE_SOURCE_DIR) + "/models/shapes-sd";
  const std::string out = test::scratch_dir("unclip-recipe");
  const train::TrainOptions o{out, 4, 4, 1e-3, false, 1000};
  train::train_prior(o, from);
  EXPECT_NE(error_of([&] { SdModel::validate(out); }).find("unet"), std::string::npos)
      << "before the decoder is trained the folder is incomplete, and says so";
  train::train_decoder(o, from);
  EXPECT_NO_THROW(SdModel::validate(out));
  const auto layout = pipeline_layout(out);
  ASSERT_EQ(layout.size(), 5u) << "encode, prior, denoise, decode and the shapes model's upscale stage";
  EXPECT_EQ(layout[1].name, "prior");
  EXPECT_EQ(layout[4].name, "upscale");
  const auto norm = load_safetensors(out + "/image_normalizer/diffusion_pytorch_model.safetensors");
  const auto prior = load_safetensors(out + "/prior/diffusion_pytorch_model.safetensors");
  EXPECT_TRUE(at::equal(norm.at("mean"), prior.at("clip_mean")));
  EXPECT_TRUE(at::equal(norm.at("std"), prior.at("clip_std")));
  EXPECT_GT(norm.at("std").min().item<double>(), 0.0);
  const SdModel m = SdModel::load(out, DeviceSpec{});
  GenerationParams p;
  p.prompt = "a red circle at the top left";
  p.prior_steps = 3;
  p.steps = 3;
  PriorRunner runner(*m.unclip, m.spec);
  PriorState s = runner.make_state(p, 0);
  std::vector<PriorState*> b{&s};
  while (!s.done()) runner.step(b);
  auto embs = TextEncodeStage(m).run({&p});
  embs[0].class_labels = runner.class_labels(s);
  EXPECT_EQ(embs[0].class_labels.size(0), 2 * m.unclip->embedding_dim());
  DenoiseState d = make_denoise_state(m, p, embs[0]);
  std::vector<DenoiseState*> db{&d};
  while (!d.done()) DenoiseStage(m).step(db);
  const at::Tensor img = decode_final_uint8(m, {d.latents});
  EXPECT_EQ(img.size(1), 64) << "32 px decoded, 64 px after the super-resolution stage";
  EXPECT_TRUE(d.failure.empty()) << d.failure;
}
