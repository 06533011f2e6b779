// Rank 0's coordinator: the Planner decides (admission, routing, limits, deadlines), this loop executes its
// decisions as Work and Cancel messages and feeds it the events the stages send back. Internal to the runner.
#pragma once
#include <functional>

#include "diffpipe/runtime/blocking_queue.h"
#include "node_context.h"

namespace diffpipe::runner {

class Coordinator {
 public:
  Coordinator(NodeContext& ctx, RequestFeed& feed) : ctx_(ctx), feed_(feed) {}
  BlockingQueue<Message>& inbox() { return inbox_; }
  // Runs until the feed is closed and every request is final, then tells every rank to shut down. Throws on a
  // job failure.
  void run();

 private:
  NodeContext& ctx_;
  RequestFeed& feed_;
  BlockingQueue<Message> inbox_;
};

}  // namespace diffpipe::runner
