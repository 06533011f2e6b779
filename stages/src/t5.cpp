#include "diffpipe/stages/t5.h"

#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "nn.h"

namespace diffpipe {

namespace {
const std::string kMeta = "\xE2\x96\x81";  // U+2581, SentencePiece's word mark

size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1; }

// tokenizers' char::is_whitespace (Unicode White_Space), on UTF-8: the code point at s[i] and its length.
bool whitespace_at(const std::string& s, size_t i, size_t* len) {
  const auto c = static_cast<unsigned char>(s[i]);
  *len = utf8_len(c);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return true;
  if (*len == 1 || i + *len > s.size()) return false;
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(s.substr(i, *len));
  const UChar32 cp = u.char32At(0);
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
         cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

std::string nfkc(const std::string& s) {
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFKCInstance(err);
  DP_CHECK(U_SUCCESS(err), "T5 tokenizer: ICU's NFKC normaliser is unavailable");
  icu::UnicodeString out = n->normalize(icu::UnicodeString::fromUTF8(s), err);
  DP_CHECK(U_SUCCESS(err), "T5 tokenizer: NFKC normalisation failed");
  std::string r;
  out.toUTF8String(r);
  return r;
}

// The normalizer section of tokenizer.json: null, NFKC, Precompiled (SentencePiece's nmt_nfkc charsmap, applied as
// NFKC: the same on text that NFKC leaves stable apart from control characters), or a Sequence of those.
bool parse_normalizer(const nlohmann::json& n, const std::string& file) {
  if (n.is_null()) return false;
  const std::string type = n.value("type", "");
  if (type == "NFKC") return true;
  if (type == "Precompiled") {
    DP_LOG(Info, file, ": normalizer Precompiled applied as NFKC (SentencePiece's nmt_nfkc)");
    return true;
  }
  if (type == "Sequence") {
    bool any = false;
    for (const auto& m : n.at("normalizers")) any = parse_normalizer(m, file) || any;
    return any;
  }
  DP_FAIL(file, ": field 'normalizer': unsupported type '", type, "' (supported: null, NFKC, Precompiled, Sequence)");
}
}  // namespace

namespace {
// The protobuf wire format, as far as SentencePiece's ModelProto needs it (varints, 32-bit, length-delimited).
struct PbReader {
  const uint8_t* p;
  const uint8_t* end;
  const std::string& file;
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      DP_CHECK(p < end, file, ": truncated protobuf (varint)");
      const uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    DP_FAIL(file, ": malformed protobuf varint");
  }
  bool next(uint32_t* field, uint32_t* wire) {
    if (p >= end) return false;
    const uint64_t key = varint();
    *field = static_cast<uint32_t>(key >> 3);
    *wire = static_cast<uint32_t>(key & 7);
    return true;
  }
  PbReader sub() {
    const uint64_t n = varint();
    DP_CHECK(n <= static_cast<uint64_t>(end - p), file, ": truncated protobuf (length-delimited field)");
    PbReader r{p, p + n, file};
    p += n;
    return r;
  }
  std::string bytes() {
    const PbReader r = sub();
    return std::string(reinterpret_cast<const char*>(r.p), static_cast<size_t>(r.end - r.p));
  }
  float fixed32() {
    DP_CHECK(end - p >= 4, file, ": truncated protobuf (fixed32)");
    float f;
    std::memcpy(&f, p, 4);
    p += 4;
    return f;
  }
  void skip(uint32_t wire) {
    if (wire == 0) (void)varint();
    else if (wire == 1) p += 8;
    else if (wire == 2) (void)sub();
    else if (wire == 5) p += 4;
    else DP_FAIL(file, ": unsupported protobuf wire type ", wire);
    DP_CHECK(p <= end, file, ": truncated protobuf");
  }
};
}  // namespace

