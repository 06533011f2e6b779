// `diffpipe profile`: each stage's time per call by batch size on this device (and what it sends on, and the
// memory it needs), measured by driving the real stages, written as a cost profile.
// `diffpipe plan`: from a profile, the placement for a cluster of any size: candidates ranked by an analytic
// bound, the best simulated with the runtime's own planner (scheduler/simulator.h); writes the winner as a
// pipeline file for `generate --pipeline`. Both run as one process.
#include <ATen/Parallel.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>

#include "cli.h"
#include "commands.h"
#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/cluster/plan.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/memory.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/model_stages.h"
#include "diffpipe/stages/stages.h"

namespace diffpipe::apps {
namespace {

int heavy_batch(const Placement& p) {
  for (const auto& s : p.stages)
    if (s.heavy) return s.spec.max_batch;
  return p.stages.front().spec.max_batch;
}

// --WHAT's batch sizes: a list of integers in [1, 4096] that ascends (`def` when the option is absent)
std::vector<int> batch_sizes(const cli::Args& a, const char* what, std::vector<int> def) {
  if (!a.has(what)) return def;
  std::vector<int> out;
  for (int64_t v : a.integers(what, 1, 4096)) {
    DP_CHECK(out.empty() || v > out.back(), "--", what, ": sizes must ascend ('", a.str(what), "')");
    out.push_back(static_cast<int>(v));
  }
  return out;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One pass of `batch` requests through every stage, each stage holding all of them (max_batch = batch): per
// stage, the seconds of each call and the bytes each request sends on.
struct Pass {
  std::vector<std::vector<double>> call_s;  // per stage
  std::vector<double> out_bytes;            // per stage, per request
  std::vector<bool> multi_step;
};

Pass run_pass(const SdModel& model, const PipelineDef& pipe, const GenerationParams& base, int batch) {
  Pass pass;
  std::map<uint64_t, std::vector<at::Tensor>> inputs;
  for (int i = 0; i < batch; ++i) inputs[static_cast<uint64_t>(i + 1)] = {};
  for (const StageDef& def : pipe) {
    StageConfig cfg;
    cfg.max_batch = batch;
    std::unique_ptr<Stage> stage = def.make(cfg);
    for (auto& [id, in] : inputs) {
      StageRequest r;
      r.id = id;
      r.params = base;
      r.params.seed = base.seed + id;
      r.inputs = std::move(in);
      stage->add(std::move(r), 0);
    }
    std::map<uint64_t, std::vector<at::Tensor>> out;
    std::vector<double> calls;
    bool multi = false;
    while (out.size() < inputs.size()) {
      const double t0 = now_s();
      std::vector<StageEvent> ev = stage->step(0);
      device_sync(model.spec.device);
      calls.push_back(now_s() - t0);
      DP_CHECK(calls.size() < 100000, "profile: stage '", def.name, "' does not finish its requests");
      for (auto& e : ev) {
        if (e.kind == StageEvent::Kind::Failed) DP_FAIL("profile: stage '", def.name, "' failed request ", e.id, ": ", e.error);
        if (e.kind == StageEvent::Kind::Progress && e.total > 1) multi = true;
        if (e.kind == StageEvent::Kind::Finished) out[e.id] = std::move(e.outputs);
      }
    }
    double bytes = 0;
    for (const auto& t : out.begin()->second)
      if (t.defined()) bytes += static_cast<double>(t.nbytes());
    pass.call_s.push_back(calls);
    pass.out_bytes.push_back(bytes);
    pass.multi_step.push_back(multi || calls.size() > 1);
    inputs = std::move(out);
  }
  return pass;
}

}  // namespace

int profile_main(int argc, char** argv) {
  cli::Args a("profile", "diffpipe profile --model DIR --out FILE [options]",
              {{"model", "DIR", "model folder"},
               {"refiner", "DIR", "SDXL: a refiner folder (its refine stage is profiled too)"},
               {"prior", "DIR", "Kandinsky 2.2: the prior folder of a decoder folder"},
               {"out", "FILE", "where to write the cost profile (JSON)"},
               {"device", "cpu|cuda", "device (default cpu)"},
               {"dtype", "TYPE", "float32 | float16 | bfloat16 (default float32)"},
               {"threads", "N", "CPU threads (default: all cores)"},
               {"batches", "LIST", "batch sizes to measure, ascending (default 1,2,4,8)"},
               {"steps", "N", "denoising steps per request (default 20)"},
               {"guidance", "G", "guidance scale (default 7.5)"},
               {"width", "W", "image width (default: the model's)"},
               {"height", "H", "image height (default: the model's)"},
               {"rounds", "N", "passes per batch size; the first warms up and is not counted (default 2)"}},
              argc, argv,
              "drives every stage of the model's pipeline at each batch size and writes seconds per call, bytes sent "
              "on and memory per stage; `diffpipe plan --profile FILE` plans placements from it");
  if (a.help_requested()) {
    std::fputs(a.help_text().c_str(), stdout);
    return 0;
  }
  DP_CHECK(a.has("model") && a.has("out"), "profile: --model DIR and --out FILE are required");
  DP_CHECK(mpi::world().size == 1, "profile: run it as one process (it measures one device)");
  const int threads = static_cast<int>(a.integer("threads", 0));
  if (threads > 0) at::set_num_threads(threads);
  const std::vector<int> batches = batch_sizes(a, "batches", {1, 2, 4, 8});
  const int rounds = static_cast<int>(a.integer("rounds", 2));
  DP_CHECK(rounds >= 2 && rounds <= 20, "profile: --rounds must be in [2, 20]");
  RankSpec rs;
  rs.device = a.str("device", "cpu");
  rs.dtype = a.str("dtype", "float32");
  const std::string dir = a.str("model");
  GenerationParams base;
  base.prompt = "a red circle above a blue square";
  base.steps = static_cast<int>(a.integer("steps", 20));
  base.guidance = a.number("guidance", 7.5);
  base.width = static_cast<int>(a.integer("width", 0));
  base.height = static_cast<int>(a.integer("height", 0));
  base.seed = 1;

  ModelAddons addons;
  addons.refiner = a.str("refiner");
  addons.prior = a.str("prior");
  const std::vector<PipelineStage> layout = pipeline_layout(dir, addons);
  std::vector<std::string> names;
  for (const auto& s : layout) names.push_back(s.name);
  const DeviceSpec spec = device_spec_of(rs);
  const SdModel model = SdModel::load(dir, spec, components_for(names), addons);
  const ResolvedParams rp = resolve_params(model, base);
  const PipelineDef pipe = model_pipeline(model, names);

  CostProfile prof;
  prof.model = dir;
  prof.device = rs.device;
  prof.dtype = rs.dtype;
  prof.width = rp.width;
  prof.height = rp.height;
  prof.steps = base.steps;
  prof.guidance = base.guidance;
  prof.threads = at::get_num_threads();
  for (size_t k = 0; k < pipe.size(); ++k) {
    StageCost c;
    c.name = pipe[k].name;
    c.heavy = pipe[k].heavy;
    c.gathers = pipe[k].gathers;
    c.admission_factor = pipe[k].admission_factor;
    prof.stages.push_back(c);
  }
  for (int b : batches) {
    std::vector<Pass> passes;
    // on this thread, which loaded the model: a CPU rank's runner runs every stage's work on that thread too
    // (runtime/compute_lane.h; any other thread would start a second OpenMP pool and run slower)
    for (int r = 0; r < rounds; ++r) passes.push_back(run_pass(model, pipe, base, b));
    for (size_t k = 0; k < pipe.size(); ++k) {
      StageCost& c = prof.stages[k];
      double sum = 0;
      size_t n = 0;
      for (int r = 1; r < rounds; ++r)
        for (double t : passes[static_cast<size_t>(r)].call_s[k]) sum += t, ++n;
      const double per_call = sum / static_cast<double>(n);
      c.seconds.points.push_back({b, per_call});
      c.multi_step = passes.back().multi_step[k];
      c.calls = static_cast<int>(passes.back().call_s[k].size());
      c.out_bytes = passes.back().out_bytes[k];
      const MemoryNeed m = estimate_rank_memory(dir, {c.name}, rp.width, rp.height, b, base.guidance > 1, spec.dtype,
                                                addons);
      c.weight_bytes = m.weights;
      c.activation_bytes.points.push_back({b, m.activations});
      prof.runtime_bytes = m.runtime;
      std::fprintf(stderr, "diffpipe profile: %-8s batch %3d: %9.4f s per call, %d call(s) per request\n", c.name.c_str(), b,
                   per_call, c.calls);
    }
  }
  prof.validate("profile");
  prof.save(a.str("out"));
  std::fprintf(stderr, "diffpipe profile: wrote %s\n", a.str("out").c_str());
  return 0;
}

int plan_main(int argc, char** argv) {
  cli::Args a("plan", "diffpipe plan --profile FILE --nodes N --ranks-per-node G [options]",
              {{"profile", "FILE", "cost profile written by `diffpipe profile`"},
               {"nodes", "N", "nodes (default 1)"},
               {"ranks-per-node", "G", "ranks (GPUs) per node (default 1)"},
               {"device-memory-gib", "GIB", "memory per rank; placements that need more are refused (default: unchecked)"},
               {"intra-gbps", "GB/S", "bandwidth between ranks of one node, GB/s (default 100)"},
               {"inter-gbps", "GB/S", "bandwidth between nodes per rank, GB/s (default 12.5)"},
               {"link-latency-us", "US", "latency per message, microseconds (default 10)"},
               {"steps", "N", "denoising steps per request (default: the profile's)"},
               {"batch-sizes", "LIST", "max_batch values to try (default 1,2,4,8,16)"},
               {"rate", "R", "open loop: Poisson arrivals per second (default: throughput, a closed loop)"},
               {"requests", "N", "requests per simulation (default: enough for the steady state)"},
               {"p99-slo", "S", "p99 latency bound in seconds; placements above it rank last"},
               {"simulate", "N", "candidates simulated after ranking by the bound (default 6)"},
               {"pipeline", "FILE", "simulate this pipeline file instead of searching"},
               {"top", "N", "candidates printed (default 10)"},
               {"out", "FILE", "write the best placement as a pipeline file"},
               {"json", "FILE", "write every candidate as JSON"},
               {"seed", "S", "seed of the simulated arrivals (default 1)"}},
              argc, argv,
              "plans a placement for a cluster from a cost profile; nothing runs on the cluster. The simulation's model "
              "of the machine is in docs/cluster.md");
  if (a.help_requested()) {
    std::fputs(a.help_text().c_str(), stdout);
    return 0;
  }
  DP_CHECK(a.has("profile"), "plan: --profile FILE is required (write one with `diffpipe profile`)");
  const CostProfile prof = CostProfile::load(a.str("profile"));
  ClusterSpec cl;
  cl.nodes = static_cast<int>(a.integer("nodes", 1));
  cl.ranks_per_node = static_cast<int>(a.integer("ranks-per-node", 1));
  DP_CHECK(cl.nodes >= 1 && cl.ranks_per_node >= 1, "plan: --nodes and --ranks-per-node must be >= 1");
  cl.device_memory_bytes = a.number("device-memory-gib", 0) * double(1 << 30);
  cl.network.intra_bytes_per_s = a.number("intra-gbps", 100) * 1e9;
  cl.network.inter_bytes_per_s = a.number("inter-gbps", 12.5) * 1e9;
  cl.network.latency_s = a.number("link-latency-us", 10) * 1e-6;
  DP_CHECK(cl.network.intra_bytes_per_s > 0 && cl.network.inter_bytes_per_s > 0 && cl.network.latency_s >= 0,
           "plan: --intra-gbps and --inter-gbps must be > 0, --link-latency-us >= 0");
  PlanOptions o;
  o.steps = static_cast<int>(a.integer("steps", 0));
  DP_CHECK(o.steps >= 0 && o.steps <= 10000, "plan: --steps must be in [1, 10000] (left out: the profile's)");
  if (a.has("batch-sizes")) o.batch_sizes = batch_sizes(a, "batch-sizes", {});
  o.rate = a.number("rate", 0);
  DP_CHECK(o.rate >= 0, "plan: --rate must be >= 0");
  o.requests = static_cast<int>(a.integer("requests", 0));
  DP_CHECK(o.requests >= 0 && o.requests <= 10000000, "plan: --requests must be in [1, 10000000] (left out: enough for the steady state)");
  o.p99_slo_s = a.number("p99-slo", 0);
  o.simulate_top = static_cast<int>(a.integer("simulate", 6));
  DP_CHECK(o.simulate_top >= 1, "plan: --simulate must be >= 1");
  o.seed = a.u64("seed", 1);
  const int top = static_cast<int>(a.integer("top", 10));

  const int N = cl.world();
  const int steps = o.steps > 0 ? o.steps : prof.steps;
  std::printf("diffpipe plan: %d rank(s) (%d node(s) x %d), profile of %s on %s %s at %dx%d, %d steps, guidance %g; %s\n", N,
              cl.nodes, cl.ranks_per_node, prof.model.c_str(), prof.device.c_str(), prof.dtype.c_str(), prof.width,
              prof.height, steps, prof.guidance,
              o.rate > 0 ? detail::cat("open loop at ", o.rate, " requests/s").c_str() : "throughput (closed loop)");
  std::vector<PlanCandidate> cands;
  if (a.has("pipeline")) {
    PlacementDefaults d;
    d.rank.device = prof.device;
    d.rank.dtype = prof.dtype;
    cands.push_back(evaluate(Placement::load(a.str("pipeline"), N, prof.layout(), d), "pipeline file " + a.str("pipeline"),
                             prof, cl, o));
    simulate_candidate(cands.back(), prof, cl, o);
  } else {
    cands = plan_placements(prof, cl, o);
  }
  nlohmann::json report = nlohmann::json::array();
  std::printf("%3s  %-62s %5s %10s %10s %8s %8s %8s %8s\n", "#", "shape (ranks x {stages})", "batch", "bound/s",
              "sim img/s", "p50 s", "p99 s", "busiest", "mem GiB");
  for (size_t i = 0; i < cands.size(); ++i) {
    const PlanCandidate& c = cands[i];
    const int batch = heavy_batch(c.placement);
    const double ips = c.images_per_s;
    nlohmann::json j = {{"shape", c.shape}, {"max_batch", batch}, {"bound_images_per_s", c.bound},
                        {"memory_bytes", c.memory}, {"fits", c.fits}, {"simulated", c.simulated}};
    if (c.simulated) {
      nlohmann::json busy = nlohmann::json::object();
      for (const auto& s : c.sim.stages) busy[s.name] = {{"utilisation", s.utilisation}, {"mean_batch", s.mean_batch}};
      j["simulated_images_per_s"] = ips;
      j["latency_s"] = {{"mean", c.sim.latency_mean}, {"p50", c.sim.latency_p50}, {"p95", c.sim.latency_p95}, {"p99", c.sim.latency_p99}};
      j["stages"] = busy;
      j["busiest_rank_utilisation"] = c.sim.busiest_rank_utilisation;
      j["bytes_moved"] = c.sim.bytes_moved;
      j["inter_node_bytes"] = c.sim.inter_node_bytes;
      j["requests"] = c.sim.requests;
      j["meets_slo"] = c.meets_slo;
    }
    report.push_back(j);
    if (static_cast<int>(i) >= top) continue;
    std::string shape = c.shape.size() > 62 ? c.shape.substr(0, 59) + "..." : c.shape;
    if (c.simulated)
      std::printf("%3zu  %-62s %5d %10.3f %10.3f %8.3f %8.3f %8.2f %8.2f%s\n", i + 1, shape.c_str(), batch, c.bound, ips,
                  c.sim.latency_p50, c.sim.latency_p99, c.sim.busiest_rank_utilisation, c.memory / double(1 << 30),
                  !c.fits ? "  (does not fit)" : !c.meets_slo ? "  (p99 above the bound)" : "");
    else
      std::printf("%3zu  %-62s %5d %10.3f %10s %8s %8s %8s %8.2f%s\n", i + 1, shape.c_str(), batch, c.bound, "-", "-", "-", "-",
                  c.memory / double(1 << 30), !c.fits ? "  (does not fit)" : "");
  }
  const PlanCandidate& best = cands.front();
  DP_CHECK(best.fits, "plan: no placement fits the device memory");
  if (!best.meets_slo)
    std::printf("diffpipe plan: no simulated placement meets the p99 bound of %g s; the best by throughput follows\n", o.p99_slo_s);
  std::printf("best: %s, max_batch %d: %.3f images/s simulated (bound %.3f), p99 %.3f s\n", best.shape.c_str(),
              heavy_batch(best.placement),
              best.images_per_s, best.bound, best.sim.latency_p99);
  if (a.has("out")) {
    const std::string comment = detail::cat(
        "diffpipe plan: ", best.shape, "\nfor ", N, " ranks (", cl.nodes, " node(s) x ", cl.ranks_per_node, "), profile ",
        a.str("profile"), " (", prof.device, " ", prof.dtype, ", ", prof.width, "x", prof.height, ", ", steps, " steps)\n",
        "simulated: ", best.images_per_s, " images/s, p99 ",
        best.sim.latency_p99, " s\nrun: mpirun -np ", N, " diffpipe generate --model MODEL",
        std::any_of(prof.stages.begin(), prof.stages.end(), [](const StageCost& s) { return s.name == "refine"; })
            ? " --refiner REFINER" : "",
        " --pipeline THIS_FILE ...");
    const std::string text = placement_toml(best.placement, prof, comment);
    write_file_atomic(a.str("out"), text.data(), text.size());
    std::printf("wrote %s\n", a.str("out").c_str());
  }
  if (a.has("json")) {
    const std::string text = report.dump(2) + "\n";
    write_file_atomic(a.str("json"), text.data(), text.size());
  }
  return 0;
}

}  // namespace diffpipe::apps
