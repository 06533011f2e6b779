// The coordinator's planning function over request state, with no model and no threads: a bounded
// admission queue (a full queue rejects), priorities with aging (no starvation), per-request deadlines and
// cancellation in any state, least-loaded routing to each stage's replicas, and a bound on in-flight work per
// replica so a fast stage cannot flood a slow one. The stages are a list (the pipeline's, in order); nothing
// here knows what they do. The runtime feeds it events and executes its decisions; tests drive it for hundreds
// of simulated steps. Not thread-safe: the coordinator thread owns it.
#pragma once
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <string>
#include <vector>

#include "diffpipe/scheduler/lifecycle.h"

namespace diffpipe::sched {

struct PlannedStage {
  std::string name;
  std::vector<int> replicas;        // ranks running this stage
  int inflight_limit = 1 << 30;     // per replica: requests routed there and not yet past this stage
  bool heavy = false;               // routed first; the other stages prefer its rank (locality)
};

// A stage's in-flight bound in the Planner, from its placement's per-replica bound (StageSpec::inflight_limit):
// the heavy stage's bound admits requests; light stages run ahead by `admission_factor` times theirs, or are
// unbounded (factor 0: fed only what the stages before them release).
inline int admission_limit(bool heavy, int admission_factor, int stage_limit) {
  return heavy ? stage_limit : admission_factor > 0 ? admission_factor * stage_limit : 1 << 30;
}

struct PlannerConfig {
  size_t queue_capacity = 1024;     // waiting requests; more are rejected
  std::vector<PlannedStage> stages; // the pipeline, in order; each needs at least one replica
  double aging_per_s = 1.0;         // priority points gained per second of waiting
};

struct Admission {
  uint64_t id;
  std::vector<int> route;  // one rank per stage
};

// What the runtime must do about requests that ended while routed somewhere (cancel/deadline).
struct Drop {
  uint64_t id;
  RequestState state;  // Cancelled or TimedOut
  int rank;            // where it is now (-1: it was still queued)
};

class Planner {
 public:
  explicit Planner(PlannerConfig cfg);

  // Returns false (and records nothing) when the queue is full or the id is already known.
  bool submit(uint64_t id, int priority, int total_steps, double now, double deadline_s = 0);
  // Admissions to make now: highest effective priority first (priority + aging x wait). Each goes to the
  // least-loaded replica of the heavy stage, then every other stage takes that same rank when it has a replica
  // there with room (no transfer: data-parallel replicas keep a request on one rank), else its least-loaded
  // replica; admission stops while a chosen replica is at its in-flight limit.
  std::vector<Admission> admit(double now);
  // Events from the runtime.
  // Progress inside the current stage: `step` of `total` calls (the stage knows the exact count, e.g. PLMS
  // makes steps + 1 calls); total <= 0 keeps the count given at submit.
  void on_step(uint64_t id, int step, double now, int total = 0);
  // The request left stage `stage`: it runs in the next one (which frees this stage's slot), or is Done after
  // the last. Late or repeated events (the request is already past `stage`, or ended) change nothing.
  void on_stage_done(uint64_t id, int stage, double now);
  void on_done(uint64_t id, double now) { on_stage_done(id, num_stages() - 1, now); }
  // Events from different ranks may arrive out of order (a stage's "done" after the next stage's steps):
  // brings the request forward to `stage` through the events it skipped. Returns false when the request
  // already ended (cancelled, failed or timed out meanwhile): drop the event.
  bool reach(uint64_t id, int stage, double now);
  void on_failed(uint64_t id, const std::string& why, double now);
  // Cancellation (any state) and deadlines: returns what to drop where.
  std::optional<Drop> cancel(uint64_t id, const std::string& why, double now);
  std::vector<Drop> expire(double now);

  const RequestInfo& info(uint64_t id) const;
  // Drops a final request's record (a long-running server would otherwise keep every request ever seen).
  void forget(uint64_t id);
  // Where the request is, in words: "queued", "in denoise (step 3 of 20)", "done", ...
  std::string where(uint64_t id) const;
  bool known(uint64_t id) const { return reqs_.count(id) != 0; }
  size_t queued() const { return queue_.size(); }
  size_t active() const;  // admitted and not final
  bool all_final() const;
  int num_stages() const { return static_cast<int>(cfg_.stages.size()); }
  int stage_index(const std::string& name) const;  // -1 when the pipeline has no such stage
  int load(int stage, int rank) const;
  const PlannerConfig& config() const { return cfg_; }

 private:
  RequestInfo& get(uint64_t id);
  void release(RequestInfo& r);            // drops its load everywhere
  void unload(RequestInfo& r, int stage);  // drops its load on one stage
  void finish(RequestInfo& r, RequestState to, const std::string& why, double now);
  PlannerConfig cfg_;
  std::map<uint64_t, RequestInfo> reqs_;
  struct QueueKey {  // admission order: effective priority, then arrival, then id
    double standing, arrival;  // standing: the effective priority less aging x now (the same for every request)
    uint64_t id;
    bool operator<(const QueueKey& o) const {
      if (standing != o.standing) return standing > o.standing;
      if (arrival != o.arrival) return arrival < o.arrival;
      return id < o.id;
    }
  };
  QueueKey key(const RequestInfo& r) const;
  std::set<QueueKey> queue_;  // waiting requests, in admission order
  // Per stage: requests counted against each replica, and the replicas ordered by (load, place in the list) so
  // that the least loaded is found without a scan (clusters of thousands of ranks are simulated).
  struct StageLoad {
    std::map<int, int> load, pos;              // rank -> load, rank -> index in the stage's replica list
    std::set<std::tuple<int, int, int>> order;  // (load, index, rank)
    void add_replica(int rank, int position);
    void change(int rank, int delta);
    bool has(int rank) const { return load.count(rank) != 0; }
    int of(int rank) const {
      auto it = load.find(rank);
      return it == load.end() ? 0 : it->second;
    }
    int least() const { return std::get<2>(*order.begin()); }
  };
  std::vector<StageLoad> load_;
};

}  // namespace diffpipe::sched
