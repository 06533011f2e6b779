#include "cli.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "diffpipe/runtime/error.h"

namespace diffpipe::cli {

Args::Args(const std::string& command, int argc, char** argv, const std::set<std::string>& value_opts,
           const std::set<std::string>& flag_opts)
    : command_(command) {
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    DP_CHECK(a.rfind("--", 0) == 0, command_, ": unexpected argument '", a, "' (options start with --)");
    std::string key = a.substr(2), val;
    const auto eq = key.find('=');
    bool inline_val = eq != std::string::npos;
    if (inline_val) {
      val = key.substr(eq + 1);
      key = key.substr(0, eq);
    }
    if (flag_opts.count(key)) {
      DP_CHECK(!inline_val, command_, ": option --", key, " takes no value");
      flags_.insert(key);
    } else if (value_opts.count(key)) {
      if (!inline_val) {
        DP_CHECK(i + 1 < argc, command_, ": option --", key, " needs a value");
        val = argv[++i];
      }
      values_[key].push_back(val);
    } else {
      std::string known;
      for (const auto& o : value_opts) known += " --" + o;
      for (const auto& o : flag_opts) known += " --" + o;
      DP_FAIL(command_, ": unknown option --", key, " (known:", known, ")");
    }
  }
}

std::string Args::str(const std::string& k, const std::string& def) const {
  auto it = values_.find(k);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::all(const std::string& k) const {
  auto it = values_.find(k);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

int64_t Args::integer(const std::string& k, int64_t def) const {
  if (!values_.count(k)) return def;
  const std::string s = str(k);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  DP_CHECK(!s.empty() && *end == 0 && errno == 0, command_, ": --", k, " expects an integer, got '", s, "'");
  return v;
}

uint64_t Args::u64(const std::string& k, uint64_t def) const {
  if (!values_.count(k)) return def;
  const std::string s = str(k);
  char* end = nullptr;
  errno = 0;
  DP_CHECK(!s.empty() && s[0] != '-', command_, ": --", k, " expects a non-negative integer, got '", s, "'");
  const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  DP_CHECK(*end == 0 && errno == 0, command_, ": --", k, " expects a non-negative integer, got '", s, "'");
  return v;
}

double Args::number(const std::string& k, double def) const {
  if (!values_.count(k)) return def;
  const std::string s = str(k);
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  DP_CHECK(!s.empty() && *end == 0 && std::isfinite(v), command_, ": --", k, " expects a number, got '", s, "'");
  return v;
}

}  // namespace diffpipe::cli
