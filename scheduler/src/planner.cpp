#include "diffpipe/scheduler/planner.h"

#include <algorithm>

#include "diffpipe/runtime/error.h"

namespace diffpipe::sched {

Planner::Planner(PlannerConfig cfg) : cfg_(std::move(cfg)), load_(cfg_.stages.size()) {
  DP_CHECK(!cfg_.stages.empty(), "planner: the pipeline has no stage");
  for (size_t s = 0; s < cfg_.stages.size(); ++s) {
    const auto& st = cfg_.stages[s];
    DP_CHECK(!st.replicas.empty(), "planner: stage '", st.name, "' has no replica");
    DP_CHECK(st.inflight_limit >= 1, "planner: stage '", st.name, "': in-flight limit must be >= 1");
    for (size_t i = 0; i < st.replicas.size(); ++i) load_[s].add_replica(st.replicas[i], static_cast<int>(i));
  }
}

int Planner::stage_index(const std::string& name) const {
  for (size_t s = 0; s < cfg_.stages.size(); ++s)
    if (cfg_.stages[s].name == name) return static_cast<int>(s);
  return -1;
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
  queue_.insert(key(r));
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

void Planner::forget(uint64_t id) {
  auto it = reqs_.find(id);
  if (it == reqs_.end()) return;
  DP_CHECK(is_final(it->second.state), "planner: request ", id, " is ", state_name(it->second.state),
           ", only final requests can be forgotten");
  reqs_.erase(it);
}

std::string Planner::where(uint64_t id) const {
  const RequestInfo& r = info(id);
  if (r.state != RequestState::Running) return state_name(r.state);
  std::string s = "in " + cfg_.stages.at(r.stage).name;
  if (r.step > 0) s += detail::cat(" (step ", r.step, " of ", r.total_steps, ")");
  return s;
}

// The effective priority, priority + aging x (now - arrival), orders requests the same way at every `now`
// (aging is one rate for all): the queue is kept in that order instead of sorted at every admission.
Planner::QueueKey Planner::key(const RequestInfo& r) const {
  return {r.priority - cfg_.aging_per_s * r.arrival_s, r.arrival_s, r.id};
}

void Planner::StageLoad::add_replica(int rank, int position) {
  if (load.count(rank)) return;
  load[rank] = 0;
  pos[rank] = position;
  order.insert({0, position, rank});
}

void Planner::StageLoad::change(int rank, int delta) {
  auto it = load.find(rank);
  DP_CHECK(it != load.end(), "planner: rank ", rank, " is not a replica of the stage");
  order.erase({it->second, pos.at(rank), rank});
  it->second += delta;
  order.insert({it->second, pos.at(rank), rank});
}

int Planner::load(int stage, int rank) const {
  return load_.at(stage).of(rank);
}

std::vector<Admission> Planner::admit(double now) {
  std::vector<Admission> out;
  const size_t S = cfg_.stages.size();
  auto it = queue_.begin();
  for (; it != queue_.end(); ++it) {
    Admission a{it->id, std::vector<int>(S, -1)};
    bool ok = true;
    int heavy = -1;
    for (size_t s = 0; s < S; ++s)
      if (cfg_.stages[s].heavy) heavy = static_cast<int>(s);
    auto choose = [&](size_t s, int prefer) {
      const auto& st = cfg_.stages[s];
      if (prefer >= 0 && load_[s].has(prefer) && load_[s].of(prefer) < st.inflight_limit) return prefer;
      return load_[s].least();
    };
    if (heavy >= 0) a.route[heavy] = choose(static_cast<size_t>(heavy), -1);
    for (size_t s = 0; s < S; ++s)
      if (static_cast<int>(s) != heavy) a.route[s] = choose(s, heavy >= 0 ? a.route[heavy] : -1);
    for (size_t s = 0; s < S && ok; ++s)
      if (load_[s].of(a.route[s]) >= cfg_.stages[s].inflight_limit) ok = false;
    if (!ok) break;  // the head waits: admitting lower-priority work around it would starve it
    RequestInfo& r = reqs_.at(a.id);
    r.route = a.route;
    for (size_t s = 0; s < S; ++s) load_[s].change(a.route[s], +1);
    r.transition(RequestState::Running, now);
    out.push_back(std::move(a));
  }
  queue_.erase(queue_.begin(), it);
  return out;
}

void Planner::unload(RequestInfo& r, int stage) {
  if (stage >= 0 && stage < static_cast<int>(r.route.size()) && r.route[stage] >= 0) load_[stage].change(r.route[stage], -1);
}

// Loads held per state: a running request holds its own stage and every later one on its route.
void Planner::release(RequestInfo& r) {
  if (r.state != RequestState::Running) return;
  for (int k = r.stage; k < num_stages(); ++k) unload(r, k);
}

void Planner::on_step(uint64_t id, int step, double now, int total) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return;
  if (total > 0) r.total_steps = total;
  DP_CHECK(r.state == RequestState::Running, "planner: request ", id, " reported step ", step, " while ",
           state_name(r.state));
  DP_CHECK(step > r.step && step <= r.total_steps, "planner: request ", id, " step ", step, " after ", r.step, " of ",
           r.total_steps);
  r.step = step;
  (void)now;
}

void Planner::on_stage_done(uint64_t id, int stage, double now) {
  RequestInfo& r = get(id);
  DP_CHECK(stage >= 0 && stage < num_stages(), "planner: request ", id, ": no stage ", stage);
  if (is_final(r.state) || r.state != RequestState::Running || r.stage > stage) return;
  DP_CHECK(r.stage == stage, "planner: request ", id, " left stage '", cfg_.stages[stage].name, "' while ",
           where(id));
  unload(r, stage);
  r.transition(stage + 1 < num_stages() ? RequestState::Running : RequestState::Done, now);
}

bool Planner::reach(uint64_t id, int stage, double now) {
  RequestInfo& r = get(id);
  if (is_final(r.state)) return false;
  DP_CHECK(r.state == RequestState::Running, "planner: request ", id, " reached a stage before it was admitted");
  while (r.stage < stage) on_stage_done(id, r.stage, now);
  return true;
}

void Planner::finish(RequestInfo& r, RequestState to, const std::string& why, double now) {
  release(r);
  if (r.state == RequestState::Queued) queue_.erase(key(r));
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
  Drop d{id, RequestState::Cancelled, r.state == RequestState::Running ? r.route[r.stage] : -1};
  finish(r, RequestState::Cancelled, why, now);
  return d;
}

std::vector<Drop> Planner::expire(double now) {
  std::vector<Drop> out;
  for (auto& [id, r] : reqs_) {
    if (is_final(r.state) || r.deadline_s <= 0 || now < r.deadline_s) continue;
    out.push_back({id, RequestState::TimedOut, r.state == RequestState::Running ? r.route[r.stage] : -1});
    const std::string w = where(id);
    finish(r, RequestState::TimedOut, "deadline passed while " + w, now);
  }
  return out;
}

size_t Planner::active() const {
  size_t n = 0;
  for (const auto& [id, r] : reqs_) n += r.state == RequestState::Running;
  return n;
}

bool Planner::all_final() const {
  for (const auto& [id, r] : reqs_)
    if (!is_final(r.state)) return false;
  return true;
}

}  // namespace diffpipe::sched
