#include "diffpipe/cluster/wire.h"

#include "diffpipe/runtime/error.h"

namespace diffpipe::wire {
namespace {

using json = nlohmann::json;

Message make(MsgKind k, uint64_t request, json fields) {
  Message m;
  m.kind = k;
  m.request = request;
  m.fields = std::move(fields);
  return m;
}

// Reads fields of one message; every error names the sender, the kind and the field.
class Reader {
 public:
  Reader(const Message& m, MsgKind want) : m_(m) {
    DP_CHECK(m.kind == want, "rank ", m.src, " sent a ", msg_kind_name(m.kind), " message where a ", msg_kind_name(want),
             " message was expected");
    DP_CHECK(m.fields.is_object(), where(), "its fields are not an object");
  }
  const json& at(const json& o, const char* k, const std::string& path) const {
    DP_CHECK(o.is_object() && o.contains(k), where(), "field '", path, "' is missing");
    return o[k];
  }
  int64_t integer(const json& o, const char* k, const std::string& path, int64_t lo, int64_t hi) const {
    const json& v = at(o, k, path);
    DP_CHECK(v.is_number_integer(), where(), "field '", path, "' must be an integer");
    const int64_t x = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
    DP_CHECK(x >= lo && x <= hi, where(), "field '", path, "' = ", x, " is out of range [", lo, ", ", hi, "]");
    return x;
  }
  uint64_t u64(const json& o, const char* k, const std::string& path) const {
    const json& v = at(o, k, path);
    DP_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0), where(), "field '", path,
             "' must be a non-negative integer");
    return v.get<uint64_t>();
  }
  double number(const json& o, const char* k, const std::string& path) const {
    const json& v = at(o, k, path);
    DP_CHECK(v.is_number(), where(), "field '", path, "' must be a number");
    return v.get<double>();
  }
  std::string str(const json& o, const char* k, const std::string& path) const {
    const json& v = at(o, k, path);
    DP_CHECK(v.is_string(), where(), "field '", path, "' must be a string");
    return v.get<std::string>();
  }
  std::vector<int> ints(const json& o, const char* k, const std::string& path) const {
    const json& v = at(o, k, path);
    DP_CHECK(v.is_array(), where(), "field '", path, "' must be a list of integers");
    std::vector<int> out;
    for (const auto& x : v) {
      DP_CHECK(x.is_number_integer() && x.get<int64_t>() >= -1 && x.get<int64_t>() < (1 << 24), where(), "field '",
               path, "' must be a list of rank numbers");
      out.push_back(x.get<int>());
    }
    return out;
  }
  std::vector<int> int_list(const json& o, const char* k, const std::string& path, int lo, int hi) const {
    const json& v = at(o, k, path);
    DP_CHECK(v.is_array(), where(), "field '", path, "' must be a list of integers");
    std::vector<int> out;
    for (const auto& x : v) {
      DP_CHECK(x.is_number_integer() && x.get<int64_t>() >= lo && x.get<int64_t>() <= hi, where(), "field '", path,
               "' must be a list of integers in [", lo, ", ", hi, "]");
      out.push_back(x.get<int>());
    }
    return out;
  }
  const json& f() const { return m_.fields; }
  std::string where() const { return detail::cat("rank ", m_.src, " sent a malformed ", msg_kind_name(m_.kind), " message: "); }

 private:
  const Message& m_;
};

json params_json(const GenerationParams& p) { return params_to_json(p); }

