#include "diffpipe/scheduler/step_batcher.h"

#include <algorithm>

#include "diffpipe/runtime/error.h"

namespace diffpipe::sched {

BatchMode parse_batch_mode(const std::string& s) {
  if (s == "step") return BatchMode::Step;
  if (s == "static") return BatchMode::Static;
  if (s == "single") return BatchMode::Single;
  DP_FAIL("unknown batching mode '", s, "' (step, static or single)");
}

const char* batch_mode_name(BatchMode m) {
  switch (m) {
    case BatchMode::Step: return "step";
    case BatchMode::Static: return "static";
    case BatchMode::Single: return "single";
  }
  return "?";
}

StepBatcher::StepBatcher(BatchMode mode, int max_batch, double aging_per_s)
    : mode_(mode), max_batch_(mode == BatchMode::Single ? 1 : max_batch), aging_(aging_per_s) {
  DP_CHECK(max_batch_ >= 1, "step batcher: max_batch must be >= 1");
}

void StepBatcher::add(uint64_t id, int priority, double arrival_s) {
  for (const auto& w : waiting_) DP_CHECK(w.id != id, "step batcher: request ", id, " added twice");
  DP_CHECK(std::find(active_.begin(), active_.end(), id) == active_.end(), "step batcher: request ", id,
           " is already active");
  waiting_.push_back({id, priority, arrival_s});
}

bool StepBatcher::cancel(uint64_t id) {
  auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](const Waiting& x) { return x.id == id; });
  if (w != waiting_.end()) {
    waiting_.erase(w);
    return true;
  }
  auto a = std::find(active_.begin(), active_.end(), id);
  if (a != active_.end()) {
    active_.erase(a);
    return true;
  }
  return false;
}

std::vector<uint64_t> StepBatcher::plan(double now) {
  const bool may_join = mode_ == BatchMode::Step || active_.empty();
  if (may_join && !waiting_.empty() && static_cast<int>(active_.size()) < max_batch_) {
    std::stable_sort(waiting_.begin(), waiting_.end(), [&](const Waiting& a, const Waiting& b) {
      const double pa = a.priority + aging_ * (now - a.arrival), pb = b.priority + aging_ * (now - b.arrival);
      if (pa != pb) return pa > pb;
      return a.arrival < b.arrival;
    });
    size_t k = 0;
    while (k < waiting_.size() && static_cast<int>(active_.size()) < max_batch_) active_.push_back(waiting_[k++].id);
    waiting_.erase(waiting_.begin(), waiting_.begin() + static_cast<std::ptrdiff_t>(k));
  }
  return active_;
}

void StepBatcher::finished(uint64_t id) {
  auto a = std::find(active_.begin(), active_.end(), id);
  DP_CHECK(a != active_.end(), "step batcher: request ", id, " finished but is not active");
  active_.erase(a);
}

}  // namespace diffpipe::sched
