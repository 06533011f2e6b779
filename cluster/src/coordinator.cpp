#include "coordinator.h"

#include <algorithm>
#include <deque>
#include <set>
#include <map>

#include "diffpipe/cluster/wire.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/scheduler/planner.h"

namespace diffpipe::runner {

using namespace std::chrono_literals;

void Coordinator::run() {
  const RunOptions& opts = ctx_.opts;
  const Placement& P = opts.placement;
  const int S = static_cast<int>(ctx_.pipeline.size());
  sched::PlannerConfig pc;
  pc.queue_capacity = P.queue_capacity;
  int heavy = 0;
  for (int k = 0; k < S; ++k) {
    const StageDef& d = ctx_.pipeline[k];
    const StageSpec& spec = P.stages.at(k).spec;
    if (d.heavy) heavy = k;
    const int limit = sched::admission_limit(d.heavy, d.admission_factor, spec.inflight_limit());
    pc.stages.push_back({d.name, spec.ranks, limit, d.heavy});
  }
  sched::Planner planner(pc);
  std::map<uint64_t, FeedItem> live;  // given by the feed and not yet final (ordered: messages list them by id)
  std::deque<FeedItem> waiting;                 // arrived, not yet accepted by the planner (queue full)
  std::set<uint64_t> cancel_pending;            // meta.cancel_at_s timers
  const Clock& clock = ctx_.clock;
  double last_progress = clock.now(), last_beat = clock.now();
  const double beat_s = std::max(0.5, std::min(5.0, opts.timeout_s / 4));
  auto finish = [&](uint64_t id) {  // the request is final: forget it (a server runs for ever)
    live.erase(id);
    cancel_pending.erase(id);
    if (planner.known(id)) planner.forget(id);
  };
  auto report = [&](uint64_t id, const std::string& status, const std::string& reason) {
    auto it = live.find(id);
    if (it == live.end()) return;
    GeneratedImage gi;
    gi.index = id;
    gi.params = it->second.params;
    gi.status = status;
    gi.reason = reason;
    gi.latency_s = clock.now() - it->second.meta.arrival_s;
    feed_.deliver(std::move(gi));
    finish(id);
  };
  auto tell_route = [&](uint64_t id) {  // every rank on its route drops it (it may be in flight between them)
    const auto& route = planner.info(id).route;
    for (int r : std::set<int>(route.begin(), route.end()))
      if (r >= 0) ctx_.send(r, wire::encode(wire::Cancel{id}));
  };
  auto drop = [&](const sched::Drop& d) {
    tell_route(d.id);
    report(d.id, sched::state_name(d.state), planner.info(d.id).reason);
  };
  while (!(feed_.closed() && waiting.empty() && live.empty())) {
    if (ctx_.stop) return;
    const double now = clock.now();
    for (auto& item : feed_.arrivals(now)) {
      DP_CHECK(!live.count(item.id), "coordinator: the feed gave request ", item.id, " twice");
      if (item.meta.arrival_s <= 0) item.meta.arrival_s = now;
      if (item.meta.cancel_at_s >= 0) cancel_pending.insert(item.id);
      live.emplace(item.id, item);
      waiting.push_back(std::move(item));
    }
    // arrivals: a full queue rejects or holds the source back
    while (!waiting.empty()) {
      const FeedItem& f = waiting.front();
      const double deadline = f.meta.deadline_s > 0 ? f.meta.arrival_s + f.meta.deadline_s : 0;
      if (planner.submit(f.id, f.meta.priority, f.params.steps, now, deadline)) {
        waiting.pop_front();
      } else if (opts.reject_when_full) {
        const uint64_t id = f.id;
        waiting.pop_front();
        report(id, "rejected", "admission queue full");
      } else {
        break;
      }
    }
    for (uint64_t id : feed_.cancellations()) {
      if (!live.count(id)) continue;
      if (planner.known(id)) {
        if (auto d = planner.cancel(id, "cancelled by the client", now)) drop(*d);
      } else {  // still waiting for admission
        waiting.erase(std::remove_if(waiting.begin(), waiting.end(), [&](const FeedItem& f) { return f.id == id; }),
                      waiting.end());
        report(id, "cancelled", "cancelled by the client");
      }
    }
    for (auto it = cancel_pending.begin(); it != cancel_pending.end();) {  // testing aid: cancel at a time
      const uint64_t id = *it;
      if (!live.count(id) || now < live.at(id).meta.cancel_at_s || !planner.known(id)) {
        ++it;
        continue;
      }
      it = cancel_pending.erase(it);
      if (auto d = planner.cancel(id, "cancelled by the client", now)) drop(*d);
    }
    for (const auto& d : planner.expire(now)) drop(d);
    ctx_.peak_queued = std::max<size_t>(ctx_.peak_queued, planner.queued());
    for (auto& a : planner.admit(now)) {
      const FeedItem& f = live.at(a.id);
      wire::Work w;
      w.request = a.id;
      w.stage = 0;
      w.params = f.params;
      w.route = a.route;
      w.priority = f.meta.priority;
      ctx_.send(a.route[0], wire::encode(std::move(w)));
    }
    ctx_.peak_active = std::max<size_t>(ctx_.peak_active, planner.active());
    feed_.status(planner.queued() + waiting.size(), planner.active());
    if (now - last_beat >= beat_s) {  // idle ranks of a long-lived run know rank 0 is alive
      last_beat = now;
      for (int r = 1; r < ctx_.transport.size(); ++r) ctx_.send(r, wire::encode(wire::Heartbeat{}));
    }
    auto msg = inbox_.pop(10ms);
    if (!msg) {
      if (planner.active() == 0) last_progress = clock.now();  // idle is not stuck
      if (clock.now() - last_progress > opts.timeout_s && planner.active() > 0) {
        std::string pending;
        for (const auto& [i, f] : live) {
          if (pending.size() > 2000) break;
          if (!planner.known(i) || planner.info(i).state != sched::RequestState::Running) continue;
          const auto& r = planner.info(i);
          std::string route;
          for (int k = 0; k < S; ++k) route += detail::cat(k ? ", " : "", pc.stages[k].name, " rank ", r.route[k]);
          pending += detail::cat(pending.empty() ? "" : "; ", "request ", i, " ", planner.where(i), " on rank ",
                                 r.route[r.stage], " (route: ", route, ")");
        }
        DP_FAIL("no progress for ", opts.timeout_s, " s; waiting on ", pending);
      }
      continue;
    }
    last_progress = clock.now();
    const double t = clock.now();
    switch (msg->kind) {
      case MsgKind::Error: DP_FAIL(wire::decode_error(*msg).what);
      case MsgKind::Steps: {
        const wire::Steps st = wire::decode_steps(*msg);
        DP_CHECK(st.stage < S, "rank ", msg->src, " reported steps of stage ", st.stage, " (the pipeline has ", S, ")");
        for (const auto& it : st.items) {
          if (!planner.known(it.request) || !planner.reach(it.request, st.stage, t)) continue;
          const auto& r = planner.info(it.request);
          if (r.stage == st.stage && it.step > r.step) planner.on_step(it.request, it.step, t, it.total);
        }
        continue;
      }
      default: break;
    }
    const uint64_t id = msg->request;
    if (!planner.known(id)) continue;  // ended and forgotten: a late message (its Cancel crossed it)
    switch (msg->kind) {
      case MsgKind::StageDone: {
        const wire::StageDone d = wire::decode_stage_done(*msg);
        DP_CHECK(d.stage + 1 < S, "rank ", msg->src, " reported request ", id, " done with stage ", d.stage,
                 ", which is not followed by another");
        planner.reach(id, d.stage + 1, t);  // false: ended meanwhile (its Cancel is on the way)
        break;
      }
      case MsgKind::Preview: {
        wire::PreviewImage pv = wire::decode_preview(std::move(*msg));
        if (live.count(id) && !sched::is_final(planner.info(id).state))
          feed_.preview(id, pv.index, image_from_uint8_hwc(pv.image));
        break;
      }
      case MsgKind::Failed: {
        const wire::Failed f = wire::decode_failed(*msg);
        if (opts.fail_fast) DP_FAIL(f.reason);
        if (sched::is_final(planner.info(id).state)) break;
        planner.on_failed(id, f.reason, t);
        tell_route(id);
        ++ctx_.failed_requests;
        report(id, "failed", f.reason);
        break;
      }
      case MsgKind::Result: {
        wire::Result r = wire::decode_result(std::move(*msg));
        if (!planner.reach(id, S - 1, t)) break;  // cancelled or timed out meanwhile
        planner.on_done(id, t);
        auto it = live.find(id);
        if (it == live.end()) break;
        GeneratedImage gi;
        gi.index = id;
        gi.params = it->second.params;
        gi.stage_ranks = r.trail;
        gi.denoise_rank = heavy < static_cast<int>(r.trail.size()) ? r.trail[heavy] : -1;
        gi.latency_s = t - it->second.meta.arrival_s;
        gi.image = image_from_uint8_hwc(r.image);
        feed_.deliver(std::move(gi));
        finish(id);
        ++ctx_.images_done;
        break;
      }
      default:
        DP_FAIL("coordinator: unexpected ", msg_kind_name(msg->kind), " message from rank ", msg->src);
    }
  }
  for (int r = 0; r < ctx_.transport.size(); ++r) ctx_.send(r, wire::encode(wire::Shutdown{}));
}

}  // namespace diffpipe::runner
