// Placement: which ranks run which stage (several ranks for one stage = replicas), per-stage batch limits,
// the transport, and each rank's device and dtype. The stages are the model's pipeline (stages/pipeline.h), in
// its order; nothing here names a stage. Derived from the world size, or read from a pipeline file (TOML, see
// docs/cluster.md) and validated in one place. Immutable after construction.
#pragma once
#include <string>
#include <vector>

#include "diffpipe/stages/pipeline.h"

namespace diffpipe {

struct StageSpec {
  std::vector<int> ranks;     // replicas
  int max_batch = 8;          // requests per stage call (denoise: per UNet call)
  int max_inflight = 0;       // per replica: requests queued or running; 0 = 2 x max_batch
  double batch_wait_ms = 2;   // one-shot stages: how long to wait to fill a batch
  std::string batching = "step";  // multi-step stages: step (continuous, step-level) | static (request-level) | single
  int inflight_limit() const { return max_inflight > 0 ? max_inflight : 2 * max_batch; }
};

struct PlacedStage {
  std::string name;
  StageSpec spec;
  bool heavy = false;   // the pipeline's main stage (derived placements give it the extra ranks)
  bool placed = false;  // a pipeline file has a table for it
};

struct RankSpec {
  std::string device = "cpu";    // cpu | cuda (the GPU of the rank's local rank)
  std::string dtype = "float32"; // float32 | float16 | bfloat16
};

// Settings a pipeline file may leave out (the command line's --device, --dtype, --transport, --max-batch,
// --batching, --batch-invariant): the file's own values win.
struct PlacementDefaults {
  RankSpec rank;
  std::string transport = "mpi";
  StageSpec stage;  // max_batch, batching, ... (not ranks)
  bool batch_invariant = false;
};

struct Placement {
  int world_size = 1;
  std::string transport = "mpi";  // mpi | nccl (a 1-rank world always runs in-process)
  size_t queue_capacity = 1024;   // coordinator's admission queue (requests waiting to be admitted)
  bool batch_invariant = false;   // CPU ranks: results independent of batch composition (costs speed)
  bool allow_idle_ranks = false;  // benchmarks: ranks without a stage are allowed (else an error)
  std::vector<PlacedStage> stages;  // in pipeline order
  std::vector<RankSpec> ranks;

  // 1 rank: every stage in one process (threads); 2: the heavy stage on rank 1, the rest on rank 0; 3 or more:
  // stages before the heavy one on rank 0, after it on the last rank, the heavy stage replicated on the rest.
  static Placement derive(int world_size, const RankSpec& defaults = {},
                          const std::vector<PipelineStage>& pipeline = default_pipeline_layout());
  // Data-parallel replicas: every rank runs every stage, a request stays on the rank it was routed to (no
  // transfers between stages). On small CPU models this beats the pipelined layout (docs/results.md).
  static Placement replicas(int world_size, const RankSpec& defaults = {},
                            const std::vector<PipelineStage>& pipeline = default_pipeline_layout());
  // Reads a pipeline file for a world of `world_size` ranks and fits it to `pipeline`; errors name the file
  // and field. What the file leaves out comes from `defaults`. Its stage tables must be among `known` (the
  // registered stage names).
  static Placement load(const std::string& path, int world_size,
                        const std::vector<PipelineStage>& pipeline = default_pipeline_layout(),
                        const PlacementDefaults& defaults = {},
                        const std::vector<std::string>& known = known_stage_names());
  void validate(const std::string& origin) const;
  // Fits the placement to the model's pipeline, in its order: a stage the pipeline lacks is dropped when
  // derived and an error naming `origin` when a pipeline file placed it; in a file, the first and the heavy
  // stage need a table, any other stage without one runs on the ranks of the stage before it. A derived
  // placement is re-derived (keeping each stage's limits). Validates. Idempotent.
  void fit(const std::vector<PipelineStage>& pipeline, const std::string& origin);

  bool has(const std::string& name) const;
  const StageSpec& stage(const std::string& name) const;  // throws naming the stage when absent
  StageSpec& stage(const std::string& name);
  std::vector<std::string> stage_names() const;
  std::vector<std::string> stages_on(int rank) const;
  std::string describe() const;  // printed at start-up
};

}  // namespace diffpipe
