// Pipeline files are TOML, read with toml++ (any valid TOML: multi-line arrays, inline tables, ...) and
// handed on as nested JSON objects. Syntax errors name the file, line and column.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace diffpipe {

nlohmann::json parse_toml(const std::string& text, const std::string& origin);
nlohmann::json load_toml(const std::string& path);

}  // namespace diffpipe
