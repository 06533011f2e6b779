// Placement planning from a cost profile: the profile file (round trip, errors naming the field), the
// simulator's view of a placement, the analytic bound and memory per rank, the search's choices on profiles whose
// best shape is known, memory refusal, pipeline files that load back, and a 512-rank cluster.
#include <gtest/gtest.h>

#include <fstream>

#include "diffpipe/cluster/plan.h"
#include "diffpipe/runtime/error.h"
#include "test_util.h"

using namespace diffpipe;

namespace {

using test::error_of;

// An SD-like profile on a GPU: encode and decode one call per request, denoise 20 calls; seconds per call at
// batch 1, 4 and 8.
CostProfile sd_like(double decode_at8 = 0.08) {
  CostProfile p;
  p.model = "sd-like";
  p.device = "cuda";
  p.dtype = "float16";
  p.width = p.height = 512;
  p.steps = 20;
  p.threads = 1;
  auto stage = [](const std::string& name, bool heavy, int calls, std::vector<std::pair<int, double>> s, double out,
                  double weights, double act_at1) {
    StageCost c;
    c.name = name;
    c.heavy = heavy;
    c.multi_step = calls > 1;
    c.calls = calls;
    c.seconds.points = std::move(s);
    c.out_bytes = out;
    c.weight_bytes = weights;
    for (const auto& [b, sec] : c.seconds.points) c.activation_bytes.points.push_back({b, act_at1 * b});
    return c;
  };
  p.stages = {stage("encode", false, 1, {{1, 0.004}, {4, 0.006}, {8, 0.009}}, 236544, 0.25e9, 0.01e9),
              stage("denoise", true, 20, {{1, 0.010}, {4, 0.030}, {8, 0.058}}, 16384, 1.7e9, 0.3e9),
              stage("decode", false, 1, {{1, 0.012}, {4, 0.042}, {8, decode_at8}}, 786432, 0.1e9, 0.8e9)};
  return p;
}

std::string saved(const CostProfile& p, const std::string& name) {
  const std::string path = test::scratch_dir("plan-" + name) + "/profile.json";
  p.save(path);
  return path;
}

std::string write(const std::string& name, const std::string& text) {
  const std::string path = test::scratch_dir("plan-" + name) + "/file";
  std::ofstream(path) << text;
  return path;
}

PlanOptions quick() {
  PlanOptions o;
  o.batch_sizes = {4, 8};
  o.simulate_top = 4;
  return o;
}

}  // namespace

TEST(CostProfile, RoundTripsThroughItsFile) {
  const CostProfile p = sd_like();
  const CostProfile q = CostProfile::load(saved(p, "roundtrip"));
  ASSERT_EQ(q.stages.size(), 3u);
  EXPECT_EQ(q.device, "cuda");
  EXPECT_EQ(q.steps, 20);
  EXPECT_TRUE(q.stage("denoise").heavy);
  EXPECT_EQ(q.stage("denoise").calls, 20);
  EXPECT_DOUBLE_EQ(q.stage("decode").seconds.at(4), 0.042);
  EXPECT_DOUBLE_EQ(q.stage("decode").activation_bytes.at(8), 6.4e9);
  EXPECT_DOUBLE_EQ(q.stage("encode").out_bytes, 236544);
  EXPECT_EQ(q.layout().size(), 3u);
  EXPECT_TRUE(q.layout()[1].heavy);
}

TEST(CostProfile, BadFilesNameTheField) {
  const std::string good = [] {
    std::ifstream f(saved(sd_like(), "bad-src"));
    return std::string(std::istreambuf_iterator<char>(f), {});
  }();
  auto load_text = [](const std::string& name, const std::string& text) {
    return error_of([&] { CostProfile::load(write(name, text)); });
  };
  EXPECT_NE(load_text("notjson", "{ not json").find(": not JSON"), std::string::npos);
  EXPECT_NE(load_text("format", "{\"format\": \"other\"}").find("format must be \"diffpipe-profile/1\""), std::string::npos);
  std::string s = good;
  s.replace(s.find("\"seconds\""), 9, "\"secs\"");
  EXPECT_NE(load_text("seconds", s).find("stages[0].batches[0].seconds must be a number"), std::string::npos);
  s = good;
  s.replace(s.find("\"heavy\": false"), 14, "\"heavy\": true");
  EXPECT_NE(load_text("heavy", s).find("exactly one stage must be heavy (found 2)"), std::string::npos);
  s = good;
  s.replace(s.find("\"batch\": 4"), 10, "\"batch\": 1");
  EXPECT_NE(load_text("ascend", s).find("stages[0] ('encode'): batches: batch sizes must ascend"), std::string::npos);
  EXPECT_NE(error_of([] { CostProfile::load("/nonexistent/profile.json"); }).find("/nonexistent/profile.json: cannot read"),
            std::string::npos);
}

