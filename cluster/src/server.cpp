#include "diffpipe/cluster/server.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <chrono>
#include <cmath>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "diffpipe/cluster/form_data.h"
#include "diffpipe/cluster/offline.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"

namespace diffpipe {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using json = nlohmann::json;


json error_body(const std::string& message, const std::string& type, const json& param, const std::string& code) {
  return {{"error", {{"message", message}, {"type", type}, {"param", param}, {"code", code}}}};
}

// A request the client got wrong: 400 naming the field.
struct BadRequest {
  std::string message, param;
  int status = 400;
};

const double kBuckets[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};

// The routes that make images: text only, an image edited under a prompt, variations of an image (no prompt).
enum class Route { Generations, Edits, Variations };

// An uploaded form (images.edit / images.create_variation) as the JSON object the generations route reads: the image
// file parts (image, mask, control_image) become data URIs of their bytes, numeric and boolean fields are typed.
std::string form_to_json(const std::string& body, const std::string& content_type) {
  std::vector<FormPart> parts;
  try {
    parts = parse_form_data(body, form_boundary(content_type));
  } catch (const std::exception& e) {
    throw BadRequest{e.what(), ""};
  }
  static const std::set<std::string> integers{"n", "num_inference_steps", "seed", "partial_images", "width", "height",
                                              "noise_level", "refiner_steps", "prior_num_inference_steps"};
  static const std::set<std::string> numbers{"guidance_scale", "strength", "controlnet_conditioning_scale",
                                             "control_guidance_start", "control_guidance_end", "aesthetic_score",
                                             "negative_aesthetic_score", "ip_adapter_scale", "denoising_end",
                                             "refiner_strength", "guidance_rescale", "prior_guidance_scale",
                                             "true_cfg_scale", "skip_layer_guidance_scale",
                                             "skip_layer_guidance_start", "skip_layer_guidance_stop"};
  // several ControlNets: these fields may come once per ControlNet (in --controlnet order) and become a list
  static const std::set<std::string> per_controlnet{"control_image", "controlnet_conditioning_scale",
                                                    "control_guidance_start", "control_guidance_end"};
  json j = json::object();
  for (const FormPart& p : parts) {
    const std::string name = p.name == "image[]" ? "image" : p.name == "control_image[]" ? "control_image" : p.name;
    if (j.contains(name) && !per_controlnet.count(name))
      throw BadRequest{name == "image" ? "one image per request" : "field '" + name + "' given twice", name};
    json v;
    if (name == "image" || name == "mask" || name == "control_image" || name == "ip_adapter_image") {
      // a file part carries the PNG's bytes; a text field may carry base64 or a data URI
      v = p.filename.empty() && p.content_type.empty()
              ? p.value
              : "data:image/png;base64," + base64_encode(std::vector<uint8_t>(p.value.begin(), p.value.end()));
    } else if (integers.count(name) || numbers.count(name)) {
      size_t used = 0;
      bool ok = !p.value.empty();
      double d = 0;
      long long i = 0;
      try {
        if (integers.count(name)) i = std::stoll(p.value, &used);
        else d = std::stod(p.value, &used);
      } catch (const std::exception&) {
        ok = false;
      }
      if (!ok || used != p.value.size())
        throw BadRequest{"'" + name + "' must be " + (integers.count(name) ? "an integer" : "a number") + ", got \"" +
                             p.value.substr(0, 40) + "\"", name};
      if (integers.count(name)) v = i;
      else v = d;
    } else if (name == "stream") {
      if (p.value != "true" && p.value != "false") throw BadRequest{"'stream' must be true or false", "stream"};
      v = p.value == "true";
    } else {
      v = p.value;
    }
    if (!j.contains(name)) {
      j[name] = std::move(v);
      continue;
    }
    if (!j[name].is_array()) j[name] = json::array({j[name]});
    j[name].push_back(std::move(v));
  }
  return j.dump();
}

}  // namespace

struct ImageServer::Impl {
  ServerOptions o;
  net::io_context ioc;
  tcp::acceptor acceptor{ioc};
  std::vector<std::thread> threads;
  std::atomic<bool> stopping{false}, ready{false};
  std::atomic<uint64_t> next_id{1};
  // Responses decided but not yet written (posted to a session, or its write in progress): the destructor lets
  // them reach their clients before the io_context stops.
  std::atomic<int> unwritten{0};

  struct Session;
  struct Job {  // one HTTP request: n images
    std::shared_ptr<Session> session;
    std::vector<uint64_t> ids;
    std::vector<std::optional<GeneratedImage>> results;
    size_t remaining = 0;
    bool answered = false;
    int prompt_tokens = 0;
    bool stream = false;  // server-sent events: partial images, then the completed image
    std::string size;     // "WxH", for the events
  };

