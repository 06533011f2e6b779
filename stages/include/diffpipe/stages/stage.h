// The stage abstraction: one class per stage, one interface. A stage takes requests in (with what the previous
// stage produced), runs batched calls over the requests it holds, and reports per request: progress (step k of
// N), finished (with what the next stage consumes), or failed (with the reason; the others go on).
// The runner (cluster/) drives any stage the same way; it never knows what a stage computes. A pipeline is an
// ordered list of StageDefs; model folders name theirs (stages/model_stages.h), tests build their own.
// Thread-safety: a Stage object is used by one worker thread.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/request.h"

namespace diffpipe {

struct StageConfig {
  int max_batch = 8;              // requests per batched call
  std::string batching = "step";  // multi-step stages: step (continuous) | static | single
};

// Preview work (a partial image of request `id`, number k) travels under its own id so that it never mixes
// with the request's own work: preview_id(id, k) = id + k * 2^56. Request ids stay below 2^56.
constexpr uint64_t kPreviewShift = 56;
inline uint64_t preview_id(uint64_t id, int k) { return id + (static_cast<uint64_t>(k) << kPreviewShift); }
inline int preview_number(uint64_t work_id) { return static_cast<int>(work_id >> kPreviewShift); }
inline uint64_t request_of(uint64_t work_id) { return work_id & ((uint64_t(1) << kPreviewShift) - 1); }

// One request handed to a stage.
struct StageRequest {
  uint64_t id = 0;
  GenerationParams params;
  std::vector<at::Tensor> inputs;  // what the previous stage produced (empty for the first stage)
  int priority = 0;
};

// What happened to one request in one step() call.
struct StageEvent {
  enum class Kind { Progress, Finished, Failed, Preview };
  Kind kind = Kind::Progress;
  uint64_t id = 0;
  int step = 0, total = 0;          // Progress: calls done and planned in this stage (multi-step stages)
  std::vector<at::Tensor> outputs;  // Finished: what the next stage consumes (the last stage: the image);
                                    // Preview: what the next stage turns into partial image number `step`
  std::string error;                // Failed: why (the runner adds rank, stage and request)

  static StageEvent progress(uint64_t id, int step, int total) { return {Kind::Progress, id, step, total, {}, {}}; }
  static StageEvent finished(uint64_t id, std::vector<at::Tensor> out) { return {Kind::Finished, id, 0, 0, std::move(out), {}}; }
  static StageEvent failed(uint64_t id, std::string why) { return {Kind::Failed, id, 0, 0, {}, std::move(why)}; }
  static StageEvent preview(uint64_t id, int k, std::vector<at::Tensor> out) { return {Kind::Preview, id, k, 0, std::move(out), {}}; }
};

class Stage {
 public:
  virtual ~Stage() = default;
  // Takes a request in. Throwing means this request cannot run here: it alone fails, with the message.
  virtual void add(StageRequest r, double now) = 0;
  // Forgets a request (cancelled or timed out); unknown ids are ignored.
  virtual void cancel(uint64_t id) = 0;
  // Requests held (waiting or in progress).
  virtual size_t held() const = 0;
  // One batched call over some held requests. An exception here fails every request of that call.
  virtual std::vector<StageEvent> step(double now) = 0;
  // The requests of the step() call in progress or last made (the runner fails them when step() throws).
  virtual std::vector<uint64_t> current_batch() const = 0;
};

// A stage that runs each request once (encode, decode, upscale): requests wait in arrival order, previews after
// every final request (lower priority); each step() takes up to max_batch of them whose first inputs share a
// shape and runs them in one call. When a batched call
// throws, each request of it is run again alone, so one bad request fails alone.
class OneShotStage : public Stage {
 public:
  explicit OneShotStage(const StageConfig& cfg) : max_batch_(cfg.max_batch) {}
  void add(StageRequest r, double now) override;
  void cancel(uint64_t id) override;
  size_t held() const override { return waiting_.size(); }
  std::vector<StageEvent> step(double now) override;
  std::vector<uint64_t> current_batch() const override;

 protected:
  // Checks a request on arrival (throw to fail it). Default: accept.
  virtual void check(const StageRequest& r) { (void)r; }
  // Runs the batch in one call; returns one Finished or Failed event per request, in order.
  virtual std::vector<StageEvent> run(const std::vector<const StageRequest*>& batch) = 0;

 private:
  size_t batch_end() const;  // how many of the waiting requests form the next batch
  int max_batch_;
  std::vector<uint64_t> current_;
  std::deque<StageRequest> waiting_;
};

// A stage of a pipeline: its name, what it consumes and produces (for people), how the runner treats it, and
// how to make one on a rank. A pipeline is a vector of these, in order.
struct StageDef {
  std::string name;
  std::string consumes, produces;
  bool heavy = false;    // the pipeline's main stage: extra ranks become its replicas; its in-flight bound
                         // (2 x max_batch per replica by default) decides admission
  bool gathers = true;   // when idle, wait up to batch_wait_ms after a first arrival to fill a batch
  int admission_factor = 4;  // light stages: in-flight bound = factor x the stage's bound; 0 = unbounded
  std::function<std::unique_ptr<Stage>(const StageConfig&)> make;
};
using PipelineDef = std::vector<StageDef>;

}  // namespace diffpipe
