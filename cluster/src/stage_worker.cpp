#include "stage_worker.h"

#include <optional>

#include "diffpipe/cluster/wire.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/log.h"

namespace diffpipe::runner {

using namespace std::chrono_literals;
using RealClock = std::chrono::steady_clock;

std::string StageWorker::who(uint64_t id) const {
  return detail::cat("rank ", ctx_.rank(), ", stage ", def_.name, ", request ", id);
}

void StageWorker::run() {
  try {
    StageConfig cfg;
    cfg.max_batch = spec_.max_batch;
    cfg.batching = spec_.batching;
    ctx_.lane.run([&] { stage_ = def_.make(cfg); });
    DP_CHECK(stage_, "stage '", def_.name, "': its factory made nothing");
    loop();
  } catch (const std::exception& e) {
    const std::string what = who(current_) + ": " + describe(e);
    DP_LOG(Error, what);
    try {
      ctx_.send(0, wire::encode(wire::Error{ctx_.rank(), what}));
    } catch (...) {
    }
    ctx_.set_failure(what);
  }
}

// A request that cannot run here fails alone: the coordinator hears of it and tells the other ranks.
void StageWorker::fail(uint64_t id, const std::string& why) {
  const std::string reason = who(id) + ": " + why;
  DP_LOG(Warn, reason);
  held_.erase(id);
  ctx_.send(0, wire::encode(wire::Failed{id, k_, ctx_.rank(), reason}));
}

void StageWorker::accept(Message&& m) {
  wire::Work w = wire::decode_work(std::move(m));
  DP_CHECK(w.stage == k_, "rank ", ctx_.rank(), " stage ", def_.name, " received work for stage ", w.stage);
  if (ctx_.is_cancelled(w.request)) return;
  // a partial image travels under its own id; it is never injected into and never fails the request
  const bool preview = w.preview > 0;
  const uint64_t id = preview ? preview_id(w.request, w.preview) : w.request;
  if (!preview) current_ = w.request;
  try {
    if (!preview) inj_.maybe_fire(def_.name, w.request, ctx_.rank());
    StageRequest r;
    r.id = id;
    r.params = w.params;
    r.inputs = std::move(w.tensors);
    r.priority = w.priority;
    held_[id] = Held{std::move(w.params), std::move(w.route), std::move(w.trail), w.priority};
    ctx_.lane.run([&] { stage_->add(std::move(r), ctx_.clock.now()); });
  } catch (const std::exception& e) {
    if (!preview) return fail(w.request, describe(e));
    held_.erase(id);
    DP_LOG(Warn, who(w.request), ": preview ", w.preview, " dropped: ", describe(e));
  }
}

// Sends a request's outputs on to the next stage of its route (preview > 0: as that partial image).
void StageWorker::forward(uint64_t request, Held h, int preview, std::vector<at::Tensor> outputs) {
  wire::Work w;
  w.request = request;
  w.stage = k_ + 1;
  w.params = std::move(h.params);
  w.route = std::move(h.route);
  w.priority = h.priority;
  w.trail = std::move(h.trail);
  w.preview = preview;
  w.tensors = std::move(outputs);
  const int dst = w.route.at(k_ + 1);
  ctx_.send(dst, wire::encode(std::move(w)));
}

void StageWorker::drop_cancelled() {
  for (auto it = held_.begin(); it != held_.end();) {
    if (ctx_.is_cancelled(request_of(it->first))) {
      stage_->cancel(it->first);
      it = held_.erase(it);
    } else {
      ++it;
    }
  }
}

void StageWorker::emit(std::vector<StageEvent>& events) {
  wire::Steps steps;
  steps.stage = k_;
  for (auto& ev : events) {
    auto it = held_.find(ev.id);
    if (it == held_.end()) continue;  // cancelled meanwhile
    if (preview_number(ev.id) > 0) {  // a partial image went through this stage: finished, it is the image; passed
      Held h = std::move(it->second);  // on as a preview (a stage without the means to show it), the next stage makes it
      held_.erase(it);
      if (ev.kind == StageEvent::Kind::Finished && !ev.outputs.empty())
        ctx_.send(0, wire::encode(wire::PreviewImage{request_of(ev.id), preview_number(ev.id), ev.outputs[0]}));
      else if (ev.kind == StageEvent::Kind::Preview && k_ + 1 < static_cast<int>(ctx_.pipeline.size()) &&
               !ev.outputs.empty())
        forward(request_of(ev.id), std::move(h), preview_number(ev.id), std::move(ev.outputs));
      continue;
    }
    switch (ev.kind) {
      case StageEvent::Kind::Progress: steps.items.push_back({ev.id, ev.step, ev.total}); break;
      case StageEvent::Kind::Failed: fail(ev.id, ev.error); break;
      case StageEvent::Kind::Preview:  // on to the next stage, which turns it into partial image number ev.step
        if (k_ + 1 < static_cast<int>(ctx_.pipeline.size()) && !ev.outputs.empty())
          forward(ev.id, it->second, ev.step, std::move(ev.outputs));
        break;
      case StageEvent::Kind::Finished: {
        Held h = std::move(it->second);
        held_.erase(it);
        h.trail.push_back(ctx_.rank());
        const bool last = k_ + 1 == static_cast<int>(ctx_.pipeline.size());
        if (last) {
          DP_CHECK(!ev.outputs.empty(), "stage '", def_.name, "' finished request ", ev.id, " without an image");
          ctx_.send(0, wire::encode(wire::Result{ev.id, std::move(h.trail), ev.outputs[0]}));
          break;
        }
        ctx_.send(0, wire::encode(wire::StageDone{ev.id, k_}));
        forward(ev.id, std::move(h), 0, std::move(ev.outputs));
        break;
      }
    }
  }
  if (!steps.items.empty()) ctx_.send(0, wire::encode(steps));
}

void StageWorker::loop() {
  while (!ctx_.stop) {
    if (held_.empty()) {
      auto m = inbox_.pop(50ms);
      if (!m) continue;
      accept(std::move(*m));
      if (def_.gathers) {  // wait a little for more, to fill a batch
        const auto deadline = RealClock::now() + std::chrono::microseconds(static_cast<int64_t>(spec_.batch_wait_ms * 1000));
        while (static_cast<int>(held_.size()) < spec_.max_batch) {
          const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - RealClock::now());
          auto n = left.count() > 0 ? inbox_.pop(left) : inbox_.try_pop();
          if (!n) break;
          accept(std::move(*n));
        }
      }
    }
    while (auto m = inbox_.try_pop()) accept(std::move(*m));
    drop_cancelled();
    if (held_.empty()) continue;
    if (stage_->held() == 0) {  // a stage must answer for every request it took: this one did not
      while (!held_.empty()) fail(held_.begin()->first, "the stage dropped the request without a result");
      continue;
    }
    std::vector<StageEvent> events;
    std::optional<std::string> call_failed;  // the whole call failed: so did each of its requests
    ctx_.lane.run([&] {
      const auto t0 = RealClock::now();  // busy: the call itself, not the wait for the lane
      try {
        events = stage_->step(ctx_.clock.now());
      } catch (const std::exception& e) {
        call_failed = describe(e);
      }
      ctx_.busy_us[k_] += std::chrono::duration_cast<std::chrono::microseconds>(RealClock::now() - t0).count();
    });
    if (call_failed)
      for (uint64_t id : stage_->current_batch()) {
        stage_->cancel(id);
        if (held_.count(id)) fail(id, *call_failed);
      }
    ctx_.touch();
    if (!events.empty()) current_ = events.front().id;
    emit(events);
  }
}

}  // namespace diffpipe::runner
