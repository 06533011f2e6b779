#include "diffpipe/stages/embeddings.h"

#include <set>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/model.h"

namespace diffpipe {

std::vector<EmbeddingSpec> parse_embedding_list(const std::string& text) {
  std::vector<EmbeddingSpec> out;
  for (const std::string& item : parse_path_list(text, "embeddings", "FILE[:TOKEN],FILE[:TOKEN]...")) {
    EmbeddingSpec e;
    const size_t dot = item.rfind(".safetensors");
    const size_t colon = dot == std::string::npos ? item.rfind(':') : item.find(':', dot);
    e.path = colon == std::string::npos ? item : item.substr(0, colon);
    if (colon != std::string::npos) e.token = item.substr(colon + 1);
    DP_CHECK(!e.path.empty() && (colon == std::string::npos || !e.token.empty()), "embeddings: '", item,
             "' is not FILE[:TOKEN]");
    out.push_back(e);
  }
  return out;
}

namespace {
// [D] or [n, D] as float32 [n, D] on the CPU, checked against the encoder's width.
at::Tensor vectors_of(const std::shared_ptr<SafetensorsFile>& f, const std::string& key, int64_t width,
                      const std::string& file, const std::string& encoder) {
  at::Tensor t = tensor_from_view(f, f->get(key)).to(at::kFloat).clone();
  if (t.dim() == 1) t = t.unsqueeze(0);
  DP_CHECK(t.dim() == 2 && t.size(0) >= 1 && t.size(1) == width, file, ": '", key, "' is ", shape_str(t.sizes()),
           "; ", encoder, " takes vectors of ", width, " ([n, ", width, "])");
  DP_CHECK(at::isfinite(t).all().item<bool>(), file, ": '", key, "' has non-finite values");
  return t;
}

std::string stem(const std::string& path) {
  std::string s = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
  const size_t dot = s.rfind('.');
  return dot == std::string::npos ? s : s.substr(0, dot);
}
}  // namespace

std::vector<TextualInversion> read_embeddings(const std::vector<EmbeddingSpec>& specs, const std::string& dir) {
  if (specs.empty()) return {};
  DP_CHECK(!SdModel::is_if(dir), "embeddings: ", dir, " is a DeepFloyd IF folder (T5); textual inversion applies to ",
           "CLIP text encoders");
  const bool sdxl = SdModel::is_sdxl(dir);
  // new ids follow the vocabulary, so each text encoder's vocab_size must be its tokenizer's; returns its width
  auto checked_width = [&](const std::string& enc, const ClipTokenizer& t) {
    const ClipTextConfig c = ClipTextConfig::load(path_join(dir, enc + "/config.json"));
    DP_CHECK(c.vocab_size == static_cast<int64_t>(t.vocab_size()), "embeddings: ", path_join(dir, enc),
             "/config.json has vocab_size ", c.vocab_size, " but its tokenizer ", t.vocab_size(),
             " tokens; textual inversion appends ids after both");
    return c.hidden_size;
  };
  const ClipTokenizer tok = ClipTokenizer::load(path_join(dir, "tokenizer"));
  const int64_t width = checked_width("text_encoder", tok);
  const int64_t width_2 = sdxl ? checked_width("text_encoder_2", ClipTokenizer::load(path_join(dir, "tokenizer_2"))) : 0;
  std::vector<TextualInversion> out;
  std::set<std::string> tokens;
  for (const EmbeddingSpec& s : specs) {
    const std::string& file = s.path;
    DP_CHECK(file.size() >= 12 && file.compare(file.size() - 12, 12, ".safetensors") == 0, "embeddings: ", file,
             ": only .safetensors files are read (a pickled .pt/.bin embedding needs converting first)");
    const auto f = SafetensorsFile::open(file);
    const auto names = f->names();
    TextualInversion ti;
    ti.file = file;
    const std::set<std::string> keys(names.begin(), names.end());
    if (keys.count("clip_l") || keys.count("clip_g")) {  // SDXL's layout: one set per text encoder
      DP_CHECK(sdxl && keys.count("clip_l") && keys.count("clip_g"), file, ": clip_l/clip_g vectors are SDXL's (both ",
               "needed) and ", dir, sdxl ? " lacks one" : " is not an SDXL folder");
      ti.vectors = vectors_of(f, "clip_l", width, file, "text_encoder");
      ti.vectors_2 = vectors_of(f, "clip_g", width_2, file, "text_encoder_2");
      DP_CHECK(ti.vectors.size(0) == ti.vectors_2.size(0), file, ": clip_l has ", ti.vectors.size(0),
               " vectors, clip_g ", ti.vectors_2.size(0));
      ti.token = s.token.empty() ? stem(file) : s.token;
    } else {
      DP_CHECK(names.size() == 1, file, ": expected one tensor (diffusers' {\"<token>\": vectors}, or \"emb_params\"), ",
               "found ", names.size());
      DP_CHECK(!sdxl, file, ": ", dir, " is an SDXL folder: its embeddings need clip_l and clip_g vectors");
      ti.vectors = vectors_of(f, names[0], width, file, "text_encoder");
      ti.token = !s.token.empty() ? s.token : names[0] == "emb_params" ? stem(file) : names[0];
    }
    DP_CHECK(!ti.token.empty() && ti.token.find_first_of(" \t\n") == std::string::npos, file, ": the token '",
             ti.token, "' must be one word");
    for (int64_t k = 0; k < ti.vectors.size(0); ++k) {
      const std::string name = k == 0 ? ti.token : ti.token + "_" + std::to_string(k);
      DP_CHECK(!tok.has_token(ClipTokenizer::normalize(name)) && tokens.insert(ClipTokenizer::normalize(name)).second,
               file, ": the token '", name, "' is already in the tokenizer (pass FILE:TOKEN with another one)");
    }
    out.push_back(std::move(ti));
  }
  return out;
}

}  // namespace diffpipe
