// A strict TOML subset for pipeline files: [table] and [table.sub] headers, key = value with strings,
// integers, floats, booleans and flat arrays of those, # comments. Anything else is an error naming the
// file and line. Duplicate keys and tables are errors. Result: nested JSON objects.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace diffpipe {

nlohmann::json parse_toml(const std::string& text, const std::string& origin);
nlohmann::json load_toml(const std::string& path);

}  // namespace diffpipe