TEST(Plan, SimStagesFollowThePlacement) {
  const CostProfile p = sd_like();
  const Placement pl = Placement::derive(4, {"cuda", "float16"}, p.layout());
  const auto s = sim_stages(pl, p);
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[1].ranks, (std::vector<int>{1, 2}));
  EXPECT_EQ(s[1].calls, 20);
  EXPECT_TRUE(s[1].multi_step);
  EXPECT_EQ(s[1].planner_limit, 16) << "heavy: 2 x max_batch";
  EXPECT_EQ(s[0].planner_limit, 64) << "light: admission factor 4 x its own bound";
  EXPECT_DOUBLE_EQ(s[0].batch_wait_s, 0.002);
  EXPECT_EQ(sim_stages(pl, p, 50)[1].calls, 50) << "--steps replaces the heavy stage's calls";
  Placement other = pl;
  other.stages[2].name = "upscale";
  EXPECT_NE(error_of([&] { sim_stages(other, p); }).find("stage 'upscale' is not in the profile (profiled stages: encode, denoise, decode)"),
            std::string::npos);
}

TEST(Plan, BoundIsTheBusiestRanksShare) {
  const CostProfile p = sd_like();
  // per request at batch 8: encode 0.009/8, denoise 20 x 0.058/8, decode 0.08/8
  const double e = 0.009 / 8, d = 20 * 0.058 / 8, v = 0.08 / 8;
  Placement rep = Placement::replicas(2, {"cuda", "float16"}, p.layout());
  EXPECT_NEAR(throughput_bound(rep, p), 2 / (e + d + v), 1e-9);
  Placement three = Placement::derive(3, {"cuda", "float16"}, p.layout());
  EXPECT_NEAR(throughput_bound(three, p), 1 / d, 1e-9) << "the denoise rank is the busiest";
  EXPECT_NEAR(peak_rank_memory(rep, p), 0.4e9 + 0.25e9 + 1.7e9 + 0.1e9 + 8 * (0.01e9 + 0.3e9 + 0.8e9), 1);
  EXPECT_NEAR(peak_rank_memory(three, p), 0.4e9 + 0.1e9 + 8 * 0.8e9, 1) << "the decode rank (its activations) is the largest";
}

TEST(Plan, BestPlacementBeatsTheDefaultsAndLoadsBack) {
  // an expensive decoder (a third of the work at batch 8): replicas and the derived layout both waste ranks
  const CostProfile p = sd_like(0.25);
  ClusterSpec c;
  c.nodes = 2;
  c.ranks_per_node = 4;
  const auto cands = plan_placements(p, c, quick());
  ASSERT_FALSE(cands.empty());
  const PlanCandidate& best = cands.front();
  ASSERT_TRUE(best.simulated);
  double derived = 0;
  for (const auto& x : cands) {
    if (x.simulated) EXPECT_GE(best.sim.steady_images_per_s, x.sim.steady_images_per_s) << x.shape;
    if (x.shape.rfind("derived", 0) == 0 && x.placement.stages[1].spec.max_batch == 8)
      derived = simulate_placement(x.placement, p, c, quick()).steady_images_per_s;
  }
  EXPECT_GT(best.sim.steady_images_per_s, 1.3 * derived) << best.shape;
  EXPECT_GT(best.sim.steady_images_per_s, 0.9 * best.bound) << "saturated: the simulation reaches the bound";
  EXPECT_LT(best.sim.steady_images_per_s, 1.02 * best.bound);
  // the pipeline file reads back as the same placement
  const std::string toml = placement_toml(best.placement, p, "a comment\nof two lines");
  EXPECT_EQ(toml.rfind("# a comment\n# of two lines\n", 0), 0u);
  const Placement back = Placement::load(write("toml", toml), c.world(), p.layout());
  ASSERT_EQ(back.stages.size(), 3u);
  for (size_t k = 0; k < 3; ++k) {
    EXPECT_EQ(back.stages[k].spec.ranks, best.placement.stages[k].spec.ranks) << back.stages[k].name;
    EXPECT_EQ(back.stages[k].spec.max_batch, best.placement.stages[k].spec.max_batch);
  }
  EXPECT_EQ(back.transport, "nccl");
  EXPECT_EQ(back.ranks[0].dtype, "float16");
}

