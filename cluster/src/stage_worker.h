// One stage replica on one rank: a thread that takes Work messages from its inbox, hands them to the Stage,
// runs its batched steps, and sends on what each request became (the next stage's Work, a Result, progress,
// or a per-request failure). Internal to the runner.
#pragma once
#include <map>

#include "diffpipe/runtime/blocking_queue.h"
#include "fault_injection.h"
#include "node_context.h"

namespace diffpipe::runner {

class StageWorker {
 public:
  StageWorker(NodeContext& ctx, int stage, const StageSpec& spec, const Injection& inj)
      : ctx_(ctx), k_(stage), spec_(spec), def_(ctx.pipeline.at(stage)), inj_(inj) {}
  BlockingQueue<Message>& inbox() { return inbox_; }
  // The worker loop; returns when ctx.stop is set. Errors outside a request end the job (ctx.set_failure and
  // an Error message to rank 0).
  void run();

 private:
  struct Held {  // what the worker keeps of a request while its stage holds it
    GenerationParams params;
    std::vector<int> route, trail;
    int priority = 0;
  };
  void loop();
  void accept(Message&& m);
  void drop_cancelled();
  void fail(uint64_t id, const std::string& why);
  void emit(std::vector<StageEvent>& events);
  void forward(uint64_t request, Held h, int preview, std::vector<at::Tensor> outputs);
  std::string who(uint64_t id) const;

  NodeContext& ctx_;
  const int k_;
  const StageSpec& spec_;
  const StageDef& def_;
  const Injection& inj_;
  std::unique_ptr<Stage> stage_;
  BlockingQueue<Message> inbox_;
  std::map<uint64_t, Held> held_;
  uint64_t current_ = 0;
};

}  // namespace diffpipe::runner
