// The runner without a model and without mpirun: pipelines of stages defined here (none of them exists in
// stages/), ranks as threads on the in-process transport, time from a ManualClock. Ordering, replicas,
// priorities, backpressure, cancellation, deadlines, per-request failures, silent ranks and malformed
// messages, each in milliseconds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/cluster/wire.h"
#include "diffpipe/runtime/compute_lane.h"
#include "diffpipe/runtime/error.h"
#include "test_util.h"

using namespace diffpipe;
using namespace std::chrono_literals;

namespace {

// What the fake stages saw, for the assertions.
struct Probe {
  std::atomic<int> max_held{0}, max_batch{0};
  std::mutex mu;
  std::map<int, std::set<uint64_t>> work_ranks;  // rank -> requests its "work" stage ran
  void held(int n) {
    int m = max_held.load();
    while (n > m && !max_held.compare_exchange_weak(m, n)) {
    }
  }
  void batch(int n) {
    int m = max_batch.load();
    while (n > m && !max_batch.compare_exchange_weak(m, n)) {
    }
  }
};

// Stage 1 "tokenize": the request's seed as a one-element tensor.
class Tokenize : public OneShotStage {
 public:
  using OneShotStage::OneShotStage;

 protected:
  void check(const StageRequest& r) override { DP_CHECK(r.params.prompt != "reject", "cannot tokenize 'reject'"); }
  std::vector<StageEvent> run(const std::vector<const StageRequest*>& batch) override {
    std::vector<StageEvent> out;
    for (const auto* r : batch)
      out.push_back(StageEvent::finished(r->id, {at::full({1}, static_cast<int64_t>(r->params.seed), at::kLong)}));
    return out;
  }
};

// Stage 2 "work" (the heavy, multi-step one): adds 1 per step for params.steps steps, up to max_batch requests
// per call, highest priority first. With a clock, one step per simulated second.
class Work : public Stage {
 public:
  Work(const StageConfig& c, Probe* p, const Clock* clock, int rank) : max_batch_(c.max_batch), probe_(p), clock_(clock), rank_(rank) {}
  void add(StageRequest r, double now) override {
    (void)now;
    DP_CHECK(!r.inputs.empty(), "work: no input");
    st_[r.id] = {r.inputs[0].item<int64_t>(), 0, r.params.steps, r.priority, r.params.prompt};
    probe_->held(static_cast<int>(st_.size()));
  }
  void cancel(uint64_t id) override { st_.erase(id); }
  size_t held() const override { return st_.size(); }
  std::vector<uint64_t> current_batch() const override { return current_; }
  std::vector<StageEvent> step(double now) override {
    std::vector<StageEvent> out;
    if (clock_ && now < next_) {  // time-gated: wait for the test to advance the clock
      std::this_thread::sleep_for(1ms);
      return out;
    }
    next_ = now + 1.0;
    std::vector<std::pair<int, uint64_t>> order;
    for (const auto& [id, s] : st_) order.push_back({-s.priority, id});
    std::sort(order.begin(), order.end());
    current_.clear();
    for (size_t i = 0; i < order.size() && static_cast<int>(i) < max_batch_; ++i) current_.push_back(order[i].second);
    probe_->batch(static_cast<int>(current_.size()));
    for (uint64_t id : current_) {
      auto& s = st_.at(id);
      {
        std::lock_guard<std::mutex> lk(probe_->mu);
        probe_->work_ranks[rank_].insert(id);
      }
      if (s.prompt == "explode") throw Error("the whole call blew up");
      ++s.value;
      ++s.step;
      out.push_back(StageEvent::progress(id, s.step, s.total));
      if (s.step < s.total) continue;
      out.push_back(s.prompt == "diverge" ? StageEvent::failed(id, diffpipe::detail::cat("diverged after step ", s.step))
                                          : StageEvent::finished(id, {at::full({1}, s.value, at::kLong)}));
      st_.erase(id);
    }
    return out;
  }