// SentencePiece's spiece.model (DeepFloyd IF and T5 folders ship it without tokenizer.json): the pieces with their
// scores and types, and the normaliser's name. Read the way transformers converts it for T5Tokenizer: the same
// Unigram model, NFKC for a (precompiled) nmt_nfkc normaliser, special pieces and the extra ids as special tokens.
T5Tokenizer T5Tokenizer::load_spiece(const std::string& dir) {
  const std::string file = path_join(dir, "spiece.model");
  std::ifstream in(file, std::ios::binary);
  DP_CHECK(in.good(), file, ": cannot open");
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  PbReader r{reinterpret_cast<const uint8_t*>(data.data()), reinterpret_cast<const uint8_t*>(data.data()) + data.size(),
             file};
  T5Tokenizer t;
  std::vector<int> types;
  std::string normalizer;
  bool charsmap = false;
  uint32_t field, wire;
  while (r.next(&field, &wire)) {
    if (field == 1 && wire == 2) {  // SentencePiece { piece = 1; score = 2; type = 3 }
      PbReader s = r.sub();
      std::string piece;
      float score = 0;
      int type = 1;  // NORMAL
      uint32_t f, w;
      while (s.next(&f, &w)) {
        if (f == 1 && w == 2) piece = s.bytes();
        else if (f == 2 && w == 5) score = s.fixed32();
        else if (f == 3 && w == 0) type = static_cast<int>(s.varint());
        else s.skip(w);
      }
      t.vocab_.emplace_back(piece, static_cast<double>(score));
      types.push_back(type);
    } else if (field == 2 && wire == 2) {  // TrainerSpec { model_type = 3 }
      PbReader s = r.sub();
      uint32_t f, w;
      while (s.next(&f, &w)) {
        if (f == 3 && w == 0) {
          const uint64_t mt = s.varint();
          DP_CHECK(mt == 1, file, ": model_type ", mt, " is not Unigram (1): not a T5 tokenizer");
        } else {
          s.skip(w);
        }
      }
    } else if (field == 3 && wire == 2) {  // NormalizerSpec { name = 1; precompiled_charsmap = 2 }
      PbReader s = r.sub();
      uint32_t f, w;
      while (s.next(&f, &w)) {
        if (f == 1 && w == 2) normalizer = s.bytes();
        else if (f == 2 && w == 2) charsmap = !s.bytes().empty();
        else s.skip(w);
      }
    } else {
      r.skip(wire);
    }
  }
  DP_CHECK(!t.vocab_.empty(), file, ": no pieces (not a SentencePiece model)");
  for (size_t i = 0; i < t.vocab_.size(); ++i) {
    const std::string& piece = t.vocab_[i].first;
    if (types[i] == 2) t.unk_id_ = static_cast<int64_t>(i);                          // UNKNOWN
    if (types[i] == 2 || types[i] == 3) t.added_.emplace_back(piece, static_cast<int64_t>(i));  // UNKNOWN, CONTROL
  }
  t.nfkc_ = charsmap || normalizer.find("nfkc") != std::string::npos;
  // transformers' T5Tokenizer: extra_ids (tokenizer_config.json, default 100) sentinels after the pieces, the
  // highest id first: <extra_id_0> = n + extra - 1
  int64_t extra = 100;
  if (file_exists(path_join(dir, "tokenizer_config.json"))) {
    const JsonConfig c = JsonConfig::load(path_join(dir, "tokenizer_config.json"));
    extra = c.integer("extra_ids", 100);
  }
  const auto n = static_cast<int64_t>(t.vocab_.size());
  for (int64_t i = 0; i < extra; ++i) t.added_.emplace_back("<extra_id_" + std::to_string(i) + ">", n + extra - 1 - i);
  t.index(file);
  return t;
}

void T5Tokenizer::index(const std::string& file) {
  double min_score = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < vocab_.size(); ++i) {
    id_of_.emplace(vocab_[i].first, static_cast<int64_t>(i));
    max_piece_bytes_ = std::max(max_piece_bytes_, vocab_[i].first.size());
    min_score = std::min(min_score, vocab_[i].second);
  }
  unk_score_ = min_score - 10.0;  // tokenizers' Unigram: unknown characters cost 10 below the rarest piece
  std::sort(added_.begin(), added_.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  const auto id = [&](const char* piece, const char* what) {
    auto it = id_of_.find(piece);
    DP_CHECK(it != id_of_.end(), file, ": the vocabulary has no ", what, " token ", piece);
    return it->second;
  };
  pad_id_ = id("<pad>", "padding");
  eos_id_ = id("</s>", "end-of-sequence");
}

