// The runner's messages, one struct per kind, each with its encoding. Only these functions read or write a
// Message's fields; a malformed message is an error naming the sending rank, the kind and the field, and a
// header of another format version is refused by the transport (runtime/message.h, kWireVersion).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "diffpipe/runtime/message.h"
#include "diffpipe/stages/request.h"

namespace diffpipe::wire {

// A request for stage `stage` of the pipeline, with what the previous stage produced.
struct Work {
  uint64_t request = 0;
  int stage = 0;
  GenerationParams params;
  std::vector<int> route;   // one rank per stage
  int priority = 0;
  std::vector<int> trail;   // the rank that ran each earlier stage
  int preview = 0;          // > 0: partial image number `preview` of the request, not the request itself
  std::vector<at::Tensor> tensors;
};
struct PreviewImage {  // partial image `index` (1-based) of a request
  uint64_t request = 0;
  int index = 0;
  at::Tensor image;  // uint8 [H, W, 3]
};
struct StageDone {  // the request left `stage`
  uint64_t request = 0;
  int stage = 0;
};
struct Steps {  // one batched call of a multi-step stage
  struct Item {
    uint64_t request = 0;
    int step = 0, total = 0;
  };
  int stage = 0;
  std::vector<Item> items;
};
struct Result {
  uint64_t request = 0;
  std::vector<int> trail;  // the rank that ran each stage
  at::Tensor image;        // uint8 [H, W, 3]
};
struct Failed {  // one request failed in a stage; the others go on
  uint64_t request = 0;
  int stage = 0;
  int rank = 0;
  std::string reason;
};
struct Error {  // a rank cannot go on
  int rank = 0;
  std::string what;
};
struct Cancel {
  uint64_t request = 0;
};
struct Shutdown {};
struct Heartbeat {};
struct Abort {
  std::string why;
};

Message encode(const Work& w);
Message encode(Work&& w);  // moves the tensors
Message encode(const StageDone& d);
Message encode(const Steps& s);
Message encode(const Result& r);
Message encode(const Failed& f);
Message encode(const Error& e);
Message encode(const Cancel& c);
Message encode(const Shutdown& s);
Message encode(const Heartbeat& h);
Message encode(const PreviewImage& p);
Message encode(const Abort& a);

// Each checks the kind and every field; throws diffpipe::Error naming m.src, the kind and the field.
Work decode_work(Message&& m);
StageDone decode_stage_done(const Message& m);
Steps decode_steps(const Message& m);
Result decode_result(Message&& m);
Failed decode_failed(const Message& m);
Error decode_error(const Message& m);
Cancel decode_cancel(const Message& m);
Abort decode_abort(const Message& m);
PreviewImage decode_preview(Message&& m);

}  // namespace diffpipe::wire
