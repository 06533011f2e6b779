// `diffpipe data`: writes the synthetic shapes dataset (PNGs + images.jsonl in generate's format).
// `diffpipe eval fidelity`: checks generated images against their captions (colour, shape, position).
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "commands.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "fidelity.h"
#include "shapes.h"

namespace diffpipe::apps {

namespace {
bool wants_help(int argc, char** argv, const char* text) {
  for (int i = 0; i < argc; ++i)
    if (!std::strcmp(argv[i], "--help")) {
      std::fputs(text, stdout);
      return true;
    }
  return false;
}
}  // namespace

int data_main(int argc, char** argv) {
  if (wants_help(argc, argv,
                 "usage: diffpipe data --out DIR [--count N] [--seed S] [--first I] [--size 64]\n"
                 "  writes N scenes (samples I..I+N-1 of seed S) as PNGs and DIR/images.jsonl (prompt, file, seed, index)\n"))
    return 0;
  cli::Args a("data", argc, argv, {"out", "count", "seed", "first", "size"}, {});
  DP_CHECK(a.has("out"), "data: --out DIR is required");
  const std::string out = a.str("out");
  const int64_t count = a.integer("count", 256), first = a.integer("first", 0), size = a.integer("size", 64);
  const uint64_t seed = a.u64("seed", 0);
  DP_CHECK(count >= 1 && count <= 10000000, "data: --count must be in [1, 10000000]");
  DP_CHECK(size == 64 || size == 32 || size == 16, "data: --size must be 64, 32 or 16");
  DP_CHECK(std::system(("mkdir -p '" + out + "'").c_str()) == 0 && dir_exists(out), out, ": cannot create folder");
  std::ofstream jl(path_join(out, "images.jsonl"));
  DP_CHECK(jl.good(), path_join(out, "images.jsonl"), ": cannot open for writing");
  for (int64_t i = first; i < first + count; ++i) {
    const data::Scene s = data::sample_scene(seed, static_cast<uint64_t>(i));
    Image im = data::render(s);
    if (size != 64) im = data::downsample(im, static_cast<int>(64 / size));
    char name[64];
    std::snprintf(name, sizeof(name), "real-%07lld.png", static_cast<long long>(i));
    write_png(path_join(out, name), im);
    jl << nlohmann::json{{"index", i}, {"seed", seed}, {"prompt", data::caption(s)}, {"file", path_join(out, name)},
                         {"status", "done"}}.dump()
       << "\n";
  }
  std::fprintf(stderr, "diffpipe: wrote %lld images to %s\n", static_cast<long long>(count), out.c_str());
  return 0;
}

int eval_main(int argc, char** argv) {
  const char* help =
      "usage: diffpipe eval fidelity --images DIR\n"
      "  DIR/images.jsonl (written by generate or data): each image is checked against its prompt\n"
      "  (colour, shape, position of every object); prints the fractions correct as JSON\n";
  if (argc < 1 || wants_help(argc, argv, help)) {
    std::fputs(help, argc < 1 ? stderr : stdout);
    return argc < 1 ? 2 : 0;
  }
  const std::string what = argv[0];
  DP_CHECK(what == "fidelity", "eval: unknown metric '", what, "' (this build has: fidelity)");
  cli::Args a("eval fidelity", argc - 1, argv + 1, {"images"}, {});
  DP_CHECK(a.has("images"), "eval fidelity: --images DIR is required");
  const std::string index = path_join(a.str("images"), "images.jsonl");
  DP_CHECK(file_exists(index), index, ": file not found (run generate or data with --out DIR first)");
  std::ifstream in(index);
  std::string line;
  int lineno = 0;
  std::vector<std::vector<data::ObjectVerdict>> verdicts;
  size_t skipped = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      DP_FAIL(index, ":", lineno, ": not JSON: ", e.what());
    }
    if (j.value("status", std::string("done")) != "done") {
      ++skipped;
      continue;
    }
    DP_CHECK(j.contains("prompt") && j.contains("file"), index, ":", lineno, ": needs 'prompt' and 'file'");
    const data::Scene s = data::parse_caption(j["prompt"].get<std::string>());
    const Image im = read_png(j["file"].get<std::string>());
    DP_CHECK(im.width == im.height, j["file"].get<std::string>(), ": images must be square");
    verdicts.push_back(data::check_image(im, s));
  }
  DP_CHECK(!verdicts.empty(), index, ": no finished images");
  const auto sum = data::summarize(verdicts);
  std::printf("%s\n", nlohmann::json{{"images", verdicts.size()}, {"objects", sum.objects}, {"colour", sum.color},
                                     {"shape", sum.shape}, {"position", sum.position}, {"skipped", skipped}}
                          .dump()
                          .c_str());
  return 0;
}

}  // namespace diffpipe::apps
