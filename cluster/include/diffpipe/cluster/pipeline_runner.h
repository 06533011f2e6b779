// Runs this rank's share of a pipeline: the stage workers placed on it (each a thread with its own inbox,
// so receiving, computing and sending overlap) and, on rank 0, the coordinator that admits requests, routes
// each to the least-loaded replica of every stage, bounds in-flight work, and collects images.
// Every blocking wait has a timeout; a failure anywhere ends every rank non-zero with a message naming the
// rank, stage and request. Call on every rank with the same options; only rank 0's requests are used.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "diffpipe/cluster/placement.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/transport.h"
#include "diffpipe/stages/request.h"

namespace diffpipe {

// Scheduling attributes of one request (same order as the requests; empty = defaults for all).
struct RequestMeta {
  int priority = 0;         // higher first; waiting requests age, so none starves
  double arrival_s = 0;     // seconds after start when the request arrives (open-loop load)
  double deadline_s = 0;    // seconds after arrival; 0 = none. Past it the request is dropped as timed out
  double cancel_at_s = -1;  // testing aid: cancel this many seconds after start (< 0: never)
};

struct RunOptions {
  std::string model_dir;
  Placement placement;
  double timeout_s = 600;      // no progress for this long = failure (names what is stuck)
  std::string inject_failure;  // testing aid: "STAGE:REQUEST" throws there, "STAGE:REQUEST:crash" aborts the process
  std::vector<RequestMeta> meta;
  bool reject_when_full = false;  // open-loop load: a full admission queue rejects (else arrivals wait)
};

struct GeneratedImage {
  uint64_t index = 0;  // position in the request list
  GenerationParams params;
  std::string status = "done";  // done | cancelled | timed out | rejected
  std::string reason;           // why it is not done
  Image image;                  // empty unless done
  double latency_s = 0;         // arrival to result
  int denoise_rank = -1;
};

struct RunStats {
  double wall_s = 0;
  size_t images = 0;
  double busy_s[kNumStages] = {};  // summed over this rank's replicas
};

// Blocks until all requests are done (rank 0 calls on_result for each, on the coordinator thread) and every
// rank has shut down cleanly; throws diffpipe::Error on failure.
RunStats run_pipeline(const RunOptions& opts, Transport& transport, const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result);

// The same with this rank's model already loaded (benchmarks and long-lived servers reuse one load): `model`
// must hold the components of the stages placed on this rank and outlive the call.
struct SdModel;
RunStats run_pipeline(const RunOptions& opts, Transport& transport, const SdModel& model,
                      const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result);

// Start-up agreement: runs `step` on every rank; if it throws anywhere, every rank throws the message of the
// lowest failing rank (rank 0 prints it once). Without MPI it just runs `step`.
void run_on_all_ranks_or_fail(const std::function<void()>& step);

}  // namespace diffpipe
