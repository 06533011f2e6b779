// Text input checks shared by the commands and the fuzz suite: UTF-8 validity and prompts files.
#pragma once
#include <string>
#include <vector>

namespace diffpipe {

// Byte offset of the first invalid UTF-8 sequence in s, or npos (overlong forms, surrogates and code points
// above U+10FFFF are invalid, as for JSON output).
size_t invalid_utf8_at(const std::string& s);
// Throws "<where>: invalid UTF-8 at byte N".
void check_utf8(const std::string& text, const std::string& where);

struct PromptLine {
  std::string text;
  std::string origin;  // "file:line" or "--prompt #k", for messages
};
// One prompt per line; blank lines and lines starting with '#' are skipped, CR LF endings accepted. Errors name
// the file (missing, a folder, no prompts) or file:line (invalid UTF-8).
std::vector<PromptLine> read_prompts(const std::string& path);

}  // namespace diffpipe
