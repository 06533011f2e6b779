// A seeded mutation fuzzer over every parser of untrusted input: safetensors files, config.json of each model
// component, tokenizer files, pipeline files (TOML), prompts files and wire messages. Each target starts from a
// valid input, mutates it (bit flips, special bytes, JSON/TOML tokens, numbers at their limits, cuts,
// duplicated and inserted ranges) and parses it. A parser may accept the input or throw a std::exception;
// anything else (a crash, a sanitizer report, an iteration over 10 s) fails. Built with AddressSanitizer and
// UndefinedBehaviorSanitizer over the parsers' own sources (tests/CMakeLists.txt).
//   fuzz_parsers [--seconds S per target] [--seed N] [--target NAME] | --sanitizer-self-test
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "diffpipe/cluster/form_data.h"
#include "diffpipe/cluster/placement.h"
#include "diffpipe/cluster/wire.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/message.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/text.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/model_writer.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/super_res.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"

using namespace diffpipe;

namespace {

const char* g_target = "";
long g_iter = 0;

extern "C" void on_alarm(int) {
  char buf[160];
  const int n = std::snprintf(buf, sizeof(buf), "fuzz_parsers: HANG: target %s, iteration %ld took over 10 s\n",
                              g_target, g_iter);
  ssize_t w = ::write(2, buf, n);
  (void)w;
  ::_exit(3);
}

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
void write_file(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}
  std::string mutate(std::string s) {
    const int n = 1 + static_cast<int>(rng_() % 4);
    for (int k = 0; k < n; ++k) one(s);
    return s;
  }

 private:
  size_t pos(const std::string& s) { return s.empty() ? 0 : rng_() % s.size(); }
  void one(std::string& s) {
    static const char special[] = {'\0', '\xff', '\x7f', '\x80', '"', '{', '}', '[', ']', ',', ':', '-', '9',
                                   'e', ' ', '\n', '\\', '=', '#', '.', '\xc3', '\xe2'};
    static const char* tokens[] = {"99999999999999999999", "-1", "0", "1e308", "-1e308", "nan", "null", "true",
                                   "\"\"", "[]", "{}", "18446744073709551615", "-9223372036854775808", "2147483648",
                                   "[[[[[[[[[[", "\"\\u0000\"", "\"\\ud800\"", "=", "[rank.1]", "[[x]]", "0x10"};
    switch (rng_() % 9) {
      case 0:  // bit flip
        if (!s.empty()) s[pos(s)] ^= static_cast<char>(1u << (rng_() % 8));
        break;
      case 1:  // special byte
        if (!s.empty()) s[pos(s)] = special[rng_() % sizeof(special)];
        break;
      case 2: {  // a token inserted
        s.insert(pos(s), tokens[rng_() % (sizeof(tokens) / sizeof(tokens[0]))]);
        break;
      }
      case 3: {  // a number replaced by one at its limits
        std::vector<size_t> starts;
        for (size_t i = 0; i < s.size(); ++i)
          if (std::isdigit(static_cast<unsigned char>(s[i])) && (i == 0 || !std::isdigit(static_cast<unsigned char>(s[i - 1]))))
            starts.push_back(i);
        if (starts.empty()) break;
        const size_t a = starts[rng_() % starts.size()];
        size_t b = a;
        while (b < s.size() && (std::isdigit(static_cast<unsigned char>(s[b])) || s[b] == '.' || s[b] == 'e')) ++b;
        s.replace(a, b - a, tokens[rng_() % 13]);
        break;
      }
      case 4:  // cut
        if (!s.empty()) s.resize(pos(s));
        break;
      case 5: {  // a range deleted
        if (s.empty()) break;
        const size_t a = pos(s), len = 1 + rng_() % std::min<size_t>(s.size() - a, 64);
        s.erase(a, len);
        break;
      }
      case 6: {  // a range duplicated
        if (s.empty()) break;
        const size_t a = pos(s), len = 1 + rng_() % std::min<size_t>(s.size() - a, 64);
        s.insert(pos(s), s.substr(a, len));
        break;
      }
      case 7: {  // random bytes inserted
        std::string r(1 + rng_() % 16, '\0');
        for (auto& c : r) c = static_cast<char>(rng_());
        s.insert(pos(s), r);
        break;
      }
      default: {  // bytes swapped
        if (s.size() < 2) break;
        std::swap(s[pos(s)], s[pos(s)]);
        break;
      }
    }
  }
  std::mt19937_64 rng_;
};