T5Tokenizer T5Tokenizer::load(const std::string& dir) {
  if (!file_exists(path_join(dir, "tokenizer.json")) && file_exists(path_join(dir, "spiece.model")))
    return load_spiece(dir);
  const std::string file = path_join(dir, "tokenizer.json");
  const JsonConfig j = JsonConfig::load(file);
  const nlohmann::json& root = j.json();
  DP_CHECK(root.contains("model") && root["model"].is_object(), file, ": field 'model' is missing");
  const nlohmann::json& m = root["model"];
  DP_CHECK(m.value("type", "") == "Unigram", file, ": field 'model.type' must be \"Unigram\" (a T5 tokenizer), got \"",
           m.value("type", ""), "\"");
  DP_CHECK(!m.value("byte_fallback", false), file, ": field 'model.byte_fallback': byte fallback is not supported");
  DP_CHECK(m.contains("vocab") && m["vocab"].is_array() && !m["vocab"].empty(), file, ": field 'model.vocab' must be a ",
           "non-empty list of [piece, score]");
  T5Tokenizer t;
  for (size_t i = 0; i < m["vocab"].size(); ++i) {
    const auto& e = m["vocab"][i];
    DP_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_number(), file, ": field 'model.vocab[", i,
             "]' must be [piece, score]");
    t.vocab_.emplace_back(e[0].get<std::string>(), e[1].get<double>());
  }
  DP_CHECK(m.contains("unk_id") && m["unk_id"].is_number_integer(), file, ": field 'model.unk_id' is required");
  t.unk_id_ = m["unk_id"].get<int64_t>();
  DP_CHECK(t.unk_id_ >= 0 && t.unk_id_ < static_cast<int64_t>(t.vocab_.size()), file, ": field 'model.unk_id' out of range");
  t.nfkc_ = parse_normalizer(root.value("normalizer", nlohmann::json()), file);
  if (root.contains("added_tokens") && root["added_tokens"].is_array())
    for (const auto& a : root["added_tokens"])
      if (a.value("special", false) && a.contains("content") && a.contains("id"))
        t.added_.emplace_back(a["content"].get<std::string>(), a["id"].get<int64_t>());
  t.index(file);
  return t;
}

// Unigram segmentation of one word (it starts with "▁"): the path of pieces with the highest total score over a
// lattice of every vocabulary piece at every character position, a character no single-character piece covers
// being <unk> (score: unk_score_); ties keep the earlier-starting piece, and runs of <unk> become one, as
// tokenizers' Unigram::encode_optimized does.
std::vector<int64_t> T5Tokenizer::encode_word(const std::string& w) const {
  const size_t n = w.size();
  constexpr double kNone = -std::numeric_limits<double>::infinity();
  std::vector<double> best(n + 1, kNone);
  std::vector<size_t> from(n + 1, 0);
  std::vector<int64_t> piece(n + 1, -1);
  best[0] = 0;
  for (size_t s = 0; s < n; s += utf8_len(static_cast<unsigned char>(w[s]))) {
    if (best[s] == kNone) continue;
    const size_t clen = std::min(utf8_len(static_cast<unsigned char>(w[s])), n - s);
    bool single = false;
    for (size_t len = 1; len <= std::min(max_piece_bytes_, n - s); ++len) {
      auto it = id_of_.find(w.substr(s, len));
      if (it == id_of_.end()) continue;
      if (len == clen) single = true;
      const double score = best[s] + vocab_[static_cast<size_t>(it->second)].second;
      if (best[s + len] == kNone || score > best[s + len]) {
        best[s + len] = score;
        from[s + len] = s;
        piece[s + len] = it->second;
      }
    }
    if (!single) {
      const double score = best[s] + unk_score_;
      if (best[s + clen] == kNone || score > best[s + clen]) {
        best[s + clen] = score;
        from[s + clen] = s;
        piece[s + clen] = unk_id_;
      }
    }
  }
  std::vector<int64_t> ids;
  for (size_t e = n; e > 0; e = from[e]) {
    if (piece[e] == unk_id_ && !ids.empty() && ids.back() == unk_id_) continue;  // fused with the <unk> after it
    ids.push_back(piece[e]);
  }
  std::reverse(ids.begin(), ids.end());
  return ids;
}

