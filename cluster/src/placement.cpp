#include "diffpipe/cluster/placement.h"

#include <algorithm>
#include <set>
#include <sstream>

#include "diffpipe/cluster/toml.h"
#include "diffpipe/runtime/error.h"

namespace diffpipe {
namespace {

std::string join(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : sep) + x;
  return s;
}

int heavy_index(const std::vector<PipelineStage>& pipeline) {
  DP_CHECK(!pipeline.empty(), "placement: the pipeline has no stage");
  for (size_t i = 0; i < pipeline.size(); ++i)
    if (pipeline[i].heavy) return static_cast<int>(i);
  return 0;
}

}  // namespace

Placement Placement::derive(int n, const RankSpec& defaults, const std::vector<PipelineStage>& pipeline) {
  DP_CHECK(n >= 1, "placement: world size must be >= 1");
  Placement p;
  p.world_size = n;
  p.ranks.assign(n, defaults);
  const int h = heavy_index(pipeline);
  // Stages that want a rank of their own get ranks 1, 2, ... when each can have one and the heavy stage still
  // has one between them and the last rank; the heavy stage takes the ranks after them.
  int own = 0;
  for (int i = 0; i < static_cast<int>(pipeline.size()); ++i) own += pipeline[i].own_rank && i != h;
  const bool separate = own > 0 && n >= 3 + own;
  const int next = separate ? 1 + own : 1;  // the heavy stage's first rank
  int own_next = 1;                         // own ranks in pipeline order, before or after the heavy stage
  for (int i = 0; i < static_cast<int>(pipeline.size()); ++i) {
    PlacedStage s;
    s.name = pipeline[i].name;
    s.heavy = i == h;
    if (n == 1) {
      s.spec.ranks = {0};
    } else if (separate && pipeline[i].own_rank && i != h) {
      s.spec.ranks = {own_next++};
    } else if (i == h) {
      for (int r = next; r < std::max(next + 1, n - 1); ++r) s.spec.ranks.push_back(r);
    } else {
      s.spec.ranks = {i < h || n == 2 ? 0 : n - 1};
    }
    p.stages.push_back(std::move(s));
  }
  return p;
}

Placement Placement::replicas(int n, const RankSpec& defaults, const std::vector<PipelineStage>& pipeline) {
  Placement p = derive(n, defaults, pipeline);
  std::vector<int> all(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) all[static_cast<size_t>(r)] = r;
  for (auto& s : p.stages) s.spec.ranks = all;
  return p;
}

bool Placement::has(const std::string& name) const {
  return std::any_of(stages.begin(), stages.end(), [&](const PlacedStage& s) { return s.name == name; });
}

const StageSpec& Placement::stage(const std::string& name) const {
  for (const auto& s : stages)
    if (s.name == name) return s.spec;
  DP_FAIL("placement: no stage '", name, "' (stages: ", join(stage_names()), ")");
}
StageSpec& Placement::stage(const std::string& name) {
  return const_cast<StageSpec&>(static_cast<const Placement&>(*this).stage(name));
}

std::vector<std::string> Placement::stage_names() const {
  std::vector<std::string> v;
  for (const auto& s : stages) v.push_back(s.name);
  return v;
}

void Placement::fit(const std::vector<PipelineStage>& pipeline, const std::string& origin) {
  const int h = heavy_index(pipeline);
  std::vector<std::string> names;
  for (const auto& ps : pipeline) names.push_back(ps.name);
  const bool from_file = std::any_of(stages.begin(), stages.end(), [](const PlacedStage& s) { return s.placed; });
  if (stage_names() == names) {  // already this pipeline (derived, built by hand or read): keep its ranks
    for (int i = 0; i < static_cast<int>(stages.size()); ++i) stages[i].heavy = i == h;
    validate(origin);
    return;
  }
  std::vector<PlacedStage> out;
  if (!from_file) {  // derived: re-derive for this pipeline, keeping every stage's limits
    Placement d = derive(world_size, RankSpec{}, pipeline);
    for (auto& s : d.stages) {
      const PlacedStage* old = nullptr;
      for (const auto& o : stages)
        if (o.name == s.name) old = &o;
      if (!old && !stages.empty()) {  // a new stage: the limits of the first stage, default batching
        s.spec.max_batch = stages.front().spec.max_batch;
        s.spec.batch_wait_ms = stages.front().spec.batch_wait_ms;
      }
      if (old) {
        std::vector<int> r = s.spec.ranks;
        s.spec = old->spec;
        s.spec.ranks = r;
      }
      out.push_back(std::move(s));
    }
  } else {
    for (const auto& s : stages)
      DP_CHECK(std::count(names.begin(), names.end(), s.name), origin, ": [", s.name, "] places stage '", s.name,
               "', which this model's pipeline (", join(names, " -> "), ") does not have (remove the table)");
    for (int i = 0; i < static_cast<int>(pipeline.size()); ++i) {
      const std::string& name = pipeline[i].name;
      auto it = std::find_if(stages.begin(), stages.end(), [&](const PlacedStage& s) { return s.name == name; });
      PlacedStage s;
      if (it != stages.end()) {
        s = *it;
      } else {
        DP_CHECK(i != 0 && i != h, origin, ": stage '", name, "' has no rank (add a [", name,
                 "] table with ranks = [...])");
        s.name = name;
        s.spec = out.back().spec;  // runs where the stage before it does, with its limits
        s.placed = false;
      }
      s.heavy = i == h;
      out.push_back(std::move(s));
    }
  }
  stages = std::move(out);
  validate(origin);
}

