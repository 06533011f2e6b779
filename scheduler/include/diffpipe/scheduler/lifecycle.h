// Request lifecycle: an explicit state enum and the transitions allowed between states.
//   Queued -> Encoding -> Denoising (step k of N) -> Decoding [-> Upscaling] -> Done
//   any non-final state -> Failed | Cancelled | TimedOut (the reason is kept on the request)
// Pure and torch-free; used by the coordinator's planner and its tests. Not thread-safe: one owner.
#pragma once
#include <cstdint>
#include <string>

namespace diffpipe::sched {

enum class RequestState : uint8_t { Queued, Encoding, Denoising, Decoding, Upscaling, Done, Failed, Cancelled, TimedOut };

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
  int step = 0;              // denoising steps done
  std::string reason;        // why it failed / was cancelled / timed out
  double admitted_s = -1, finished_s = -1;
  int route[4] = {-1, -1, -1, -1};  // encode, denoise, decode, upscale ranks (-1: the stage is not used)

  // Applies a transition; throws diffpipe::Error naming the request and both states when illegal.
  void transition(RequestState to, double now, const std::string& why = "");
};

}  // namespace diffpipe::sched
