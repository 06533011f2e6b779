// Request lifecycle: an explicit state enum and the transitions allowed between states. The stages a request
// passes through are the pipeline's (whatever the model folder lists), so the state says where the request is
// as "running in stage k" rather than naming fixed stages:
//   Queued -> Running (stage 0) -> Running (stage 1) -> ... -> Running (last stage) -> Done
//   any non-final state -> Failed | Cancelled | TimedOut (the reason is kept on the request)
// Pure and torch-free; used by the coordinator's planner and its tests. Not thread-safe: one owner.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace diffpipe::sched {

enum class RequestState : uint8_t { Queued, Running, Done, Failed, Cancelled, TimedOut };

const char* state_name(RequestState s);
bool is_final(RequestState s);
// Whether `from -> to` is a legal transition (forward along the pipeline, or to a final failure state).
bool can_transition(RequestState from, RequestState to);

struct RequestInfo {
  uint64_t id = 0;
  int priority = 0;          // higher runs first; aging prevents starvation
  double arrival_s = 0;      // when it was submitted (scheduler clock)
  double deadline_s = 0;     // absolute; 0 = none
  int total_steps = 0;
  RequestState state = RequestState::Queued;
  int stage = -1;            // while Running: the index of the stage it is in
  int step = 0;              // steps done in the current multi-step stage
  std::string reason;        // why it failed / was cancelled / timed out
  double admitted_s = -1, finished_s = -1;
  std::vector<int> route;    // one rank per pipeline stage, set at admission

  // Applies a transition; throws diffpipe::Error naming the request and both states when illegal.
  // Running -> Running moves to the next stage.
  void transition(RequestState to, double now, const std::string& why = "");
};

}  // namespace diffpipe::sched