void Placement::validate(const std::string& origin) const {
  DP_CHECK(transport == "mpi" || transport == "nccl", origin, ": transport '", transport,
           "' is not supported (mpi or nccl)");
  DP_CHECK(static_cast<int>(ranks.size()) == world_size, origin, ": ", ranks.size(), " rank entries for ",
           world_size, " ranks");
  DP_CHECK(queue_capacity >= 1, origin, ": queue_capacity must be >= 1");
  DP_CHECK(!stages.empty(), origin, ": no stage is placed");
  std::set<int> used;
  for (const auto& ps : stages) {
    const auto& st = ps.spec;
    const std::string& name = ps.name;
    DP_CHECK(!st.ranks.empty(), origin, ": stage '", name, "' has no rank");
    std::set<int> seen;
    for (int r : st.ranks) {
      DP_CHECK(r >= 0 && r < world_size, origin, ": stage '", name, "': rank ", r, " is out of range [0, ",
               world_size, ") for this world of ", world_size, " ranks");
      DP_CHECK(seen.insert(r).second, origin, ": stage '", name, "': rank ", r, " listed twice");
      used.insert(r);
    }
    DP_CHECK(st.max_batch >= 1 && st.max_batch <= 4096, origin, ": stage '", name, "': max_batch ", st.max_batch,
             " must be in [1, 4096]");
    DP_CHECK(st.max_inflight >= 0, origin, ": stage '", name, "': max_inflight must be >= 0");
    DP_CHECK(st.batch_wait_ms >= 0 && st.batch_wait_ms <= 60000, origin, ": stage '", name,
             "': batch_wait_ms must be in [0, 60000]");
    DP_CHECK(st.batching == "step" || st.batching == "static" || st.batching == "single", origin, ": stage '", name,
             "': batching '", st.batching, "' (step, static or single)");
  }
  std::vector<std::string> idle;
  for (int r = 0; r < world_size; ++r)
    if (!used.count(r)) idle.push_back(std::to_string(r));
  DP_CHECK(idle.empty() || allow_idle_ranks, origin, ": more ranks than needed: rank(s) ", join(idle), " of ", world_size,
           " run no stage (list them under a stage, or start fewer ranks)");
  for (int r = 0; r < world_size; ++r) {
    const auto& rs = ranks[r];
    DP_CHECK(rs.device == "cpu" || rs.device == "cuda", origin, ": rank ", r, ": device '", rs.device,
             "' (cpu or cuda)");
    DP_CHECK(rs.dtype == "float32" || rs.dtype == "float16" || rs.dtype == "bfloat16", origin, ": rank ", r,
             ": dtype '", rs.dtype, "' (float32, float16 or bfloat16)");
    DP_CHECK(rs.device == "cuda" || rs.dtype != "float16", origin, ": rank ", r,
             ": dtype float16 needs device = \"cuda\" (CPU ranks run float32 or bfloat16)");
    if (transport == "nccl")
      DP_CHECK(rs.device == "cuda" || world_size == 1, origin, ": rank ", r,
               ": transport nccl needs every rank on device \"cuda\"");
  }
}