GenerationParams read_params(const Reader& r, const json& o) {
  GenerationParams p;
  p.prompt = r.str(o, "prompt", "params.prompt");
  p.negative_prompt = r.str(o, "negative_prompt", "params.negative_prompt");
  p.steps = static_cast<int>(r.integer(o, "steps", "params.steps", 1, 1 << 20));
  p.guidance = r.number(o, "guidance", "params.guidance");
  p.sampler = r.str(o, "sampler", "params.sampler");
  p.seed = r.u64(o, "seed", "params.seed");
  p.width = static_cast<int>(r.integer(o, "width", "params.width", 0, 1 << 20));
  p.height = static_cast<int>(r.integer(o, "height", "params.height", 0, 1 << 20));
  p.clip_skip = static_cast<int>(r.integer(o, "clip_skip", "params.clip_skip", 0, 1 << 10));
  p.previews = static_cast<int>(r.integer(o, "previews", "params.previews", 0, 3));
  p.prior_steps = static_cast<int>(r.integer(o, "prior_steps", "params.prior_steps", 1, 1 << 20));
  p.prior_guidance = r.number(o, "prior_guidance", "params.prior_guidance");
  p.noise_level = static_cast<int>(r.integer(o, "noise_level", "params.noise_level", 0, 1 << 20));
  p.image_prompt = r.str(o, "image_prompt", "params.image_prompt");
  if (o.contains("original_width")) {  // SDXL's size conditioning, sent only when set (params_to_json)
    p.original_width = static_cast<int>(r.integer(o, "original_width", "params.original_width", 0, 1 << 20));
    p.original_height = static_cast<int>(r.integer(o, "original_height", "params.original_height", 0, 1 << 20));
    p.crop_top = static_cast<int>(r.integer(o, "crop_top", "params.crop_top", 0, 1 << 20));
    p.crop_left = static_cast<int>(r.integer(o, "crop_left", "params.crop_left", 0, 1 << 20));
  }
  if (o.contains("sr_steps")) {  // DeepFloyd IF stage II, sent only when not the defaults
    p.sr_steps = static_cast<int>(r.integer(o, "sr_steps", "params.sr_steps", 1, 1 << 20));
    p.sr_guidance = r.number(o, "sr_guidance", "params.sr_guidance");
    p.sr_noise_level = static_cast<int>(r.integer(o, "sr_noise_level", "params.sr_noise_level", 0, 1 << 20));
  }
  if (o.contains("x4_steps")) {  // DeepFloyd IF stage III, sent only when not the defaults
    p.x4_steps = static_cast<int>(r.integer(o, "x4_steps", "params.x4_steps", 1, 1 << 20));
    p.x4_guidance = r.number(o, "x4_guidance", "params.x4_guidance");
    p.x4_noise_level = static_cast<int>(r.integer(o, "x4_noise_level", "params.x4_noise_level", 0, 1 << 20));
  }
  if (o.contains("strength")) p.strength = r.number(o, "strength", "params.strength");  // sent when not the default
  if (o.contains("aesthetic_score")) p.aesthetic_score = r.number(o, "aesthetic_score", "params.aesthetic_score");
  if (o.contains("ip_adapter_image")) {
    p.ip_adapter_image = r.str(o, "ip_adapter_image", "params.ip_adapter_image");
    p.ip_adapter_scale = r.number(o, "ip_adapter_scale", "params.ip_adapter_scale");
  }
  if (o.contains("negative_aesthetic_score"))
    p.negative_aesthetic_score = r.number(o, "negative_aesthetic_score", "params.negative_aesthetic_score");
  if (o.contains("refiner")) {
    DP_CHECK(o.at("refiner").is_boolean(), r.where(), "field 'params.refiner' must be true or false");
    p.skip_refiner = !o.at("refiner").get<bool>();
  }
  if (o.contains("guidance_rescale")) p.guidance_rescale = r.number(o, "guidance_rescale", "params.guidance_rescale");
  if (o.contains("true_cfg_scale")) p.true_cfg_scale = r.number(o, "true_cfg_scale", "params.true_cfg_scale");
  if (o.contains("skip_guidance_layers")) {  // SD3's skip-layer guidance, sent with its three numbers
    p.skip_guidance_layers = r.int_list(o, "skip_guidance_layers", "params.skip_guidance_layers", 0, 1 << 20);
    p.skip_layer_guidance_scale = r.number(o, "skip_layer_guidance_scale", "params.skip_layer_guidance_scale");
    p.skip_layer_guidance_start = r.number(o, "skip_layer_guidance_start", "params.skip_layer_guidance_start");
    p.skip_layer_guidance_stop = r.number(o, "skip_layer_guidance_stop", "params.skip_layer_guidance_stop");
  }
  if (o.contains("denoising_end")) p.denoising_end = r.number(o, "denoising_end", "params.denoising_end");
  if (o.contains("refiner_steps"))
    p.refiner_steps = static_cast<int>(r.integer(o, "refiner_steps", "params.refiner_steps", 0, 1 << 20));
  if (o.contains("refiner_strength")) p.refiner_strength = r.number(o, "refiner_strength", "params.refiner_strength");
  if (o.contains("mask")) p.mask = r.str(o, "mask", "params.mask");
  if (o.contains("lora")) p.lora = r.str(o, "lora", "params.lora");
  if (o.contains("guess_mode")) {
    DP_CHECK(o.at("guess_mode").is_boolean(), r.where(), "field 'params.guess_mode' must be true or false");
    p.guess_mode = o.at("guess_mode").get<bool>();
  }
  auto control = [&](const json& e, const std::string& path, const char* image, const char* scale, const char* start,
                     const char* end) {
    ControlInput c;
    c.image = r.str(e, image, path + "." + image);
    c.scale = r.number(e, scale, path + "." + scale);
    if (e.contains(start)) {
      c.start = r.number(e, start, path + "." + start);
      c.end = r.number(e, end, path + "." + end);
    }
    p.controls.push_back(c);
  };
  if (o.contains("control_image"))  // one ControlNet's (params_to_json)
    control(o, "params", "control_image", "control_scale", "control_start", "control_end");
  if (o.contains("controls")) {  // several
    const json& list = o.at("controls");
    DP_CHECK(list.is_array(), r.where(), "field 'params.controls' must be a list");
    for (size_t k = 0; k < list.size(); ++k) {
      DP_CHECK(list[k].is_object(), r.where(), "field 'params.controls' entries must be objects");
      control(list[k], "params.controls." + std::to_string(k), "image", "scale", "start", "end");
    }
  }
  return p;
}

