#include "diffpipe/cluster/toml.h"

#include <fstream>
#include <sstream>
#include <toml++/toml.h>

#include "diffpipe/runtime/error.h"

namespace diffpipe {
namespace {

nlohmann::json to_json(const toml::node& n, const std::string& origin) {
  if (const auto* t = n.as_table()) {
    nlohmann::json o = nlohmann::json::object();
    for (auto&& [k, v] : *t) o[std::string(k.str())] = to_json(v, origin);
    return o;
  }
  if (const auto* a = n.as_array()) {
    nlohmann::json o = nlohmann::json::array();
    for (auto&& v : *a) o.push_back(to_json(v, origin));
    return o;
  }
  if (const auto* v = n.as_string()) return v->get();
  if (const auto* v = n.as_integer()) return v->get();
  if (const auto* v = n.as_floating_point()) return v->get();
  if (const auto* v = n.as_boolean()) return v->get();
  DP_FAIL(origin, ":", n.source().begin.line, ": dates and times are not pipeline settings");
}

}  // namespace

nlohmann::json parse_toml(const std::string& text, const std::string& origin) {
  try {
    const toml::table t = toml::parse(text, origin);
    return to_json(t, origin);
  } catch (const toml::parse_error& e) {
    DP_FAIL(origin, ":", e.source().begin.line, ":", e.source().begin.column, ": ", e.description());
  }
}

nlohmann::json load_toml(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DP_CHECK(f.good(), path, ": pipeline file not found or unreadable");
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_toml(ss.str(), path);
}

}  // namespace diffpipe
