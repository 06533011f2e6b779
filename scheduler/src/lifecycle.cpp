#include "diffpipe/scheduler/lifecycle.h"

#include "diffpipe/runtime/error.h"

namespace diffpipe::sched {

const char* state_name(RequestState s) {
  switch (s) {
    case RequestState::Queued: return "queued";
    case RequestState::Running: return "running";
    case RequestState::Done: return "done";
    case RequestState::Failed: return "failed";
    case RequestState::Cancelled: return "cancelled";
    case RequestState::TimedOut: return "timed out";
  }
  return "?";
}

bool is_final(RequestState s) {
  return s == RequestState::Done || s == RequestState::Failed || s == RequestState::Cancelled ||
         s == RequestState::TimedOut;
}

bool can_transition(RequestState from, RequestState to) {
  if (is_final(from)) return false;
  if (to == RequestState::Failed || to == RequestState::Cancelled || to == RequestState::TimedOut) return true;
  switch (from) {
    case RequestState::Queued: return to == RequestState::Running;
    case RequestState::Running: return to == RequestState::Running || to == RequestState::Done;
    default: return false;
  }
}

void RequestInfo::transition(RequestState to, double now, const std::string& why) {
  DP_CHECK(can_transition(state, to), "request ", id, ": illegal transition ", state_name(state), " -> ",
           state_name(to));
  if (to == RequestState::Running) {
    if (state == RequestState::Queued) admitted_s = now;
    ++stage;
    step = 0;
  }
  state = to;
  if (!why.empty()) reason = why;
  if (is_final(to)) finished_s = now;
}

}  // namespace diffpipe::sched
