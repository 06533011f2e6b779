#include "diffpipe/runtime/json_config.h"

#include <cmath>

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DP_CHECK(f.good(), path, ": cannot open file");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool dir_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
std::string path_join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}

void make_dirs(const std::string& dir) {
  std::string cur;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if ((i == dir.size() || dir[i] == '/') && !cur.empty()) ::mkdir(cur.c_str(), 0755);
    if (i < dir.size()) cur += dir[i];
  }
  DP_CHECK(dir_exists(dir), dir, ": cannot create folder");
}

JsonConfig JsonConfig::load(const std::string& path) {
  DP_CHECK(file_exists(path), path, ": file not found");
  const std::string text = read_text_file(path);
  nlohmann::json j;
  try {
    // allow_exceptions, ignore_comments=false; diffusers writes -Infinity/NaN as bare words, which strict JSON
    // rejects: map them to strings first so that lambda_min_clipped: -Infinity parses.
    std::string fixed;
    fixed.reserve(text.size());
    bool in_str = false;
    for (size_t i = 0; i < text.size(); ++i) {
      char c = text[i];
      if (c == '"' && (i == 0 || text[i - 1] != '\\')) in_str = !in_str;
      if (!in_str) {
        if (text.compare(i, 9, "-Infinity") == 0) { fixed += "\"-Infinity\""; i += 8; continue; }
        if (text.compare(i, 8, "Infinity") == 0) { fixed += "\"Infinity\""; i += 7; continue; }
        if (text.compare(i, 3, "NaN") == 0) { fixed += "\"NaN\""; i += 2; continue; }
      }
      fixed.push_back(c);
    }
    j = nlohmann::json::parse(fixed);
  } catch (const nlohmann::json::parse_error& e) {
    DP_FAIL(path, ": invalid JSON: ", e.what());
  }
  DP_CHECK(j.is_object(), path, ": expected a JSON object at the top level");
  return JsonConfig(std::move(j), path);
}

bool JsonConfig::has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

void JsonConfig::fail(const std::string& key, const std::string& why) const {
  DP_FAIL(path_, ": key '", key, "': ", why);
}

const nlohmann::json& JsonConfig::at(const std::string& key) const {
  if (!has(key)) fail(key, "missing");
  return j_[key];
}

int64_t JsonConfig::integer(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_number_integer()) fail(key, "expected an integer, got " + v.dump());
  return v.get<int64_t>();
}
double JsonConfig::number(const std::string& key) const {
  const auto& v = at(key);
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    const auto s = v.get<std::string>();
    if (s == "-Infinity") return -INFINITY;
    if (s == "Infinity") return INFINITY;
    if (s == "NaN") return NAN;
  }
  fail(key, "expected a number, got " + v.dump());
}
bool JsonConfig::boolean(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_boolean()) fail(key, "expected true or false, got " + v.dump());
  return v.get<bool>();
}
std::string JsonConfig::string(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_string()) fail(key, "expected a string, got " + v.dump());
  return v.get<std::string>();
}
std::vector<int64_t> JsonConfig::int_list(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_array()) fail(key, "expected a list of integers, got " + v.dump());
  std::vector<int64_t> out;
  for (const auto& e : v) {
    if (!e.is_number_integer()) fail(key, "expected a list of integers, got " + v.dump());
    out.push_back(e.get<int64_t>());
  }
  return out;
}
std::vector<std::string> JsonConfig::string_list(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_array()) fail(key, "expected a list of strings, got " + v.dump());
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string()) fail(key, "expected a list of strings, got " + v.dump());
    out.push_back(e.get<std::string>());
  }
  return out;
}
int64_t JsonConfig::integer(const std::string& key, int64_t def) const { return has(key) ? integer(key) : def; }
double JsonConfig::number(const std::string& key, double def) const { return has(key) ? number(key) : def; }
bool JsonConfig::boolean(const std::string& key, bool def) const { return has(key) ? boolean(key) : def; }
std::string JsonConfig::string(const std::string& key, const std::string& def) const {
  return has(key) ? string(key) : def;
}
std::vector<int64_t> JsonConfig::int_or_list(const std::string& key, size_t n, int64_t def) const {
  if (!has(key)) return std::vector<int64_t>(n, def);
  const auto& v = j_[key];
  if (v.is_number_integer()) return std::vector<int64_t>(n, v.get<int64_t>());
  auto l = int_list(key);
  if (l.size() != n) fail(key, "expected " + std::to_string(n) + " entries (one per block), got " + v.dump());
  return l;
}

void JsonConfig::require(const std::string& key, const nlohmann::json& allowed) const {
  if (has(key) && json()[key] != allowed)
    fail(key, "unsupported value " + json()[key].dump() + " (supported: " + allowed.dump() + ")");
}

void JsonConfig::at_least(const std::string& key, int64_t value, int64_t lo) const {
  if (value < lo) fail(key, "must be at least " + std::to_string(lo) + ", got " + std::to_string(value));
}

void JsonConfig::at_least(const std::string& key, const std::vector<int64_t>& values, int64_t lo) const {
  for (int64_t v : values) at_least(key, v, lo);
}

void JsonConfig::positive(const std::string& key, double value) const {
  if (!(std::isfinite(value) && value > 0)) fail(key, "must be a finite number > 0, got " + std::to_string(value));
}

void JsonConfig::finite(const std::string& key, double value) const {
  if (!std::isfinite(value)) fail(key, "must be a finite number");
}

}  // namespace diffpipe
