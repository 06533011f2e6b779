#include "diffpipe/runtime/message.h"

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/torch_tensor.h"

namespace diffpipe {

const char* msg_kind_name(MsgKind k) {
  switch (k) {
    case MsgKind::Work: return "work";
    case MsgKind::StageDone: return "stage-done";
    case MsgKind::Steps: return "steps";
    case MsgKind::Result: return "result";
    case MsgKind::Error: return "error";
    case MsgKind::Shutdown: return "shutdown";
    case MsgKind::Abort: return "abort";
    case MsgKind::Failed: return "failed";
    case MsgKind::Cancel: return "cancel";
    case MsgKind::Heartbeat: return "heartbeat";
    case MsgKind::Preview: return "preview";
    case MsgKind::Test: return "test";
  }
  return "?";
}

size_t TensorSpec::nbytes() const {
  size_t n = c10::elementSize(dtype);
  for (auto s : shape) n *= static_cast<size_t>(s);
  return n;
}

std::vector<uint8_t> encode_header(const Message& m, const std::vector<bool>& via_device) {
  nlohmann::json h;
  h["v"] = kWireVersion;
  h["k"] = static_cast<int32_t>(m.kind);
  h["r"] = m.request;
  h["s"] = m.step;
  h["f"] = m.fields;
  nlohmann::json ts = nlohmann::json::array();
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const auto& t = m.tensors[i];
    DP_CHECK(t.defined(), "message ", msg_kind_name(m.kind), " request ", m.request, ": undefined tensor");
    nlohmann::json e = {{"d", dtype_name(from_scalar_type(t.scalar_type()))}, {"sh", t.sizes().vec()}};
    if (i < via_device.size() && via_device[i]) e["v"] = true;
    ts.push_back(e);
  }
  h["t"] = ts;
  return nlohmann::json::to_cbor(h);
}

std::vector<TensorSpec> decode_header(const uint8_t* data, size_t n, Message* m) {
  nlohmann::json h;
  try {
    h = nlohmann::json::from_cbor(data, data + n);
    const int32_t v = h.value("v", 0);
    DP_CHECK(v == kWireVersion, "message from rank ", m->src, ": wire format version ", v, ", this build reads ",
             kWireVersion, " (every rank must run the same diffpipe build)");
    m->kind = static_cast<MsgKind>(h.at("k").get<int32_t>());
    m->request = h.at("r").get<uint64_t>();
    m->step = h.at("s").get<int32_t>();
    m->fields = h.at("f");
    std::vector<TensorSpec> specs;
    for (const auto& t : h.at("t")) {
      DType d;
      DP_CHECK(parse_dtype(t.at("d").get<std::string>(), &d), "unknown dtype");
      specs.push_back({to_scalar_type(d, "message"), t.at("sh").get<std::vector<int64_t>>(), t.value("v", false)});
    }
    return specs;
  } catch (const nlohmann::json::exception& e) {
    DP_FAIL("message from rank ", m->src, ": malformed header (", n, " bytes): ", e.what());
  }
}

}  // namespace diffpipe