 private:
  struct St {
    int64_t value;
    int step, total, priority;
    std::string prompt;
  };
  int max_batch_;
  Probe* probe_;
  const Clock* clock_;
  int rank_;
  double next_ = 0;
  std::map<uint64_t, St> st_;
  std::vector<uint64_t> current_;
};

// Stage 3 "paint" (the last): a 2x2 image whose pixels are the value.
class Paint : public OneShotStage {
 public:
  using OneShotStage::OneShotStage;

 protected:
  std::vector<StageEvent> run(const std::vector<const StageRequest*>& batch) override {
    std::vector<StageEvent> out;
    for (const auto* r : batch) {
      const int64_t v = r->inputs.at(0).item<int64_t>();
      out.push_back(StageEvent::finished(r->id, {at::full({2, 2, 3}, v & 255, at::kByte)}));
    }
    return out;
  }
};

std::vector<PipelineStage> layout() { return {{"tokenize"}, {"work", true}, {"paint"}}; }

PipelineDef pipeline(Probe* probe, const Clock* clock, std::atomic<int>* rank_of_thread = nullptr) {
  PipelineDef p(3);
  p[0].name = "tokenize";
  p[0].make = [](const StageConfig& c) { return std::make_unique<Tokenize>(c); };
  p[1].name = "work";
  p[1].heavy = true;
  p[1].gathers = false;
  p[1].make = [=](const StageConfig& c) { return std::make_unique<Work>(c, probe, clock, rank_of_thread ? rank_of_thread->load() : -1); };
  p[2].name = "paint";
  p[2].admission_factor = 0;
  p[2].make = [](const StageConfig& c) { return std::make_unique<Paint>(c); };
  return p;
}

struct WorldResult {
  std::vector<GeneratedImage> results;  // rank 0's, in the order they came
  std::vector<std::string> errors;      // per rank, "" = ok
  RunStats stats;                       // rank 0's
  double seconds = 0;                   // real time the whole world took
};

// Runs every rank (except `silent` ones, which never start) as a thread. `tick` runs repeatedly on another
// thread until the world is done (it advances a ManualClock).
WorldResult run_world(int n, const RunOptions& opts, const std::vector<GenerationParams>& reqs, Probe* probe,
                      const Clock* gate_clock, std::set<int> silent = {}, std::function<void()> tick = nullptr) {
  auto world = make_inproc_world(n);
  WorldResult w;
  w.errors.assign(n, "");
  std::vector<std::thread> th;
  std::atomic<bool> done{false};
  std::mutex mu;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < n; ++r) {
    if (silent.count(r)) continue;
    th.emplace_back([&, r] {
      std::atomic<int> me{r};
      PipelineDef def = pipeline(probe, gate_clock, &me);
      try {
        RunStats st = run_stages(opts, *world[r], def, reqs, [&](GeneratedImage&& g) {
          std::lock_guard<std::mutex> lk(mu);
          w.results.push_back(std::move(g));
        });
        if (r == 0) w.stats = st;
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(mu);
        w.errors[r] = e.what();
      }
    });
  }
  std::thread ticker([&] {
    while (!done) {
      if (tick) tick();
      std::this_thread::sleep_for(2ms);
    }
  });
  for (auto& t : th) t.join();
  done = true;
  ticker.join();
  w.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return w;
}

std::vector<GenerationParams> requests(int n, int steps) {
  std::vector<GenerationParams> v(n);
  for (int i = 0; i < n; ++i) {
    v[i].prompt = "p" + std::to_string(i);
    v[i].steps = steps;
    v[i].seed = 10 * i;
  }
  return v;
}

RunOptions options(int ranks, int max_batch = 4) {
  RunOptions o;
  o.placement = Placement::derive(ranks, {}, layout());
  for (auto& s : o.placement.stages) s.spec.max_batch = max_batch;
  o.timeout_s = 30;
  return o;
}

