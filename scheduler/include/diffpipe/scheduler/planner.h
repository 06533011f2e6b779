// The coordinator's planning function over request state, with no model and no threads: a bounded
// admission queue (a full queue rejects), priorities with aging (no starvation), per-request deadlines and
// cancellation in any state, least-loaded routing to each stage's replicas, and a bound on in-flight work per
// denoise replica so a fast stage cannot flood a slow one. The runtime feeds it events and executes its
// decisions; tests drive it for hundreds of simulated steps. Not thread-safe: the coordinator thread owns it.
#pragma once
#include <map>
#include <optional>
#include <vector>

#include "diffpipe/scheduler/lifecycle.h"

namespace diffpipe::sched {

constexpr int kPlannedStages = 4;  // encode, denoise, decode, upscale (optional: no replicas = not used)

struct PlannerConfig {
  size_t queue_capacity = 1024;       // waiting requests; more are rejected
  std::vector<int> replicas[kPlannedStages];  // encode, denoise, decode, upscale ranks
  int denoise_inflight_limit = 16;    // per denoise replica: routed and not yet out of denoising
  int encode_inflight_limit = 64;     // per encode replica
  int decode_inflight_limit = 64;     // per decode replica: handed over and not yet done
  int upscale_inflight_limit = 1 << 30;  // per upscale replica
  double aging_per_s = 1.0;           // priority points gained per second of waiting
};

struct Admission {
  uint64_t id;
  int route[kPlannedStages];  // -1 for an unused stage
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
  // Admissions to make now: highest effective priority first (priority + aging x wait), each routed to the
  // least-loaded replica of every stage, while the chosen denoise replica is under its in-flight limit.
  std::vector<Admission> admit(double now);
  // Events from the runtime.
  void on_encoded(uint64_t id, double now);               // Encoding -> Denoising
  // Progress inside denoising: `step` of `total` model calls (the denoiser knows the exact count, e.g. PLMS
  // makes steps + 1 calls); total <= 0 keeps the count given at submit.
  void on_step(uint64_t id, int step, double now, int total = 0);
  void on_denoised(uint64_t id, double now);              // Denoising -> Decoding (frees the denoise slot)
  void on_decoded(uint64_t id, double now);               // Decoding -> Upscaling (with an upscale stage)
  void on_done(uint64_t id, double now);                  // Decoding | Upscaling -> Done
  // Events from different ranks may arrive out of order (an encoder's "encoded" after the denoiser's steps):
  // brings the request forward to `target` (Denoising, Decoding or Upscaling) through the events it skipped.
  // Returns false when the request already ended (cancelled or timed out meanwhile): drop the event.
  bool reach(uint64_t id, RequestState target, double now);
  bool upscales() const { return !cfg_.replicas[3].empty(); }
  void on_failed(uint64_t id, const std::string& why, double now);
  // Cancellation (any state) and deadlines: returns what to drop where.
  std::optional<Drop> cancel(uint64_t id, const std::string& why, double now);
  std::vector<Drop> expire(double now);

  const RequestInfo& info(uint64_t id) const;
  bool known(uint64_t id) const { return reqs_.count(id) != 0; }
  size_t queued() const { return queue_.size(); }
  size_t active() const;  // admitted and not final
  bool all_final() const;
  int load(int stage, int rank) const;
  const PlannerConfig& config() const { return cfg_; }

 private:
  RequestInfo& get(uint64_t id);
  int stage_of(RequestState s) const;  // the stage whose load the request counts against (-1: none)
  void release(RequestInfo& r);        // drops its load everywhere
  void finish(RequestInfo& r, RequestState to, const std::string& why, double now);
  PlannerConfig cfg_;
  std::map<uint64_t, RequestInfo> reqs_;
  std::vector<uint64_t> queue_;  // waiting ids
  void unload(RequestInfo& r, int stage);  // drops its load on one stage (if routed there)
  std::map<int, int> load_[kPlannedStages];  // rank -> requests counted against it
};

}  // namespace diffpipe::sched