std::vector<int64_t> T5Tokenizer::encode_text(const std::string& raw) const {
  std::vector<int64_t> ids;
  // special tokens in the raw text (not normalised) stand for themselves; the rest is normalised and split
  size_t start = 0;
  auto plain = [&](const std::string& part) {
    const std::string s = nfkc_ ? nfkc(part) : part;
    size_t i = 0;
    while (i < s.size()) {
      size_t len;
      if (whitespace_at(s, i, &len)) {
        i += len;
        continue;
      }
      size_t j = i;
      while (j < s.size() && !whitespace_at(s, j, &len)) j += len;
      std::string word = s.substr(i, j - i);
      if (word.compare(0, kMeta.size(), kMeta) != 0) word = kMeta + word;  // Metaspace, prepend_scheme "always"
      // Metaspace splits at each word mark inside the word too
      size_t p = 0;
      while (p < word.size()) {
        size_t q = word.find(kMeta, p + kMeta.size());
        if (q == std::string::npos) q = word.size();
        for (int64_t id : encode_word(word.substr(p, q - p))) ids.push_back(id);
        p = q;
      }
      i = j;
    }
  };
  for (size_t i = 0; i < raw.size();) {
    bool hit = false;
    for (const auto& [content, id] : added_)
      if (!content.empty() && raw.compare(i, content.size(), content) == 0) {
        plain(raw.substr(start, i - start));
        ids.push_back(id);
        i += content.size();
        start = i;
        hit = true;
        break;
      }
    if (!hit) ++i;
  }
  plain(raw.substr(start));
  return ids;
}

T5Tokenizer::Encoded T5Tokenizer::encode(const std::string& text, int max_length) const {
  DP_CHECK(max_length >= 1, "T5 tokenizer: max_length must be at least 1");
  std::vector<int64_t> ids = encode_text(text);
  if (static_cast<int>(ids.size()) > max_length - 1) ids.resize(static_cast<size_t>(max_length - 1));
  ids.push_back(eos_id_);
  Encoded e;
  e.mask.assign(ids.size(), 1);
  e.ids = std::move(ids);
  e.ids.resize(static_cast<size_t>(max_length), pad_id_);
  e.mask.resize(static_cast<size_t>(max_length), 0);
  return e;
}

std::vector<std::string> T5Tokenizer::pieces(const std::string& text) const {
  std::vector<std::string> out;
  for (int64_t id : encode_text(text)) out.push_back(vocab_[static_cast<size_t>(id)].first);
  return out;
}

T5Config T5Config::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  T5Config c;
  c.vocab_size = j.integer("vocab_size", c.vocab_size);
  c.d_model = j.integer("d_model", c.d_model);
  c.d_kv = j.integer("d_kv", c.d_kv);
  c.d_ff = j.integer("d_ff", c.d_ff);
  c.num_layers = j.integer("num_layers", c.num_layers);
  c.num_heads = j.integer("num_heads", c.num_heads);
  c.relative_attention_num_buckets = j.integer("relative_attention_num_buckets", c.relative_attention_num_buckets);
  c.relative_attention_max_distance = j.integer("relative_attention_max_distance", c.relative_attention_max_distance);
  c.layer_norm_epsilon = j.number("layer_norm_epsilon", c.layer_norm_epsilon);
  const std::string ff = j.string("feed_forward_proj", "relu");
  if (ff != "gated-gelu" && ff != "relu")
    j.fail("feed_forward_proj", "unsupported value \"" + ff + "\" (supported: \"gated-gelu\", \"relu\")");
  c.gated = ff == "gated-gelu";
  for (const char* k : {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                        "relative_attention_num_buckets", "relative_attention_max_distance"})
    j.at_least(k, j.integer(k, 1), 1);
  if (c.relative_attention_num_buckets < 4) j.fail("relative_attention_num_buckets", "must be at least 4");
  j.positive("layer_norm_epsilon", c.layer_norm_epsilon);
  return c;
}

