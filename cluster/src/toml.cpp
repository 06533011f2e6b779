#include "diffpipe/cluster/toml.h"

#include <cctype>
#include <sstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe {

namespace {

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

bool valid_key(const std::string& k) {
  if (k.empty()) return false;
  for (char c : k)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') return false;
  return true;
}

struct Parser {
  const std::string& origin;
  int line;
  [[noreturn]] void fail(const std::string& why) const { DP_FAIL(origin, ":", line, ": ", why); }

  // Parses one value starting at s[i]; advances i.
  nlohmann::json value(const std::string& s, size_t& i) {
    while (i < s.size() && s[i] == ' ') ++i;
    if (i >= s.size()) fail("missing value");
    if (s[i] == '"') {
      std::string out;
      for (++i; i < s.size() && s[i] != '"'; ++i) {
        if (s[i] == '\\' && i + 1 < s.size()) {
          ++i;
          switch (s[i]) {
            case 'n': out += '\n'; break;
            case 't': out += '\t'; break;
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            default: fail(std::string("unsupported escape \\") + s[i]);
          }
        } else {
          out += s[i];
        }
      }
      if (i >= s.size()) fail("unterminated string");
      ++i;
      return out;
    }
    if (s[i] == '[') {
      nlohmann::json arr = nlohmann::json::array();
      ++i;
      while (true) {
        while (i < s.size() && s[i] == ' ') ++i;
        if (i < s.size() && s[i] == ']') {
          ++i;
          return arr;
        }
        arr.push_back(value(s, i));
        while (i < s.size() && s[i] == ' ') ++i;
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == ']') {
          ++i;
          return arr;
        }
        fail("expected ',' or ']' in array");
      }
    }
    size_t j = i;
    while (j < s.size() && s[j] != ',' && s[j] != ']' && s[j] != ' ') ++j;
    const std::string tok = s.substr(i, j - i);
    i = j;
    if (tok == "true") return true;
    if (tok == "false") return false;
    try {
      size_t used = 0;
      if (tok.find_first_of(".eE") == std::string::npos) {
        long long v = std::stoll(tok, &used);
        if (used == tok.size()) return v;
      } else {
        double v = std::stod(tok, &used);
        if (used == tok.size()) return v;
      }
    } catch (...) {
    }
    fail("cannot parse value '" + tok + "' (strings need double quotes)");
  }
};

std::string strip_comment(const std::string& line) {
  bool in_str = false;
  for (size_t i = 0; i < line.size(); ++i) {
    if (line[i] == '"' && (i == 0 || line[i - 1] != '\\')) in_str = !in_str;
    if (line[i] == '#' && !in_str) return line.substr(0, i);
  }
  return line;
}

}  // namespace

nlohmann::json parse_toml(const std::string& text, const std::string& origin) {
  nlohmann::json root = nlohmann::json::object();
  nlohmann::json* table = &root;
  std::istringstream in(text);
  std::string raw;
  Parser p{origin, 0};
  while (std::getline(in, raw)) {
    ++p.line;
    const std::string s = trim(strip_comment(raw));
    if (s.empty()) continue;
    if (s.front() == '[') {
      if (s.back() != ']' || s.size() < 3 || s[1] == '[') p.fail("malformed table header '" + s + "'");
      const std::string name = trim(s.substr(1, s.size() - 2));
      table = &root;
      std::stringstream parts(name);
      std::string part;
      while (std::getline(parts, part, '.')) {
        part = trim(part);
        if (!valid_key(part)) p.fail("invalid table name '" + name + "'");
        if (!table->contains(part)) (*table)[part] = nlohmann::json::object();
        else if (!(*table)[part].is_object()) p.fail("'" + part + "' is already a value, not a table");
        table = &(*table)[part];
      }
      if (table->contains("__defined__")) p.fail("table [" + name + "] defined twice");
      (*table)["__defined__"] = true;
      continue;
    }
    const auto eq = s.find('=');
    if (eq == std::string::npos) p.fail("expected 'key = value', got '" + s + "'");
    const std::string key = trim(s.substr(0, eq));
    if (!valid_key(key)) p.fail("invalid key '" + key + "'");
    if (table->contains(key)) p.fail("duplicate key '" + key + "'");
    const std::string rest = trim(s.substr(eq + 1));
    size_t i = 0;
    nlohmann::json v = p.value(rest, i);
    if (trim(rest.substr(i)) != "") p.fail("unexpected text after the value: '" + rest.substr(i) + "'");
    (*table)[key] = v;
  }
  // drop the markers
  std::function<void(nlohmann::json&)> clean = [&](nlohmann::json& j) {
    if (!j.is_object()) return;
    j.erase("__defined__");
    for (auto& [k, v] : j.items()) clean(v);
  };
  clean(root);
  return root;
}

nlohmann::json load_toml(const std::string& path) {
  DP_CHECK(file_exists(path), path, ": file not found");
  return parse_toml(read_text_file(path), path);
}

}  // namespace diffpipe
