// What travels between ranks: a small header (format version, kind, request id, step, fields) plus tensor
// payloads. Every MPI tag lives in the one Tag enum. Header encoding is CBOR (compact, binary-safe).
// Thread-safety: value type. Tensors are shared (not copied) when a message is moved between threads.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace diffpipe {

// The kinds of message the pipeline runner exchanges; each has one typed struct with its encoding in
// cluster/wire.h (nothing reads `fields` by hand). kWireVersion changes whenever any of them changes.
enum class MsgKind : int32_t {
  Work = 1,       // coordinator or stage -> stage: a request for stage k, with the previous stage's tensors
  StageDone = 2,  // stage -> coordinator: a request left stage k
  Steps = 3,      // multi-step stage -> coordinator: where each request of one batched call is (step k of N)
  Result = 4,     // last stage -> coordinator: the image
  Error = 5,      // any -> coordinator: the rank cannot go on (the job ends)
  Shutdown = 6,   // coordinator -> all: drain and exit
  Abort = 7,      // coordinator -> all: exit non-zero now
  Failed = 8,     // stage -> coordinator: one request failed (the others go on)
  Cancel = 9,     // coordinator -> the ranks on a request's route: drop it
  Heartbeat = 10, // coordinator -> other ranks, every few seconds: rank 0 is alive (long idle runs)
  Preview = 11,   // decoder -> coordinator: a partial image of a request (the denoised estimate on the way)
  Test = 100,     // transport tests
};
constexpr int32_t kWireVersion = 6;
const char* msg_kind_name(MsgKind k);

// All MPI tags used by diffpipe.
enum class Tag : int { Header = 11, Payload = 12, NcclBootstrap = 13 };

struct Message {
  MsgKind kind = MsgKind::Test;
  int src = -1;            // filled in by the receiving transport
  uint64_t request = 0;
  int32_t step = 0;
  nlohmann::json fields = nlohmann::json::object();
  std::vector<at::Tensor> tensors;
};

// Header bytes (kind, request, step, fields, and each tensor's dtype + shape).
// via_device[i]: tensor i travels over the device transport (NCCL) rather than as an MPI payload.
std::vector<uint8_t> encode_header(const Message& m, const std::vector<bool>& via_device = {});
// Parses a header; fills kind/request/step/fields and returns the tensor specs. Throws on malformed input.
struct TensorSpec {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  bool via_device = false;
  size_t nbytes() const;
};
std::vector<TensorSpec> decode_header(const uint8_t* data, size_t n, Message* m);

}  // namespace diffpipe
