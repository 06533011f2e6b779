#include "diffpipe/scheduler/simulator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <queue>
#include <random>

#include "diffpipe/runtime/error.h"
#include "diffpipe/scheduler/planner.h"

namespace diffpipe::sched {

double CostCurve::at(int batch) const {
  DP_CHECK(!points.empty(), "cost curve: no points");
  const auto& p = points;
  if (batch <= p.front().first) return p.front().second;
  if (p.size() == 1) return p[0].second * batch / p[0].first;  // one point: no gain from batching assumed
  size_t k = 1;
  while (k + 1 < p.size() && p[k].first < batch) ++k;
  const auto [b0, s0] = p[k - 1];
  const auto [b1, s1] = p[k];
  const double v = s0 + (s1 - s0) * (batch - b0) / static_cast<double>(b1 - b0);
  return std::max(v, 1e-3 * p.front().second);
}

void CostCurve::validate(const std::string& what) const {
  DP_CHECK(!points.empty(), what, ": no measured batch size");
  for (size_t k = 0; k < points.size(); ++k) {
    DP_CHECK(points[k].first >= 1, what, ": batch size ", points[k].first, " must be >= 1");
    DP_CHECK(std::isfinite(points[k].second) && points[k].second > 0, what, ": seconds at batch ", points[k].first,
             " must be a positive number, got ", points[k].second);
    DP_CHECK(k == 0 || points[k].first > points[k - 1].first, what, ": batch sizes must ascend (", points[k - 1].first,
             " then ", points[k].first, ")");
  }
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

namespace {

enum class Ev { Arrive, Deliver, CallDone, Wake, Notify };

struct Event {
  double t;
  uint64_t seq;
  Ev kind;
  int rank = -1, stage = -1;
  uint64_t id = 0;
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
};

// One stage's work on one rank.
struct Slot {
  std::deque<uint64_t> waiting;              // one-shot stages
  std::unique_ptr<StepBatcher> batcher;      // multi-step stages
  std::map<uint64_t, int> steps;             // multi-step: calls done per request
  double ready_since = 0;                    // when its current work became ready (oldest first)
  double gather_until = -1;                  // gathering after an idle period until then
  size_t held() const { return batcher ? batcher->active_size() + batcher->waiting_size() : waiting.size(); }
};

struct Rank {
  bool busy = false;
  int stage = -1;                 // the call in progress
  std::vector<uint64_t> batch;
  double busy_s = 0, link_free = 0;
  std::map<int, Slot> slots;      // stage index -> slot
};

class Sim {
 public:
  Sim(const std::vector<SimStage>& stages, int world, const SimNetwork& net, const SimWorkload& w)
      : S_(stages), net_(net), w_(w), ranks_(static_cast<size_t>(world)) {
    DP_CHECK(world >= 1, "simulation: world size must be >= 1");
    DP_CHECK(!stages.empty(), "simulation: the pipeline has no stage");
    DP_CHECK(net.ranks_per_node >= 1 && net.intra_bytes_per_s > 0 && net.inter_bytes_per_s > 0 && net.latency_s >= 0,
             "simulation: the network needs ranks_per_node >= 1, positive bandwidths and latency >= 0");
    PlannerConfig pc;
    pc.queue_capacity = w.queue_capacity;
    for (size_t k = 0; k < stages.size(); ++k) {
      const SimStage& s = stages[k];
      const std::string what = "stage '" + s.name + "'";
      s.cost.validate(what + " cost");
      DP_CHECK(!s.ranks.empty(), what, " has no rank");
      DP_CHECK(s.max_batch >= 1 && s.calls >= 1 && s.planner_limit >= 1 && s.batch_wait_s >= 0 && s.out_bytes >= 0,
               what, ": max_batch, calls and in-flight bound must be >= 1, batch wait and bytes >= 0");
      for (int r : s.ranks) {
        DP_CHECK(r >= 0 && r < world, what, ": rank ", r, " is outside [0, ", world, ")");
        Slot& slot = ranks_[r].slots[static_cast<int>(k)];
        if (s.multi_step) slot.batcher = std::make_unique<StepBatcher>(s.mode, s.max_batch);
      }
      pc.stages.push_back({s.name, s.ranks, s.planner_limit, s.heavy});
      if (s.heavy) heavy_ = static_cast<int>(k);
    }
    planner_ = std::make_unique<Planner>(pc);
    stage_stats_.resize(stages.size());
    batch_sum_.assign(stages.size(), 0);
  }

  SimResult run() {
    std::vector<double> arrivals = w_.arrivals;
    if (arrivals.empty()) {
      DP_CHECK(w_.requests >= 1 && w_.rate >= 0, "simulation: requests must be >= 1 and the rate >= 0");
      std::mt19937_64 rng(w_.seed);
      std::exponential_distribution<double> gap(w_.rate > 0 ? w_.rate : 1.0);
      double t = 0;
      for (int i = 0; i < w_.requests; ++i) {
        arrivals.push_back(t);
        if (w_.rate > 0) t += gap(rng);
      }
    }
    arrival_ = arrivals;
    // closed loop with a bounded number outstanding: the rest arrive as requests finish
    const bool paced = w_.arrivals.empty() && w_.rate == 0 && w_.concurrency > 0;
    next_ = paced ? std::min(arrivals.size(), static_cast<size_t>(w_.concurrency)) : arrivals.size();
    for (size_t i = 0; i < next_; ++i) push({arrivals[i], 0, Ev::Arrive, -1, -1, i});
    SimResult res;
    res.requests = static_cast<int>(arrivals.size());
    while (!q_.empty()) {
      const Event e = q_.top();
      q_.pop();
      now_ = e.t;
      ++res.events;
      switch (e.kind) {
        case Ev::Arrive:
          if (!planner_->submit(e.id, 0, S_[heavy_].calls, now_)) {
            ++res.rejected;
            arrive_next();
          }
          admit();
          res.peak_queued = std::max(res.peak_queued, planner_->queued());
          break;
        case Ev::Deliver: deliver(e.rank, e.stage, e.id); break;
        case Ev::CallDone: call_done(e.rank); break;
        case Ev::Wake: start(e.rank); break;
        case Ev::Notify:
          if (planner_->reach(e.id, e.stage, now_)) planner_->on_stage_done(e.id, e.stage, now_);
          if (e.stage + 1 == static_cast<int>(S_.size())) {
            latency_.push_back(now_ - arrival_[e.id]);
            done_at_.push_back(now_);
            planner_->forget(e.id);
            arrive_next();
          }
          admit();
          break;
      }
    }
    res.done = static_cast<int>(latency_.size());
    DP_CHECK(res.done + res.rejected == res.requests, "simulation: stalled with ", res.requests - res.done - res.rejected,
             " request(s) unfinished (a placement the planner cannot route?)");
    const double t0 = *std::min_element(arrival_.begin(), arrival_.end());
    const double last = done_at_.empty() ? 0 : *std::max_element(done_at_.begin(), done_at_.end());
    res.makespan_s = last - t0;
    res.images_per_s = res.makespan_s > 0 ? res.done / res.makespan_s : 0;
    // steady state: the heavy stage's work done between the first completion and the last admission (the
    // system is full then; before it fills, after it drains), in requests per second
    const double w0 = done_at_.empty() ? 0 : *std::min_element(done_at_.begin(), done_at_.end());
    double steps = 0;
    for (const auto& [t, b] : heavy_calls_)
      if (t > w0 && t <= last_admit_) steps += b;
    res.steady_images_per_s = last_admit_ > w0 && steps > 0 ? steps / S_[heavy_].calls / (last_admit_ - w0) : res.images_per_s;
    if (!latency_.empty()) {
      double sum = 0;
      for (double l : latency_) sum += l;
      res.latency_mean = sum / latency_.size();
    }
    res.latency_p50 = percentile(latency_, 0.5);
    res.latency_p95 = percentile(latency_, 0.95);
    res.latency_p99 = percentile(latency_, 0.99);
    for (size_t k = 0; k < S_.size(); ++k) {
      SimStageStats st = stage_stats_[k];
      st.name = S_[k].name;
      st.mean_batch = st.calls > 0 ? batch_sum_[k] / st.calls : 0;
      st.utilisation = res.makespan_s > 0 ? st.busy_s / (res.makespan_s * S_[k].ranks.size()) : 0;
      res.stages.push_back(st);
    }
    for (const Rank& r : ranks_)
      if (res.makespan_s > 0) res.busiest_rank_utilisation = std::max(res.busiest_rank_utilisation, r.busy_s / res.makespan_s);
    res.bytes_moved = bytes_;
    res.inter_node_bytes = inter_bytes_;
    return res;
  }

 private:
  void push(Event e) {
    e.seq = seq_++;
    q_.push(e);
  }
  // Paced closed loop: the next request arrives now (one finished or was refused).
  void arrive_next() {
    if (next_ >= arrival_.size()) return;
    arrival_[next_] = now_;
    push({now_, 0, Ev::Arrive, -1, -1, next_++});
  }
  int node(int rank) const { return rank / net_.ranks_per_node; }
  // When `bytes` sent now from `from` reach `to` (the sender's link sends one message at a time).
  double send(int from, int to, double bytes) {
    if (from == to) return now_;
    const bool same = node(from) == node(to);
    const double wire = bytes / (same ? net_.intra_bytes_per_s : net_.inter_bytes_per_s);
    Rank& r = ranks_[from];
    const double start = std::max(now_, r.link_free);
    r.link_free = start + wire;
    bytes_ += bytes;
    if (!same) inter_bytes_ += bytes;
    return start + wire + net_.latency_s;
  }
  double control(int from, int to) const { return from == to ? now_ : now_ + net_.latency_s; }

  void admit() {
    for (const Admission& a : planner_->admit(now_)) {
      route_[a.id] = a.route;
      last_admit_ = now_;
      push({control(0, a.route[0]), 0, Ev::Deliver, a.route[0], 0, a.id});
    }
  }

  void deliver(int rank, int k, uint64_t id) {
    Slot& s = ranks_[rank].slots.at(k);
    const bool idle = s.held() == 0 && !(ranks_[rank].busy && ranks_[rank].stage == k);
    if (idle) {
      s.ready_since = now_;
      if (S_[k].gathers && S_[k].batch_wait_s > 0) {
        s.gather_until = now_ + S_[k].batch_wait_s;
        push({s.gather_until, 0, Ev::Wake, rank, k, 0});
      }
    }
    if (s.batcher) {
      s.batcher->add(id, 0, now_);
      s.steps[id] = 0;
    } else {
      s.waiting.push_back(id);
    }
    start(rank);
  }

  bool runnable(const Slot& s, int k) const {
    if (s.held() == 0) return false;
    if (s.gather_until > now_ && static_cast<int>(s.held()) < S_[k].max_batch) return false;
    return true;
  }

  void start(int rank) {
    Rank& r = ranks_[rank];
    if (r.busy) return;
    int pick = -1;
    for (auto& [k, s] : r.slots) {
      if (!runnable(s, k)) continue;
      // oldest ready work first; ties to the later stage (finishing requests frees the planner's slots)
      if (pick < 0 || s.ready_since <= r.slots.at(pick).ready_since) pick = k;
    }
    if (pick < 0) return;
    Slot& s = r.slots.at(pick);
    s.gather_until = -1;
    std::vector<uint64_t> batch;
    if (s.batcher) {
      batch = s.batcher->plan(now_);
    } else {
      const size_t n = std::min(s.waiting.size(), static_cast<size_t>(S_[pick].max_batch));
      batch.assign(s.waiting.begin(), s.waiting.begin() + static_cast<std::ptrdiff_t>(n));
      s.waiting.erase(s.waiting.begin(), s.waiting.begin() + static_cast<std::ptrdiff_t>(n));
    }
    const double dt = S_[pick].cost.at(static_cast<int>(batch.size()));
    r.busy = true;
    r.stage = pick;
    r.batch = std::move(batch);
    r.busy_s += dt;
    stage_stats_[pick].busy_s += dt;
    stage_stats_[pick].calls += 1;
    batch_sum_[pick] += static_cast<double>(r.batch.size());
    if (S_[pick].heavy) heavy_calls_.push_back({now_ + dt, static_cast<double>(r.batch.size())});
    push({now_ + dt, 0, Ev::CallDone, rank, pick, 0});
  }

  void call_done(int rank) {
    Rank& r = ranks_[rank];
    const int k = r.stage;
    Slot& s = r.slots.at(k);
    std::vector<uint64_t> finished;
    if (s.batcher) {
      for (uint64_t id : r.batch)
        if (++s.steps[id] >= S_[k].calls) {
          s.batcher->finished(id);
          s.steps.erase(id);
          finished.push_back(id);
        }
    } else {
      finished = r.batch;
    }
    r.busy = false;
    r.stage = -1;
    r.batch.clear();
    if (s.held() > 0) s.ready_since = now_;
    for (uint64_t id : finished) forward(rank, k, id);
    start(rank);
  }

  void forward(int rank, int k, uint64_t id) {
    const bool last = k + 1 == static_cast<int>(S_.size());
    const int to = last ? 0 : route_.at(id)[k + 1];
    const double at = send(rank, to, S_[k].out_bytes);
    // the coordinator hears of it (with the result, from the last stage)
    push({last ? at : control(rank, 0), 0, Ev::Notify, rank, k, id});
    if (!last) push({at, 0, Ev::Deliver, to, k + 1, id});
    else route_.erase(id);
  }

  const std::vector<SimStage>& S_;
  int heavy_ = 0;  // the heavy stage's index
  SimNetwork net_;
  SimWorkload w_;
  std::vector<Rank> ranks_;
  std::unique_ptr<Planner> planner_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> q_;
  uint64_t seq_ = 0;
  double now_ = 0;
  std::vector<double> arrival_, latency_, done_at_;
  size_t next_ = 0;  // the next request to arrive (paced closed loop)
  double last_admit_ = 0;
  std::vector<std::pair<double, double>> heavy_calls_;  // (end, requests) of every heavy-stage call
  std::map<uint64_t, std::vector<int>> route_;
  std::vector<SimStageStats> stage_stats_;
  std::vector<double> batch_sum_;
  double bytes_ = 0, inter_bytes_ = 0;
};

}  // namespace

SimResult simulate(const std::vector<SimStage>& stages, int world_size, const SimNetwork& net, const SimWorkload& w) {
  return Sim(stages, world_size, net, w).run();
}

}  // namespace diffpipe::sched
