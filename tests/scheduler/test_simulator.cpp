// The placement simulator against cases whose answer is known in closed form: batching rounds, a pipeline's
// bottleneck, replicas, transfers on a link, queueing, and its errors. The planner and step batcher it drives
// are the runtime's own (tested in test_scheduler.cpp).
#include <gtest/gtest.h>

#include <functional>

#include "diffpipe/scheduler/planner.h"
#include "diffpipe/scheduler/simulator.h"

using namespace diffpipe::sched;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

SimStage stage(const std::string& name, std::vector<int> ranks, CostCurve cost, int calls = 1, bool heavy = false) {
  SimStage s;
  s.name = name;
  s.ranks = std::move(ranks);
  s.cost = std::move(cost);
  s.calls = calls;
  s.multi_step = calls > 1;
  s.heavy = heavy;
  s.gathers = false;
  s.planner_limit = heavy ? 16 : 1 << 30;
  return s;
}

CostCurve flat(double s) { return CostCurve{{{1, s}}}; }
CostCurve fixed(double s) { return CostCurve{{{1, s}, {64, s}}}; }  // the same time at any batch size

SimWorkload closed(int n) {
  SimWorkload w;
  w.requests = n;
  return w;
}

}  // namespace

TEST(CostCurve, InterpolatesAndExtends) {
  const CostCurve c{{{1, 1.0}, {4, 2.5}, {8, 4.5}}};
  EXPECT_DOUBLE_EQ(c.at(1), 1.0);
  EXPECT_DOUBLE_EQ(c.at(2), 1.5);
  EXPECT_DOUBLE_EQ(c.at(6), 3.5);
  EXPECT_DOUBLE_EQ(c.at(16), 8.5) << "beyond the last point: the last segment's slope";
  EXPECT_DOUBLE_EQ(flat(0.3).at(4), 1.2) << "one point: no batching gain assumed";
  EXPECT_NE(error_of([] { CostCurve{{{4, 1.0}, {2, 1.0}}}.validate("encode"); }).find("encode: batch sizes must ascend"),
            std::string::npos);
  EXPECT_NE(error_of([] { CostCurve{{{1, -1.0}}}.validate("decode"); }).find("decode: seconds at batch 1"), std::string::npos);
  EXPECT_NE(error_of([] { CostCurve{}.validate("denoise"); }).find("denoise: no measured batch size"), std::string::npos);
}

TEST(Simulator, ContinuousBatchingRunsRoundsOfMaxBatch) {
  // one multi-step stage, 8 requests at once, 4 per call, 10 calls of 0.1 s each: two rounds of 1 s (the stage
  // gathers, so its first call waits for a full batch instead of starting with the first arrival)
  SimStage d = stage("denoise", {0}, fixed(0.1), 10, true);
  d.max_batch = 4;
  d.gathers = true;
  const SimResult r = simulate({d}, 1, SimNetwork{}, closed(8));
  EXPECT_EQ(r.done, 8);
  EXPECT_NEAR(r.makespan_s, 2.0, 1e-9);
  EXPECT_NEAR(r.images_per_s, 4.0, 1e-9);
  EXPECT_NEAR(r.latency_mean, 1.5, 1e-9) << "four done at 1 s, four at 2 s";
  EXPECT_NEAR(r.latency_p99, 2.0, 1e-9);
  EXPECT_NEAR(r.stages[0].mean_batch, 4.0, 1e-9);
  EXPECT_NEAR(r.stages[0].calls, 20, 1e-9);
  EXPECT_NEAR(r.busiest_rank_utilisation, 1.0, 1e-9);
}

