#include <fstream>

#include "diffpipe/cluster/placement.h"
#include "diffpipe/cluster/toml.h"
#include "diffpipe/runtime/error.h"
#include "test_util.h"

using namespace diffpipe;

namespace {
std::string file_with(const std::string& name, const std::string& text) {
  const std::string p = test::scratch_dir("placement-" + name) + "/pipeline.toml";
  std::ofstream(p) << text;
  return p;
}
}  // namespace

namespace {
std::vector<PipelineStage> with_upscale() {
  auto p = default_pipeline_layout();
  p.push_back({"upscale", false});
  return p;
}
}  // namespace

TEST(Placement, DerivedFromWorldSize) {
  auto p1 = Placement::derive(1);
  EXPECT_EQ(p1.stages_on(0), (std::vector<std::string>{"encode", "denoise", "decode"}));
  EXPECT_FALSE(p1.has("upscale")) << "a model without super-resolution has no upscale stage";
  p1.fit(with_upscale(), "derived");
  EXPECT_EQ(p1.stage("upscale").ranks, std::vector<int>{0});
  p1.fit(default_pipeline_layout(), "derived");
  EXPECT_FALSE(p1.has("upscale")) << "a derived placement follows the model";
  auto p2 = Placement::derive(2);
  EXPECT_EQ(p2.stage("encode").ranks, std::vector<int>{0});
  EXPECT_EQ(p2.stage("decode").ranks, std::vector<int>{0});
  EXPECT_EQ(p2.stage("denoise").ranks, std::vector<int>{1});
  auto p3 = Placement::derive(3, {}, with_upscale());
  EXPECT_EQ(p3.stage("decode").ranks, std::vector<int>{2});
  EXPECT_EQ(p3.stage("upscale").ranks, std::vector<int>{2}) << "upscale runs where decode does";
  auto p6 = Placement::derive(6);
  EXPECT_EQ(p6.stage("denoise").ranks, (std::vector<int>{1, 2, 3, 4}));
  EXPECT_EQ(p6.stage("decode").ranks, std::vector<int>{5});
  for (int n = 1; n <= 8; ++n) EXPECT_NO_THROW(Placement::derive(n).validate("derived")) << n;
  EXPECT_NE(p3.describe().find("rank 1 [cpu, float32]: denoise"), std::string::npos) << p3.describe();
  // any pipeline: the heavy stage gets the extra ranks, stages before it rank 0, after it the last rank
  auto p5 = Placement::derive(5, {}, {{"a"}, {"b"}, {"heavy", true}, {"c"}});
  EXPECT_EQ(p5.stages_on(0), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(p5.stage("heavy").ranks, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(p5.stages_on(4), std::vector<std::string>{"c"});
  EXPECT_NE(p5.describe().find("heavy(max_batch 8, step batching)"), std::string::npos) << p5.describe();
}

// Stable unCLIP's prior wants a rank of its own: it gets one once every stage can have one (4 ranks), before
// the denoiser's replicas; with fewer ranks it runs on rank 0 with the text encoder.
TEST(Placement, PriorGetsItsOwnRankWhenThereAreEnough) {
  const std::vector<PipelineStage> unclip{{"encode"}, {"prior", false, true}, {"denoise", true}, {"decode"}};
  auto p1 = Placement::derive(1, {}, unclip);
  EXPECT_EQ(p1.stages_on(0), (std::vector<std::string>{"encode", "prior", "denoise", "decode"}));
  auto p3 = Placement::derive(3, {}, unclip);
  EXPECT_EQ(p3.stages_on(0), (std::vector<std::string>{"encode", "prior"}));
  EXPECT_EQ(p3.stage("denoise").ranks, std::vector<int>{1});
  EXPECT_EQ(p3.stage("decode").ranks, std::vector<int>{2});
  auto p4 = Placement::derive(4, {}, unclip);
  EXPECT_EQ(p4.stage("encode").ranks, std::vector<int>{0});
  EXPECT_EQ(p4.stage("prior").ranks, std::vector<int>{1});
  EXPECT_EQ(p4.stage("denoise").ranks, std::vector<int>{2});
  EXPECT_EQ(p4.stage("decode").ranks, std::vector<int>{3});
  auto p7 = Placement::derive(7, {}, unclip);
  EXPECT_EQ(p7.stage("prior").ranks, std::vector<int>{1});
  EXPECT_EQ(p7.stage("denoise").ranks, (std::vector<int>{2, 3, 4, 5}));
  EXPECT_EQ(p7.stage("decode").ranks, std::vector<int>{6});
  for (int n = 1; n <= 8; ++n) EXPECT_NO_THROW(Placement::derive(n, {}, unclip).validate("derived")) << n;
}

// A stage after the heavy one that wants a rank of its own (the SDXL refiner, IF stage II) gets one as well, never one
// of the denoiser's replicas (they once shared rank 1).
TEST(Placement, OwnRankAfterTheHeavyStage) {
  const std::vector<PipelineStage> refiner{{"encode"}, {"denoise", true}, {"refine", false, true}, {"decode"}};
  auto p3 = Placement::derive(3, {}, refiner);
  EXPECT_EQ(p3.stage("denoise").ranks, std::vector<int>{1});
  EXPECT_EQ(p3.stage("refine").ranks, std::vector<int>{2});  // with decode on the last rank
  auto p4 = Placement::derive(4, {}, refiner);
  EXPECT_EQ(p4.stage("encode").ranks, std::vector<int>{0});
  EXPECT_EQ(p4.stage("refine").ranks, std::vector<int>{1});
  EXPECT_EQ(p4.stage("denoise").ranks, std::vector<int>{2});
  EXPECT_EQ(p4.stage("decode").ranks, std::vector<int>{3});
  auto p6 = Placement::derive(6, {}, refiner);
  EXPECT_EQ(p6.stage("refine").ranks, std::vector<int>{1});
  EXPECT_EQ(p6.stage("denoise").ranks, (std::vector<int>{2, 3, 4}));
  const std::vector<PipelineStage> cascade{{"encode"}, {"denoise", true}, {"superres", false, true}, {"decode"},
                                           {"x4", false, true}};
  auto p5 = Placement::derive(5, {}, cascade);
  EXPECT_EQ(p5.stage("superres").ranks, std::vector<int>{1});
  EXPECT_EQ(p5.stage("x4").ranks, std::vector<int>{2});
  EXPECT_EQ(p5.stage("denoise").ranks, std::vector<int>{3});
  EXPECT_EQ(p5.stage("decode").ranks, std::vector<int>{4});
  for (int n = 1; n <= 8; ++n) {
    EXPECT_NO_THROW(Placement::derive(n, {}, refiner).validate("derived")) << n;
    EXPECT_NO_THROW(Placement::derive(n, {}, cascade).validate("derived")) << n;
    const Placement p = Placement::derive(n, {}, refiner);
    if (n >= 4)
      for (int r : p.stage("denoise").ranks) EXPECT_NE(r, p.stage("refine").ranks[0]) << n;
  }
}

TEST(Placement, DataParallelReplicas) {
  const auto p = Placement::replicas(3);
  for (const auto& s : p.stages) EXPECT_EQ(s.spec.ranks, (std::vector<int>{0, 1, 2})) << s.name;
  EXPECT_NO_THROW(p.validate("replicas"));
  EXPECT_EQ(Placement::replicas(1).stages_on(0), (std::vector<std::string>{"encode", "denoise", "decode"}));
}

TEST(Placement, FileWithReplicasDevicesAndLimits) {
  const auto p = Placement::load(file_with("ok", R"(
transport = "nccl"
device = "cuda"
dtype = "float16"
[encode]
ranks = [0]
max_batch = 16
[denoise]
ranks = [
  1,
  2,   # two replicas, over several lines
]
max_batch = 4
max_inflight = 6
[decode]
ranks = [3]
batch_wait_ms = 5.5
[rank.3]
dtype = "float32"
)"), 4, with_upscale());
  EXPECT_EQ(p.transport, "nccl");
  EXPECT_EQ(p.stage("encode").max_batch, 16);
  EXPECT_EQ(p.stage("denoise").ranks, (std::vector<int>{1, 2}));
  EXPECT_EQ(p.stage("denoise").inflight_limit(), 6);
  EXPECT_EQ(p.stage("encode").inflight_limit(), 32);
  EXPECT_DOUBLE_EQ(p.stage("decode").batch_wait_ms, 5.5);
  EXPECT_EQ(p.ranks[1].dtype, "float16");
  EXPECT_EQ(p.ranks[3].dtype, "float32");
  EXPECT_EQ(p.ranks[3].device, "cuda");
  EXPECT_EQ(p.stage_names(), (std::vector<std::string>{"encode", "denoise", "decode", "upscale"}));
  EXPECT_EQ(p.stage("upscale").ranks, std::vector<int>{3}) << "no [upscale] table: on the decode ranks";
}

TEST(Placement, UpscaleStageOnItsOwnRanks) {
  const std::string text = "[encode]\nranks=[0]\n[denoise]\nranks=[1]\n[decode]\nranks=[0]\n[upscale]\nranks=[2, 3]\n"
                           "max_batch = 2\n";
  auto p = Placement::load(file_with("upscale", text), 4, with_upscale());
  EXPECT_EQ(p.stage("upscale").ranks, (std::vector<int>{2, 3}));
  EXPECT_EQ(p.stage("upscale").max_batch, 2);
  EXPECT_NE(p.describe().find("rank 2 [cpu, float32]: upscale(max_batch 2)"), std::string::npos) << p.describe();
  p.fit(with_upscale(), "f");
  EXPECT_EQ(p.stage("upscale").ranks, (std::vector<int>{2, 3})) << "fit is idempotent";
  EXPECT_NE(test::error_of([&] { p.fit(default_pipeline_layout(), "pipe.toml"); })
                .find("pipe.toml: [upscale] places stage 'upscale', which this model's pipeline (encode -> denoise -> "
                      "decode) does not have"),
            std::string::npos);
  // without the table a rank that would only upscale is idle
  EXPECT_NE(test::error_of([&] {
              Placement::load(file_with("upscale-idle", text.substr(0, text.find("[upscale]"))), 4, with_upscale());
            }).find("more ranks than needed: rank(s) 2, 3 of 4"),
            std::string::npos);
}

// Command-line settings are defaults under a pipeline file: what the file sets wins, what it leaves out comes
// from the command line (never silently dropped).
TEST(Placement, CommandLineDefaultsUnderAFile) {
  PlacementDefaults d;
  d.rank.dtype = "bfloat16";
  d.transport = "mpi";
  d.stage.max_batch = 3;
  d.stage.batching = "static";
  d.batch_invariant = true;
  const auto p = Placement::load(file_with("defaults", "[encode]\nranks=[0]\nmax_batch=5\n[denoise]\nranks=[1]\n"
                                                       "[decode]\nranks=[0]\n[rank.1]\ndtype=\"float32\"\n"),
                                 2, default_pipeline_layout(), d);
  EXPECT_EQ(p.stage("encode").max_batch, 5) << "the file wins";
  EXPECT_EQ(p.stage("denoise").max_batch, 3) << "the command line fills in";
  EXPECT_EQ(p.stage("denoise").batching, "static");
  EXPECT_EQ(p.ranks[0].dtype, "bfloat16");
  EXPECT_EQ(p.ranks[1].dtype, "float32");
  EXPECT_TRUE(p.batch_invariant);
}

TEST(Placement, BadFilesGiveClearErrors) {
  const std::string base = "[encode]\nranks=[0]\n[denoise]\nranks=[1]\n[decode]\nranks=[0]\n";
  auto load = [&](const std::string& name, const std::string& text, int n) {
    return test::error_of([&] { Placement::load(file_with(name, text), n); });
  };
  EXPECT_NE(load("unknown", base + "[refiner]\nranks=[1]\n", 2).find("unknown stage or key 'refiner'"), std::string::npos);
  EXPECT_NE(load("prior-on-sd", base + "[prior]\nranks=[1]\n", 2).find("places stage 'prior', which this model's pipeline"),
            std::string::npos)
      << "a known stage the model's pipeline lacks (the prior of a Stable unCLIP folder, on an SD folder)";
  EXPECT_NE(test::error_of([&] { Placement::load(file_with("upscale-range", base + "[upscale]\nranks=[5]\n"), 2, with_upscale()); })
                .find("stage 'upscale': rank 5 is out of range"),
            std::string::npos);
  EXPECT_NE(load("range", base, 1).find("stage 'denoise': rank 1 is out of range [0, 1)"), std::string::npos);
  EXPECT_NE(load("missing", "[encode]\nranks=[0]\n[decode]\nranks=[0]\n", 1).find("stage 'denoise' has no rank"),
            std::string::npos);
  EXPECT_NE(load("extra", base, 4).find("more ranks than needed: rank(s) 2, 3 of 4"), std::string::npos);
  EXPECT_NE(load("dup", "[encode]\nranks=[0, 0]\n[denoise]\nranks=[0]\n[decode]\nranks=[0]\n", 1).find("listed twice"),
            std::string::npos);
  EXPECT_NE(load("key", base + "[rank.1]\ngpu = 3\n", 2).find("[rank.1] unknown key 'gpu'"), std::string::npos);
  EXPECT_NE(load("batch", "[encode]\nranks=[0]\nmax_batch=0\n[denoise]\nranks=[1]\n[decode]\nranks=[0]\n", 2)
                .find("max_batch 0 must be in [1, 4096]"),
            std::string::npos);
  EXPECT_NE(load("dtype", base + "[rank.0]\ndtype = \"float16\"\n", 2).find("needs device = \"cuda\""), std::string::npos);
  // bfloat16 runs on CPU ranks too (AMX / AVX-512 BF16 kernels)
  EXPECT_EQ(Placement::load(file_with("bf16", base + "[rank.1]\ndtype = \"bfloat16\"\n"), 2).ranks[1].dtype, "bfloat16");
  EXPECT_NE(load("ncclcpu", "transport = \"nccl\"\n" + base, 2).find("transport nccl needs every rank on device"),
            std::string::npos);
  EXPECT_NE(load("transport", "transport = \"tcp\"\n" + base, 2).find("transport 'tcp' is not supported"),
            std::string::npos);
}

TEST(Toml, AnyValidTomlAndErrorsWithLineNumbers) {
  auto j = parse_toml("a = 1\nb = \"x # not a comment\" # comment\n[t.u]\nc = [1, 2.5, true, \"s\"]\nd = -3e2\n"
                      "e = [\n  1,\n  2,\n]\nf = { g = 3 }\n", "f");
  EXPECT_EQ(j["a"], 1);
  EXPECT_EQ(j["b"], "x # not a comment");
  EXPECT_EQ(j["t"]["u"]["c"][1], 2.5);
  EXPECT_EQ(j["t"]["u"]["d"], -300.0);
  EXPECT_EQ(j["t"]["u"]["e"], nlohmann::json({1, 2})) << "multi-line arrays";
  EXPECT_EQ(j["t"]["u"]["f"]["g"], 3) << "inline tables";
  EXPECT_NE(test::error_of([] { parse_toml("a = 1\na = 2\n", "f.toml"); }).find("f.toml:2:"), std::string::npos);
  EXPECT_NE(test::error_of([] { parse_toml("x\n", "f.toml"); }).find("f.toml:1:"), std::string::npos);
  EXPECT_NE(test::error_of([] { parse_toml("[a]\n[a]\n", "f.toml"); }).find("f.toml:2:"), std::string::npos);
  EXPECT_NE(test::error_of([] { parse_toml("k = bare\n", "f.toml"); }).find("f.toml:1:"), std::string::npos);
  EXPECT_NE(test::error_of([] { parse_toml("k = \"open\n", "f.toml"); }).find("f.toml:1:"), std::string::npos);
  EXPECT_NE(test::error_of([] { load_toml("/no/such/pipeline.toml"); }).find("/no/such/pipeline.toml: pipeline file not found"),
            std::string::npos);
}