  std::mutex mu;  // everything below
  std::deque<FeedItem> arrivals;
  std::vector<uint64_t> cancels;
  std::map<uint64_t, std::pair<std::shared_ptr<Job>, size_t>> waiting;  // image id -> (job, index in it)
  size_t jobs_open = 0, queued = 0, active = 0;
  std::map<std::string, uint64_t> responses;  // by HTTP status
  std::map<std::string, uint64_t> images;     // by outcome
  std::map<std::string, uint64_t> failures;   // by reason (failed requests)
  uint64_t latency_count = 0;
  double latency_sum = 0;
  uint64_t latency_buckets[sizeof(kBuckets) / sizeof(kBuckets[0])] = {};

  void count_response(int status) {
    std::lock_guard<std::mutex> lk(mu);
    ++responses[std::to_string(status)];
  }
  std::string metrics_text();
  void answer(const std::shared_ptr<Job>& job);  // mu held
  void accept();
};

// One connection: read a request, answer it (possibly after the pipeline made its images), repeat while
// keep-alive. A client that disconnects while waiting has its images cancelled.
struct ImageServer::Impl::Session : std::enable_shared_from_this<Session> {
  Session(tcp::socket s, Impl& impl) : stream(std::move(s)), impl(impl) {}
  ~Session() { answered(); }
  beast::tcp_stream stream;
  Impl& impl;
  net::steady_timer read_timer{stream.get_executor()};
  bool reading = false, timed_out = false;
  beast::flat_buffer buffer;
  std::optional<http::request_parser<http::string_body>> parser;
  bool keep_alive = false;
  bool waiting_result = false;
  bool owes_answer = false;  // a decided answer is being written: counted in impl.unwritten until written
  void answered() {
    if (owes_answer) {
      owes_answer = false;
      --impl.unwritten;
    }
  }
  std::shared_ptr<Job> job;