struct Target {
  std::string name;
  std::string seed_input;
  std::function<void(const std::string&)> parse;  // accepts or throws std::exception
};

// Reads every tensor of a safetensors file (small ones only: the header decides sizes).
void parse_safetensors(const std::string& path) {
  auto f = SafetensorsFile::open(path);
  for (const auto& name : f->names()) {
    const TensorView& v = f->get(name);
    if (v.nbytes <= (size_t(1) << 20)) (void)tensor_from_view(f, v).sum();
  }
}

// Decodes a header and the typed message it claims to be.
void parse_wire(const std::string& bytes) {
  Message m;
  m.src = 1;
  const auto specs = decode_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &m);
  for (const auto& s : specs) {
    if (s.nbytes() > (size_t(1) << 20)) return;  // the transport would receive a payload of this size
    m.tensors.push_back(at::zeros(s.shape, at::TensorOptions().dtype(s.dtype)));
  }
  switch (m.kind) {
    case MsgKind::Work: (void)wire::decode_work(std::move(m)); break;
    case MsgKind::StageDone: (void)wire::decode_stage_done(m); break;
    case MsgKind::Steps: (void)wire::decode_steps(m); break;
    case MsgKind::Result: (void)wire::decode_result(std::move(m)); break;
    case MsgKind::Failed: (void)wire::decode_failed(m); break;
    case MsgKind::Error: (void)wire::decode_error(m); break;
    case MsgKind::Cancel: (void)wire::decode_cancel(m); break;
    case MsgKind::Abort: (void)wire::decode_abort(m); break;
    default: break;
  }
}