TEST(Simulator, PipelineRunsAtItsBottleneck) {
  // three stages on three ranks, one request per call: 0.1 s, 0.3 s, 0.2 s; 100 requests stream at 1 / 0.3 s
  SimStage e = stage("encode", {0}, flat(0.1)), d = stage("denoise", {1}, flat(0.3), 1, true), v = stage("decode", {2}, flat(0.2));
  for (SimStage* s : {&e, &d, &v}) s->max_batch = 1;
  const SimResult r = simulate({e, d, v}, 3, SimNetwork{}, closed(100));
  EXPECT_EQ(r.done, 100);
  // fill (0.1) + 100 x 0.3 + drain (0.2), plus one control message and two transfers of latency each
  EXPECT_NEAR(r.makespan_s, 0.1 + 100 * 0.3 + 0.2, 1e-3);
  EXPECT_NEAR(r.stages[1].utilisation, 1.0, 0.01);
  EXPECT_NEAR(r.stages[0].utilisation, 1.0 / 3, 0.01);
}

TEST(Simulator, ReplicasScaleTheHeavyStage) {
  auto run = [](int replicas) {
    std::vector<int> ranks;
    for (int k = 1; k <= replicas; ++k) ranks.push_back(k);
    SimStage e = stage("encode", {0}, fixed(0.001)), d = stage("denoise", ranks, CostCurve{{{1, 0.05}, {8, 0.2}}}, 20, true);
    d.max_batch = 8;
    return simulate({e, d}, replicas + 1, SimNetwork{}, closed(256)).images_per_s;
  };
  const double one = run(1), four = run(4);
  EXPECT_NEAR(one, 8 / (20 * 0.2), 0.05 * one) << "8 images every 20 calls of 0.2 s";
  EXPECT_NEAR(four / one, 4.0, 0.2);
}

TEST(Simulator, TransfersQueueOnTheSendersLink) {
  // stage 0 on rank 0 sends 1 GB per request to rank 1 over a 1 GB/s link: one request takes 0.1 + 1 + 0.1 s;
  // ten requests at once leave rank 0 one after another, so the link, not the stages, paces them
  SimStage a = stage("encode", {0}, fixed(0.1)), b = stage("denoise", {1}, fixed(0.1), 1, true);
  a.out_bytes = 1e9;
  a.max_batch = b.max_batch = 1;
  SimNetwork net;
  net.ranks_per_node = 1;  // different nodes: the inter-node bandwidth
  net.inter_bytes_per_s = 1e9;
  net.latency_s = 0;
  EXPECT_NEAR(simulate({a, b}, 2, net, closed(1)).latency_p50, 1.2, 1e-9);
  const SimResult r = simulate({a, b}, 2, net, closed(10));
  EXPECT_NEAR(r.makespan_s, 0.1 + 10 * 1.0 + 0.1, 1e-9);
  EXPECT_DOUBLE_EQ(r.bytes_moved, 10e9);
  EXPECT_DOUBLE_EQ(r.inter_node_bytes, 10e9);
  net.ranks_per_node = 2;  // same node: the intra-node bandwidth (100 GB/s by default)
  const SimResult same = simulate({a, b}, 2, net, closed(10));
  EXPECT_DOUBLE_EQ(same.inter_node_bytes, 0);
  EXPECT_LT(same.makespan_s, 1.5);
  // the same stages on one rank move nothing
  a.ranks = b.ranks = {0};
  EXPECT_DOUBLE_EQ(simulate({a, b}, 1, net, closed(10)).bytes_moved, 0);
}

TEST(Simulator, LightLoadHasNoQueueingAndGatheringAddsItsWait) {
  SimStage e = stage("encode", {0}, fixed(0.01)), d = stage("denoise", {0}, fixed(0.02), 10, true);
  SimWorkload w;
  w.requests = 50;
  w.rate = 0.5;  // one every 2 s on average; a request takes 0.21 s
  const SimResult r = simulate({e, d}, 1, SimNetwork{}, w);
  EXPECT_NEAR(r.latency_p50, 0.21, 1e-6);
  e.gathers = true;
  e.batch_wait_s = 0.005;
  EXPECT_NEAR(simulate({e, d}, 1, SimNetwork{}, w).latency_p50, 0.215, 1e-6);
}

