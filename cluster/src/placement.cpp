#include "diffpipe/cluster/placement.h"

#include <algorithm>
#include <set>
#include <sstream>

#include "diffpipe/cluster/toml.h"
#include "diffpipe/runtime/error.h"

namespace diffpipe {

const char* stage_name(StageKind s) {
  switch (s) {
    case StageKind::Encode: return "encode";
    case StageKind::Denoise: return "denoise";
    case StageKind::Decode: return "decode";
    case StageKind::Upscale: return "upscale";
  }
  return "?";
}

Placement Placement::derive(int n, const RankSpec& defaults) {
  DP_CHECK(n >= 1, "placement: world size must be >= 1");
  Placement p;
  p.world_size = n;
  p.ranks.assign(n, defaults);
  auto& enc = p.stage(StageKind::Encode).ranks;
  auto& den = p.stage(StageKind::Denoise).ranks;
  auto& dec = p.stage(StageKind::Decode).ranks;
  if (n == 1) {
    enc = den = dec = {0};
  } else if (n == 2) {
    enc = {0};
    dec = {0};
    den = {1};
  } else {
    enc = {0};
    dec = {n - 1};
    for (int r = 1; r < n - 1; ++r) den.push_back(r);
  }
  p.stage(StageKind::Upscale).ranks = dec;
  return p;
}

void Placement::match_model(bool has_super_resolution, const std::string& origin) {
  if (has_super_resolution) {
    if (stage(StageKind::Upscale).ranks.empty()) stage(StageKind::Upscale).ranks = stage(StageKind::Decode).ranks;
    return;
  }
  DP_CHECK(!upscale_placed, origin, ": [upscale] places a super-resolution stage, but the model has no "
           "super_resolution/ folder (remove the table)");
  stage(StageKind::Upscale).ranks.clear();
  validate(origin);  // a rank that only upscaled would now run nothing
}

void Placement::validate(const std::string& origin) const {
  DP_CHECK(transport == "mpi" || transport == "nccl", origin, ": transport '", transport,
           "' is not supported (mpi or nccl)");
  DP_CHECK(static_cast<int>(ranks.size()) == world_size, origin, ": ", ranks.size(), " rank entries for ",
           world_size, " ranks");
  std::set<int> used;
  for (int s = 0; s < kNumStages; ++s) {
    const auto& st = stages[s];
    const char* name = stage_name(static_cast<StageKind>(s));
    if (s == static_cast<int>(StageKind::Upscale) && st.ranks.empty()) continue;  // a model without super-resolution
    DP_CHECK(!st.ranks.empty(), origin, ": stage '", name, "' has no rank");
    DP_CHECK(queue_capacity >= 1, origin, ": queue_capacity must be >= 1");
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
  std::vector<int> idle;
  for (int r = 0; r < world_size; ++r)
    if (!used.count(r)) idle.push_back(r);
  if (!idle.empty()) {
    std::ostringstream os;
    for (size_t i = 0; i < idle.size(); ++i) os << (i ? ", " : "") << idle[i];
    DP_FAIL(origin, ": more ranks than needed: rank(s) ", os.str(), " of ", world_size,
            " run no stage (list them under a stage, or start fewer ranks)");
  }
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

Placement Placement::load(const std::string& path, int world_size) {
  const nlohmann::json j = load_toml(path);
  RankSpec defaults;
  Placement p;
  p.world_size = world_size;
  auto get_str = [&](const nlohmann::json& o, const char* k, const std::string& where, std::string def) {
    if (!o.contains(k)) return def;
    DP_CHECK(o[k].is_string(), path, ": ", where, k, " must be a string");
    return o[k].get<std::string>();
  };
  for (auto& [k, v] : j.items()) {
    if (k == "transport" || k == "device" || k == "dtype" || k == "rank" || k == "queue_capacity" ||
        k == "batch_invariant")
      continue;
    if (k == "encode" || k == "denoise" || k == "decode" || k == "upscale") continue;
    DP_FAIL(path, ": unknown stage or key '", k, "' (stages: encode, denoise, decode, upscale; keys: transport, device, dtype, "
            "queue_capacity, batch_invariant; tables: [rank.N])");
  }
  p.transport = get_str(j, "transport", "", "mpi");
  if (j.contains("batch_invariant")) {
    DP_CHECK(j["batch_invariant"].is_boolean(), path, ": batch_invariant must be true or false");
    p.batch_invariant = j["batch_invariant"].get<bool>();
  }
  if (j.contains("queue_capacity")) {
    DP_CHECK(j["queue_capacity"].is_number_integer() && j["queue_capacity"].get<int64_t>() >= 1, path,
             ": queue_capacity must be a positive integer");
    p.queue_capacity = j["queue_capacity"].get<size_t>();
  }
  defaults.device = get_str(j, "device", "", "cpu");
  defaults.dtype = get_str(j, "dtype", "", "float32");
  p.ranks.assign(world_size, defaults);
  p.upscale_placed = j.contains("upscale");
  for (int s = 0; s < kNumStages; ++s) {
    const char* name = stage_name(static_cast<StageKind>(s));
    if (s == static_cast<int>(StageKind::Upscale) && !p.upscale_placed) {  // optional: defaults to the decode ranks
      p.stages[s] = p.stages[static_cast<int>(StageKind::Decode)];
      continue;
    }
    DP_CHECK(j.contains(name), path, ": stage '", name, "' has no rank (add a [", name, "] table with ranks = [...])");
    const auto& t = j[name];
    DP_CHECK(t.is_object(), path, ": '", name, "' must be a table");
    auto& st = p.stages[s];
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
      for (auto& [rk, rv] : v.items())
        DP_CHECK(rk == "device" || rk == "dtype", path, ": [rank.", k, "] unknown key '", rk, "' (device, dtype)");
      p.ranks[r].device = get_str(v, "device", "[rank." + k + "] ", p.ranks[r].device);
      p.ranks[r].dtype = get_str(v, "dtype", "[rank." + k + "] ", p.ranks[r].dtype);
    }
  }
  p.validate(path);
  return p;
}

std::vector<StageKind> Placement::stages_on(int rank) const {
  std::vector<StageKind> out;
  for (int s = 0; s < kNumStages; ++s)
    if (std::count(stages[s].ranks.begin(), stages[s].ranks.end(), rank)) out.push_back(static_cast<StageKind>(s));
  return out;
}

std::string Placement::describe() const {
  std::ostringstream os;
  os << "placement: " << world_size << " rank(s), transport " << (world_size == 1 ? "inproc" : transport) << "\n";
  for (int r = 0; r < world_size; ++r) {
    os << "  rank " << r << " [" << ranks[r].device << ", " << ranks[r].dtype << "]:";
    for (auto s : stages_on(r)) {
      os << " " << stage_name(s) << "(max_batch " << stage(s).max_batch;
      if (s == StageKind::Denoise) os << ", " << stage(s).batching << " batching";
      os << ")";
    }
    if (r == 0) os << " +coordinator";
    os << "\n";
  }
  return os.str();
}

}  // namespace diffpipe
