// Placement planning for clusters larger than the one at hand: a cost profile measured once per model, device
// and size (`diffpipe profile`), a cluster description (nodes, ranks per node, links, device memory), and a
// search over placements whose candidates are ranked by an analytic bound and then simulated with the
// runtime's own planner (scheduler/simulator.h). The winner is written as a pipeline file `generate` reads.
// Torch-free; not thread-safe.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "diffpipe/cluster/placement.h"
#include "diffpipe/scheduler/simulator.h"

namespace diffpipe {

// One stage's measured costs.
struct StageCost {
  std::string name;
  bool heavy = false, multi_step = false, gathers = true;
  int admission_factor = 4;  // as its StageDef
  int calls = 1;             // calls per request at the profile's steps
  double out_bytes = 0;      // bytes per request sent to the next stage
  sched::CostCurve seconds;  // per call, by requests in the call
  double weight_bytes = 0;   // its weights in the profile's dtype
  sched::CostCurve activation_bytes;  // one call's activations, by batch size (interpolated like the seconds)
};

struct CostProfile {
  std::string model, device, dtype;
  int width = 0, height = 0, steps = 0, threads = 0;
  double guidance = 7.5;
  double runtime_bytes = 0.4e9;  // the process itself
  std::vector<StageCost> stages;  // pipeline order

  // Reads a profile written by save(); errors name the file and the field.
  static CostProfile load(const std::string& path);
  void save(const std::string& path) const;
  void validate(const std::string& origin) const;
  std::vector<PipelineStage> layout() const;  // the pipeline the profile measured
  int heavy_index() const;                     // the heavy stage's place in `stages`
  const StageCost& stage(const std::string& name) const;
};

struct ClusterSpec {
  int nodes = 1, ranks_per_node = 1;  // world = nodes x ranks_per_node; rank r on node r / ranks_per_node
  double device_memory_bytes = 0;     // per rank; 0 = not checked
  sched::SimNetwork network;          // its ranks_per_node is set from this spec
  int world() const { return nodes * ranks_per_node; }
};

// The simulator's view of `placement` running the profiled model (`steps` > 0 replaces the heavy stage's
// calls per request, scaled from the profile's steps).
std::vector<sched::SimStage> sim_stages(const Placement& placement, const CostProfile& profile, int steps = 0);
// Requests per second no placement of this shape can beat: each rank's share of every stage it runs, at the
// stage's max_batch, against one second of that rank's time.
double throughput_bound(const Placement& placement, const CostProfile& profile, int steps = 0);
// The most memory one rank of the placement needs (its stages' weights and one call's activations each).
double peak_rank_memory(const Placement& placement, const CostProfile& profile);

struct PlanOptions {
  int steps = 0;                        // 0: the profile's
  std::vector<int> batch_sizes{1, 2, 4, 8, 16};
  double rate = 0;                      // open-loop arrivals per second; 0: throughput (paced closed loop)
  int requests = 0;                     // 0: enough for the steady state
  double p99_slo_s = 0;                 // 0: none; otherwise candidates above it rank last
  int simulate_top = 6;                 // candidates simulated after the bound's ranking
  uint64_t seed = 1;
};

struct PlanCandidate {
  std::string shape;            // "replicas", "encode 1 | denoise 6 | decode 1", ...
  Placement placement;
  double bound = 0;             // throughput_bound
  double memory = 0;            // peak_rank_memory
  bool fits = true;             // within ClusterSpec::device_memory_bytes
  bool simulated = false;
  sched::SimResult sim;
  double images_per_s = 0;      // what candidates are ranked by: the simulated steady rate (closed loop), or the
                                // whole run's (with a rate)
  bool meets_slo = true;
};

// A candidate for `placement`: its bound, memory per rank and whether it fits; then simulate_candidate() fills in
// the simulation under the plan's workload.
PlanCandidate evaluate(Placement placement, std::string shape, const CostProfile& profile, const ClusterSpec& cluster,
                       const PlanOptions& o);
void simulate_candidate(PlanCandidate& c, const CostProfile& profile, const ClusterSpec& cluster, const PlanOptions& o);

// Every candidate (ranked: simulated ones that fit and meet the SLO first, by simulated throughput; then the
// rest by bound). Throws when no candidate fits in memory, naming the smallest need.
std::vector<PlanCandidate> plan_placements(const CostProfile& profile, const ClusterSpec& cluster, const PlanOptions& o);
// The simulation of one placement under the plan's workload (what plan_placements runs per candidate).
sched::SimResult simulate_placement(const Placement& placement, const CostProfile& profile, const ClusterSpec& cluster,
                                    const PlanOptions& o);
// A pipeline file (docs/cluster.md) for `placement`; Placement::load reads it back to the same placement.
std::string placement_toml(const Placement& placement, const CostProfile& profile, const std::string& comment = "");

}  // namespace diffpipe
