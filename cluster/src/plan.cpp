#include "diffpipe/cluster/plan.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/scheduler/planner.h"

namespace diffpipe {
namespace {

using json = nlohmann::json;
constexpr const char* kFormat = "diffpipe-profile/1";

// The heavy stage's calls per request at `steps` (the profile measured calls at profile.steps; a sampler's
// extra calls, e.g. PLMS's one, stay as measured).
int calls_at(const StageCost& s, const CostProfile& p, int steps) {
  if (!s.heavy || steps <= 0 || p.steps <= 0) return s.calls;
  return std::max(1, s.calls - p.steps + steps);
}

// Seconds of one rank per request for a stage at batch b.
double work_per_request(const StageCost& s, const CostProfile& p, int b, int steps) {
  return s.seconds.at(b) / b * calls_at(s, p, steps);
}

const StageCost& match(const CostProfile& p, const PlacedStage& s) {
  for (const auto& c : p.stages)
    if (c.name == s.name) return c;
  std::string names;
  for (const auto& c : p.stages) names += (names.empty() ? "" : ", ") + c.name;
  DP_FAIL("plan: the placement's stage '", s.name, "' is not in the profile (profiled stages: ", names, ")");
}

// "6 x {encode, denoise} + 1 x {decode}": ranks grouped by the stages they run.
std::string shape_of(const Placement& p) {
  std::map<std::string, int> groups;
  std::vector<std::string> order;
  for (int r = 0; r < p.world_size; ++r) {
    std::string g;
    for (const auto& n : p.stages_on(r)) g += (g.empty() ? "" : ", ") + n;
    if (!groups.count(g)) order.push_back(g);
    ++groups[g];
  }
  std::string s;
  for (const auto& g : order) s += (s.empty() ? "" : " + ") + std::to_string(groups[g]) + " x {" + g + "}";
  return s;
}

}  // namespace

// ---- the profile file ----

void CostProfile::validate(const std::string& origin) const {
  DP_CHECK(!stages.empty(), origin, ": stages: no stage");
  int heavy = 0;
  std::set<std::string> names;
  for (size_t k = 0; k < stages.size(); ++k) {
    const StageCost& s = stages[k];
    const std::string at = detail::cat(origin, ": stages[", k, "] ('", s.name, "')");
    DP_CHECK(!s.name.empty() && names.insert(s.name).second, at, ": name must be present and unique");
    heavy += s.heavy;
    DP_CHECK(s.calls >= 1, at, ": calls must be >= 1");
    DP_CHECK(s.out_bytes >= 0 && s.weight_bytes >= 0, at, ": out_bytes and weight_bytes must be >= 0");
    s.seconds.validate(at + ": batches");
  }
  DP_CHECK(heavy == 1, origin, ": stages: exactly one stage must be heavy (found ", heavy, ")");
}

std::vector<PipelineStage> CostProfile::layout() const {
  std::vector<PipelineStage> v;
  for (const auto& s : stages) v.push_back({s.name, s.heavy, false});
  return v;
}

int CostProfile::heavy_index() const {
  for (size_t k = 0; k < stages.size(); ++k)
    if (stages[k].heavy) return static_cast<int>(k);
  DP_FAIL("profile: no heavy stage");
}

const StageCost& CostProfile::stage(const std::string& name) const {
  for (const auto& s : stages)
    if (s.name == name) return s;
  DP_FAIL("profile: no stage '", name, "'");
}

void CostProfile::save(const std::string& path) const {
  json j = {{"format", kFormat}, {"model", model}, {"device", device}, {"dtype", dtype}, {"width", width},
            {"height", height}, {"steps", steps}, {"guidance", guidance}, {"threads", threads},
            {"runtime_bytes", runtime_bytes}};
  json st = json::array();
  for (const auto& s : stages) {
    json b = json::array();
    for (const auto& [n, sec] : s.seconds.points)
      b.push_back({{"batch", n}, {"seconds", sec}, {"activation_bytes", s.activation_bytes.points.empty() ? 0.0 : s.activation_bytes.at(n)}});
    st.push_back({{"name", s.name}, {"heavy", s.heavy}, {"multi_step", s.multi_step}, {"gathers", s.gathers},
                  {"admission_factor", s.admission_factor}, {"calls", s.calls}, {"out_bytes", s.out_bytes},
                  {"weight_bytes", s.weight_bytes}, {"batches", b}});
  }
  j["stages"] = st;
  const std::string text = j.dump(2) + "\n";
  write_file_atomic(path, text.data(), text.size());
}

CostProfile CostProfile::load(const std::string& path) {
  std::ifstream f(path);
  DP_CHECK(f, path, ": cannot read the profile");
  json j;
  try {
    j = json::parse(f);
  } catch (const std::exception& e) {
    DP_FAIL(path, ": not JSON (", e.what(), ")");
  }
  DP_CHECK(j.is_object(), path, ": a profile is a JSON object");
  DP_CHECK(j.value("format", "") == kFormat, path, ": format must be \"", kFormat, "\" (written by diffpipe profile)");
  auto num = [&](const json& o, const char* k, const std::string& where) {
    DP_CHECK(o.contains(k) && o[k].is_number(), path, ": ", where, k, " must be a number");
    const double v = o[k].get<double>();
    DP_CHECK(std::isfinite(v), path, ": ", where, k, " must be finite");
    return v;
  };
  auto str = [&](const json& o, const char* k, const std::string& where) {
    DP_CHECK(o.contains(k) && o[k].is_string(), path, ": ", where, k, " must be a string");
    return o[k].get<std::string>();
  };
  auto flag = [&](const json& o, const char* k, const std::string& where) {
    DP_CHECK(o.contains(k) && o[k].is_boolean(), path, ": ", where, k, " must be true or false");
    return o[k].get<bool>();
  };
  CostProfile p;
  p.model = str(j, "model", "");
  p.device = str(j, "device", "");
  p.dtype = str(j, "dtype", "");
  p.width = static_cast<int>(num(j, "width", ""));
  p.height = static_cast<int>(num(j, "height", ""));
  p.steps = static_cast<int>(num(j, "steps", ""));
  p.guidance = num(j, "guidance", "");
  p.threads = static_cast<int>(num(j, "threads", ""));
  p.runtime_bytes = num(j, "runtime_bytes", "");
  DP_CHECK(j.contains("stages") && j["stages"].is_array(), path, ": stages must be a list");
  for (size_t k = 0; k < j["stages"].size(); ++k) {
    const json& o = j["stages"][k];
    const std::string where = detail::cat("stages[", k, "].");
    DP_CHECK(o.is_object(), path, ": stages[", k, "] must be an object");
    StageCost s;
    s.name = str(o, "name", where);
    s.heavy = flag(o, "heavy", where);
    s.multi_step = flag(o, "multi_step", where);
    s.gathers = flag(o, "gathers", where);
    s.admission_factor = static_cast<int>(num(o, "admission_factor", where));
    s.calls = static_cast<int>(num(o, "calls", where));
    s.out_bytes = num(o, "out_bytes", where);
    s.weight_bytes = num(o, "weight_bytes", where);
    DP_CHECK(o.contains("batches") && o["batches"].is_array() && !o["batches"].empty(), path, ": ", where,
             "batches must be a non-empty list");
    for (size_t b = 0; b < o["batches"].size(); ++b) {
      const json& e = o["batches"][b];
      const std::string w = detail::cat(where, "batches[", b, "].");
      DP_CHECK(e.is_object(), path, ": ", where, "batches[", b, "] must be an object");
      const int n = static_cast<int>(num(e, "batch", w));
      s.seconds.points.push_back({n, num(e, "seconds", w)});
      s.activation_bytes.points.push_back({n, num(e, "activation_bytes", w)});
    }
    p.stages.push_back(std::move(s));
  }
  p.validate(path);
  return p;
}

// ---- placements against the profile ----

std::vector<sched::SimStage> sim_stages(const Placement& placement, const CostProfile& profile, int steps) {
  std::vector<sched::SimStage> out;
  for (const auto& ps : placement.stages) {
    const StageCost& c = match(profile, ps);
    sched::SimStage s;
    s.name = ps.name;
    s.multi_step = c.multi_step;
    s.calls = calls_at(c, profile, steps);
    s.cost = c.seconds;
    s.out_bytes = c.out_bytes;
    s.heavy = c.heavy;
    s.gathers = c.gathers;
    s.ranks = ps.spec.ranks;
    s.max_batch = ps.spec.max_batch;
    s.planner_limit = sched::admission_limit(c.heavy, c.admission_factor, ps.spec.inflight_limit());
    s.batch_wait_s = ps.spec.batch_wait_ms / 1000;
    s.mode = sched::parse_batch_mode(ps.spec.batching);
    out.push_back(std::move(s));
  }
  return out;
}

double throughput_bound(const Placement& placement, const CostProfile& profile, int steps) {
  std::vector<double> load(static_cast<size_t>(placement.world_size), 0.0);
  for (const auto& ps : placement.stages) {
    const StageCost& c = match(profile, ps);
    const double share = work_per_request(c, profile, ps.spec.max_batch, steps) / ps.spec.ranks.size();
    for (int r : ps.spec.ranks) load[static_cast<size_t>(r)] += share;
  }
  const double worst = *std::max_element(load.begin(), load.end());
  return worst > 0 ? 1 / worst : 0;
}

double peak_rank_memory(const Placement& placement, const CostProfile& profile) {
  double peak = 0;
  for (int r = 0; r < placement.world_size; ++r) {
    double m = profile.runtime_bytes;
    for (const auto& ps : placement.stages) {
      if (!std::count(ps.spec.ranks.begin(), ps.spec.ranks.end(), r)) continue;
      const StageCost& c = match(profile, ps);
      m += c.weight_bytes + c.activation_bytes.at(ps.spec.max_batch);
    }
    peak = std::max(peak, m);
  }
  return peak;
}

sched::SimResult simulate_placement(const Placement& placement, const CostProfile& profile, const ClusterSpec& cluster,
                                    const PlanOptions& o) {
  const auto stages = sim_stages(placement, profile, o.steps);
  sched::SimNetwork net = cluster.network;
  net.ranks_per_node = cluster.ranks_per_node;
  sched::SimWorkload w;
  w.seed = o.seed;
  w.rate = o.rate;
  // enough requests for a steady state: five times what the heavy stage holds at once
  int capacity = 0;
  for (const auto& s : stages)
    if (s.heavy) capacity = static_cast<int>(s.ranks.size()) * s.planner_limit;
  w.concurrency = o.rate > 0 ? 0 : capacity + static_cast<int>(placement.world_size);
  w.requests = o.requests > 0 ? o.requests : std::max(200, 5 * (capacity + placement.world_size));
  return sched::simulate(stages, placement.world_size, net, w);
}

std::string placement_toml(const Placement& p, const CostProfile& profile, const std::string& comment) {
  std::ostringstream os;
  std::istringstream cs(comment);
  for (std::string line; std::getline(cs, line);) os << "# " << line << "\n";
  os << "transport = \"" << p.transport << "\"\n"
     << "device = \"" << profile.device << "\"\n"
     << "dtype = \"" << profile.dtype << "\"\n";
  for (const auto& s : p.stages) {
    os << "\n[" << s.name << "]\nranks = [";
    for (size_t k = 0; k < s.spec.ranks.size(); ++k)
      os << (k ? (k % 16 ? ", " : ",\n  ") : "") << s.spec.ranks[k];
    os << "]\nmax_batch = " << s.spec.max_batch << "\n";
    if (s.spec.max_inflight > 0) os << "max_inflight = " << s.spec.max_inflight << "\n";
    os << "batch_wait_ms = " << s.spec.batch_wait_ms << "\n";
    if (s.heavy || profile.stage(s.name).multi_step) os << "batching = \"" << s.spec.batching << "\"\n";
  }
  return os.str();
}

// ---- the search ----

namespace {

Placement base_placement(const CostProfile& profile, int world) {
  Placement p;
  p.world_size = world;
  RankSpec rs;
  rs.device = profile.device;
  rs.dtype = profile.dtype;
  p.ranks.assign(static_cast<size_t>(world), rs);
  p.transport = profile.device == "cuda" && world > 1 ? "nccl" : "mpi";
  return p;
}

// Ranks in the order dedicated stages take them: the last local rank of every node, then the one before, ...
// so that light stages spread over the nodes and the heavy stage keeps the low local ranks.
std::vector<int> spread_order(const ClusterSpec& c) {
  std::vector<int> v;
  for (int pos = c.ranks_per_node - 1; pos >= 0; --pos)
    for (int n = 0; n < c.nodes; ++n) v.push_back(n * c.ranks_per_node + pos);
  return v;
}

// One shape: for each light stage 0 = on the heavy stage's ranks, k > 0 = k ranks of its own; `shared` puts
// every light stage on the same k ranks.
Placement shaped(const CostProfile& profile, const ClusterSpec& c, const std::vector<int>& own, int shared, int batch) {
  const int N = c.world();
  Placement p = base_placement(profile, N);
  const std::vector<int> order = spread_order(c);
  size_t next = 0;
  std::vector<std::vector<int>> ranks(profile.stages.size());
  const int heavy = profile.heavy_index();
  auto take = [&](int k) {
    std::vector<int> r(order.begin() + static_cast<std::ptrdiff_t>(next), order.begin() + static_cast<std::ptrdiff_t>(next + k));
    next += static_cast<size_t>(k);
    std::sort(r.begin(), r.end());
    return r;
  };
  std::vector<int> shared_ranks = shared > 0 ? take(shared) : std::vector<int>{};
  for (size_t k = 0; k < profile.stages.size(); ++k) {
    if (static_cast<int>(k) == heavy) continue;
    if (shared > 0) ranks[k] = shared_ranks;
    else if (own[k] > 0) ranks[k] = take(own[k]);
  }
  ranks[heavy] = take(N - static_cast<int>(next));
  for (size_t k = 0; k < profile.stages.size(); ++k) {
    PlacedStage s;
    s.name = profile.stages[k].name;
    s.heavy = profile.stages[k].heavy;
    s.placed = true;
    s.spec.ranks = ranks[k].empty() ? ranks[heavy] : ranks[k];
    s.spec.max_batch = batch;
    p.stages.push_back(std::move(s));
  }
  p.validate("plan");
  return p;
}

// Whole rank counts either side of an ideal share (at least one).
std::set<int> around(double ideal) {
  return {std::max(1, static_cast<int>(std::floor(ideal))), std::max(1, static_cast<int>(std::ceil(ideal)))};
}

}  // namespace

PlanCandidate evaluate(Placement placement, std::string shape, const CostProfile& profile, const ClusterSpec& cluster,
                       const PlanOptions& o) {
  PlanCandidate c;
  c.shape = std::move(shape);
  c.bound = throughput_bound(placement, profile, o.steps);
  c.memory = peak_rank_memory(placement, profile);
  c.fits = cluster.device_memory_bytes <= 0 || c.memory <= cluster.device_memory_bytes;
  c.placement = std::move(placement);
  return c;
}

void simulate_candidate(PlanCandidate& c, const CostProfile& profile, const ClusterSpec& cluster, const PlanOptions& o) {
  c.sim = simulate_placement(c.placement, profile, cluster, o);
  c.simulated = true;
  c.images_per_s = o.rate > 0 ? c.sim.images_per_s : c.sim.steady_images_per_s;
  c.meets_slo = o.p99_slo_s <= 0 || c.sim.latency_p99 <= o.p99_slo_s;
}

std::vector<PlanCandidate> plan_placements(const CostProfile& profile, const ClusterSpec& cluster, const PlanOptions& o) {
  profile.validate("profile");
  const int N = cluster.world();
  DP_CHECK(cluster.nodes >= 1 && cluster.ranks_per_node >= 1, "plan: nodes and ranks per node must be >= 1");
  DP_CHECK(N <= 100000, "plan: ", N, " ranks is beyond what the planner simulates (100000)");
  DP_CHECK(!o.batch_sizes.empty(), "plan: no batch size to try");
  const size_t S = profile.stages.size();
  const int heavy = profile.heavy_index();
  const double limit = cluster.device_memory_bytes;

  std::vector<PlanCandidate> cands;
  std::set<std::string> seen;
  auto add = [&](Placement p, const std::string& label) {
    const std::string key = shape_of(p) + "|" + std::to_string(p.stages[static_cast<size_t>(heavy)].spec.max_batch);
    if (!seen.insert(key).second) return;
    std::string shape = label.empty() ? shape_of(p) : label + ": " + shape_of(p);
    // too big: halve the light stages' batches (their activations, e.g. a VAE decoder's, often dominate) while
    // that helps
    while (limit > 0 && peak_rank_memory(p, profile) > limit) {
      bool shrunk = false;
      for (auto& st : p.stages)
        if (!st.heavy && st.spec.max_batch > 1) {
          st.spec.max_batch /= 2;
          shrunk = true;
        }
      if (!shrunk) break;
    }
    std::string smaller;
    for (const auto& st : p.stages)
      if (!st.heavy && st.spec.max_batch != p.stages[static_cast<size_t>(heavy)].spec.max_batch)
        smaller += detail::cat(smaller.empty() ? " (" : ", ", st.name, " max_batch ", st.spec.max_batch);
    if (!smaller.empty()) shape += smaller + ")";
    cands.push_back(evaluate(std::move(p), std::move(shape), profile, cluster, o));
  };
  const Placement base = base_placement(profile, N);
  for (int b : o.batch_sizes) {
    DP_CHECK(b >= 1 && b <= 4096, "plan: batch size ", b, " must be in [1, 4096]");
    // generate's default for this world, then every stage on every rank
    for (const char* kind : {"derived", "replicas"}) {
      Placement p = std::string(kind) == "derived" ? Placement::derive(N, base.ranks[0], profile.layout())
                                                   : Placement::replicas(N, base.ranks[0], profile.layout());
      p.transport = base.transport;
      for (auto& s : p.stages) s.spec.max_batch = b;
      add(std::move(p), kind);
    }
    if (N == 1) continue;
    // light stages on ranks of their own, in proportion to their work, or on the heavy stage's ranks
    double total = 0;
    std::vector<double> w(S);
    for (size_t k = 0; k < S; ++k) total += w[k] = work_per_request(profile.stages[k], profile, b, o.steps);
    std::vector<std::vector<int>> options(S);
    double light = 0;
    for (size_t k = 0; k < S; ++k) {
      if (static_cast<int>(k) == heavy) {
        options[k] = {0};
        continue;
      }
      light += w[k];
      std::set<int> ks = around(N * w[k] / total);
      ks.insert(0);
      options[k].assign(ks.begin(), ks.end());
    }
    std::vector<int> own(S, 0);
    std::function<void(size_t)> rec = [&](size_t k) {
      if (k == S) {
        int used = 0;
        for (int x : own) used += x;
        if (used >= 1 && used <= N - 1) add(shaped(profile, cluster, own, 0, b), "");
        return;
      }
      for (int x : options[k]) {
        own[k] = x;
        rec(k + 1);
      }
      own[k] = 0;
    };
    rec(0);
    if (S > 2)  // every light stage together on ranks of their own
      for (int k : around(N * light / total))
        if (k <= N - 1) add(shaped(profile, cluster, std::vector<int>(S, 0), k, b), "");
  }
  // simulate the best bounds that fit
  std::vector<size_t> order(cands.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (cands[a].fits != cands[b].fits) return cands[a].fits;
    return cands[a].bound > cands[b].bound;
  });
  if (!cands[order[0]].fits) {
    double least = cands[order[0]].memory;
    for (const auto& c : cands) least = std::min(least, c.memory);
    DP_FAIL("plan: no placement fits in ", cluster.device_memory_bytes / 1e9, " GB per rank (the smallest needs ",
            least / 1e9, " GB); try smaller batch sizes or more memory");
  }
  int simulated = 0;
  for (size_t i : order) {
    if (simulated >= o.simulate_top || !cands[i].fits) break;
    simulate_candidate(cands[i], profile, cluster, o);
    ++simulated;
  }
  std::stable_sort(cands.begin(), cands.end(), [&](const PlanCandidate& a, const PlanCandidate& b) {
    auto tier = [](const PlanCandidate& c) { return !c.fits ? 3 : !c.simulated ? 2 : !c.meets_slo ? 1 : 0; };
    if (tier(a) != tier(b)) return tier(a) < tier(b);
    if (a.simulated && b.simulated) {
      if (o.rate > 0 && a.images_per_s > 0.98 * o.rate && b.images_per_s > 0.98 * o.rate)  // both keep up:
        return a.sim.latency_p99 < b.sim.latency_p99;                                     // lower p99 wins
      return a.images_per_s > b.images_per_s;
    }
    return a.bound > b.bound;
  });
  return cands;
}

}  // namespace diffpipe