std::map<uint64_t, const GeneratedImage*> by_index(const WorldResult& w) {
  std::map<uint64_t, const GeneratedImage*> m;
  for (const auto& g : w.results) m[g.index] = &g;
  return m;
}

}  // namespace

// A pipeline none of whose stages exists in stages/ runs through the coordinator on 1, 3 and 4 ranks with the
// same results; on 4 ranks both replicas of the heavy stage work.
TEST(Runner, AnyPipelineOnAnyPlacementGivesTheSameResults) {
  const auto reqs = requests(12, 3);
  for (int n : {1, 3, 4}) {
    SCOPED_TRACE(n);
    Probe probe;
    const auto w = run_world(n, options(n), reqs, &probe, nullptr);
    for (int r = 0; r < n; ++r) EXPECT_EQ(w.errors[r], "") << "rank " << r;
    ASSERT_EQ(w.results.size(), reqs.size());
    for (const auto& [i, g] : by_index(w)) {
      EXPECT_EQ(g->status, "done") << g->reason;
      ASSERT_EQ(g->image.width, 2);
      EXPECT_EQ(g->image.pixels[0], (10 * i + 3) & 255) << "request " << i << ": seed + one per step";
      ASSERT_EQ(g->stage_ranks.size(), 3u);
      EXPECT_EQ(g->denoise_rank, g->stage_ranks[1]);
    }
    EXPECT_EQ(w.stats.images, reqs.size());
    EXPECT_EQ(w.stats.busy_s.size(), 3u);
    if (n == 4) {
      EXPECT_EQ(probe.work_ranks.size(), 2u) << "two replicas of 'work' (ranks 1 and 2)";
      for (const auto& [rank, ids] : probe.work_ranks) EXPECT_GE(ids.size(), 3u) << "rank " << rank;
    }
  }
}

// The heavy stage never holds more than its in-flight bound, nor runs more than max_batch per call.
TEST(Runner, BackpressureBoundsTheHeavyStage) {
  RunOptions o = options(3, 2);
  o.placement.stage("work").max_inflight = 3;
  Probe probe;
  const auto w = run_world(3, o, requests(20, 4), &probe, nullptr);
  EXPECT_EQ(w.errors, std::vector<std::string>(3, ""));
  EXPECT_EQ(w.results.size(), 20u);
  EXPECT_LE(probe.max_held.load(), 3) << "admission must respect max_inflight";
  EXPECT_LE(probe.max_batch.load(), 2);
  EXPECT_GE(probe.max_batch.load(), 1);
}

// With room for one request at a time, requests finish in priority order.
TEST(Runner, PrioritiesDecideTheOrder) {
  RunOptions o = options(1, 1);
  o.placement.stage("work").max_inflight = 1;
  const auto reqs = requests(5, 2);
  o.meta.resize(reqs.size());
  const int prio[] = {0, 5, 1, 9, 3};
  for (int i = 0; i < 5; ++i) o.meta[i].priority = prio[i];
  Probe probe;
  const auto w = run_world(1, o, reqs, &probe, nullptr);
  ASSERT_EQ(w.results.size(), 5u);
  std::vector<uint64_t> order;
  for (const auto& g : w.results) order.push_back(g.index);
  EXPECT_EQ(order, (std::vector<uint64_t>{3, 1, 4, 2, 0}));
}

