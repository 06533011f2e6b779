#include "diffpipe/stages/tokenizer.h"

#include <unicode/locid.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <sstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe {

namespace {

// GPT-2/CLIP bytes_to_unicode: printable bytes map to themselves, the rest to 256+n.
const std::vector<std::string>& byte_encoder() {
  static const std::vector<std::string> table = [] {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<int> cp(256, -1);
    for (int b : bs) cp[b] = b;
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (cp[b] < 0) cp[b] = 256 + n++;
    std::vector<std::string> out(256);
    for (int b = 0; b < 256; ++b) {
      icu::UnicodeString u(static_cast<UChar32>(cp[b]));
      u.toUTF8String(out[b]);
    }
    return out;
  }();
  return table;
}

// Decodes UTF-8 into code points (invalid bytes become U+FFFD, like Python's errors="replace").
std::vector<UChar32> code_points(const std::string& s) {
  std::vector<UChar32> out;
  int32_t i = 0, n = static_cast<int32_t>(s.size());
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  while (i < n) {
    UChar32 c;
    U8_NEXT(p, i, n, c);
    out.push_back(c < 0 ? 0xFFFD : c);
  }
  return out;
}

void append_utf8(std::string& out, UChar32 c) {
  icu::UnicodeString u(c);
  u.toUTF8String(out);
}

bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
// Python's str.isspace(): category Zs, or bidi class WS, B or S.
bool is_space(UChar32 c) {
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return true;
  if (u_charType(c) == U_SPACE_SEPARATOR) return true;
  const auto bidi = u_charDirection(c);
  return bidi == U_WHITE_SPACE_NEUTRAL || bidi == U_BLOCK_SEPARATOR || bidi == U_SEGMENT_SEPARATOR;
}

// The HTML5 named character references and Python's numeric remapping tables (generated from Python's html
// module), so that html_unescape() matches Python's html.unescape exactly.
const std::unordered_map<std::string, std::string>& named_entities() {
  static const std::unordered_map<std::string, std::string> m = {
#include "html_entities.inc"
  };
  return m;
}
const std::unordered_map<uint32_t, std::string>& remapped_charrefs() {
  static const std::unordered_map<uint32_t, std::string> m = {
#include "html_charrefs.inc"
  };
  return m;
}
bool invalid_codepoint(uint32_t c) {
  static const std::vector<uint32_t> v = {
#include "html_invalid_codepoints.inc"
  };
  return std::binary_search(v.begin(), v.end(), c);
}

}  // namespace