json work_fields(const Work& w) {
  return {{"stage", w.stage}, {"params", params_json(w.params)}, {"route", w.route}, {"priority", w.priority},
          {"trail", w.trail}, {"preview", w.preview}};
}

}  // namespace

Message encode(const Work& w) {
  Message m = make(MsgKind::Work, w.request, work_fields(w));
  m.tensors = w.tensors;
  return m;
}
Message encode(Work&& w) {
  Message m = make(MsgKind::Work, w.request, work_fields(w));
  m.tensors = std::move(w.tensors);
  return m;
}
Message encode(const StageDone& d) { return make(MsgKind::StageDone, d.request, {{"stage", d.stage}}); }
Message encode(const Steps& s) {
  json items = json::array();
  for (const auto& i : s.items) items.push_back({i.request, i.step, i.total});
  return make(MsgKind::Steps, s.items.empty() ? 0 : s.items[0].request, {{"stage", s.stage}, {"items", items}});
}
Message encode(const Result& r) {
  Message m = make(MsgKind::Result, r.request, {{"trail", r.trail}});
  m.tensors.push_back(r.image);
  return m;
}
Message encode(const Failed& f) {
  return make(MsgKind::Failed, f.request, {{"stage", f.stage}, {"rank", f.rank}, {"reason", f.reason}});
}
Message encode(const Error& e) { return make(MsgKind::Error, 0, {{"rank", e.rank}, {"what", e.what}}); }
Message encode(const Cancel& c) { return make(MsgKind::Cancel, c.request, json::object()); }
Message encode(const Shutdown&) { return make(MsgKind::Shutdown, 0, json::object()); }
Message encode(const Heartbeat&) { return make(MsgKind::Heartbeat, 0, json::object()); }
Message encode(const PreviewImage& p) {
  Message m = make(MsgKind::Preview, p.request, {{"index", p.index}});
  m.tensors.push_back(p.image);
  return m;
}