  // A client has read_timeout_s to send a whole request (our own timer: the stream's timeout would close the
  // socket before we could answer 408).
  void read() {
    parser.emplace();
    parser->body_limit(impl.o.max_body);
    stream.expires_never();
    reading = true;
    timed_out = false;
    read_timer.expires_after(std::chrono::milliseconds(static_cast<int64_t>(impl.o.read_timeout_s * 1000)));
    read_timer.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || !self->reading) return;
      self->timed_out = true;
      beast::error_code ec2;
      self->stream.socket().cancel(ec2);
    });
    http::async_read(stream, buffer, *parser, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->reading = false;
      self->read_timer.cancel();
      if (self->timed_out) {
        if (!self->parser->got_some() && self->buffer.size() == 0) return self->close();  // an idle keep-alive
        ec = beast::error::timeout;
      }
      self->on_read(ec);
    });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::body_limit) return send_json(413, error_body("request body larger than " + std::to_string(impl.o.max_body) + " bytes", "invalid_request_error", nullptr, "body_too_large"), false);
    if (ec == beast::error::timeout) return send_json(408, error_body("the request was not received within " + std::to_string(impl.o.read_timeout_s) + " s", "invalid_request_error", nullptr, "request_timeout"), false);
    if (ec) return close();  // end of stream, reset, malformed HTTP
    stream.expires_never();
    const auto& req = parser->get();
    keep_alive = req.keep_alive();
    const std::string target(req.target());
    const std::string path = target.substr(0, target.find('?'));
    if (req.method() == http::verb::get && path == "/healthz") {
      const bool ok = impl.ready && !impl.stopping;
      return send_json(ok ? 200 : 503, {{"status", ok ? "ok" : impl.stopping ? "stopping" : "starting"}}, keep_alive);
    }
    if (req.method() == http::verb::get && path == "/v1/models") {
      json m = {{"id", impl.o.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "diffpipe"}};
      if (!impl.o.lora_adapters.empty()) m["lora_adapters"] = impl.o.lora_adapters;  // what "lora" may name
      if (!impl.o.embedding_tokens.empty()) m["embedding_tokens"] = impl.o.embedding_tokens;
      if (impl.o.controlnets > 0) m["controlnets"] = impl.o.controlnets;
      if (impl.o.ip_adapter) m["ip_adapter"] = true;  // requests may bring ip_adapter_image
      if (!impl.o.refiner.empty()) m["refiner"] = impl.o.refiner;  // requests may set denoising_end, refiner_steps
      return send_json(200, {{"object", "list"}, {"data", json::array({m})}}, keep_alive);
    }
    if (req.method() == http::verb::get && path == "/metrics") return send_text(200, impl.metrics_text(), "text/plain; version=0.0.4");
    const Route route = path == "/v1/images/edits" ? Route::Edits : path == "/v1/images/variations" ? Route::Variations
                                                                                                     : Route::Generations;
    if (path == "/v1/images/generations" || route != Route::Generations) {
      if (req.method() != http::verb::post)
        return send_json(405, error_body("use POST", "invalid_request_error", nullptr, "method_not_allowed"), keep_alive);
      const std::string type(req[http::field::content_type]);
      if (route == Route::Generations || type.rfind("multipart/", 0) != 0) return generate(req.body(), route);
      std::string body;
      try {  // an uploaded form: the image as a file
        body = form_to_json(req.body(), type);
      } catch (const BadRequest& b) {
        return send_json(b.status, error_body(b.message, "invalid_request_error", b.param.empty() ? json(nullptr) : json(b.param), "invalid_value"), keep_alive);
      }
      return generate(body, route);
    }
    send_json(404, error_body("no route " + std::string(req.method_string()) + " " + path, "invalid_request_error", nullptr, "not_found"), keep_alive);
  }

  void generate(const std::string& body, Route route) {
    std::vector<GenerationParams> params;
    int tokens = 0;
    bool streaming = false;
    std::string size_text;
    try {
      params = parse(body, route, &tokens, &streaming, &size_text);
    } catch (const BadRequest& b) {
      return send_json(b.status, error_body(b.message, "invalid_request_error", b.param.empty() ? json(nullptr) : json(b.param), "invalid_value"), keep_alive);
    }
    if (impl.stopping)
      return send_json(503, error_body("the server is shutting down", "server_error", nullptr, "shutting_down"), false);
    job = std::make_shared<Job>();
    job->session = shared_from_this();
    job->results.resize(params.size());
    job->remaining = params.size();
    job->prompt_tokens = tokens;
    job->stream = streaming;
    job->size = size_text;
    {
      std::lock_guard<std::mutex> lk(impl.mu);
      ++impl.jobs_open;
      for (size_t k = 0; k < params.size(); ++k) {
        FeedItem f;
        f.id = impl.next_id++;
        f.params = params[k];
        f.meta.deadline_s = impl.o.request_timeout_s;
        job->ids.push_back(f.id);
        impl.waiting[f.id] = {job, k};
        impl.arrivals.push_back(std::move(f));
      }
    }
    waiting_result = true;
    watch_disconnect();
  }

  // Readable while we wait for the images: either the next pipelined request, or the client went away.
  void watch_disconnect() {
    stream.socket().async_wait(tcp::socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
      if (ec || !self->waiting_result) return;
      char c;
      beast::error_code ec2;
      self->stream.socket().non_blocking(true, ec2);  // never block a server thread on the peek
      const size_t n = self->stream.socket().receive(net::buffer(&c, 1), tcp::socket::message_peek, ec2);
      if (ec2 == net::error::would_block || ec2 == net::error::try_again) return self->watch_disconnect();
      if (n == 0 || ec2) {  // end of stream: the client left; cancel its images everywhere
        std::lock_guard<std::mutex> lk(self->impl.mu);
        if (self->job && !self->job->answered) {
          self->job->answered = true;
          --self->impl.jobs_open;
          for (uint64_t id : self->job->ids)
            if (self->impl.waiting.count(id)) self->impl.cancels.push_back(id);
          ++self->impl.responses["client closed"];
        }
        return;
      }
    });
  }

  // Server-sent events: the head once, then each event as it comes, in order; the connection closes after the
  // last one (the body ends with the connection).
  std::deque<std::string> out_queue;
  bool writing = false, sse_started = false, close_after = false;
  void sse(std::string event_text, bool last) {  // on the session's executor
    if (!sse_started) {
      sse_started = true;
      impl.count_response(200);
      out_queue.push_back("HTTP/1.1 200 OK\r\nServer: diffpipe\r\nContent-Type: text/event-stream\r\n"
                          "Cache-Control: no-cache\r\nConnection: close\r\n\r\n");
    }
    out_queue.push_back(std::move(event_text));
    close_after = close_after || last;
    pump();
  }
  void pump() {
    if (writing) return;
    if (out_queue.empty()) {
      if (close_after) close();
      return;
    }
    writing = true;
    auto data = std::make_shared<std::string>(std::move(out_queue.front()));
    out_queue.pop_front();
    net::async_write(stream.socket(), net::buffer(*data), [self = shared_from_this(), data](beast::error_code ec, size_t) {
      self->writing = false;
      if (ec) return self->close();
      self->pump();
    });
  }

  std::vector<GenerationParams> parse(const std::string& body, Route route, int* tokens, bool* streaming,
                                      std::string* size_text) {
    json j;
    try {
      j = json::parse(body);
    } catch (const std::exception& e) {
      throw BadRequest{std::string("the body is not valid JSON: ") + e.what(), ""};
    }
    if (!j.is_object()) throw BadRequest{"the body must be a JSON object", ""};
    static const std::set<std::string> used{"prompt", "n", "size", "response_format", "output_format", "user", "model",
                                            "negative_prompt", "num_inference_steps", "guidance_scale", "seed",
                                            "sampler", "width", "height", "stream", "partial_images", "image",
                                            "strength", "noise_level", "mask", "control_image",
                                            "controlnet_conditioning_scale", "control_guidance_start",
                                            "control_guidance_end", "lora", "guess_mode", "aesthetic_score",
                                            "negative_aesthetic_score", "ip_adapter_image", "ip_adapter_scale",
                                            "denoising_end", "refiner_steps", "refiner_strength", "guidance_rescale",
                                            "refiner", "prior_num_inference_steps", "prior_guidance_scale",
                                            "true_cfg_scale", "skip_guidance_layers", "skip_layer_guidance_scale",
                                            "skip_layer_guidance_start", "skip_layer_guidance_stop"};
    static const std::set<std::string> ignored{"quality", "style", "background", "moderation", "output_compression"};
    for (auto& [k, v] : j.items())
      if (!used.count(k) && !ignored.count(k)) throw BadRequest{"unknown field '" + k + "'", k};
    auto str = [&](const char* k) -> std::optional<std::string> {
      if (!j.contains(k) || j[k].is_null()) return std::nullopt;
      if (!j[k].is_string()) throw BadRequest{std::string("'") + k + "' must be a string", k};
      return j[k].get<std::string>();
    };
    auto integer = [&](const char* k, int64_t lo, int64_t hi) -> std::optional<int64_t> {
      if (!j.contains(k) || j[k].is_null()) return std::nullopt;
      if (!j[k].is_number_integer()) throw BadRequest{std::string("'") + k + "' must be an integer", k};
      const int64_t v = j[k].get<int64_t>();
      if (v < lo || v > hi)
        throw BadRequest{std::string("'") + k + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v), k};
      return v;
    };
    auto number = [&](const char* k, const char* range) -> std::optional<double> {  // range: "" or " in [0, 1]"
      if (!j.contains(k) || j[k].is_null()) return std::nullopt;
      if (!j[k].is_number()) throw BadRequest{std::string("'") + k + "' must be a number" + range, k};
      return j[k].get<double>();
    };
    // an image (a PNG as a data URI or bare base64): it travels inline with the request, never a path on the server
    auto image_ref = [&](const char* k) -> std::optional<std::string> {
      const auto s = str(k);
      if (!s || s->empty()) return std::nullopt;
      return is_data_uri(*s) ? *s : "data:image/png;base64," + *s;
    };
    // variations: an image and no prompt (Stable unCLIP's image embedding); edits: an image under a prompt
    if (route != Route::Generations && !(j.contains("image") && j["image"].is_string() && !j["image"].empty()))
      throw BadRequest{std::string("'image' is required: the PNG to ") + (route == Route::Edits ? "edit" : "vary") +
                           " (a file in a multipart form, or base64 / a data URI in JSON)", "image"};
    if (route == Route::Variations && !impl.o.image_variations)
      throw BadRequest{"this model makes no image variations (a Stable unCLIP folder with image_encoder/ does; "
                       "/v1/images/edits takes an image and a prompt)", "image"};
    if (route == Route::Variations && j.contains("prompt"))
      throw BadRequest{"variations take no prompt (use /v1/images/edits to guide an image by a prompt)", "prompt"};
    const auto prompt = route == Route::Variations ? std::optional<std::string>("") : str("prompt");
    if (route != Route::Variations && (!prompt || prompt->empty())) throw BadRequest{"'prompt' is required", "prompt"};
    if (prompt->size() > 32000) throw BadRequest{"'prompt' is longer than 32000 characters", "prompt"};
    if (j.contains("stream") && !j["stream"].is_boolean()) throw BadRequest{"'stream' must be true or false", "stream"};
    *streaming = j.value("stream", false);
    const int partial = static_cast<int>(integer("partial_images", 0, 3).value_or(0));
    if (partial > 0 && !*streaming) throw BadRequest{"'partial_images' needs stream: true", "partial_images"};
    const auto fmt = str("response_format");
    if (fmt && *fmt != "b64_json") throw BadRequest{"response_format '" + *fmt + "' is not supported: use b64_json", "response_format"};
    const auto ofmt = str("output_format");
    if (ofmt && *ofmt != "png") throw BadRequest{"output_format '" + *ofmt + "' is not supported: use png", "output_format"};
    (void)str("user");
    (void)str("model");
    const int n = static_cast<int>(integer("n", 1, impl.o.max_n).value_or(1));
    if (*streaming && n != 1) throw BadRequest{"streaming makes one image: 'n' must be 1 with stream: true", "n"};
    GenerationParams p = impl.o.defaults;
    p.previews = partial;
    p.prompt = *prompt;
    p.negative_prompt = str("negative_prompt").value_or(p.negative_prompt);
    p.steps = static_cast<int>(integer("num_inference_steps", 1, 1000).value_or(p.steps));
    p.guidance = number("guidance_scale", "").value_or(p.guidance);
    p.sampler = str("sampler").value_or(p.sampler);
    // the x4 upscaler's input noise level, Stable unCLIP's image-embedding noise augmentation (checked by the model)
    p.noise_level = static_cast<int>(integer("noise_level", 0, 1 << 20).value_or(p.noise_level));
    if (const auto s = number("strength", " in [0, 1]")) {  // image-to-image (with an image)
      p.strength = *s;
      if (!(p.strength >= 0 && p.strength <= 1)) throw BadRequest{"'strength' must be in [0, 1]", "strength"};
    }
    for (const auto& [key, v] : {std::pair<const char*, double*>{"aesthetic_score", &p.aesthetic_score},
                                 {"negative_aesthetic_score", &p.negative_aesthetic_score}})
      if (const auto s = number(key, " >= 0")) {  // the SDXL refiner's (checked against the model later)
        *v = *s;
        if (!(*v >= 0)) throw BadRequest{std::string("'") + key + "' must be a number >= 0", key};
      }
    for (const auto& [key, v] : {std::pair<const char*, double*>{"denoising_end", &p.denoising_end},
                                 {"refiner_strength", &p.refiner_strength}})
      if (const auto s = number(key, " in (0, 1]")) {  // the SDXL refiner's (checked against the model later)
        *v = *s;
        if (!(*v > 0 && *v <= 1)) throw BadRequest{std::string("'") + key + "' must be a number in (0, 1]", key};
      }
    p.refiner_steps = static_cast<int>(integer("refiner_steps", 0, 1000).value_or(p.refiner_steps));
    // the diffusion prior's (Stable unCLIP, Kandinsky 2.2; diffusers' combined pipelines' names; checked by the model)
    p.prior_steps = static_cast<int>(integer("prior_num_inference_steps", 1, 1000).value_or(p.prior_steps));
    p.prior_guidance = number("prior_guidance_scale", "").value_or(p.prior_guidance);
    if (const auto s = number("guidance_rescale", " in [0, 1]")) {  // diffusers' guidance_rescale
      p.guidance_rescale = *s;
      if (!(p.guidance_rescale >= 0 && p.guidance_rescale <= 1))
        throw BadRequest{"'guidance_rescale' must be in [0, 1]", "guidance_rescale"};
    }
    if (const auto s = number("true_cfg_scale", "")) p.true_cfg_scale = *s;  // FLUX.1's true CFG (checked by the model)
    if (j.contains("skip_guidance_layers") && !j["skip_guidance_layers"].is_null()) {  // SD3's skip-layer guidance
      const json& v = j["skip_guidance_layers"];
      if (!v.is_array()) throw BadRequest{"'skip_guidance_layers' must be a list of integers", "skip_guidance_layers"};
      p.skip_guidance_layers.clear();
      for (const json& x : v) {
        if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > (1 << 20))
          throw BadRequest{"'skip_guidance_layers' must be a list of integers >= 0", "skip_guidance_layers"};
        p.skip_guidance_layers.push_back(x.get<int>());
      }
    }
    for (const auto& [key, v] : {std::pair<const char*, double*>{"skip_layer_guidance_scale", &p.skip_layer_guidance_scale},
                                 {"skip_layer_guidance_start", &p.skip_layer_guidance_start},
                                 {"skip_layer_guidance_stop", &p.skip_layer_guidance_stop}})
      if (const auto s = number(key, "")) *v = *s;  // (checked by the model)
    if (const auto ip = image_ref("ip_adapter_image")) p.ip_adapter_image = *ip;  // IP-Adapter's image prompt
    if (const auto s = number("ip_adapter_scale", "")) p.ip_adapter_scale = *s;
    if (j.contains("refiner")) {  // false: this request skips the server's refiner
      if (!j["refiner"].is_boolean()) throw BadRequest{"'refiner' must be true or false", "refiner"};
      p.skip_refiner = !j["refiner"].get<bool>();
    }
    if (j.contains("guess_mode")) {  // ControlNets' guess mode
      if (!j["guess_mode"].is_boolean()) throw BadRequest{"'guess_mode' must be true or false", "guess_mode"};
      p.guess_mode = j["guess_mode"].get<bool>();
    }
    if (j.contains("lora")) {  // per-request LoRA adapters of the server (--lora-adapters)
      try {
        p.lora = offline::lora_field(j["lora"], "'lora'");
      } catch (const std::exception& e) {
        throw BadRequest{e.what(), "lora"};
      }
    }
    {  // ControlNets' conditioning images (inline PNGs) and settings: a value, or a list with one per ControlNet
      static const char* keys[4] = {"control_image", "controlnet_conditioning_scale", "control_guidance_start",
                                    "control_guidance_end"};
      std::optional<json> images;
      if (j.contains(keys[0]) && !j[keys[0]].is_null()) {
        images = j[keys[0]];
        auto inline_png = [](json& e) {
          if (e.is_string() && !e.get<std::string>().empty() && !is_data_uri(e.get<std::string>()))
            e = "data:image/png;base64," + e.get<std::string>();
          else if (e.is_string() && e.get<std::string>().empty())
            e = nullptr;
        };
        if (images->is_array()) for (auto& e : *images) inline_png(e);
        else inline_png(*images);
        if (images->is_null()) images.reset();
      }
      auto at = [&](int k) { return j.contains(keys[k]) && !j[keys[k]].is_null() ? &j[keys[k]] : nullptr; };
      try {
        p.controls = offline::control_fields(p.controls, {images ? &*images : nullptr, at(1), at(2), at(3)},
                                             {keys[0], keys[1], keys[2], keys[3]}, "request");
      } catch (const std::exception& e) {
        const std::string msg = e.what();
        std::string param = keys[0];
        for (const char* k : keys)
          if (msg.find(std::string("'") + k + "'") != std::string::npos) param = k;
        throw BadRequest{msg, param};
      }
    }
    if (const auto m = image_ref("mask")) {  // inpainting: white repainted, black kept
      if (route != Route::Edits) throw BadRequest{"a mask goes with /v1/images/edits (inpainting)", "mask"};
      p.mask = *m;
    }
    // an input image: image-to-image's start, the x4 upscaler's input, Stable unCLIP's image prompt
    p.image_prompt = image_ref("image").value_or(p.image_prompt);
    std::string size_param;
    if (const auto size = str("size"); size && *size != "auto") {
      int w = 0, h = 0;
      char x = 0, extra = 0;
      if (std::sscanf(size->c_str(), "%d%c%d%c", &w, &x, &h, &extra) != 3 || x != 'x' || w <= 0 || h <= 0)
        throw BadRequest{"'size' must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\", got \"" + *size + "\"", "size"};
      p.width = w;
      p.height = h;
      size_param = "size";
    }
    if (auto w = integer("width", 1, 8192)) p.width = static_cast<int>(*w), size_param = "width";
    if (auto h = integer("height", 1, 8192)) p.height = static_cast<int>(*h), size_param = size_param.empty() ? "height" : size_param;
    std::optional<uint64_t> seed;
    if (j.contains("seed") && !j["seed"].is_null()) {
      if (!j["seed"].is_number_unsigned()) throw BadRequest{"'seed' must be a non-negative integer", "seed"};
      seed = j["seed"].get<uint64_t>();
    }
    if (!seed) {
      static std::mutex rng_mu;
      static std::mt19937_64 rng{std::random_device{}()};
      std::lock_guard<std::mutex> lk(rng_mu);
      seed = rng() >> 16;
    }
    try {
      if (impl.o.validate) impl.o.validate(p);
    } catch (const std::exception& e) {
      const std::string msg = e.what();
      std::string field = msg.substr(0, msg.find(':'));
      field = field.substr(0, field.find(" (entry "));  // one of several ControlNets' fields
      std::string param = field == "width" || field == "height" || field == "width/height" ? (size_param.empty() ? "size" : size_param)
                          : field == "steps" ? "num_inference_steps" : field == "guidance" ? "guidance_scale"
                          : field == "control_scale" ? "controlnet_conditioning_scale"
                          : field == "control_start/control_end" ? "control_guidance_start"
                          : field == "image_prompt" || field == "an inline image" || field.rfind("an inline image must", 0) == 0
                              ? "image" : field;
      throw BadRequest{msg, param};
    }
    *tokens = impl.o.count_tokens ? impl.o.count_tokens(p.prompt) : 0;
    *size_text = std::to_string(p.width) + "x" + std::to_string(p.height);
    std::vector<GenerationParams> out;
    for (int k = 0; k < n; ++k) {  // the images of one request: seeds s, s + 1, ... as `generate --images n`
      GenerationParams q = p;
      q.seed = *seed + static_cast<uint64_t>(k);
      out.push_back(q);
    }
    return out;
  }

  void send_json(int status, const json& body, bool keep) { send_text(status, body.dump(), "application/json", keep); }
  void send_text(int status, std::string body, const std::string& type, bool keep = true,
                 const std::string& retry_after = "") {
    impl.count_response(status);
    auto res = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(status), 11);
    res->set(http::field::server, "diffpipe");
    res->set(http::field::content_type, type);
    if (!retry_after.empty()) res->set(http::field::retry_after, retry_after);
    res->keep_alive(keep && !impl.stopping);
    res->body() = std::move(body);
    res->prepare_payload();
    stream.expires_after(std::chrono::seconds(30));
    http::async_write(stream, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      self->answered();
      if (ec || !res->keep_alive()) return self->close();
      self->read();
    });
  }

  void close() {
    answered();  // written, or it never will be
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream.socket().close(ec);
  }
};