struct T5EncoderModel::Impl {
  struct Block {
    at::Tensor ln_attn, ln_ff;  // RMS norm weights
    nn::Linear q, k, v, o, wi_0, wi_1, wo;
  };
  at::Tensor embed, rel_bias, final_ln;  // rel_bias: [buckets, heads] (first layer's)
  std::vector<Block> blocks;
};

T5EncoderModel::T5EncoderModel(const T5Config& c, const Weights& w) : cfg_(c) {
  auto m = std::make_shared<Impl>();
  const int64_t D = c.d_model, I = c.num_heads * c.d_kv;
  m->embed = w.has("shared.weight") ? w.get("shared.weight", {c.vocab_size, D})
                                    : w.get("encoder.embed_tokens.weight", {c.vocab_size, D});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const Weights b = w.sub("encoder.block." + std::to_string(i) + ".layer");
    Impl::Block k;
    k.ln_attn = b.get("0.layer_norm.weight", {D});
    k.q = nn::Linear(b, "0.SelfAttention.q", D, I, false);
    k.k = nn::Linear(b, "0.SelfAttention.k", D, I, false);
    k.v = nn::Linear(b, "0.SelfAttention.v", D, I, false);
    k.o = nn::Linear(b, "0.SelfAttention.o", I, D, false);
    if (i == 0) m->rel_bias = b.get("0.SelfAttention.relative_attention_bias.weight", {c.relative_attention_num_buckets, c.num_heads});
    k.ln_ff = b.get("1.layer_norm.weight", {D});
    if (c.gated) {
      k.wi_0 = nn::Linear(b, "1.DenseReluDense.wi_0", D, c.d_ff, false);
      k.wi_1 = nn::Linear(b, "1.DenseReluDense.wi_1", D, c.d_ff, false);
    } else {
      k.wi_0 = nn::Linear(b, "1.DenseReluDense.wi", D, c.d_ff, false);
    }
    k.wo = nn::Linear(b, "1.DenseReluDense.wo", c.d_ff, D, false);
    m->blocks.push_back(std::move(k));
  }
  m->final_ln = w.get("encoder.final_layer_norm.weight", {D});
  impl_ = m;
}

std::shared_ptr<T5EncoderModel> T5EncoderModel::load(const std::string& dir, const DeviceSpec& spec) {
  const auto cfg = T5Config::load(path_join(dir, "config.json"));
  const Weights w = Weights::load(path_join(dir, "model.safetensors"), spec);
  auto m = std::make_shared<T5EncoderModel>(cfg, w);
  for (const auto& k : w.unused())
    if (k != "encoder.embed_tokens.weight") DP_LOG(Warn, w.origin(), ": unused tensor '", k, "'");
  return m;
}

namespace {
// transformers' T5LayerNorm: no mean subtraction, no bias, statistics in float32.
at::Tensor rms_norm(const at::Tensor& h, const at::Tensor& weight, double eps) {
  const at::Tensor var = h.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true);
  at::Tensor y = h * at::rsqrt(var + eps);
  if (weight.scalar_type() != at::kFloat) y = y.to(weight.scalar_type());
  return weight * y;
}
// float16 activations: transformers clamps each residual sum to the finite range (T5's large activations)
at::Tensor clamp_f16(const at::Tensor& h) {
  if (h.scalar_type() != at::kHalf) return h;
  const double mx = 65504.0, c = at::isinf(h).any().item<bool>() ? mx - 1000 : mx;
  return at::clamp(h, -c, c);
}
}  // namespace

