#include "diffpipe/scheduler/planner.h"

#include <algorithm>

#include "diffpipe/runtime/error.h"

namespace diffpipe::sched {

Planner::Planner(PlannerConfig cfg) : cfg_(std::move(cfg)) {
  for (int s = 0; s < kPlannedStages; ++s) {
    DP_CHECK(s == 3 || !cfg_.replicas[s].empty(), "planner: stage ", s, " has no replica");
    for (int r : cfg_.replicas[s]) load_[s][r] = 0;
  }
  DP_CHECK(cfg_.denoise_inflight_limit >= 1 && cfg_.encode_inflight_limit >= 1 && cfg_.decode_inflight_limit >= 1 &&
               cfg_.upscale_inflight_limit >= 1,
           "planner: in-flight limits must be >= 1");
}

bool Planner::submit(uint64_t id, int priority, int total_steps, double now, double deadline_s) {
  if (queue_.size() >= cfg_.queue_capacity || reqs_.count(id)) return false;
  RequestInfo r;
  r.id = id;
  r.priority = priority;
  r.arrival_s = now;
  r.deadline_s = deadline_s;
  r.total_steps = total_steps;
  reqs_.emplace(id, r);
  queue_.push_back(id);
  return true;
}

RequestInfo& Planner::get(uint64_t id) {
  auto it = reqs_.find(id);
  DP_CHECK(it != reqs_.end(), "planner: unknown request ", id);
  return it->second;
}
const RequestInfo& Planner::info(uint64_t id) const {
  auto it = reqs_.find(id);
  DP_CHECK(it != reqs_.end(), "planner: unknown request ", id);
  return it->second;
}

int Planner::load(int stage, int rank) const {
  auto it = load_[stage].find(rank);
  return it == load_[stage].end() ? 0 : it->second;
}

std::vector<Admission> Planner::admit(double now) {
  std::vector<Admission> out;
  // effective priority: priority + aging x waited; ties by arrival then id (FIFO)
  std::stable_sort(queue_.begin(), queue_.end(), [&](uint64_t a, uint64_t b) {
    const auto& ra = reqs_.at(a);
    const auto& rb = reqs_.at(b);
    const double pa = ra.priority + cfg_.aging_per_s * (now - ra.arrival_s);
    const double pb = rb.priority + cfg_.aging_per_s * (now - rb.arrival_s);
    if (pa != pb) return pa > pb;
    if (ra.arrival_s != rb.arrival_s) return ra.arrival_s < rb.arrival_s;
    return a < b;
  });
  const int limits[kPlannedStages] = {cfg_.encode_inflight_limit, cfg_.denoise_inflight_limit,
                                     cfg_.decode_inflight_limit, cfg_.upscale_inflight_limit};
  size_t taken = 0;
  for (; taken < queue_.size(); ++taken) {
    Admission a{queue_[taken], {-1, -1, -1, -1}};
    bool ok = true;
    for (int s = 0; s < kPlannedStages && ok; ++s) {
      if (cfg_.replicas[s].empty()) continue;
      int best = -1;
      for (int r : cfg_.replicas[s])
        if (best < 0 || load_[s][r] < load_[s][best]) best = r;
      if (load_[s][best] >= limits[s]) ok = false;
      a.route[s] = best;
    }
    if (!ok) break;  // the head waits: admitting lower-priority work around it would starve it
    RequestInfo& r = reqs_.at(a.id);
    for (int s = 0; s < kPlannedStages; ++s) {
      r.route[s] = a.route[s];
      if (a.route[s] >= 0) ++load_[s][a.route[s]];
    }
    r.transition(RequestState::Encoding, now);
    out.push_back(a);
  }
  queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(taken));
  return out;
}

int Planner::stage_of(RequestState s) const {
  switch (s) {
    case RequestState::Encoding: return 0;
    case RequestState::Denoising: return 1;
    case RequestState::Decoding: return 2;
    case RequestState::Upscaling: return 3;
    default: return -1;
  }
}

void Planner::unload(RequestInfo& r, int stage) {
  if (r.route[stage] >= 0) --load_[stage][r.route[stage]];
}

// Loads held per state: a request holds its own stage and every later one on its route (Encoding holds all).
void Planner::release(RequestInfo& r) {
  const int s = stage_of(r.state);
  if (s < 0) return;
  for (int k = s; k < kPlannedStages; ++k) unload(r, k);
}

void Planner::on_encoded(uint64_t id, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;  // cancelled meanwhile: the runtime drops it downstream
  r.transition(RequestState::Denoising, now);
  unload(r, 0);
}

void Planner::on_step(uint64_t id, int step, double now, int total) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;
  if (total > 0) r.total_steps = total;
  DP_CHECK(r.state == RequestState::Denoising, "planner: request ", id, " reported step ", step, " while ",
           state_name(r.state));
  DP_CHECK(step > r.step && step <= r.total_steps, "planner: request ", id, " step ", step, " after ", r.step, " of ",
           r.total_steps);
  r.step = step;
  (void)now;
}

void Planner::on_denoised(uint64_t id, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;
  r.transition(RequestState::Decoding, now);
  r.step = r.total_steps;
  unload(r, 1);
}

void Planner::on_decoded(uint64_t id, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;
  DP_CHECK(r.route[3] >= 0, "planner: request ", id, " decoded for upscaling, but no upscale stage is planned");
  r.transition(RequestState::Upscaling, now);
  unload(r, 2);
}

void Planner::on_done(uint64_t id, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;
  release(r);
  r.transition(RequestState::Done, now);
}

bool Planner::reach(uint64_t id, RequestState target, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return false;
  if (r.state == RequestState::Encoding && target != RequestState::Encoding) on_encoded(id, now);
  if (r.state == RequestState::Denoising && target != RequestState::Denoising) on_denoised(id, now);
  if (r.state == RequestState::Decoding && target == RequestState::Upscaling) on_decoded(id, now);
  return true;
}

void Planner::finish(RequestInfo& r, RequestState to, const std::string& why, double now) {
  release(r);
  queue_.erase(std::remove(queue_.begin(), queue_.end(), r.id), queue_.end());
  r.transition(to, now, why);
}

void Planner::on_failed(uint64_t id, const std::string& why, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;
  finish(r, RequestState::Failed, why, now);
}

std::optional<Drop> Planner::cancel(uint64_t id, const std::string& why, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return std::nullopt;
  const int s = stage_of(r.state);
  Drop d{id, RequestState::Cancelled, s < 0 ? -1 : r.route[s]};
  finish(r, RequestState::Cancelled, why, now);
  return d;
}

std::vector<Drop> Planner::expire(double now) {
  std::vector<Drop> out;
  for (auto& [id, r] : reqs_) {
    if (is_final(r.state) || r.deadline_s <= 0 || now < r.deadline_s) continue;
    const int s = stage_of(r.state);
    out.push_back({id, RequestState::TimedOut, s < 0 ? -1 : r.route[s]});
    finish(r, RequestState::TimedOut, detail::cat("deadline passed while ", state_name(r.state)), now);
  }
  return out;
}

size_t Planner::active() const {
  size_t n = 0;
  for (const auto& [id, r] : reqs_) n += !is_final(r.state) && r.state != RequestState::Queued;
  return n;
}

bool Planner::all_final() const {
  for (const auto& [id, r] : reqs_)
    if (!is_final(r.state)) return false;
  return true;
}

}  // namespace diffpipe::sched