void ImageServer::Impl::answer(const std::shared_ptr<Job>& job) {
  // mu held: decide the response from the outcomes; the session writes it on its own executor
  job->answered = true;
  --jobs_open;
  int status = 200;
  json body;
  std::string retry;
  for (const auto& r : job->results) {
    if (!r || r->status == "done") continue;
    if (r->status == "rejected") {
      status = 429, retry = "1";
      body = error_body("the server is at capacity (admission queue full); retry later", "rate_limit_error", nullptr, "queue_full");
    } else if (r->status == "timed out") {
      status = 504;
      body = error_body("the request took longer than " + std::to_string(o.request_timeout_s) + " s: " + r->reason, "timeout_error", nullptr, "timeout");
    } else {
      status = 500;
      body = error_body("image generation failed: " + r->reason, "server_error", nullptr, r->status == "failed" ? "generation_failed" : "cancelled");
    }
    break;
  }
  const json usage = {{"input_tokens", job->prompt_tokens}, {"output_tokens", 0}, {"total_tokens", job->prompt_tokens},
                      {"input_tokens_details", {{"text_tokens", job->prompt_tokens}, {"image_tokens", 0}}}};
  if (job->stream) {  // the last event: the image, or the error
    std::string ev;
    if (status == 200) {
      const json d = {{"type", "image_generation.completed"}, {"b64_json", base64_encode(encode_png(job->results[0]->image))},
                      {"created_at", static_cast<int64_t>(std::time(nullptr))}, {"size", job->size},
                      {"quality", "auto"}, {"background", "opaque"}, {"output_format", "png"}, {"usage", usage}};
      ev = "event: image_generation.completed\ndata: " + d.dump() + "\n\n";
    } else {
      ev = "event: error\ndata: " + body.dump() + "\n\n";
    }
    auto session = job->session;
    ++unwritten;  // until the last event is written (pump, on closing)
    net::post(session->stream.get_executor(), [session, ev = std::move(ev)]() mutable {
      session->waiting_result = false;  // the disconnect watch ends with the connection (cancelling it here
      session->job.reset();             // would cancel the partial images still being written)
      session->owes_answer = true;
      session->sse(std::move(ev), true);
    });
    return;
  }
  if (status == 200) {
    json data = json::array();
    for (const auto& r : job->results) data.push_back({{"b64_json", base64_encode(encode_png(r->image))}});
    body = {{"created", static_cast<int64_t>(std::time(nullptr))}, {"data", data},
            {"usage", {{"input_tokens", job->prompt_tokens}, {"output_tokens", 0}, {"total_tokens", job->prompt_tokens},
                       {"input_tokens_details", {{"text_tokens", job->prompt_tokens}, {"image_tokens", 0}}}}}};
  }
  auto session = job->session;
  ++unwritten;  // until the response is written (send_text's completion)
  net::post(session->stream.get_executor(), [session, status, body = std::move(body), retry] {
    session->owes_answer = true;
    session->waiting_result = false;
    session->job.reset();
    beast::error_code ec;
    session->stream.socket().cancel(ec);  // the disconnect watch
    session->send_text(status, body.dump(), "application/json", session->keep_alive, retry);
  });
}

