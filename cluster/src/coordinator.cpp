#include "coordinator.h"

#include <algorithm>
#include <set>

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
    // the heavy stage's bound admits requests; light stages run ahead by a factor, or are fed only what the
    // stages before them release
    const int limit = d.heavy ? spec.inflight_limit() : d.admission_factor > 0 ? d.admission_factor * spec.inflight_limit() : 1 << 30;
    pc.stages.push_back({d.name, spec.ranks, limit, d.heavy});
  }
  sched::Planner planner(pc);
  const size_t n = requests_.size();
  auto meta = [&](size_t i) { return i < opts.meta.size() ? opts.meta[i] : RequestMeta{}; };
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return meta(a).arrival_s < meta(b).arrival_s; });
  std::vector<bool> cancel_sent(n, false);
  size_t next = 0, finished = 0;
  const Clock& clock = ctx_.clock;
  double last_progress = clock.now();
  auto report = [&](uint64_t id, const std::string& status, const std::string& reason) {
    GeneratedImage gi;
    gi.index = id;
    gi.params = requests_[id];
    gi.status = status;
    gi.reason = reason;
    gi.latency_s = clock.now() - meta(id).arrival_s;
    on_result_(std::move(gi));
    ++finished;
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
  while (finished < n) {
    if (ctx_.stop) return;
    const double now = clock.now();
    // arrivals (open loop): a full queue rejects or holds the source back
    while (next < n && meta(order[next]).arrival_s <= now) {
      const size_t id = order[next];
      const RequestMeta m = meta(id);
      const double deadline = m.deadline_s > 0 ? m.arrival_s + m.deadline_s : 0;
      if (planner.submit(id, m.priority, requests_[id].steps, now, deadline)) {
        ++next;
      } else if (opts.reject_when_full) {
        ++next;
        report(id, "rejected", "admission queue full");
      } else {
        break;
      }
    }
    for (size_t i = 0; i < n; ++i) {
      const RequestMeta m = meta(i);
      if (m.cancel_at_s < 0 || cancel_sent[i] || now < m.cancel_at_s || !planner.known(i)) continue;
      cancel_sent[i] = true;
      if (auto d = planner.cancel(i, "cancelled by the client", now)) drop(*d);
    }
    for (const auto& d : planner.expire(now)) drop(d);
    ctx_.peak_queued = std::max<size_t>(ctx_.peak_queued, planner.queued());
    for (auto& a : planner.admit(now)) {
      wire::Work w;
      w.request = a.id;
      w.stage = 0;
      w.params = requests_[a.id];
      w.route = a.route;
      w.priority = meta(a.id).priority;
      ctx_.send(a.route[0], wire::encode(std::move(w)));
    }
    ctx_.peak_active = std::max<size_t>(ctx_.peak_active, planner.active());
    auto msg = inbox_.pop(10ms);
    if (!msg) {
      if (clock.now() - last_progress > opts.timeout_s && planner.active() > 0) {
        std::string pending;
        for (size_t i = 0; i < n && pending.size() < 2000; ++i) {
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
        const wire::Steps s = wire::decode_steps(*msg);
        DP_CHECK(s.stage < S, "rank ", msg->src, " reported steps of stage ", s.stage, " (the pipeline has ", S, ")");
        for (const auto& it : s.items) {
          if (!planner.known(it.request) || !planner.reach(it.request, s.stage, t)) continue;
          const auto& r = planner.info(it.request);
          if (r.stage == s.stage && it.step > r.step) planner.on_step(it.request, it.step, t, it.total);
        }
        continue;
      }
      default: break;
    }
    DP_CHECK(msg->request < n && planner.known(msg->request), "rank ", msg->src, " sent a ", msg_kind_name(msg->kind),
             " message for unknown request ", msg->request);
    const uint64_t id = msg->request;
    switch (msg->kind) {
      case MsgKind::StageDone: {
        const wire::StageDone d = wire::decode_stage_done(*msg);
        DP_CHECK(d.stage + 1 < S, "rank ", msg->src, " reported request ", id, " done with stage ", d.stage,
                 ", which is not followed by another");
        planner.reach(id, d.stage + 1, t);  // false: ended meanwhile (its Cancel is on the way)
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
        GeneratedImage gi;
        gi.index = id;
        gi.params = requests_[id];
        gi.stage_ranks = r.trail;
        gi.denoise_rank = heavy < static_cast<int>(r.trail.size()) ? r.trail[heavy] : -1;
        gi.latency_s = t - meta(id).arrival_s;
        gi.image = image_from_uint8_hwc(r.image);
        on_result_(std::move(gi));
        ++finished;
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
