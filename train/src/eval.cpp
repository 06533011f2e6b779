#include "diffpipe/train/eval.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"

namespace diffpipe::train {

// The finished images listed in DIR/images.jsonl (generate's or data's format).
std::vector<Entry> read_index(const std::string& dir, size_t* skipped) {
  const std::string index = path_join(dir, "images.jsonl");
  DP_CHECK(file_exists(index), index, ": file not found (run generate or data with --out DIR first)");
  std::ifstream in(index);
  std::string line;
  int lineno = 0;
  std::vector<Entry> out;
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
      if (skipped) ++*skipped;
      continue;
    }
    DP_CHECK(j.contains("prompt") && j.contains("file"), index, ":", lineno, ": needs 'prompt' and 'file'");
    out.push_back({j["prompt"].get<std::string>(), j["file"].get<std::string>()});
  }
  DP_CHECK(!out.empty(), index, ": no finished images");
  return out;
}

at::Tensor load_images(const std::vector<Entry>& es) {  // [N, 3, H, W] in [-1, 1]
  std::vector<at::Tensor> ts;
  for (const auto& e : es) {
    ts.push_back(image_to_chw(read_png(e.file)));
  }
  return at::stack(ts);
}

// FID features of the images listed in DIR: the supplied Inception-v3's pool3 (2048-d) or the model's image tower.
at::Tensor fid_features(const std::vector<Entry>& es, const FidInception* inception, const ImageTower* tower) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < es.size(); i += 32) {
    const std::vector<Entry> part(es.begin() + static_cast<std::ptrdiff_t>(i),
                                  es.begin() + static_cast<std::ptrdiff_t>(std::min(es.size(), i + 32)));
    const at::Tensor x = load_images(part);
    out.push_back(inception ? inception->features(x) : tower->features(x));
  }
  return at::cat(out);
}

}  // namespace diffpipe::train