std::string ImageServer::Impl::metrics_text() {
  std::lock_guard<std::mutex> lk(mu);
  std::ostringstream os;
  os << "# HELP diffpipe_queue_depth Requests waiting for admission.\n# TYPE diffpipe_queue_depth gauge\n"
     << "diffpipe_queue_depth " << queued << "\n"
     << "# HELP diffpipe_inflight_requests Images admitted and unfinished.\n# TYPE diffpipe_inflight_requests gauge\n"
     << "diffpipe_inflight_requests " << active << "\n"
     << "# HELP diffpipe_open_requests HTTP requests waiting for their images.\n# TYPE diffpipe_open_requests gauge\n"
     << "diffpipe_open_requests " << jobs_open << "\n"
     << "# HELP diffpipe_images_total Images by outcome.\n# TYPE diffpipe_images_total counter\n";
  for (const auto& [k, v] : images) os << "diffpipe_images_total{status=\"" << k << "\"} " << v << "\n";
  os << "# HELP diffpipe_http_responses_total HTTP responses by status.\n# TYPE diffpipe_http_responses_total counter\n";
  for (const auto& [k, v] : responses) os << "diffpipe_http_responses_total{code=\"" << k << "\"} " << v << "\n";
  os << "# HELP diffpipe_failures_total Images that failed in a stage, by reason.\n# TYPE diffpipe_failures_total counter\n";
  for (const auto& [k, v] : failures) {
    std::string r = k.substr(0, 200);
    for (auto& c : r)
      if (c == '"' || c == '\\' || c == '\n') c = ' ';
    os << "diffpipe_failures_total{reason=\"" << r << "\"} " << v << "\n";
  }
  os << "# HELP diffpipe_image_latency_seconds Arrival to finished image.\n# TYPE diffpipe_image_latency_seconds histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < sizeof(kBuckets) / sizeof(kBuckets[0]); ++i) {
    cum += latency_buckets[i];
    os << "diffpipe_image_latency_seconds_bucket{le=\"" << kBuckets[i] << "\"} " << cum << "\n";
  }
  os << "diffpipe_image_latency_seconds_bucket{le=\"+Inf\"} " << latency_count << "\n"
     << "diffpipe_image_latency_seconds_sum " << latency_sum << "\n"
     << "diffpipe_image_latency_seconds_count " << latency_count << "\n";
  return os.str();
}

