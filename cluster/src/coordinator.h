// Rank 0's coordinator: the Planner decides (admission, routing, limits, deadlines), this loop executes its
// decisions as Work and Cancel messages and feeds it the events the stages send back. Internal to the runner.
#pragma once
#include <functional>

#include "diffpipe/runtime/blocking_queue.h"
#include "node_context.h"

namespace diffpipe::runner {

class Coordinator {
 public:
  Coordinator(NodeContext& ctx, const std::vector<GenerationParams>& requests,
              const std::function<void(GeneratedImage&&)>& on_result)
      : ctx_(ctx), requests_(requests), on_result_(on_result) {}
  BlockingQueue<Message>& inbox() { return inbox_; }
  // Runs until every request is final, then tells every rank to shut down. Throws on a job failure.
  void run();

 private:
  NodeContext& ctx_;
  const std::vector<GenerationParams>& requests_;
  const std::function<void(GeneratedImage&&)>& on_result_;
  BlockingQueue<Message> inbox_;
};

}  // namespace diffpipe::runner