// A request that fails in a stage ends as "failed" with its reason; the others finish; nothing hangs.
// With fail_fast the job stops on every rank with that reason.
TEST(Runner, FailuresStayPerRequest) {
  auto reqs = requests(8, 3);
  reqs[2].prompt = "reject";   // refused on arrival by tokenize (rank 0)
  reqs[5].prompt = "diverge";  // fails after its last step in work (rank 1)
  Probe probe;
  const auto w = run_world(3, options(3), reqs, &probe, nullptr);
  EXPECT_EQ(w.errors, std::vector<std::string>(3, "")) << "a request's failure is not the job's";
  ASSERT_EQ(w.results.size(), 8u);
  auto m = by_index(w);
  EXPECT_EQ(m[2]->status, "failed");
  EXPECT_NE(m[2]->reason.find("rank 0, stage tokenize, request 2: cannot tokenize 'reject'"), std::string::npos)
      << m[2]->reason;
  EXPECT_EQ(m[5]->status, "failed");
  EXPECT_NE(m[5]->reason.find("rank 1, stage work, request 5: diverged after step 3"), std::string::npos) << m[5]->reason;
  for (uint64_t i : {0, 1, 3, 4, 6, 7}) EXPECT_EQ(m[i]->status, "done") << i;
  EXPECT_EQ(w.stats.failed, 2u);
  EXPECT_EQ(w.stats.images, 6u);

  // a whole batched call that throws fails the requests of that call, not the job
  auto boom = requests(4, 2);
  boom[1].prompt = "explode";
  RunOptions single = options(3, 1);
  const auto wb = run_world(3, single, boom, &probe, nullptr);
  EXPECT_EQ(wb.errors, std::vector<std::string>(3, ""));
  auto mb = by_index(wb);
  EXPECT_EQ(mb[1]->status, "failed");
  EXPECT_NE(mb[1]->reason.find("the whole call blew up"), std::string::npos);
  EXPECT_EQ(mb[0]->status, "done");
  EXPECT_EQ(mb[3]->status, "done");

  RunOptions ff = options(3);
  ff.fail_fast = true;
  const auto wf = run_world(3, ff, reqs, &probe, nullptr);
  for (int r = 0; r < 3; ++r) EXPECT_NE(wf.errors[r], "") << "fail_fast: rank " << r << " must stop";
  EXPECT_NE(wf.errors[0].find("stage "), std::string::npos) << wf.errors[0];
}

// Cancellation and deadlines on the injected clock: a request cancelled at t = 2.5 s and one whose deadline
// passes at t = 3.2 s while at step 4 of 10 end so, with their reasons; the rest finish. No real waiting.
TEST(Runner, CancellationAndDeadlinesOnTheInjectedClock) {
  auto clock = std::make_shared<ManualClock>();
  RunOptions o = options(3, 8);
  o.clock = clock;
  const auto reqs = requests(4, 10);
  o.meta.resize(4);
  o.meta[1].cancel_at_s = 2.5;
  o.meta[2].deadline_s = 3.2;
  Probe probe;
  const auto w = run_world(3, o, reqs, &probe, clock.get(), {}, [&] { clock->advance(0.05); });
  EXPECT_EQ(w.errors, std::vector<std::string>(3, ""));
  auto m = by_index(w);
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[1]->status, "cancelled");
  EXPECT_EQ(m[1]->reason, "cancelled by the client");
  EXPECT_EQ(m[2]->status, "timed out");
  EXPECT_NE(m[2]->reason.find("deadline passed while in work (step "), std::string::npos) << m[2]->reason;
  EXPECT_NE(m[2]->reason.find(" of 10)"), std::string::npos) << m[2]->reason;
  EXPECT_EQ(m[0]->status, "done");
  EXPECT_EQ(m[3]->status, "done");
  EXPECT_LT(w.seconds, 10.0) << "10 simulated seconds must not take real ones";
}

// A rank that never answers ends the whole job within the (simulated) timeout, naming what is stuck where;
// the other ranks are told and exit too.
TEST(Runner, ASilentRankEndsTheJobNamingIt) {
  auto clock = std::make_shared<ManualClock>();
  RunOptions o = options(3);
  o.clock = clock;
  o.timeout_s = 5;
  Probe probe;
  const auto w = run_world(3, o, requests(2, 2), &probe, nullptr, /*silent=*/{2}, [&] { clock->advance(0.1); });
  EXPECT_NE(w.errors[0].find("no progress for 5 s; waiting on request 0 in paint on rank 2"), std::string::npos)
      << w.errors[0];
  EXPECT_NE(w.errors[1].find("stopped because the job failed"), std::string::npos) << w.errors[1];
  EXPECT_LT(w.seconds, 10.0);
}