void ImageServer::Impl::accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket s) {
    if (ec) return;  // closed (stop) or a transient error: stop accepting
    std::make_shared<Session>(std::move(s), *this)->read();
    if (!stopping) accept();
  });
}

ImageServer::ImageServer(ServerOptions o) : impl_(std::make_unique<Impl>()) { impl_->o = std::move(o); }

ImageServer::~ImageServer() {
  // the answers already decided reach their clients first (at most 10 s: a client that stopped reading loses its)
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (impl_->unwritten > 0 && !impl_->threads.empty() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  impl_->ioc.stop();
  for (auto& t : impl_->threads) t.join();
}

void ImageServer::start() {
  auto& I = *impl_;
  beast::error_code ec;
  const auto addr = net::ip::make_address(I.o.host, ec);
  DP_CHECK(!ec, "serve: --host '", I.o.host, "' is not an IP address");
  const tcp::endpoint ep(addr, static_cast<unsigned short>(I.o.port));
  I.acceptor.open(ep.protocol(), ec);
  if (!ec) I.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) I.acceptor.bind(ep, ec);
  if (!ec) I.acceptor.listen(net::socket_base::max_listen_connections, ec);
  DP_CHECK(!ec, "serve: cannot listen on ", I.o.host, ":", I.o.port, ": ", ec.message());
  I.accept();
  for (int i = 0; i < std::max(1, I.o.threads); ++i) I.threads.emplace_back([this] { impl_->ioc.run(); });
}

