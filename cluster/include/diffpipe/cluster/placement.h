// Placement: which ranks run which stage (several ranks for one stage = replicas), per-stage batch limits,
// the transport, and each rank's device and dtype. Derived from the world size, or read from a pipeline
// file (TOML subset, see docs/cluster.md) and validated in one place. Immutable after construction.
#pragma once
#include <string>
#include <vector>

namespace diffpipe {

// Upscale (super-resolution, Imagen-style cascade) runs only for models with a super_resolution/ folder.
enum class StageKind { Encode = 0, Denoise = 1, Decode = 2, Upscale = 3 };
constexpr int kNumStages = 4;
const char* stage_name(StageKind s);

struct StageSpec {
  std::vector<int> ranks;     // replicas
  int max_batch = 8;          // requests per stage call (denoise: per UNet call)
  int max_inflight = 0;       // per replica: requests queued or running; 0 = 2 x max_batch
  double batch_wait_ms = 2;   // encoder/decoder: how long to wait to fill a batch
  std::string batching = "step";  // denoise: step (continuous, step-level) | static (request-level) | single
  int inflight_limit() const { return max_inflight > 0 ? max_inflight : 2 * max_batch; }
};

struct RankSpec {
  std::string device = "cpu";    // cpu | cuda (the GPU of the rank's local rank)
  std::string dtype = "float32"; // float32 | float16 | bfloat16
};

struct Placement {
  int world_size = 1;
  std::string transport = "mpi";  // mpi | nccl (a 1-rank world always runs in-process)
  size_t queue_capacity = 1024;   // coordinator's admission queue (requests waiting to be admitted)
  bool batch_invariant = false;   // CPU ranks: results independent of batch composition (costs speed)
  StageSpec stages[kNumStages];
  std::vector<RankSpec> ranks;
  bool upscale_placed = false;    // the pipeline file has an [upscale] table (else upscale runs on the decode ranks)

  // 1 rank: every stage in one process (threads); 2: {encode, decode} + {denoise}; 3: one rank per stage;
  // more: extra denoise replicas (encode = 0, decode = last, denoise = the rest). Upscale runs where decode does.
  static Placement derive(int world_size, const RankSpec& defaults = {});
  // Reads and validates a pipeline file for a world of `world_size` ranks; errors name the file and field.
  static Placement load(const std::string& path, int world_size);
  void validate(const std::string& origin) const;
  // Fits the placement to the model: without super-resolution the upscale stage is dropped (an [upscale]
  // table in a pipeline file is then an error naming `origin`); idempotent.
  void match_model(bool has_super_resolution, const std::string& origin);
  bool upscales() const { return !stage(StageKind::Upscale).ranks.empty(); }

  const StageSpec& stage(StageKind s) const { return stages[static_cast<int>(s)]; }
  StageSpec& stage(StageKind s) { return stages[static_cast<int>(s)]; }
  std::vector<StageKind> stages_on(int rank) const;
  std::string describe() const;  // printed at start-up
};

}  // namespace diffpipe
