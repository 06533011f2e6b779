// The denoiser's batching policy, as a pure planner over request state (no model, no threads):
//   Step   - continuous step-level batching: each iteration runs every active request one step; waiting
//            requests join as soon as there is room (at most max_batch active); finished ones leave at once.
//   Static - request-level batching: a batch forms only when the previous one has fully finished.
//   Single - one request at a time (Static with max_batch 1).
// Waiting requests join by priority + aging x wait (no starvation), then arrival. Cancellation works for
// waiting and active requests. Not thread-safe: the denoise worker owns it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace diffpipe::sched {

enum class BatchMode { Step, Static, Single };
BatchMode parse_batch_mode(const std::string& s);  // "step" | "static" | "single"; throws otherwise
const char* batch_mode_name(BatchMode m);

class StepBatcher {
 public:
  StepBatcher(BatchMode mode, int max_batch, double aging_per_s = 1.0);
  void add(uint64_t id, int priority, double arrival_s);
  // Removes a waiting or active request; false when unknown.
  bool cancel(uint64_t id);
  // The requests to run in this iteration (admitting waiting ones first, per the mode).
  std::vector<uint64_t> plan(double now);
  // An active request finished its last step.
  void finished(uint64_t id);
  size_t active_size() const { return active_.size(); }
  size_t waiting_size() const { return waiting_.size(); }
  int max_batch() const { return max_batch_; }

 private:
  struct Waiting {
    uint64_t id;
    int priority;
    double arrival;
  };
  BatchMode mode_;
  int max_batch_;
  double aging_;
  std::vector<Waiting> waiting_;
  std::vector<uint64_t> active_;
};

}  // namespace diffpipe::sched