// Typed messages: round trips, and malformed or unknown ones are errors naming the rank, kind and field.
TEST(Wire, RoundTripAndMalformedMessages) {
  wire::Work w;
  w.request = 7;
  w.stage = 1;
  w.params.prompt = "a cat";
  w.params.seed = 42;
  w.params.sr_steps = 7;         // the cascade settings travel when not the defaults
  w.params.x4_steps = 11;
  w.params.x4_guidance = 3.5;
  w.params.x4_noise_level = 120;
  w.route = {0, 2, 3};
  w.priority = -2;
  w.trail = {0};
  w.tensors.push_back(at::ones({2}));
  Message m = wire::encode(w);
  m.src = 5;
  const wire::Work back = wire::decode_work(Message(m));
  EXPECT_EQ(back.request, 7u);
  EXPECT_EQ(back.params.prompt, "a cat");
  EXPECT_EQ(back.params.seed, 42u);
  EXPECT_EQ(back.params.sr_steps, 7);
  EXPECT_EQ(back.params.x4_steps, 11);
  EXPECT_EQ(back.params.x4_guidance, 3.5);
  EXPECT_EQ(back.params.x4_noise_level, 120);
  EXPECT_EQ(back.route, (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(back.priority, -2);
  EXPECT_EQ(back.tensors.size(), 1u);

  Message bad = m;
  bad.fields.erase("route");
  EXPECT_NE(test::error_of([&] { wire::decode_work(Message(bad)); })
                .find("rank 5 sent a malformed work message: field 'route' is missing"),
            std::string::npos);
  bad = m;
  bad.fields["params"]["steps"] = "many";
  EXPECT_NE(test::error_of([&] { wire::decode_work(Message(bad)); }).find("field 'params.steps' must be an integer"),
            std::string::npos);
  bad = m;
  bad.fields["stage"] = 3;
  EXPECT_NE(test::error_of([&] { wire::decode_work(Message(bad)); }).find("field 'stage' = 3 but the route has 3 stages"),
            std::string::npos);
  // SDXL's size conditioning travels only when set, and comes back as sent; out of range is named
  EXPECT_FALSE(m.fields["params"].contains("original_width")) << "unset SDXL keys must stay out of the message";
  EXPECT_EQ(back.params.original_width, 0);
  wire::Work xl = w;
  xl.params.original_width = 2048;
  xl.params.original_height = 1536;
  xl.params.crop_top = 12;
  xl.params.crop_left = 34;
  Message mx = wire::encode(xl);
  mx.src = 5;
  const wire::Work xb = wire::decode_work(Message(mx));
  EXPECT_EQ(xb.params.original_width, 2048);
  EXPECT_EQ(xb.params.original_height, 1536);
  EXPECT_EQ(xb.params.crop_top, 12);
  EXPECT_EQ(xb.params.crop_left, 34);
  mx.fields["params"]["crop_top"] = -1;
  EXPECT_NE(test::error_of([&] { wire::decode_work(Message(mx)); }).find("field 'params.crop_top' = -1 is out of range"),
            std::string::npos);
  Message r = wire::encode(wire::Result{1, {0, 1}, at::zeros({2, 2}, at::kByte)});
  r.src = 2;
  EXPECT_NE(test::error_of([&] { wire::decode_result(Message(r)); }).find("the image must be uint8 [H, W, 3]"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { wire::decode_steps(m); }).find("rank 5 sent a work message where a steps message"),
            std::string::npos);

  // the header's format version is checked by every transport
  Message t;
  t.kind = MsgKind::Test;
  t.src = 3;
  auto hdr = encode_header(t);
  auto j = nlohmann::json::from_cbor(hdr);
  j["v"] = kWireVersion + 1;
  const auto other = nlohmann::json::to_cbor(j);
  Message out;
  out.src = 3;
  EXPECT_NE(test::error_of([&] { decode_header(other.data(), other.size(), &out); })
                .find("message from rank 3: wire format version"),
            std::string::npos);
}

// A message of an unknown kind reaching a rank ends the job with the kind and the sender named.
TEST(Runner, UnknownMessageKindIsAnErrorNamingTheSender) {
  auto world = make_inproc_world(2);
  RunOptions o = options(2);
  Probe probe;
  std::string err1;
  std::thread rank1([&] {
    PipelineDef def = pipeline(&probe, nullptr);
    try {
      run_stages(o, *world[1], def, requests(1, 1), [](GeneratedImage&&) {});
    } catch (const std::exception& e) {
      err1 = e.what();
    }
  });
  Message odd;
  odd.kind = static_cast<MsgKind>(42);
  world[0]->send(1, odd);
  rank1.join();
  EXPECT_NE(err1.find("rank 1: unexpected message kind 42 (?) from rank 0"), std::string::npos) << err1;
}

// A live feed, as a server drives the coordinator: requests arrive from another thread while the pipeline runs,
// the ranks stay up through a long idle spell (heartbeats on the injected clock), a client cancels one request
// while it waits and one while it runs, and the run ends when the feed closes.
namespace {
class TestFeed : public RequestFeed {
 public:
  void push(FeedItem f) {
    std::lock_guard<std::mutex> lk(mu_);
    in_.push_back(std::move(f));
  }
  void cancel(uint64_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    cancels_.push_back(id);
  }
  void close() { closed_ = true; }
  std::vector<FeedItem> arrivals(double) override {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<FeedItem> out(in_.begin(), in_.end());
    in_.clear();
    return out;
  }
  std::vector<uint64_t> cancellations() override {
    std::lock_guard<std::mutex> lk(mu_);
    auto out = cancels_;
    cancels_.clear();
    return out;
  }
  bool closed() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return closed_ && in_.empty();
  }
  void deliver(GeneratedImage&& gi) override {
    std::lock_guard<std::mutex> lk(mu_);
    results_[gi.index] = std::move(gi);
  }
  std::map<uint64_t, GeneratedImage> results() const {
    std::lock_guard<std::mutex> lk(mu_);
    return results_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<FeedItem> in_;
  std::vector<uint64_t> cancels_;
  std::atomic<bool> closed_{false};
  std::map<uint64_t, GeneratedImage> results_;
};
}  // namespace

TEST(Runner, LiveFeedWithIdleSpellsAndClientCancellation) {
  auto clock = std::make_shared<ManualClock>();
  RunOptions o = options(3, 2);
  o.clock = clock;
  o.timeout_s = 5;
  auto world = make_inproc_world(3);
  Probe probe;
  TestFeed feed;
  std::vector<std::string> errors(3);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 3; ++r)
    ranks.emplace_back([&, r] {
      PipelineDef def = pipeline(&probe, clock.get());
      try {
        run_stages(o, *world[r], def, r == 0 ? &feed : nullptr);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  auto item = [](uint64_t id, int steps) {
    FeedItem f;
    f.id = id;
    f.params.prompt = "p";
    f.params.steps = steps;
    f.params.seed = id;
    return f;
  };
  auto advance_until = [&](const std::function<bool()>& cond) {
    for (int i = 0; i < 4000 && !cond(); ++i) {
      clock->advance(0.1);
      std::this_thread::sleep_for(1ms);
    }
  };
  advance_until([&] { return clock->now() > 20; });  // 20 simulated seconds idle: nobody times out
  for (uint64_t id = 100; id < 104; ++id) feed.push(item(id, id == 101 ? 200 : 3));
  advance_until([&] { return feed.results().size() >= 2; });
  feed.cancel(101);  // in flight: 200 steps
  for (uint64_t id = 104; id < 107; ++id) feed.push(item(id, 2));
  advance_until([&] { return feed.results().size() >= 7; });
  feed.close();
  for (auto& t : ranks) t.join();
  EXPECT_EQ(errors, std::vector<std::string>(3, ""));
  const auto res = feed.results();
  ASSERT_EQ(res.size(), 7u);
  EXPECT_EQ(res.at(101).status, "cancelled");
  for (uint64_t id : {100, 102, 103, 104, 105, 106}) EXPECT_EQ(res.at(id).status, "done") << id;
  EXPECT_EQ(res.at(104).image.pixels[0], (104 + 2) & 255);
}

namespace {

// Wraps a stage: records the threads its construction, add() and step() ran on, gives each step parallel tensor
// work (an add of 2^20 elements, above LibTorch's grain size), and records the process's thread count there.
struct ThreadProbe {
  std::mutex mu;
  std::set<std::thread::id> compute_threads;
  int max_process_threads = 0;
  void saw() {
    std::lock_guard<std::mutex> lk(mu);
    compute_threads.insert(std::this_thread::get_id());
    max_process_threads = std::max(max_process_threads, process_thread_count());
  }
};

class Recording : public Stage {
 public:
  Recording(std::unique_ptr<Stage> inner, ThreadProbe* p) : inner_(std::move(inner)), p_(p) { p_->saw(); }
  void add(StageRequest r, double now) override {
    p_->saw();
    inner_->add(std::move(r), now);
  }
  void cancel(uint64_t id) override { inner_->cancel(id); }
  size_t held() const override { return inner_->held(); }
  std::vector<StageEvent> step(double now) override {
    (void)at::ones({int64_t(1) << 20}).add_(1);
    p_->saw();
    return inner_->step(now);
  }
  std::vector<uint64_t> current_batch() const override { return inner_->current_batch(); }

 private:
  std::unique_ptr<Stage> inner_;
  ThreadProbe* p_;
};

}  // namespace

// On a CPU rank every stage's tensor work runs on the thread that called run_stages, and the rank's other
// threads start no OpenMP pool of their own (runtime/compute_lane.h): the process gains only the runner's own
// threads. With the lane off, each stage computes on its own thread, which gets a pool (what the lane avoids).
TEST(Runner, CpuStagesComputeOnTheCallingThreadWithOneThreadPool) {
  (void)at::ones({int64_t(1) << 20}).add_(1);  // this thread's pool exists before, as after a model load
  const int baseline = process_thread_count();
  ASSERT_GT(baseline, 0) << "/proc/self/task unreadable";
  const int T = at::get_num_threads();
  for (const bool lane : {true, false}) {
    SCOPED_TRACE(lane ? "lane" : "no lane");
    Probe probe;
    ThreadProbe threads;
    PipelineDef def = pipeline(&probe, nullptr);
    for (auto& d : def)
      d.make = [make = d.make, &threads](const StageConfig& c) { return std::make_unique<Recording>(make(c), &threads); };
    RunOptions o = options(1);
    o.cpu_lane = lane;
    auto world = make_inproc_world(1);
    std::vector<GeneratedImage> out;
    const auto reqs = requests(6, 3);
    run_stages(o, *world[0], def, reqs, [&](GeneratedImage&& g) { out.push_back(std::move(g)); });
    ASSERT_EQ(out.size(), reqs.size());
    for (const auto& g : out) {
      EXPECT_EQ(g.status, "done") << g.reason;
      EXPECT_EQ(g.image.pixels.at(0), (10 * g.index + 3) & 255);
    }
    const int runner_threads = 5;  // three stage workers, the coordinator, the dispatcher
    if (lane) {
      EXPECT_EQ(threads.compute_threads, std::set<std::thread::id>{std::this_thread::get_id()});
      EXPECT_LE(threads.max_process_threads, baseline + runner_threads);
    } else {
      EXPECT_EQ(threads.compute_threads.size(), 3u);
      EXPECT_EQ(threads.compute_threads.count(std::this_thread::get_id()), 0u);
      if (T > 1) EXPECT_GE(threads.max_process_threads, baseline + runner_threads - 1 + 3 * (T - 1));
    }
  }
}