TEST(Plan, MemoryDecidesWhatFits) {
  const CostProfile p = sd_like();
  ClusterSpec c;
  c.ranks_per_node = 4;
  c.device_memory_bytes = 1e9;
  EXPECT_NE(error_of([&] { plan_placements(p, c, quick()); }).find("no placement fits in 1 GB per rank (the smallest needs"),
            std::string::npos);
  // room for the UNet at batch 8 alone, not with the decoder's activations beside it
  c.device_memory_bytes = 5e9;
  const auto cands = plan_placements(p, c, quick());
  EXPECT_TRUE(cands.front().fits);
  EXPECT_LE(cands.front().memory, 5e9);
  for (const auto& x : cands)
    if (x.shape.rfind("replicas", 0) == 0 && x.placement.stages[1].spec.max_batch == 8) EXPECT_FALSE(x.fits);
  // room for everything at batch 8 but the decoder's activations: its batch is halved until the rank fits
  c.device_memory_bytes = 8e9;  // replicas at 8: 0.4 + 2.05 + 8 x 1.11 = 11.3 GB; decode at 2: 0.4 + 2.05 + 8 x 0.31 + 2 x 0.8
  bool found = false;
  for (const auto& x : plan_placements(p, c, quick()))
    if (x.shape.rfind("replicas", 0) == 0 && x.placement.stages[1].spec.max_batch == 8) {
      found = true;
      EXPECT_TRUE(x.fits);
      EXPECT_EQ(x.placement.stages[2].spec.max_batch, 2) << x.shape;
      EXPECT_NE(x.shape.find("(encode max_batch 2, decode max_batch 2)"), std::string::npos) << x.shape;
      EXPECT_LE(x.memory, 8e9);
    }
  EXPECT_TRUE(found);
}

TEST(Plan, OpenLoopPrefersLowerLatencyWhenBothKeepUp) {
  const CostProfile p = sd_like();
  ClusterSpec c;
  c.ranks_per_node = 4;
  PlanOptions o = quick();
  o.rate = 5;  // well under every candidate's capacity
  o.requests = 300;
  const auto cands = plan_placements(p, c, o);
  const PlanCandidate& best = cands.front();
  for (const auto& x : cands)
    if (x.simulated) EXPECT_LE(best.sim.latency_p99, x.sim.latency_p99 + 1e-12) << x.shape;
  o.p99_slo_s = 1e-3;  // nobody meets it: every simulated candidate is marked
  for (const auto& x : plan_placements(p, c, o))
    if (x.simulated) EXPECT_FALSE(x.meets_slo);
}

TEST(Plan, LargeClusterPlansInSeconds) {
  const CostProfile p = sd_like(0.25);
  ClusterSpec c;
  c.nodes = 64;
  c.ranks_per_node = 8;
  PlanOptions o;
  o.batch_sizes = {8};
  o.simulate_top = 2;
  const auto cands = plan_placements(p, c, o);
  const PlanCandidate& best = cands.front();
  ASSERT_TRUE(best.simulated);
  EXPECT_EQ(best.placement.world_size, 512);
  EXPECT_GT(best.sim.steady_images_per_s, 0.9 * best.bound);
  EXPECT_GT(best.sim.inter_node_bytes, 0) << "dedicated ranks on other nodes: traffic crosses nodes";
}