std::vector<Target> targets(const std::string& work) {
  std::vector<Target> t;
  // a random model gives valid configs and tokenizer files
  RandomModelOptions mo;
  mo.super_resolution = true;
  write_random_model(work + "/model", mo);
  const std::string m = work + "/model";
  {
    const std::string p = work + "/seed.safetensors";
    save_safetensors(p, {{"a", at::arange(6, at::kFloat).view({2, 3})}, {"b", at::arange(4, at::kLong)},
                         {"c", at::ones({1}, at::kHalf)}, {"d", at::zeros({0, 3}, at::kBFloat16)}},
                     {{"format", "pt"}});
    t.push_back({"safetensors", read_file(p), [work](const std::string& s) {
                   write_file(work + "/x.safetensors", s);
                   parse_safetensors(work + "/x.safetensors");
                 }});
  }
  auto config = [&](const std::string& name, const std::string& file, std::function<void(const std::string&)> load) {
    t.push_back({name, read_file(m + "/" + file), [work, load](const std::string& s) {
                   write_file(work + "/config.json", s);
                   load(work + "/config.json");
                 }});
  };
  config("unet-config", "unet/config.json", [](const std::string& p) { (void)UNetConfig::load(p); });
  config("vae-config", "vae/config.json", [](const std::string& p) { (void)VaeConfig::load(p); });
  config("text-config", "text_encoder/config.json", [](const std::string& p) { (void)ClipTextConfig::load(p); });
  config("scheduler-config", "scheduler/scheduler_config.json", [](const std::string& p) { (void)SchedulerConfig::load(p); });
  config("super-res-config", "super_resolution/config.json", [](const std::string& p) { (void)SuperResConfig::load(p); });
  for (const std::string file : {"vocab.json", "merges.txt", "tokenizer_config.json"}) {
    t.push_back({"tokenizer-" + file, read_file(m + "/tokenizer/" + file), [work, m, file](const std::string& s) {
                   const std::string d = work + "/tok";
                   std::system(("rm -rf '" + d + "' && cp -r '" + m + "/tokenizer' '" + d + "'").c_str());
                   write_file(d + "/" + file, s);
                   const ClipTokenizer tok = ClipTokenizer::load(d);
                   (void)tok.encode("a red circle at the top left, &amp; a Blue square!");
                 }});
  }
  t.push_back({"pipeline-toml",
               "transport = \"mpi\"\ndevice = \"cpu\"\n[encode]\nranks = [0]\nmax_batch = 4\n[denoise]\n"
               "ranks = [\n  1,\n]\nmax_inflight = 6\nbatching = \"step\"\n[decode]\nranks = [2]\nbatch_wait_ms = 1.5\n"
               "[rank.1]\ndtype = \"bfloat16\"\n",
               [work](const std::string& s) {
                 write_file(work + "/p.toml", s);
                 (void)Placement::load(work + "/p.toml", 3);
               }});
  t.push_back({"prompts", "a red circle\r\n# a comment\n\n  a blue square \xc3\xa9\xe2\x82\xac\nlast line",
               [work](const std::string& s) {
                 write_file(work + "/prompts.txt", s);
                 (void)read_prompts(work + "/prompts.txt");
               }});
  {  // a PNG in memory (what an HTTP client's "image" becomes) and the same PNG as a data URI
    Image im;
    im.width = 5;
    im.height = 3;
    for (int i = 0; i < 5 * 3 * 3; ++i) im.pixels.push_back(static_cast<uint8_t>(i * 17));
    const std::vector<uint8_t> png = encode_png(im, {{"parameters", "a red circle"}});
    t.push_back({"png-bytes", std::string(png.begin(), png.end()), [](const std::string& s) {
                   (void)decode_png(reinterpret_cast<const uint8_t*>(s.data()), s.size(), "fuzz");
                 }});
    t.push_back({"image-data-uri", "data:image/png;base64," + base64_encode(png),
                 [](const std::string& s) { (void)read_image_ref(s); }});
    // an upload as the openai client sends it: text fields and the PNG as a file part
    const std::string form = "--fz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na red circle\r\n--fz\r\n"
                             "Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png"
                             "\r\n\r\n" + std::string(png.begin(), png.end()) + "\r\n--fz--\r\n";
    t.push_back({"multipart-form", form, [](const std::string& s) {
                   for (const FormPart& p : parse_form_data(s, form_boundary("multipart/form-data; boundary=fz")))
                     if (p.name == "image") (void)decode_png(reinterpret_cast<const uint8_t*>(p.value.data()), p.value.size(), "fuzz");
                 }});
  }
  {
    wire::Work w;
    w.request = 3;
    w.stage = 1;
    w.params.prompt = "a cat";
    w.route = {0, 1, 2};
    w.trail = {0};
    w.tensors.push_back(at::zeros({2, 3}));
    const auto h = encode_header(wire::encode(w));
    const auto r = encode_header(wire::encode(wire::Result{1, {0, 1, 2}, at::zeros({2, 2, 3}, at::kByte)}));
    wire::Steps st;
    st.stage = 1;
    st.items = {{1, 2, 3}, {4, 5, 6}};
    const auto sh = encode_header(wire::encode(st));
    t.push_back({"wire-work", std::string(h.begin(), h.end()), parse_wire});
    t.push_back({"wire-result", std::string(r.begin(), r.end()), parse_wire});
    t.push_back({"wire-steps", std::string(sh.begin(), sh.end()), parse_wire});
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 5;
  uint64_t seed = 1;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--target" && i + 1 < argc) only = argv[++i];
    else if (a == "--sanitizer-self-test") {  // proves the sanitizer is live: a heap read past the end
      std::vector<char> v(16, 'x');
      volatile const char* p = v.data();
      std::printf("%d\n", p[16 + static_cast<int>(v.size() > 100)]);
      return 0;
    }
    else {
      std::fprintf(stderr, "usage: fuzz_parsers [--seconds S] [--seed N] [--target NAME]\n");
      return 2;
    }
  }
  at::set_num_threads(1);
  const std::string work = "/tmp/diffpipe-fuzz-" + std::to_string(::getpid());
  std::system(("rm -rf '" + work + "' && mkdir -p '" + work + "'").c_str());
  std::signal(SIGALRM, on_alarm);
  int ran = 0;
  for (const auto& t : targets(work)) {
    if (!only.empty() && t.name != only) continue;
    ++ran;
    g_target = t.name.c_str();
    Mutator mut(seed ^ std::hash<std::string>()(t.name));
    long accepted = 0, rejected = 0;
    // the valid input must parse: otherwise the target tests nothing
    try {
      t.parse(t.seed_input);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fuzz_parsers: target %s: its valid seed input is rejected: %s\n", t.name.c_str(), e.what());
      return 1;
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (g_iter = 0; std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds; ++g_iter) {
      const std::string input = mut.mutate(t.seed_input);
      ::alarm(10);
      try {
        t.parse(input);
        ++accepted;
      } catch (const std::exception&) {
        ++rejected;
      }
      ::alarm(0);
    }
    std::printf("%-28s %7ld inputs: %6ld accepted, %6ld rejected with an error, 0 crashes, 0 hangs\n", t.name.c_str(),
                g_iter, accepted, rejected);
    std::fflush(stdout);
  }
  std::system(("rm -rf '" + work + "'").c_str());
  if (ran == 0) {
    std::fprintf(stderr, "fuzz_parsers: no target named '%s'\n", only.c_str());
    return 2;
  }
  return 0;
}
