#include "diffpipe/runtime/text.h"

#include <cstdint>
#include <fstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe {

// Byte offset of the first invalid UTF-8 sequence in s, or npos (overlong forms, surrogates and code points
// above U+10FFFF are invalid, as for JSON output).
size_t invalid_utf8_at(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xE ? 2 : (c >> 3) == 0x1E ? 3 : -1;
    if (n < 0 || (n > 0 && i + n >= s.size())) return i;  // not a lead byte, or cut short
    uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d >> 6) != 0x2) return i;
      cp = (cp << 6) | (d & 0x3F);
    }
    const uint32_t min[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n + 1;
  }
  return std::string::npos;
}

void check_utf8(const std::string& text, const std::string& where) {
  const size_t at = invalid_utf8_at(text);
  DP_CHECK(at == std::string::npos, where, ": invalid UTF-8 at byte ", at);
}

std::vector<PromptLine> read_prompts(const std::string& path) {
  DP_CHECK(!dir_exists(path), path, ": is a folder; --prompts takes a file with one prompt per line");
  std::ifstream f(path);
  DP_CHECK(f.good(), path, ": prompts file not found or not readable");
  std::vector<PromptLine> out;
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    check_utf8(line, path + ":" + std::to_string(n));
    const auto a = line.find_first_not_of(" \t");
    if (a == std::string::npos || line[a] == '#') continue;
    out.push_back({line.substr(a), path + ":" + std::to_string(n)});
  }
  DP_CHECK(!out.empty(), path, ": no prompts (one per line; '#' starts a comment)");
  return out;
}

}  // namespace diffpipe
