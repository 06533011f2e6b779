// `diffpipe data`: writes the synthetic shapes dataset (PNGs + images.jsonl in generate's format).
// `diffpipe eval fidelity`: checks generated images against their captions (colour, shape, position).
#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <map>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "commands.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/tokenizer.h"
#include "diffpipe/train/fidelity.h"
#include "diffpipe/train/eval.h"
#include "diffpipe/train/image_tower.h"
#include "diffpipe/train/inception.h"
#include "diffpipe/train/metrics.h"
#include "diffpipe/train/shapes.h"

namespace diffpipe::apps {

namespace {
// Parses a command's options; prints its help and returns nullopt for -h/--help.
std::optional<cli::Args> parse(const std::string& command, const std::string& usage, const std::vector<cli::Opt>& opts,
                               int argc, char** argv, const std::string& about = "") {
  cli::Args a(command, usage, opts, argc, argv, about);
  if (a.help_requested()) {
    std::fputs(a.help_text().c_str(), stdout);
    return std::nullopt;
  }
  return a;
}
}  // namespace

int data_main(int argc, char** argv) {
  const auto parsed = parse("data", "diffpipe data --out DIR [options]",
                            {{"out", "DIR", "output folder"},
                             {"count", "N", "scenes to write (default 256)"},
                             {"seed", "S", "dataset seed (default 0)"},
                             {"first", "I", "first sample index (default 0)"},
                             {"size", "PX", "64 (default), 32 or 16"}},
                            argc, argv,
                            "writes N scenes (samples I..I+N-1 of seed S) as PNGs and DIR/images.jsonl (prompt, file, seed, index)");
  if (!parsed) return 0;
  const cli::Args& a = *parsed;
  DP_CHECK(a.has("out"), "data: --out DIR is required");
  const std::string out = a.str("out");
  const int64_t count = a.integer("count", 256), first = a.integer("first", 0), size = a.integer("size", 64);
  const uint64_t seed = a.u64("seed", 0);
  DP_CHECK(count >= 1 && count <= 10000000, "data: --count must be in [1, 10000000]");
  DP_CHECK(size == 64 || size == 32 || size == 16, "data: --size must be 64, 32 or 16");
  make_dirs(out);
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

using train::Entry;
using train::fid_features;
using train::load_images;
using train::read_index;

int eval_main(int argc, char** argv) {
  const char* help =
      "usage: diffpipe eval fidelity --images DIR\n"
      "       diffpipe eval clip-score --images DIR --model MODEL\n"
      "       diffpipe eval fid --real DIR --generated DIR (--model MODEL | --inception FILE)\n"
      "       diffpipe eval features --images DIR (--model MODEL | --inception FILE) --out FILE.safetensors\n"
      "  DIR/images.jsonl (written by generate or data) lists images and prompts.\n"
      "  fidelity: each image checked against its prompt (colour, shape, position of every object).\n"
      "  clip-score: 100 * max(cos(text, image), 0) averaged, with MODEL's text encoder and image_encoder.\n"
      "  fid: Frechet distance between Gaussians fitted to features of the two sets: pytorch-fid's Inception-v3\n"
      "       (pool3, 2048-d) from a safetensors FILE with torchvision key names, or MODEL's image_encoder.\n"
      "  features: the features fid uses, saved as tensor 'features' [N, D].\n";
  if (argc < 1 || !std::strcmp(argv[0], "--help") || !std::strcmp(argv[0], "-h")) {
    std::fputs(help, argc < 1 ? stderr : stdout);
    return argc < 1 ? 2 : 0;
  }
  const std::string what = argv[0];
  if (what == "clip-score") {
    const auto parsed = parse("eval clip-score", "diffpipe eval clip-score --images DIR --model MODEL",
                              {{"images", "DIR", "folder with images.jsonl"}, {"model", "MODEL", "text_encoder/ and image_encoder/"}},
                              argc - 1, argv + 1);
    if (!parsed) return 0;
    const cli::Args& a = *parsed;
    DP_CHECK(a.has("model"), "eval clip-score: --model MODEL is required (its text_encoder/ and image_encoder/)");
    DP_CHECK(a.has("images"), "eval clip-score: --images DIR is required");
    const std::string model = a.str("model");
    at::NoGradGuard ng;
    const auto tower = ImageTower::load(path_join(model, "image_encoder"), DeviceSpec{});
    const auto es = read_index(a.str("images"));
    const auto tok = ClipTokenizer::load(path_join(model, "tokenizer"));
    const auto te = ClipTextModel::load(path_join(model, "text_encoder"), DeviceSpec{});
    // streamed: 64 images and captions at a time, so 10,000 (or 100,000) images never sit in memory together
    std::vector<at::Tensor> texts, imgs;
    for (size_t i = 0; i < es.size(); i += 64) {
      const std::vector<Entry> part(es.begin() + static_cast<std::ptrdiff_t>(i),
                                    es.begin() + static_cast<std::ptrdiff_t>(std::min(es.size(), i + 64)));
      std::vector<int64_t> ids;
      for (const auto& e : part) {
        auto t = tok.encode(e.prompt);
        ids.insert(ids.end(), t.begin(), t.end());
      }
      texts.push_back(te->text_embeds(at::tensor(ids, at::kLong).view({static_cast<int64_t>(part.size()), tok.max_length()})));
      imgs.push_back(tower->embed(load_images(part)));
    }
    const at::Tensor text = at::cat(texts), img = at::cat(imgs);
    std::printf("%s\n", nlohmann::json{{"images", es.size()}, {"clip_score", metrics::clip_score(text, img)}}.dump().c_str());
    return 0;
  }
  if (what == "fid" || what == "features") {
    const auto parsed = parse("eval " + what,
                              what == "fid" ? "diffpipe eval fid --real DIR --generated DIR (--model MODEL | --inception FILE)"
                                            : "diffpipe eval features --images DIR (--model MODEL | --inception FILE) --out FILE",
                              {{"images", "DIR", "features: folder with images.jsonl"},
                               {"real", "DIR", "fid: the reference images"},
                               {"generated", "DIR", "fid: the generated images"},
                               {"model", "MODEL", "use MODEL's image_encoder/ as the feature extractor"},
                               {"inception", "FILE", "pytorch-fid's Inception-v3 (safetensors, torchvision key names)"},
                               {"out", "FILE", "features: where to save them (safetensors)"}},
                              argc - 1, argv + 1);
    if (!parsed) return 0;
    const cli::Args& a = *parsed;
    DP_CHECK(a.has("model") != a.has("inception"), "eval ", what,
             ": give one feature extractor: --inception FILE (Inception-v3, safetensors) or --model MODEL (its image_encoder/)");
    at::NoGradGuard ng;
    std::shared_ptr<FidInception> inception;
    std::shared_ptr<ImageTower> tower;
    if (a.has("inception")) inception = FidInception::load(a.str("inception"));
    else tower = ImageTower::load(path_join(a.str("model"), "image_encoder"), DeviceSpec{});
    const std::string extractor = inception ? "inception-v3 pool3" : "image tower";
    if (what == "features") {
      DP_CHECK(a.has("images") && a.has("out"), "eval features: --images DIR and --out FILE are required");
      const at::Tensor f = fid_features(read_index(a.str("images")), inception.get(), tower.get());
      save_safetensors(a.str("out"), {{"features", f.contiguous()}}, {{"extractor", extractor}});
      std::printf("%s\n", nlohmann::json{{"images", f.size(0)}, {"features", f.size(1)}, {"out", a.str("out")}}.dump().c_str());
      return 0;
    }
    DP_CHECK(a.has("real") && a.has("generated"), "eval fid: --real DIR and --generated DIR are required");
    const auto real = read_index(a.str("real")), gen = read_index(a.str("generated"));
    const at::Tensor fr = fid_features(real, inception.get(), tower.get()), fg = fid_features(gen, inception.get(), tower.get());
    const double fid = metrics::frechet_distance(metrics::fit_gaussian(fr), metrics::fit_gaussian(fg));
    std::printf("%s\n", nlohmann::json{{"real", real.size()}, {"generated", gen.size()}, {"features", fr.size(1)},
                                       {"extractor", extractor}, {"fid", fid}}.dump().c_str());
    return 0;
  }
  if (what == "reconstruct") {  // the autoencoder (+ super-resolution) alone: an upper bound for generation
    const auto parsed = parse("eval reconstruct", "diffpipe eval reconstruct --images DIR --model MODEL --out DIR",
                              {{"images", "DIR", "folder with images.jsonl"}, {"model", "MODEL", "the model folder"},
                               {"out", "DIR", "output folder"}},
                              argc - 1, argv + 1);
    if (!parsed) return 0;
    const cli::Args& a = *parsed;
    DP_CHECK(a.has("images") && a.has("model") && a.has("out"), "eval reconstruct: --images DIR --model MODEL --out DIR");
    at::NoGradGuard ng;
    SdModel m = SdModel::load(a.str("model"), DeviceSpec{}, kVae | kVaeEncoder | kSuperRes);
    const auto es = read_index(a.str("images"));
    const std::string out = a.str("out");
    make_dirs(out);
    std::ofstream jl(path_join(out, "images.jsonl"));
    const int64_t base = m.default_size();
    for (size_t i = 0; i < es.size(); ++i) {
      at::Tensor x = load_images({es[i]});
      if (x.size(2) != base) x = at::avg_pool2d(x, {x.size(2) / base, x.size(2) / base});
      at::Tensor lat = m.vae->encode(x).mean * m.vae_config.scaling_factor;
      const Image im = decode_final(m, {lat[0]})[0];
      const std::string f = path_join(out, "rec-" + std::to_string(i) + ".png");
      write_png(f, im);
      jl << nlohmann::json{{"prompt", es[i].prompt}, {"file", f}, {"status", "done"}}.dump() << "\n";
    }
    std::fprintf(stderr, "diffpipe: reconstructed %zu images into %s\n", es.size(), out.c_str());
    return 0;
  }
  DP_CHECK(what == "fidelity", "eval: unknown metric '", what, "' (fidelity, clip-score, fid, features, reconstruct)");
  const auto parsed = parse("eval fidelity", "diffpipe eval fidelity --images DIR",
                            {{"images", "DIR", "folder with images.jsonl"}}, argc - 1, argv + 1);
  if (!parsed) return 0;
  const cli::Args& a = *parsed;
  DP_CHECK(a.has("images"), "eval fidelity: --images DIR is required");
  size_t skipped = 0;
  std::vector<std::vector<data::ObjectVerdict>> verdicts;
  std::map<std::string, std::vector<std::vector<data::ObjectVerdict>>> by_kind;  // one small / one large / two
  for (const auto& e : read_index(a.str("images"), &skipped)) {
    const data::Scene sc = data::parse_caption(e.prompt);
    const Image im = read_png(e.file);
    DP_CHECK(im.width == im.height, e.file, ": images must be square");
    verdicts.push_back(data::check_image(im, sc));
    const std::string kind = sc.objects.size() > 1 ? "two objects" : sc.objects[0].size == 0 ? "one small" : "one large";
    by_kind[kind].push_back(verdicts.back());
  }
  auto summary = [](const std::vector<std::vector<data::ObjectVerdict>>& v) {
    const auto s = data::summarize(v);
    return nlohmann::json{{"objects", s.objects}, {"colour", s.color}, {"shape", s.shape}, {"position", s.position}};
  };
  nlohmann::json out = summary(verdicts);
  out["images"] = verdicts.size();
  out["skipped"] = skipped;
  for (const auto& [kind, v] : by_kind) out["by_kind"][kind] = summary(v);
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace diffpipe::apps