Placement Placement::load(const std::string& path, int world_size, const std::vector<PipelineStage>& pipeline,
                          const PlacementDefaults& given, const std::vector<std::string>& known) {
  const nlohmann::json j = load_toml(path);
  RankSpec defaults;
  Placement p;
  p.world_size = world_size;
  auto get_str = [&](const nlohmann::json& o, const char* k, const std::string& where, std::string def) {
    if (!o.contains(k)) return def;
    DP_CHECK(o[k].is_string(), path, ": ", where, k, " must be a string");
    return o[k].get<std::string>();
  };
  const std::set<std::string> keys{"transport", "device", "dtype", "rank", "queue_capacity", "batch_invariant"};
  for (auto& [k, v] : j.items()) {
    if (keys.count(k)) continue;
    DP_CHECK(std::count(known.begin(), known.end(), k), path, ": unknown stage or key '", k, "' (stages: ",
             join(known), "; keys: transport, device, dtype, queue_capacity, batch_invariant; tables: [rank.N])");
  }
  p.transport = get_str(j, "transport", "", given.transport);
  p.batch_invariant = given.batch_invariant;
  if (j.contains("batch_invariant")) {
    DP_CHECK(j["batch_invariant"].is_boolean(), path, ": batch_invariant must be true or false");
    p.batch_invariant = j["batch_invariant"].get<bool>();
  }
  if (j.contains("queue_capacity")) {
    DP_CHECK(j["queue_capacity"].is_number_integer() && j["queue_capacity"].get<int64_t>() >= 1, path,
             ": queue_capacity must be a positive integer");
    p.queue_capacity = j["queue_capacity"].get<size_t>();
  }
  defaults.device = get_str(j, "device", "", given.rank.device);
  defaults.dtype = get_str(j, "dtype", "", given.rank.dtype);
  p.ranks.assign(world_size, defaults);
  for (const auto& name : known) {
    if (!j.contains(name)) continue;
    const auto& t = j[name];
    DP_CHECK(t.is_object(), path, ": '", name, "' must be a table");
    PlacedStage ps;
    ps.name = name;
    ps.placed = true;
    ps.spec = given.stage;
    ps.spec.ranks.clear();
    auto& st = ps.spec;
    for (auto& [k, v] : t.items()) {
      if (k == "ranks") {
        DP_CHECK(v.is_array(), path, ": [", name, "] ranks must be a list of integers");
        for (const auto& r : v) {
          DP_CHECK(r.is_number_integer(), path, ": [", name, "] ranks must be a list of integers");
          st.ranks.push_back(r.get<int>());
        }
      } else if (k == "max_batch" || k == "max_inflight") {
        DP_CHECK(v.is_number_integer(), path, ": [", name, "] ", k, " must be an integer");
        (k == "max_batch" ? st.max_batch : st.max_inflight) = v.get<int>();
      } else if (k == "batching") {
        DP_CHECK(v.is_string(), path, ": [", name, "] batching must be a string");
        st.batching = v.get<std::string>();
      } else if (k == "batch_wait_ms") {
        DP_CHECK(v.is_number(), path, ": [", name, "] batch_wait_ms must be a number");
        st.batch_wait_ms = v.get<double>();
      } else {
        DP_FAIL(path, ": [", name, "] unknown key '", k, "' (ranks, max_batch, max_inflight, batch_wait_ms, batching)");
      }
    }
    p.stages.push_back(std::move(ps));
  }
  if (j.contains("rank")) {
    DP_CHECK(j["rank"].is_object(), path, ": 'rank' must hold [rank.N] tables");
    for (auto& [k, v] : j["rank"].items()) {
      int r = -1;
      try {
        size_t used = 0;
        r = std::stoi(k, &used);
        if (used != k.size()) r = -1;
      } catch (...) {
      }
      DP_CHECK(r >= 0 && r < world_size, path, ": [rank.", k, "]: rank out of range [0, ", world_size, ")");
      DP_CHECK(v.is_object(), path, ": [rank.", k, "] must be a table");
      for (auto& [rk, rv] : v.items())
        DP_CHECK(rk == "device" || rk == "dtype", path, ": [rank.", k, "] unknown key '", rk, "' (device, dtype)");
      p.ranks[r].device = get_str(v, "device", "[rank." + k + "] ", p.ranks[r].device);
      p.ranks[r].dtype = get_str(v, "dtype", "[rank." + k + "] ", p.ranks[r].dtype);
    }
  }
  if (p.stages.empty()) {  // nothing placed: every stage still needs a table
    const std::string first = pipeline.empty() ? std::string("encode") : pipeline.front().name;
    DP_FAIL(path, ": stage '", first, "' has no rank (add a [", first, "] table with ranks = [...])");
  }
  p.fit(pipeline, path);
  return p;
}

std::vector<std::string> Placement::stages_on(int rank) const {
  std::vector<std::string> out;
  for (const auto& s : stages)
    if (std::count(s.spec.ranks.begin(), s.spec.ranks.end(), rank)) out.push_back(s.name);
  return out;
}

std::string Placement::describe() const {
  std::ostringstream os;
  os << "placement: " << world_size << " rank(s), transport " << (world_size == 1 ? "inproc" : transport) << "\n";
  for (int r = 0; r < world_size; ++r) {
    os << "  rank " << r << " [" << ranks[r].device << ", " << ranks[r].dtype << "]:";
    for (const auto& s : stages) {
      if (!std::count(s.spec.ranks.begin(), s.spec.ranks.end(), r)) continue;
      os << " " << s.name << "(max_batch " << s.spec.max_batch;
      if (s.heavy) os << ", " << s.spec.batching << " batching";
      os << ")";
    }
    if (r == 0) os << " +coordinator";
    os << "\n";
  }
  return os.str();
}

}  // namespace diffpipe
