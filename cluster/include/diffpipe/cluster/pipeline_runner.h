// Runs this rank's share of a pipeline: the stage workers placed on it (each a thread with its own inbox,
// so receiving, computing and sending overlap) and, on rank 0, the coordinator that admits requests, routes
// each to the least-loaded replica of every stage, bounds in-flight work, and collects images.
// The stages are any PipelineDef (stages/stage.h): the runner drives them through the Stage interface only.
// A request that fails in a stage ends as "failed" with its reason and the others go on (fail_fast: the job
// stops); a rank that fails or goes silent ends every rank non-zero with a message naming it. Every wait has a
// deadline on the injected clock. Call on every rank with the same options; only rank 0's requests are used.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffpipe/cluster/clock.h"
#include "diffpipe/cluster/placement.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/transport.h"
#include "diffpipe/stages/lora_spec.h"
#include "diffpipe/stages/request.h"
#include "diffpipe/stages/stage.h"

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
  ModelAddons addons;  // LoRA files fused into the model, a ControlNet beside it, as every rank loads it
  Placement placement;
  double timeout_s = 600;      // no progress for this long = failure (names what is stuck)
  std::string inject_failure;  // testing aid: "STAGE:REQUEST" throws there, "STAGE:REQUEST:crash" aborts the process
  std::vector<RequestMeta> meta;
  bool reject_when_full = false;  // open-loop load: a full admission queue rejects (else arrivals wait)
  bool fail_fast = false;         // a request's failure stops the whole job (else it fails alone)
  std::shared_ptr<Clock> clock;   // null = a steady clock started by the run
  // CPU ranks: every stage's tensor work runs on the thread that called run_stages (one OpenMP pool per
  // process; runtime/compute_lane.h). false: each stage computes on its own thread (slower; for comparison).
  bool cpu_lane = true;
};

struct GeneratedImage {
  uint64_t index = 0;  // position in the request list
  GenerationParams params;
  std::string status = "done";  // done | failed | cancelled | timed out | rejected
  std::string reason;           // why it is not done
  Image image;                  // empty unless done
  double latency_s = 0;         // arrival to result
  std::vector<int> stage_ranks; // the rank that ran each stage (done only)
  int denoise_rank = -1;        // the rank of the heavy stage (done only)
};

// Where rank 0's requests come from and where their outcomes go. A run over a fixed list uses ListFeed (the
// vector overloads below); a server feeds requests as clients send them. All calls come from the coordinator's
// thread; an implementation shared with other threads locks itself.
struct FeedItem {
  uint64_t id = 0;  // unique within the run; GeneratedImage::index is this id
  GenerationParams params;
  RequestMeta meta;  // arrival_s is filled in by the coordinator when 0 and the feed is live
};
class RequestFeed {
 public:
  virtual ~RequestFeed() = default;
  // Requests that have arrived by `now` (the run's clock), in arrival order.
  virtual std::vector<FeedItem> arrivals(double now) = 0;
  // Requests whose client gave up since the last call (they end "cancelled" wherever they are).
  virtual std::vector<uint64_t> cancellations() { return {}; }
  // No request will arrive any more: the run ends when every request is final.
  virtual bool closed() const = 0;
  // One outcome per request (done, failed, cancelled, timed out, rejected).
  virtual void deliver(GeneratedImage&& gi) = 0;
  // A partial image of a request still on its way (GenerationParams::previews), before its outcome.
  virtual void preview(uint64_t id, int index, Image&& image) { (void)id, (void)index, (void)image; }
  // The coordinator's view after each loop: waiting for admission, admitted and unfinished.
  virtual void status(size_t queued, size_t active) { (void)queued, (void)active; }
};

// A fixed list of requests (index = id) arriving at their meta's arrival_s.
class ListFeed : public RequestFeed {
 public:
  ListFeed(const std::vector<GenerationParams>& requests, const std::vector<RequestMeta>& meta,
           std::function<void(GeneratedImage&&)> on_result,
           std::function<void(uint64_t, int, Image&&)> on_preview = nullptr);
  void preview(uint64_t id, int index, Image&& image) override {
    if (on_preview_) on_preview_(id, index, std::move(image));
  }
  std::vector<FeedItem> arrivals(double now) override;
  bool closed() const override { return next_ >= order_.size(); }
  void deliver(GeneratedImage&& gi) override { on_result_(std::move(gi)); }

 private:
  const std::vector<GenerationParams>& requests_;
  std::vector<RequestMeta> meta_;
  std::vector<size_t> order_;  // by arrival time
  size_t next_ = 0;
  std::function<void(GeneratedImage&&)> on_result_;
  std::function<void(uint64_t, int, Image&&)> on_preview_;
};

struct RunStats {
  double wall_s = 0;
  size_t images = 0;               // done (rank 0)
  size_t failed = 0;               // failed in a stage (rank 0)
  std::vector<double> busy_s;      // per pipeline stage (placement order), summed over this rank's replicas
  double bytes_sent = 0;           // tensor bytes this rank sent to other ranks
  size_t peak_queued = 0;          // rank 0: most requests waiting for admission at once
  size_t peak_active = 0;          // rank 0: most requests admitted and unfinished at once
};

// The general form: any pipeline. `validate` (optional) runs on rank 0 for every request before any work.
RunStats run_stages(const RunOptions& opts, Transport& transport, const PipelineDef& pipeline,
                    const std::vector<GenerationParams>& requests,
                    const std::function<void(GeneratedImage&&)>& on_result,
                    const std::function<void(const GenerationParams&)>& validate = nullptr);
// The same fed by `feed` (rank 0; other ranks pass nullptr): runs until the feed is closed and every request it
// gave is final. Ranks stay up while idle (the coordinator sends heartbeats).
RunStats run_stages(const RunOptions& opts, Transport& transport, const PipelineDef& pipeline, RequestFeed* feed);

// A model folder's pipeline: each rank loads only what its stages need. Blocks until all requests are done
// (rank 0 calls on_result for each, on the coordinator thread) and every rank has shut down cleanly; throws
// diffpipe::Error on failure.
RunStats run_pipeline(const RunOptions& opts, Transport& transport, const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result);
// The same fed by `feed` (rank 0; nullptr elsewhere); the requests are validated by whoever fills the feed.
RunStats run_pipeline(const RunOptions& opts, Transport& transport, RequestFeed* feed);

// The same with this rank's model already loaded (benchmarks and long-lived servers reuse one load): `model`
// must hold the components of the stages placed on this rank and outlive the call.
struct SdModel;
RunStats run_pipeline(const RunOptions& opts, Transport& transport, const SdModel& model,
                      const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result);
// A model's pipeline fed by `feed` (rank 0; nullptr elsewhere): the server's form.
RunStats run_pipeline(const RunOptions& opts, Transport& transport, const SdModel& model, RequestFeed* feed);

// The device and dtype a rank's models use: its RankSpec (cuda: the GPU of its node-local rank, checked to exist).
struct DeviceSpec;
DeviceSpec device_spec_of(const RankSpec& rs, bool batch_invariant = false);

// Start-up agreement: runs `step` on every rank; if it throws anywhere, every rank throws the message of the
// lowest failing rank (rank 0 prints it once). Without MPI it just runs `step`.
void run_on_all_ranks_or_fail(const std::function<void()>& step);

}  // namespace diffpipe
