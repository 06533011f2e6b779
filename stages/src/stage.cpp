#include "diffpipe/stages/stage.h"

#include <algorithm>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

void OneShotStage::add(StageRequest r, double now) {
  (void)now;
  check(r);
  // A final request goes before every waiting preview of other requests, but after its own (a client streaming
  // partial images sees them before the image).
  const bool own_preview_waiting = std::any_of(waiting_.begin(), waiting_.end(), [&](const StageRequest& w) {
    return preview_number(w.id) > 0 && request_of(w.id) == r.id;
  });
  if (preview_number(r.id) == 0 && !own_preview_waiting) {
    auto it = std::find_if(waiting_.begin(), waiting_.end(), [](const StageRequest& w) { return preview_number(w.id) > 0; });
    waiting_.insert(it, std::move(r));
    return;
  }
  waiting_.push_back(std::move(r));
}

void OneShotStage::cancel(uint64_t id) {
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), [&](const StageRequest& r) { return r.id == id; }),
                 waiting_.end());
}

size_t OneShotStage::batch_end() const {
  if (waiting_.empty()) return 0;
  auto shape = [](const StageRequest& r) {
    return r.inputs.empty() ? std::vector<int64_t>{} : r.inputs[0].sizes().vec();
  };
  const auto first = shape(waiting_.front());
  size_t n = 1;
  while (n < waiting_.size() && static_cast<int>(n) < max_batch_ && shape(waiting_[n]) == first &&
         (preview_number(waiting_[n].id) > 0) == (preview_number(waiting_.front().id) > 0))
    ++n;
  return n;
}

std::vector<uint64_t> OneShotStage::current_batch() const { return current_; }

std::vector<StageEvent> OneShotStage::step(double now) {
  (void)now;
  const size_t n = batch_end();
  std::vector<StageRequest> batch(std::make_move_iterator(waiting_.begin()),
                                  std::make_move_iterator(waiting_.begin() + static_cast<std::ptrdiff_t>(n)));
  waiting_.erase(waiting_.begin(), waiting_.begin() + static_cast<std::ptrdiff_t>(n));
  std::vector<const StageRequest*> ptrs;
  current_.clear();
  for (const auto& r : batch) {
    ptrs.push_back(&r);
    current_.push_back(r.id);
  }
  auto checked = [&](const std::vector<const StageRequest*>& b) {
    auto ev = run(b);
    DP_CHECK(ev.size() == b.size(), "stage returned ", ev.size(), " results for ", b.size(), " requests");
    return ev;
  };
  if (ptrs.size() == 1) return checked(ptrs);  // a throw fails this one request (the runner names it)
  try {
    return checked(ptrs);
  } catch (const std::exception&) {
    // one bad request must not take its batch neighbours down: run each alone
    std::vector<StageEvent> out;
    for (const StageRequest* r : ptrs) {
      try {
        auto ev = checked({r});
        out.push_back(std::move(ev[0]));
      } catch (const std::exception& e) {
        out.push_back(StageEvent::failed(r->id, describe(e)));
      }
    }
    return out;
  }
}

}  // namespace diffpipe