TEST(Simulator, StepBatchingBeatsStaticOnLatencyUnderLoad) {
  auto p99 = [](BatchMode m) {
    SimStage d = stage("denoise", {0}, CostCurve{{{1, 0.02}, {8, 0.05}}}, 20, true);
    d.mode = m;
    SimWorkload w;
    w.requests = 400;
    w.rate = 8;
    w.seed = 3;
    return simulate({d}, 1, SimNetwork{}, w);
  };
  const SimResult step = p99(BatchMode::Step), stat = p99(BatchMode::Static), single = p99(BatchMode::Single);
  EXPECT_EQ(step.done, 400);
  EXPECT_LT(step.latency_p99, stat.latency_p99);
  EXPECT_LT(step.latency_p99, single.latency_p99);
  EXPECT_GT(step.images_per_s, single.images_per_s);
}

TEST(Simulator, PacedClosedLoopKeepsConcurrencyOutstanding) {
  // 4 outstanding on a 0.1 s x 10-call stage with room for 8 (gathering): a batch of 4 every second
  SimStage d = stage("denoise", {0}, fixed(0.1), 10, true);
  d.gathers = true;
  d.max_batch = 4;
  SimWorkload w = closed(40);
  w.concurrency = 4;
  const SimResult r = simulate({d}, 1, SimNetwork{}, w);
  EXPECT_EQ(r.done, 40);
  EXPECT_EQ(r.peak_queued, 0u);
  EXPECT_NEAR(r.steady_images_per_s, 4.0, 0.05);
  EXPECT_NEAR(r.latency_p99, 1.0, 1e-9) << "never more than 4 in the system";
}

TEST(Simulator, DeterministicForASeed) {
  SimStage d = stage("denoise", {0, 1}, CostCurve{{{1, 0.02}, {8, 0.05}}}, 20, true);
  SimWorkload w;
  w.requests = 100;
  w.rate = 20;
  const SimResult a = simulate({d}, 2, SimNetwork{}, w), b = simulate({d}, 2, SimNetwork{}, w);
  EXPECT_EQ(a.latency_p99, b.latency_p99);
  EXPECT_EQ(a.makespan_s, b.makespan_s);
  w.seed = 2;
  EXPECT_NE(simulate({d}, 2, SimNetwork{}, w).makespan_s, a.makespan_s);
}

TEST(Simulator, AdmissionQueueRejectsBeyondCapacity) {
  SimStage d = stage("denoise", {0}, fixed(0.1), 5, true);
  d.planner_limit = 2;
  SimWorkload w = closed(20);
  w.queue_capacity = 8;
  const SimResult r = simulate({d}, 1, SimNetwork{}, w);
  EXPECT_EQ(r.rejected, 10) << "20 at once: 2 admitted, 8 queued, the rest refused";
  EXPECT_EQ(r.done, 10);
  EXPECT_EQ(r.peak_queued, 8u);
}

TEST(Simulator, ErrorsNameTheStage) {
  SimStage d = stage("denoise", {3}, fixed(0.1), 5, true);
  EXPECT_NE(error_of([&] { simulate({d}, 2, SimNetwork{}, closed(1)); }).find("stage 'denoise': rank 3 is outside [0, 2)"),
            std::string::npos);
  d.ranks = {};
  EXPECT_NE(error_of([&] { simulate({d}, 2, SimNetwork{}, closed(1)); }).find("stage 'denoise' has no rank"), std::string::npos);
  d.ranks = {0};
  d.cost = CostCurve{{{2, 0.1}, {1, 0.2}}};
  EXPECT_NE(error_of([&] { simulate({d}, 2, SimNetwork{}, closed(1)); }).find("stage 'denoise' cost: batch sizes must ascend"),
            std::string::npos);
}

TEST(Planner, AdmissionLimitFollowsTheStageKind) {
  EXPECT_EQ(admission_limit(true, 4, 16), 16);
  EXPECT_EQ(admission_limit(false, 4, 16), 64);
  EXPECT_EQ(admission_limit(false, 0, 16), 1 << 30);
}
