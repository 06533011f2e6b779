// The scheduler's planning functions, driven for hundreds of simulated steps with no model: no request lost
// or run twice, limits respected, no starvation, cancellation and deadlines in every state, priorities.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "diffpipe/runtime/error.h"
#include "diffpipe/scheduler/lifecycle.h"
#include "diffpipe/scheduler/planner.h"
#include "diffpipe/scheduler/step_batcher.h"

using namespace diffpipe;
using namespace diffpipe::sched;

TEST(Lifecycle, LegalAndIllegalTransitions) {
  EXPECT_TRUE(can_transition(RequestState::Queued, RequestState::Encoding));
  EXPECT_TRUE(can_transition(RequestState::Denoising, RequestState::Denoising));
  EXPECT_TRUE(can_transition(RequestState::Decoding, RequestState::Done));
  EXPECT_TRUE(can_transition(RequestState::Decoding, RequestState::Upscaling));
  EXPECT_FALSE(can_transition(RequestState::Queued, RequestState::Decoding));
  EXPECT_FALSE(can_transition(RequestState::Done, RequestState::Cancelled));
  for (auto s : {RequestState::Queued, RequestState::Encoding, RequestState::Denoising, RequestState::Decoding})
    for (auto f : {RequestState::Failed, RequestState::Cancelled, RequestState::TimedOut}) EXPECT_TRUE(can_transition(s, f));
  RequestInfo r;
  r.id = 7;
  try {
    r.transition(RequestState::Done, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("request 7: illegal transition queued -> done"), std::string::npos);
  }
  r.transition(RequestState::Encoding, 1.0);
  r.transition(RequestState::Cancelled, 2.0, "user asked");
  EXPECT_EQ(r.reason, "user asked");
  EXPECT_EQ(r.finished_s, 2.0);
}

namespace {
PlannerConfig cfg(int dn_replicas, int limit, size_t cap = 1000) {
  PlannerConfig c;
  c.replicas[0] = {0};
  for (int r = 1; r <= dn_replicas; ++r) c.replicas[1].push_back(r);
  c.replicas[2] = {dn_replicas + 1};
  c.denoise_inflight_limit = limit;
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
  EXPECT_NE(a[0].route[1], a[1].route[1]) << "least-loaded routing spreads over replicas";
  EXPECT_EQ(p.load(1, a[0].route[1]), 1);
}

TEST(Planner, UpscaleStageRoutesAndReleasesItsLoad) {
  Planner plain(cfg(1, 4));
  plain.submit(1, 0, 5, 0);
  EXPECT_EQ(plain.admit(0).at(0).route[3], -1) << "no upscale replicas: the stage is not on the route";
  plain.on_encoded(1, 0);
  plain.on_denoised(1, 0);
  EXPECT_THROW(plain.on_decoded(1, 0), Error);

  PlannerConfig c = cfg(1, 4);
  c.replicas[3] = {5, 6};
  c.upscale_inflight_limit = 1;
  Planner p(c);
  for (uint64_t id = 1; id <= 3; ++id) p.submit(id, 0, 5, 0);
  auto a = p.admit(0);
  ASSERT_EQ(a.size(), 2u) << "two upscale replicas with room for one request each";
  EXPECT_NE(a[0].route[3], a[1].route[3]);
  EXPECT_EQ(p.load(3, 5), 1);
  p.on_encoded(1, 1);
  p.on_denoised(1, 2);
  p.on_decoded(1, 3);
  EXPECT_EQ(p.info(1).state, RequestState::Upscaling);
  EXPECT_EQ(p.load(2, c.replicas[2][0]), 1) << "request 2 still holds the decoder";
  auto d = p.cancel(2, "client", 3);  // cancelled while encoding: every stage's load is released
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(p.load(2, c.replicas[2][0]), 0);
  p.on_done(1, 4);
  EXPECT_EQ(p.load(3, 5) + p.load(3, 6), 0);
  EXPECT_EQ(p.admit(4).size(), 1u) << "request 3 admitted once upscale room is free";
}

TEST(Planner, OutOfOrderEventsReachTheirStage) {
  PlannerConfig c = cfg(1, 4);
  c.replicas[3] = {9};
  Planner p(c);
  p.submit(1, 0, 5, 0);
  p.submit(2, 0, 5, 0);
  p.admit(0);
  EXPECT_TRUE(p.reach(1, RequestState::Upscaling, 1)) << "a 'decoded' before 'encoded' and 'denoised' arrived";
  EXPECT_EQ(p.info(1).state, RequestState::Upscaling);
  EXPECT_EQ(p.load(0, 0) + p.load(1, 1) + p.load(2, 2), 3) << "only request 2 still holds encode, denoise, decode";
  EXPECT_EQ(p.load(3, 9), 2) << "both hold the upscaler";
  EXPECT_TRUE(p.reach(1, RequestState::Denoising, 1)) << "a late step report changes nothing";
  EXPECT_EQ(p.info(1).state, RequestState::Upscaling);
  p.cancel(2, "client", 2);
  EXPECT_FALSE(p.reach(2, RequestState::Decoding, 2)) << "events for an ended request are dropped";
  EXPECT_EQ(p.info(2).state, RequestState::Cancelled);
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
        if (r.state == RequestState::Encoding) {
          p.on_encoded(it->first, now);
          batchers.at(r.route[1]).add(it->first, r.priority, now);
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
          ASSERT_EQ(r.state, RequestState::Denoising) << "request " << id << " runs while " << state_name(r.state);
          ASSERT_EQ(r.route[1], rank);
          ++steps_run[id];
          p.on_step(id, r.step + 1, now);
          if (--steps_left[id] == 0) {
            b.finished(id);
            p.on_denoised(id, now);
            decode_eta[id] = tick + 1;
          }
        }
      }
      for (auto it = decode_eta.begin(); it != decode_eta.end();) {
        if (it->second > tick) { ++it; continue; }
        if (p.info(it->first).state == RequestState::Decoding) p.on_done(it->first, now);
        it = decode_eta.erase(it);
      }
      // invariants: loads match states, limits hold
      int in_denoise[4] = {0, 0, 0, 0};
      for (uint64_t id : submitted) {
        const RequestInfo& r = p.info(id);
        if (r.state == RequestState::Encoding || r.state == RequestState::Denoising) ++in_denoise[r.route[1]];
      }
      for (int rank = 1; rank <= 3; ++rank) {
        ASSERT_EQ(p.load(1, rank), in_denoise[rank]) << "tick " << tick;
        ASSERT_LE(p.load(1, rank), limit);
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
