// What travels between ranks: a small header (kind, request id, step, free-form fields as JSON) plus tensor
// payloads. Every MPI tag lives in the one Tag enum. Header encoding is CBOR (compact, binary-safe).
// Thread-safety: value type. Tensors are shared (not copied) when a message is moved between threads.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace diffpipe {

enum class MsgKind : int32_t {
  Encode = 1,    // coordinator -> encoder: a request to encode (header: params, route)
  Denoise = 2,   // encoder -> denoiser: embeddings [cond, (uncond)]
  Decode = 3,    // denoiser -> decoder: final latents [C, h, w]
  Result = 4,    // decoder (or upscaler) -> coordinator: image uint8 [H, W, 3]
  Error = 5,     // any -> coordinator: {rank, stage, request, what}
  Shutdown = 6,  // coordinator -> all: drain and exit
  Abort = 7,     // coordinator -> all: exit non-zero now
  Progress = 8,  // stage -> coordinator: {event: "encoded" | "denoised"}
  Cancel = 9,    // coordinator -> the ranks on a request's route: drop it
  Upscale = 10,  // decoder -> upscaler: base-resolution image uint8 [h, w, 3]
  Test = 100,    // transport tests
};
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