// Python's html.unescape: the pattern &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?) replaced by
// _replace_charref (numeric references with the HTML5 remapping; named references by exact name, else by the
// longest known prefix, else left as they are). Works on code points, as Python's str does.
std::string ClipTokenizer::html_unescape(const std::string& text) {
  if (text.find('&') == std::string::npos) return text;
  const std::vector<UChar32> cp = code_points(text);
  std::string out;
  auto put = [&](size_t a, size_t b) {
    for (size_t k = a; k < b; ++k) append_utf8(out, cp[k]);
  };
  size_t i = 0;
  while (i < cp.size()) {
    if (cp[i] != '&') {
      append_utf8(out, cp[i++]);
      continue;
    }
    size_t j = i + 1;
    if (j < cp.size() && cp[j] == '#') {
      const bool hex = j + 1 < cp.size() && (cp[j + 1] == 'x' || cp[j + 1] == 'X');
      size_t k = j + (hex ? 2 : 1), start = k;
      auto is_digit = [&](UChar32 c) {
        return (c >= '0' && c <= '9') || (hex && ((c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')));
      };
      uint64_t num = 0;
      while (k < cp.size() && is_digit(cp[k])) {
        const UChar32 c = cp[k];
        const int d = c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
        if (num <= 0x7FFFFFFF) num = num * (hex ? 16 : 10) + d;  // anything larger is invalid anyway
        ++k;
      }
      if (k == start) {  // "&#" without digits: not a reference
        append_utf8(out, cp[i++]);
        continue;
      }
      if (k < cp.size() && cp[k] == ';') ++k;
      auto it = remapped_charrefs().find(static_cast<uint32_t>(num));
      if (it != remapped_charrefs().end()) out += it->second;
      else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) append_utf8(out, 0xFFFD);
      else if (!invalid_codepoint(static_cast<uint32_t>(num))) append_utf8(out, static_cast<UChar32>(num));
      i = k;
      continue;
    }
    size_t k = j;
    while (k < cp.size() && k - j < 32 && cp[k] != '\t' && cp[k] != '\n' && cp[k] != '\f' && cp[k] != ' ' &&
           cp[k] != '<' && cp[k] != '&' && cp[k] != '#' && cp[k] != ';')
      ++k;
    if (k == j) {
      append_utf8(out, cp[i++]);
      continue;
    }
    if (k < cp.size() && cp[k] == ';') ++k;
    std::string name;
    for (size_t q = j; q < k; ++q) append_utf8(name, cp[q]);
    const auto& ents = named_entities();
    auto it = ents.find(name);
    if (it != ents.end()) {
      out += it->second;
      i = k;
      continue;
    }
    bool replaced = false;
    for (size_t x = k - j - 1; x > 1; --x) {  // longest known prefix of the name
      std::string pre;
      for (size_t q = j; q < j + x; ++q) append_utf8(pre, cp[q]);
      auto p = ents.find(pre);
      if (p != ents.end()) {
        out += p->second;
        put(j + x, k);
        replaced = true;
        break;
      }
    }
    if (!replaced) {
      out += '&';
      put(j, k);
    }
    i = k;
  }
  return out;
}

std::string ClipTokenizer::normalize(const std::string& text) {
  const std::string unesc = html_unescape(html_unescape(text));
  // whitespace collapse + strip
  std::string collapsed;
  bool pending_space = false;
  for (UChar32 c : code_points(unesc)) {
    if (is_space(c)) {
      pending_space = !collapsed.empty();
      continue;
    }
    if (pending_space) collapsed.push_back(' ');
    pending_space = false;
    append_utf8(collapsed, c);
  }
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(collapsed);
  u.toLower(icu::Locale::getRoot());
  std::string lower;
  u.toUTF8String(lower);
  return lower;
}

std::vector<std::string> ClipTokenizer::split(const std::string& text) {
  // <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+  (ignore case)
  static const char* specials[] = {"<|startoftext|>", "<|endoftext|>"};
  static const char* contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  const std::vector<UChar32> cps = code_points(text);
  std::vector<std::string> out;
  size_t i = 0;
  auto matches_ascii = [&](const char* lit) {
    size_t n = std::strlen(lit);
    if (i + n > cps.size()) return size_t(0);
    for (size_t k = 0; k < n; ++k)
      if (u_tolower(cps[i + k]) != std::tolower(static_cast<unsigned char>(lit[k]))) return size_t(0);
    return n;
  };
  while (i < cps.size()) {
    size_t n = 0;
    for (const char* s : specials)
      if ((n = matches_ascii(s))) break;
    if (!n)
      for (const char* s : contractions)
        if ((n = matches_ascii(s))) break;
    if (!n) {
      const UChar32 c = cps[i];
      size_t k = i;
      if (is_letter(c)) {
        while (k < cps.size() && is_letter(cps[k])) ++k;
      } else if (is_number(c)) {
        k = i + 1;
      } else if (!is_space(c)) {
        while (k < cps.size() && !is_space(cps[k]) && !is_letter(cps[k]) && !is_number(cps[k])) ++k;
      } else {
        ++i;  // whitespace separates tokens
        continue;
      }
      n = k - i;
    }
    std::string tok;
    for (size_t k = i; k < i + n; ++k) append_utf8(tok, cps[k]);
    out.push_back(std::move(tok));
    i += n;
  }
  return out;
}

ClipTokenizer ClipTokenizer::load(const std::string& dir) {
  ClipTokenizer t;
  const std::string vocab_path = path_join(dir, "vocab.json");
  const std::string merges_path = path_join(dir, "merges.txt");
  const JsonConfig vocab = JsonConfig::load(vocab_path);
  for (auto it = vocab.json().begin(); it != vocab.json().end(); ++it) {
    DP_CHECK(it.value().is_number_integer(), vocab_path, ": token '", it.key(), "' has a non-integer id");
    t.vocab_[it.key()] = it.value().get<int64_t>();
  }
  DP_CHECK(!t.vocab_.empty(), vocab_path, ": empty vocabulary");
  std::ifstream mf(merges_path);
  DP_CHECK(mf.good(), merges_path, ": cannot open file");
  std::string line;
  int rank = 0, lineno = 0;
  while (std::getline(mf, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (lineno == 1 && line.rfind("#version", 0) == 0)) continue;
    const auto sp = line.find(' ');
    DP_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < line.size() && line.find(' ', sp + 1) == std::string::npos,
             merges_path, ":", lineno, ": expected two symbols separated by one space, got '", line, "'");
    t.ranks_.emplace(line, rank++);
  }
  std::string bos = "<|startoftext|>", eos = "<|endoftext|>", pad = "<|endoftext|>";
  const std::string cfg_path = path_join(dir, "tokenizer_config.json");
  if (file_exists(cfg_path)) {
    const JsonConfig cfg = JsonConfig::load(cfg_path);
    auto token_of = [&](const char* key, const std::string& def) {
      if (!cfg.has(key)) return def;
      const auto& v = cfg.json()[key];
      if (v.is_string()) return v.get<std::string>();
      if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
      cfg.fail(key, "expected a token string");
    };
    bos = token_of("bos_token", bos);
    eos = token_of("eos_token", eos);
    pad = token_of("pad_token", pad);
    const int64_t ml = cfg.integer("model_max_length", 77);
    if (ml < 2) cfg.fail("model_max_length", "must be at least 2");
    t.max_length_ = static_cast<int>(std::min<int64_t>(ml, 77));
  }
  auto id_of = [&](const std::string& tok, const char* what) {
    auto it = t.vocab_.find(tok);
    DP_CHECK(it != t.vocab_.end(), vocab_path, ": ", what, " token '", tok, "' is not in the vocabulary");
    return it->second;
  };
  t.bos_id_ = id_of(bos, "bos");
  t.eos_id_ = id_of(eos, "eos");
  t.pad_id_ = id_of(pad, "pad");
  return t;
}

std::vector<std::string> ClipTokenizer::merge_pair(const std::vector<std::string>& symbols, const std::string& a,
                                                   const std::string& b) {
  std::vector<std::string> out;
  for (size_t i = 0; i < symbols.size();) {
    if (i + 1 < symbols.size() && symbols[i] == a && symbols[i + 1] == b) {
      out.push_back(a + b);
      i += 2;
    } else {
      out.push_back(symbols[i++]);
    }
  }
  return out;
}

std::vector<std::string> ClipTokenizer::bpe(const std::string& token) const {
  {
    std::lock_guard<std::mutex> lk(cache_->mu);
    auto it = cache_->words.find(token);
    if (it != cache_->words.end()) return it->second;
  }
  // Split into symbols (one byte-unicode char each), the last one with "</w>".
  std::vector<std::string> word;
  for (UChar32 c : code_points(token)) {
    std::string s;
    append_utf8(s, c);
    word.push_back(s);
  }
  if (word.empty()) return {};
  word.back() += "</w>";
  while (word.size() > 1) {
    int best = INT32_MAX;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = ranks_.find(word[i] + " " + word[i + 1]);
      if (it != ranks_.end() && it->second < best) {
        best = it->second;
        best_i = i;
      }
    }
    if (best == INT32_MAX) break;
    word = merge_pair(word, word[best_i], word[best_i + 1]);
  }
  std::lock_guard<std::mutex> lk(cache_->mu);
  if (cache_->words.size() < 100000) cache_->words.emplace(token, word);
  return word;
}

