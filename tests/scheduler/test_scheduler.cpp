// The scheduler's planning functions, driven for hundreds of simulated steps with no model: no request lost
// or run twice, limits respected, no starvation, cancellation and deadlines in every state, priorities.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <random>
#include <set>

#include "diffpipe/runtime/error.h"
#include "diffpipe/scheduler/lifecycle.h"
#include "diffpipe/scheduler/planner.h"
#include "diffpipe/scheduler/step_batcher.h"

using namespace diffpipe;
using namespace diffpipe::sched;

namespace {
std::string test_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST(Lifecycle, LegalAndIllegalTransitions) {
  EXPECT_TRUE(can_transition(RequestState::Queued, RequestState::Running));
  EXPECT_TRUE(can_transition(RequestState::Running, RequestState::Running)) << "on to the next stage";
  EXPECT_TRUE(can_transition(RequestState::Running, RequestState::Done));
  EXPECT_FALSE(can_transition(RequestState::Queued, RequestState::Done));
  EXPECT_FALSE(can_transition(RequestState::Done, RequestState::Cancelled));
  for (auto s : {RequestState::Queued, RequestState::Running})
    for (auto f : {RequestState::Failed, RequestState::Cancelled, RequestState::TimedOut}) EXPECT_TRUE(can_transition(s, f));
  RequestInfo r;
  r.id = 7;
  try {
    r.transition(RequestState::Done, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("request 7: illegal transition queued -> done"), std::string::npos);
  }
  r.transition(RequestState::Running, 1.0);
  EXPECT_EQ(r.stage, 0);
  r.transition(RequestState::Running, 1.5);
  EXPECT_EQ(r.stage, 1);
  r.transition(RequestState::Cancelled, 2.0, "user asked");
  EXPECT_EQ(r.reason, "user asked");
  EXPECT_EQ(r.finished_s, 2.0);
  EXPECT_EQ(r.admitted_s, 1.0);
}

namespace {
// Stage indices of the SD-shaped pipelines used here: encode, denoise, decode (and upscale when added).
constexpr int kEncode = 0, kDenoise = 1, kDecode = 2, kUpscale = 3;
PlannerConfig cfg(int dn_replicas, int limit, size_t cap = 1000) {
  PlannerConfig c;
  c.stages.push_back({"encode", {0}, 64});
  c.stages.push_back({"denoise", {}, limit});
  for (int r = 1; r <= dn_replicas; ++r) c.stages[kDenoise].replicas.push_back(r);
  c.stages.push_back({"decode", {dn_replicas + 1}});
  c.queue_capacity = cap;
  return c;
}
}  // namespace

TEST(Planner, BoundedQueueRejects) {
  Planner p(cfg(1, 2, 3));
  EXPECT_TRUE(p.submit(1, 0, 10, 0));
  EXPECT_TRUE(p.submit(2, 0, 10, 0));
  EXPECT_TRUE(p.submit(3, 0, 10, 0));
  EXPECT_FALSE(p.submit(4, 0, 10, 0)) << "a full queue must reject";
  EXPECT_FALSE(p.submit(1, 0, 10, 0)) << "a duplicate id must be rejected";
  EXPECT_EQ(p.admit(0).size(), 2u);  // in-flight limit 2
  EXPECT_TRUE(p.submit(4, 0, 10, 0));  // room again
}

TEST(Planner, PrioritiesWithAgingAndLeastLoadedRouting) {
  PlannerConfig c = cfg(2, 1);
  c.aging_per_s = 1.0;
  Planner p(c);
  p.submit(1, 0, 5, 0.0);   // old, low priority
  p.submit(2, 5, 5, 9.0);   // new, higher priority but 9 s younger: 5 < 0 + 9 aging
  p.submit(3, 20, 5, 9.0);  // much higher: goes first
  auto a = p.admit(9.0);
  ASSERT_EQ(a.size(), 2u);  // two denoise replicas, limit 1 each
  EXPECT_EQ(a[0].id, 3u);
  EXPECT_EQ(a[1].id, 1u) << "aging must lift the old request above the newer priority-5 one";
  EXPECT_NE(a[0].route[kDenoise], a[1].route[kDenoise]) << "least-loaded routing spreads over replicas";
  EXPECT_EQ(p.load(kDenoise, a[0].route[kDenoise]), 1);
}

TEST(Planner, UpscaleStageRoutesAndReleasesItsLoad) {
  Planner plain(cfg(1, 4));
  plain.submit(1, 0, 5, 0);
  EXPECT_EQ(plain.admit(0).at(0).route.size(), 3u) << "no upscale stage: not on the route";
  EXPECT_EQ(plain.stage_index("upscale"), -1);
  plain.on_stage_done(1, kEncode, 0);
  plain.on_stage_done(1, kDenoise, 0);
  plain.on_stage_done(1, kDecode, 0);
  EXPECT_EQ(plain.info(1).state, RequestState::Done) << "decode is the last stage of this pipeline";
  EXPECT_THROW(plain.on_stage_done(1, kUpscale, 0), Error);

  PlannerConfig c = cfg(1, 4);
  c.stages.push_back({"upscale", {5, 6}, 1});
  Planner p(c);
  for (uint64_t id = 1; id <= 3; ++id) p.submit(id, 0, 5, 0);
  auto a = p.admit(0);
  ASSERT_EQ(a.size(), 2u) << "two upscale replicas with room for one request each";
  EXPECT_NE(a[0].route[kUpscale], a[1].route[kUpscale]);
  EXPECT_EQ(p.load(kUpscale, 5), 1);
  p.on_stage_done(1, kEncode, 1);
  p.on_stage_done(1, kDenoise, 2);
  p.on_stage_done(1, kDecode, 3);
  EXPECT_EQ(p.info(1).state, RequestState::Running);
  EXPECT_EQ(p.info(1).stage, kUpscale);
  EXPECT_EQ(p.where(1), "in upscale");
  EXPECT_EQ(p.load(kDecode, c.stages[kDecode].replicas[0]), 1) << "request 2 still holds the decoder";
  auto d = p.cancel(2, "client", 3);  // cancelled while encoding: every stage's load is released
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(p.load(kDecode, c.stages[kDecode].replicas[0]), 0);
  p.on_done(1, 4);
  EXPECT_EQ(p.info(1).state, RequestState::Done);
  EXPECT_EQ(p.load(kUpscale, 5) + p.load(kUpscale, 6), 0);
  EXPECT_EQ(p.admit(4).size(), 1u) << "request 3 admitted once upscale room is free";
}

TEST(Planner, OutOfOrderEventsReachTheirStage) {
  PlannerConfig c = cfg(1, 4);
  c.stages.push_back({"upscale", {9}});
  Planner p(c);
  p.submit(1, 0, 5, 0);
  p.submit(2, 0, 5, 0);
  p.admit(0);
  EXPECT_TRUE(p.reach(1, kUpscale, 1)) << "a 'decoded' before 'encoded' and 'denoised' arrived";
  EXPECT_EQ(p.info(1).stage, kUpscale);
  EXPECT_EQ(p.load(kEncode, 0) + p.load(kDenoise, 1) + p.load(kDecode, 2), 3)
      << "only request 2 still holds encode, denoise, decode";
  EXPECT_EQ(p.load(kUpscale, 9), 2) << "both hold the upscaler";
  EXPECT_TRUE(p.reach(1, kDenoise, 1)) << "a late step report changes nothing";
  p.on_stage_done(1, kEncode, 1);
  EXPECT_EQ(p.info(1).stage, kUpscale) << "a late 'encoded' changes nothing";
  p.cancel(2, "client", 2);
  EXPECT_FALSE(p.reach(2, kDecode, 2)) << "events for an ended request are dropped";
  EXPECT_EQ(p.info(2).state, RequestState::Cancelled);
}

// Data-parallel replicas (every stage on every rank): a request stays on one rank for all its stages, and
// requests spread over the ranks by the heavy stage's load; a pipelined placement is unaffected.
TEST(Planner, ReplicasKeepARequestOnOneRank) {
  PlannerConfig c;
  c.stages = {{"encode", {0, 1, 2}, 64}, {"denoise", {0, 1, 2}, 2, true}, {"decode", {0, 1, 2}}};
  Planner p(c);
  for (uint64_t id = 0; id < 6; ++id) p.submit(id, 0, 4, 0);
  const auto a = p.admit(0);
  ASSERT_EQ(a.size(), 6u);
  std::map<int, int> per_rank;
  for (const auto& ad : a) {
    EXPECT_EQ(ad.route[0], ad.route[1]) << "request " << ad.id << " would move between ranks";
    EXPECT_EQ(ad.route[2], ad.route[1]);
    ++per_rank[ad.route[1]];
  }
  EXPECT_EQ(per_rank, (std::map<int, int>{{0, 2}, {1, 2}, {2, 2}})) << "least-loaded over the heavy stage";
  Planner pipe(cfg(2, 4));  // disjoint ranks per stage: each stage's own replicas
  pipe.submit(1, 0, 4, 0);
  const auto b = pipe.admit(0);
  EXPECT_EQ(b.at(0).route, (std::vector<int>{0, 1, 3}));
}

TEST(Planner, AnyStageListAndPerRequestFailure) {
  PlannerConfig c;  // a pipeline the SD model never had: nothing in the planner names stages
  c.stages = {{"a", {0}}, {"b", {1, 2}, 1}, {"c", {0}}, {"d", {3}}, {"e", {0}}};
  Planner p(c);
  for (uint64_t id = 0; id < 3; ++id) p.submit(id, 0, 4, 0);
  auto a = p.admit(0);
  ASSERT_EQ(a.size(), 2u) << "stage b has two replicas with room for one each";
  EXPECT_EQ(a[0].route.size(), 5u);
  p.reach(0, 1, 1);
  p.on_step(0, 2, 1);
  EXPECT_EQ(p.where(0), "in b (step 2 of 4)");
  p.on_failed(1, "stage a, request 1: bad input", 2);
  EXPECT_EQ(p.info(1).state, RequestState::Failed);
  EXPECT_EQ(p.info(1).reason, "stage a, request 1: bad input");
  ASSERT_EQ(p.admit(2).size(), 1u) << "the failed request's slot is free for request 2";
  for (int s = 0; s < 5; ++s) p.on_stage_done(0, s, 3);
  EXPECT_EQ(p.info(0).state, RequestState::Done);
  EXPECT_EQ(p.active(), 1u);
  PlannerConfig bad;
  bad.stages = {{"a", {}}};
  EXPECT_NE(test_error([&] { Planner x(bad); }).find("stage 'a' has no replica"), std::string::npos);
}

// Hundreds of simulated steps: random arrivals, step counts, priorities, cancellations and deadlines over 3
// denoise replicas each with a StepBatcher. Invariants are checked at every tick.
TEST(Planner, SimulationInvariants) {
  for (BatchMode mode : {BatchMode::Step, BatchMode::Static, BatchMode::Single}) {
    SCOPED_TRACE(batch_mode_name(mode));
    const int B = 4, limit = 6, n_requests = 300;
    Planner p(cfg(3, limit, 64));
    std::map<int, StepBatcher> batchers;
    for (int r = 1; r <= 3; ++r) batchers.emplace(r, StepBatcher(mode, B, 0.5));
    std::mt19937 rng(1234);
    std::map<uint64_t, int> steps_left, encode_eta, decode_eta;
    std::map<uint64_t, int> times_admitted, steps_run;
    std::set<uint64_t> submitted, rejected;
    uint64_t next_id = 0;
    int tick = 0;
    for (; tick < 5000 && (next_id < n_requests || !p.all_final()); ++tick) {
      const double now = tick * 0.1;
      // arrivals: Poisson-ish, bursts overflow the bounded queue sometimes
      const int arrivals = next_id < n_requests ? static_cast<int>(rng() % 4) : 0;
      for (int k = 0; k < arrivals && next_id < n_requests; ++k, ++next_id) {
        const int steps = 2 + static_cast<int>(rng() % 12);
        const double deadline = rng() % 10 == 0 ? now + 1.0 + (rng() % 30) * 0.1 : 0.0;
        if (p.submit(next_id, static_cast<int>(rng() % 3), steps, now, deadline)) {
          submitted.insert(next_id);
          steps_left[next_id] = steps;
        } else {
          rejected.insert(next_id);
        }
      }
      // random cancellation of any known, unfinished request
      if (rng() % 8 == 0 && !submitted.empty()) {
        auto it = submitted.begin();
        std::advance(it, rng() % submitted.size());
        if (auto d = p.cancel(*it, "client went away", now)) {
          if (d->rank >= 1 && d->rank <= 3) batchers.at(d->rank).cancel(*it);
        }
      }
      for (const Drop& d : p.expire(now))
        if (d.rank >= 1 && d.rank <= 3) batchers.at(d.rank).cancel(d.id);
      for (const Admission& a : p.admit(now)) {
        ++times_admitted[a.id];
        encode_eta[a.id] = tick + 1;
      }
      // encoder: after one tick, hand to the routed denoise replica
      for (auto it = encode_eta.begin(); it != encode_eta.end();) {
        if (it->second > tick) { ++it; continue; }
        const RequestInfo& r = p.info(it->first);
        if (r.state == RequestState::Running && r.stage == kEncode) {
          p.on_stage_done(it->first, kEncode, now);
          batchers.at(r.route[kDenoise]).add(it->first, r.priority, now);
        }
        it = encode_eta.erase(it);
      }
      // denoisers: one "UNet call" per replica per tick
      for (auto& [rank, b] : batchers) {
        auto run = b.plan(now);
        ASSERT_LE(static_cast<int>(run.size()), b.max_batch());
        std::set<uint64_t> uniq(run.begin(), run.end());
        ASSERT_EQ(uniq.size(), run.size()) << "a request runs twice in one batch";
        for (uint64_t id : run) {
          const RequestInfo& r = p.info(id);
          ASSERT_TRUE(r.state == RequestState::Running && r.stage == kDenoise)
              << "request " << id << " runs while " << p.where(id);
          ASSERT_EQ(r.route[kDenoise], rank);
          ++steps_run[id];
          p.on_step(id, r.step + 1, now);
          if (--steps_left[id] == 0) {
            b.finished(id);
            p.on_stage_done(id, kDenoise, now);
            decode_eta[id] = tick + 1;
          }
        }
      }
      for (auto it = decode_eta.begin(); it != decode_eta.end();) {
        if (it->second > tick) { ++it; continue; }
        if (p.info(it->first).state == RequestState::Running) p.on_done(it->first, now);
        it = decode_eta.erase(it);
      }
      // invariants: loads match states, limits hold
      int in_denoise[4] = {0, 0, 0, 0};
      for (uint64_t id : submitted) {
        const RequestInfo& r = p.info(id);
        if (r.state == RequestState::Running && r.stage <= kDenoise) ++in_denoise[r.route[kDenoise]];
      }
      for (int rank = 1; rank <= 3; ++rank) {
        ASSERT_EQ(p.load(kDenoise, rank), in_denoise[rank]) << "tick " << tick;
        ASSERT_LE(p.load(kDenoise, rank), limit);
      }
    }
    ASSERT_TRUE(p.all_final()) << "requests left unfinished after " << tick << " ticks";
    int done = 0, cancelled = 0, timed_out = 0;
    for (uint64_t id : submitted) {
      const RequestInfo& r = p.info(id);
      EXPECT_LE(times_admitted[id], 1) << "request " << id << " admitted twice";
      if (r.state == RequestState::Done) {
        ++done;
        EXPECT_EQ(steps_run[id], r.total_steps) << "request " << id << " ran the wrong number of steps";
      }
      cancelled += r.state == RequestState::Cancelled;
      timed_out += r.state == RequestState::TimedOut;
      if (r.state != RequestState::Done) EXPECT_FALSE(r.reason.empty()) << "request " << id << " lost its reason";
    }
    EXPECT_EQ(submitted.size() + rejected.size(), static_cast<size_t>(n_requests)) << "a request was lost";
    EXPECT_GT(done, 100);
    EXPECT_GT(cancelled, 0);
    EXPECT_GT(timed_out, 0);
    std::printf("[sim %s] %d ticks: %d done, %d cancelled, %d timed out, %zu rejected (queue full)\n",
                batch_mode_name(mode), tick, done, cancelled, timed_out, rejected.size());
  }
}

TEST(StepBatcher, StepModeJoinsMidFlightStaticWaits) {
  StepBatcher step(BatchMode::Step, 3), stat(BatchMode::Static, 3), single(BatchMode::Single, 3);
  for (auto* b : {&step, &stat, &single}) {
    b->add(1, 0, 0);
    b->add(2, 0, 0);
  }
  EXPECT_EQ(step.plan(0).size(), 2u);
  EXPECT_EQ(stat.plan(0).size(), 2u);
  EXPECT_EQ(single.plan(0).size(), 1u);
  for (auto* b : {&step, &stat, &single}) b->add(3, 0, 1);
  EXPECT_EQ(step.plan(1).size(), 3u) << "step-level batching admits at the next iteration";
  EXPECT_EQ(stat.plan(1).size(), 2u) << "static batching waits for the batch to finish";
  stat.finished(1);
  EXPECT_EQ(stat.plan(2).size(), 1u) << "still waiting for request 2";
  stat.finished(2);
  EXPECT_EQ(stat.plan(3), std::vector<uint64_t>{3});
  EXPECT_TRUE(step.cancel(2));
  EXPECT_FALSE(step.cancel(2));
  EXPECT_EQ(step.plan(2).size(), 2u);
  EXPECT_THROW(step.finished(99), Error);
  EXPECT_THROW(parse_batch_mode("dynamic"), Error);
}

TEST(StepBatcher, AgingPreventsStarvation) {
  StepBatcher b(BatchMode::Step, 1, 1.0);
  b.add(1, 0, 0.0);       // low priority, arrives first
  auto first = b.plan(0.0);
  ASSERT_EQ(first, std::vector<uint64_t>{1});
  b.finished(1);
  b.add(2, 0, 0.0);        // low priority
  // a stream of higher-priority requests keeps arriving; request 2 must still run within bounded time
  bool ran = false;
  for (int t = 1; t < 100 && !ran; ++t) {
    b.add(100 + t, 5, t);
    auto run = b.plan(t);
    ASSERT_EQ(run.size(), 1u);
    ran = run[0] == 2;
    b.finished(run[0]);
  }
  EXPECT_TRUE(ran) << "a low-priority request starved";
}