void ImageServer::stop() {
  if (impl_->stopping.exchange(true)) return;
  net::post(impl_->ioc, [this] {
    beast::error_code ec;
    impl_->acceptor.close(ec);
  });
}

int ImageServer::port() const { return impl_->acceptor.local_endpoint().port(); }
bool ImageServer::stopping() const { return impl_->stopping; }

std::vector<FeedItem> ImageServer::arrivals(double) {
  impl_->ready = true;
  std::lock_guard<std::mutex> lk(impl_->mu);
  std::vector<FeedItem> out(impl_->arrivals.begin(), impl_->arrivals.end());
  impl_->arrivals.clear();
  return out;
}

std::vector<uint64_t> ImageServer::cancellations() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  auto out = std::move(impl_->cancels);
  impl_->cancels.clear();
  return out;
}

bool ImageServer::closed() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->stopping && impl_->arrivals.empty() && impl_->waiting.empty();
}

void ImageServer::deliver(GeneratedImage&& gi) {
  auto& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  ++I.images[gi.status];
  if (gi.status == "failed") ++I.failures[gi.reason.substr(gi.reason.find(": ") == std::string::npos ? 0 : gi.reason.find(": ") + 2)];
  if (gi.status == "done") {
    ++I.latency_count;
    I.latency_sum += gi.latency_s;
    for (size_t i = 0; i < sizeof(kBuckets) / sizeof(kBuckets[0]); ++i)
      if (gi.latency_s <= kBuckets[i]) {
        ++I.latency_buckets[i];
        break;
      }
  }
  auto it = I.waiting.find(gi.index);
  if (it == I.waiting.end()) return;
  auto [job, k] = it->second;
  I.waiting.erase(it);
  const bool ok = gi.status == "done";
  job->results[k] = std::move(gi);
  --job->remaining;
  if (job->answered) return;  // the client left, or an earlier image already decided the answer
  if (!ok) {  // the first image that is not done decides the answer; the others are not needed any more
    for (uint64_t id : job->ids)
      if (I.waiting.count(id)) I.cancels.push_back(id);
    I.answer(job);
  } else if (job->remaining == 0) {
    I.answer(job);
  }
}

void ImageServer::preview(uint64_t id, int index, Image&& image) {
  auto& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  auto it = I.waiting.find(id);
  if (it == I.waiting.end()) return;
  auto job = it->second.first;
  if (!job->stream || job->answered) return;
  const json d = {{"type", "image_generation.partial_image"}, {"b64_json", base64_encode(encode_png(image))},
                  {"created_at", static_cast<int64_t>(std::time(nullptr))}, {"size", job->size}, {"quality", "auto"},
                  {"background", "opaque"}, {"output_format", "png"}, {"partial_image_index", index - 1}};
  std::string ev = "event: image_generation.partial_image\ndata: " + d.dump() + "\n\n";
  auto session = job->session;
  net::post(session->stream.get_executor(), [session, ev = std::move(ev)]() mutable { session->sse(std::move(ev), false); });
}

void ImageServer::status(size_t queued, size_t active) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->queued = queued;
  impl_->active = active;
}

}  // namespace diffpipe