int64_t ClipTokenizer::length(const std::string& text) const {
  return std::min<int64_t>(static_cast<int64_t>(encode_untruncated(text).size()), max_length_);
}

void ClipTokenizer::add_token(const std::string& text, const std::vector<int64_t>& ids) {
  const std::string key = normalize(text);
  DP_CHECK(!key.empty() && !ids.empty(), "tokenizer: an added token needs text and ids");
  for (const auto& [t, v] : added_) DP_CHECK(t != key, "tokenizer: '", text, "' is already an added token");
  for (int64_t id : ids) added_ids_ = std::max(added_ids_, id + 1 - static_cast<int64_t>(vocab_.size()));
  added_.emplace_back(key, ids);
  std::stable_sort(added_.begin(), added_.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
}

std::vector<int64_t> ClipTokenizer::encode_untruncated(const std::string& text) const {
  std::vector<int64_t> ids{bos_id_};
  const std::string norm = normalize(text);
  size_t plain = 0;  // start of the stretch without added tokens
  for (size_t i = 0; i < norm.size() && !added_.empty();) {
    const auto hit = std::find_if(added_.begin(), added_.end(),
                                  [&](const auto& a) { return norm.compare(i, a.first.size(), a.first) == 0; });
    if (hit == added_.end()) {
      ++i;
      continue;
    }
    encode_plain(norm.substr(plain, i - plain), ids);
    ids.insert(ids.end(), hit->second.begin(), hit->second.end());
    i += hit->first.size();
    plain = i;
  }
  encode_plain(norm.substr(plain), ids);
  ids.push_back(eos_id_);
  return ids;
}

void ClipTokenizer::encode_plain(const std::string& normalized, std::vector<int64_t>& ids) const {
  const auto& be = byte_encoder();
  for (const std::string& piece : split(normalized)) {
    if (piece == "<|startoftext|>" || piece == "<|endoftext|>") {  // special tokens map to themselves
      auto it = vocab_.find(piece);
      if (it != vocab_.end()) {
        ids.push_back(it->second);
        continue;
      }
    }
    std::string mapped;
    for (unsigned char b : piece) mapped += be[b];
    for (const std::string& sym : bpe(mapped)) {
      auto it = vocab_.find(sym);
      DP_CHECK(it != vocab_.end(), "tokenizer: BPE symbol '", sym, "' of '", piece, "' is not in the vocabulary");
      ids.push_back(it->second);
    }
  }
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids = encode_untruncated(text);
  if (static_cast<int>(ids.size()) > max_length_) {
    ids.resize(max_length_ - 1);
    ids.push_back(eos_id_);
  }
  ids.resize(max_length_, pad_id_);
  return ids;
}

}  // namespace diffpipe