PreviewImage decode_preview(Message&& m) {
  Reader r(m, MsgKind::Preview);
  PreviewImage p;
  p.request = m.request;
  p.index = static_cast<int>(r.integer(r.f(), "index", "index", 1, 3));
  DP_CHECK(m.tensors.size() == 1, r.where(), "expected one image tensor, got ", m.tensors.size());
  p.image = std::move(m.tensors[0]);
  DP_CHECK(p.image.dim() == 3 && p.image.size(2) == 3 && p.image.scalar_type() == at::kByte, r.where(),
           "the image must be uint8 [H, W, 3], got ", p.image.sizes());
  return p;
}
Message encode(const Abort& a) { return make(MsgKind::Abort, 0, {{"why", a.why}}); }

Work decode_work(Message&& m) {
  Reader r(m, MsgKind::Work);
  Work w;
  w.request = m.request;
  w.stage = static_cast<int>(r.integer(r.f(), "stage", "stage", 0, 1 << 10));
  w.params = read_params(r, r.at(r.f(), "params", "params"));
  w.route = r.ints(r.f(), "route", "route");
  DP_CHECK(w.stage < static_cast<int>(w.route.size()), r.where(), "field 'stage' = ", w.stage, " but the route has ",
           w.route.size(), " stages");
  w.priority = static_cast<int>(r.integer(r.f(), "priority", "priority", INT32_MIN, INT32_MAX));
  w.trail = r.ints(r.f(), "trail", "trail");
  w.preview = static_cast<int>(r.integer(r.f(), "preview", "preview", 0, 3));
  w.tensors = std::move(m.tensors);
  return w;
}

StageDone decode_stage_done(const Message& m) {
  Reader r(m, MsgKind::StageDone);
  return {m.request, static_cast<int>(r.integer(r.f(), "stage", "stage", 0, 1 << 10))};
}

Steps decode_steps(const Message& m) {
  Reader r(m, MsgKind::Steps);
  Steps s;
  s.stage = static_cast<int>(r.integer(r.f(), "stage", "stage", 0, 1 << 10));
  const json& items = r.at(r.f(), "items", "items");
  DP_CHECK(items.is_array(), r.where(), "field 'items' must be a list");
  for (const auto& it : items) {
    DP_CHECK(it.is_array() && it.size() == 3 && it[0].is_number_unsigned() && it[1].is_number_integer() &&
                 it[2].is_number_integer(),
             r.where(), "field 'items' must hold [request, step, total] triples");
    s.items.push_back({it[0].get<uint64_t>(), it[1].get<int>(), it[2].get<int>()});
  }
  return s;
}

Result decode_result(Message&& m) {
  Reader r(m, MsgKind::Result);
  Result res;
  res.request = m.request;
  res.trail = r.ints(r.f(), "trail", "trail");
  DP_CHECK(m.tensors.size() == 1, r.where(), "expected one image tensor, got ", m.tensors.size());
  res.image = std::move(m.tensors[0]);
  DP_CHECK(res.image.dim() == 3 && res.image.size(2) == 3 && res.image.scalar_type() == at::kByte, r.where(),
           "the image must be uint8 [H, W, 3], got ", res.image.sizes(), " ", res.image.scalar_type());
  return res;
}

Failed decode_failed(const Message& m) {
  Reader r(m, MsgKind::Failed);
  Failed f;
  f.request = m.request;
  f.stage = static_cast<int>(r.integer(r.f(), "stage", "stage", 0, 1 << 10));
  f.rank = static_cast<int>(r.integer(r.f(), "rank", "rank", 0, 1 << 24));
  f.reason = r.str(r.f(), "reason", "reason");
  return f;
}

Error decode_error(const Message& m) {
  Reader r(m, MsgKind::Error);
  return {static_cast<int>(r.integer(r.f(), "rank", "rank", 0, 1 << 24)), r.str(r.f(), "what", "what")};
}

Cancel decode_cancel(const Message& m) {
  Reader r(m, MsgKind::Cancel);
  return {m.request};
}

Abort decode_abort(const Message& m) {
  Reader r(m, MsgKind::Abort);
  return {r.str(r.f(), "why", "why")};
}

}  // namespace diffpipe::wire
