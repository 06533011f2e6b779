// A discrete-event simulation of a placement: how many images per second a cluster would make and at what
// latency, without running a model. The decisions are the runtime's own: the coordinator's Planner (admission,
// routing, in-flight bounds) and each multi-step stage's StepBatcher run unchanged against a simulated clock;
// only the work is replaced by a cost per call (measured by `diffpipe profile`, as a function of batch size).
// Model of the machine, stated so that it can be checked (docs/cluster.md, "Planning a placement"):
//   - a rank runs one stage call at a time (a GPU, or a CPU rank's cores); among its stages with work ready it
//     takes the one whose work has waited longest;
//   - a gathering stage that was idle waits batch_wait after a first arrival for its batch to fill;
//   - a request moving between ranks costs latency + bytes / bandwidth (intra- or inter-node), and a rank sends one
//     message at a time (its link is a queue); on the same rank it costs nothing;
//   - the coordinator's own messages cost one link latency.
// Pure and torch-free; deterministic for a given seed. Not thread-safe.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "diffpipe/scheduler/step_batcher.h"

namespace diffpipe::sched {

// Seconds per call as a function of batch size: piecewise linear through measured points (batch, seconds),
// extended linearly beyond the last two (and flat below the first).
struct CostCurve {
  std::vector<std::pair<int, double>> points;  // ascending batch sizes, seconds > 0
  double at(int batch) const;
  void validate(const std::string& what) const;  // throws naming `what`
};

struct SimStage {
  std::string name;
  bool multi_step = false;   // step-batched (denoise, prior, superres): one call per step of its active requests
  int calls = 1;             // calls per request (multi-step: the sampler's calls; one-shot: 1)
  CostCurve cost;            // seconds per call by requests in the call
  double out_bytes = 0;      // bytes each request sends to the next stage (the last stage: to rank 0, the image)
  bool heavy = false;
  bool gathers = true;       // waits batch_wait_s after a first arrival when idle
  std::vector<int> ranks;    // replicas
  int max_batch = 8;
  int planner_limit = 16;    // the Planner's in-flight bound per replica (see admission_limit())
  double batch_wait_s = 0.002;
  BatchMode mode = BatchMode::Step;  // multi-step stages
};

struct SimNetwork {
  int ranks_per_node = 8;       // rank r is on node r / ranks_per_node
  double intra_bytes_per_s = 100e9;
  double inter_bytes_per_s = 12.5e9;
  double latency_s = 10e-6;     // per message
};

struct SimWorkload {
  int requests = 256;
  double rate = 0;                // Poisson arrivals per second; 0 = closed loop (every request at t = 0, or
                                  // `concurrency` outstanding: each finished request lets the next one in)
  int concurrency = 0;            // closed loop: requests submitted and unfinished at once (0 = all)
  std::vector<double> arrivals;   // explicit arrival times (overrides requests and rate)
  uint64_t seed = 1;
  size_t queue_capacity = 1u << 30;
};

struct SimStageStats {
  std::string name;
  double busy_s = 0;       // summed over its replicas
  double calls = 0;
  double mean_batch = 0;
  double utilisation = 0;  // busy / (makespan x replicas)
};

struct SimResult {
  int requests = 0, done = 0, rejected = 0;
  double makespan_s = 0, images_per_s = 0;
  double steady_images_per_s = 0;  // the heavy stage's work between the first completion and the last admission,
                                   // in requests per second (a finite run without its ramp-up and drain)
  double latency_mean = 0, latency_p50 = 0, latency_p95 = 0, latency_p99 = 0;
  std::vector<SimStageStats> stages;
  double busiest_rank_utilisation = 0;
  double bytes_moved = 0, inter_node_bytes = 0;
  size_t peak_queued = 0;
  double events = 0;
};

// The p-quantile (0..1) of `v` by nearest rank (0 when empty): how the simulator, `diffpipe bench` and the
// scheduler benchmark report latency percentiles, so their figures compare.
double percentile(std::vector<double> v, double p);

// Runs the workload through `stages` (pipeline order) on `world_size` ranks; rank 0 is also the coordinator.
// Throws naming the stage when a stage has no rank, a rank outside [0, world_size), or a bad cost curve.
SimResult simulate(const std::vector<SimStage>& stages, int world_size, const SimNetwork& net, const SimWorkload& w);

}  // namespace diffpipe::sched