// T5Attention._relative_position_bucket, bidirectional, on ATen as transformers computes it (float32 log).
static at::Tensor relative_buckets(int64_t L, int64_t num_buckets, int64_t max_distance) {
  const at::Tensor pos = at::arange(L, at::kLong);
  at::Tensor rel = pos.unsqueeze(0) - pos.unsqueeze(1);  // [query, key]: key - query
  const int64_t nb = num_buckets / 2, max_exact = nb / 2;
  at::Tensor buckets = (rel > 0).to(at::kLong) * nb;
  rel = rel.abs();
  const at::Tensor is_small = rel < max_exact;
  at::Tensor large = max_exact + (at::log(rel.to(at::kFloat) / max_exact) /
                                  std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
                                  static_cast<double>(nb - max_exact))
                                     .to(at::kLong);
  large = at::minimum(large, at::full_like(large, nb - 1));
  return buckets + at::where(is_small, rel, large);
}

int64_t t5_relative_bucket(int64_t relative_position, int64_t num_buckets, int64_t max_distance) {
  const int64_t L = std::abs(relative_position) + 1;
  const at::Tensor b = relative_buckets(L, num_buckets, max_distance);
  return relative_position >= 0 ? b[0][relative_position].item<int64_t>() : b[-relative_position][0].item<int64_t>();
}

at::Tensor T5EncoderModel::forward(const at::Tensor& input_ids, const at::Tensor& attention_mask) const {
  const Impl& m = *impl_;
  DP_CHECK(input_ids.dim() == 2, "T5 encoder: input_ids must be [batch, length]");
  const int64_t B = input_ids.size(0), L = input_ids.size(1), H = cfg_.num_heads, Dk = cfg_.d_kv;
  DP_CHECK(!attention_mask.defined() || attention_mask.sizes() == input_ids.sizes(),
           "T5 encoder: attention_mask must be [", B, ", ", L, "]");
  if (nn::batch_invariant() && B > 1)
    return nn::per_sample(B, [&](int64_t i) {
      return forward(input_ids.slice(0, i, i + 1),
                     attention_mask.defined() ? attention_mask.slice(0, i, i + 1) : attention_mask);
    });
  const at::Tensor ids = input_ids.to(m.embed.device(), at::kLong);
  DP_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < cfg_.vocab_size),
           "T5 encoder: token id out of range [0, ", cfg_.vocab_size, ")");
  at::Tensor h = at::embedding(m.embed, ids);
  const auto dt = h.scalar_type();
  // position bias [1, H, L, L] from the first layer's table, plus the padding mask (keys), for every layer
  const at::Tensor buckets = relative_buckets(L, cfg_.relative_attention_num_buckets,
                                              cfg_.relative_attention_max_distance).to(h.device());
  at::Tensor bias = at::embedding(m.rel_bias, buckets).permute({2, 0, 1}).unsqueeze(0);
  if (attention_mask.defined()) {
    const double lowest = dt == at::kHalf ? -65504.0 : dt == at::kBFloat16 ? -3.3895313892515355e38
                                                                          : -3.4028234663852886e38;
    const at::Tensor pad = (1 - attention_mask.to(h.device(), dt)).view({B, 1, 1, L}) * lowest;
    bias = bias + pad;
  }
  bias = bias.to(dt).expand({B, H, L, L});
  auto heads = [&](const at::Tensor& t) { return t.view({B, L, H, Dk}).transpose(1, 2); };
  for (const auto& b : m.blocks) {
    const at::Tensor y = rms_norm(h, b.ln_attn, cfg_.layer_norm_epsilon);
    const at::Tensor a = at::scaled_dot_product_attention(heads(b.q(y)), heads(b.k(y)), heads(b.v(y)), bias,
                                                          0.0, false, /*scale=*/1.0);  // T5 does not scale
    h = clamp_f16(h + b.o(a.transpose(1, 2).reshape({B, L, H * Dk})));
    const at::Tensor z = rms_norm(h, b.ln_ff, cfg_.layer_norm_epsilon);
    const at::Tensor f = cfg_.gated ? at::gelu(b.wi_0(z), "tanh") * b.wi_1(z) : at::relu(b.wi_0(z));
    h = clamp_f16(h + b.wo(f));
  }
  return rms_norm(h, m.final_ln, cfg_.layer_norm_epsilon);
}

}  // namespace diffpipe
