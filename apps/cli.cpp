#include "cli.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "diffpipe/runtime/error.h"

namespace diffpipe::cli {
namespace {

// The help text, from the same declarations the parser uses.
std::string format_help(const std::string& usage, const std::vector<Opt>& opts, const std::string& about) {
  std::string out = "usage: " + usage + "\noptions:\n";
  auto line = [&](const std::string& left, const std::string& help) {
    std::string l = "  " + left;
    std::string h = help;
    for (size_t pos = h.find('\n'); pos != std::string::npos; pos = h.find('\n', pos + 28))
      h.replace(pos, 1, "\n" + std::string(27, ' '));
    out += l.size() < 26 ? l + std::string(27 - l.size(), ' ') + h + "\n" : l + "\n" + std::string(27, ' ') + h + "\n";
  };
  for (const auto& o : opts)
    line("--" + o.name + (o.value.empty() ? "" : " " + o.value), o.help + (o.repeat ? " (repeatable)" : ""));
  line("-h, --help", "this help");
  if (!about.empty()) out += about + (about.back() == '\n' ? "" : "\n");
  return out;
}

}  // namespace

Args::Args(const std::string& command, const std::string& usage, const std::vector<Opt>& opts, int argc, char** argv,
           const std::string& about)
    : command_(command) {
  CLI::App app(about, "diffpipe " + command);
  app.allow_extras(false);
  app.positionals_at_end(false);
  std::map<std::string, std::vector<std::string>> store;
  std::map<std::string, int64_t> counts;
  for (const auto& o : opts) {
    if (o.value.empty()) {
      app.add_flag("--" + o.name, counts[o.name], o.help);
    } else {
      app.add_option("--" + o.name, store[o.name], o.help)->type_name(o.value)->allow_extra_args(false);
    }
  }
  std::string prog = "diffpipe " + command;
  std::vector<char*> av{prog.data()};
  av.insert(av.end(), argv, argv + argc);
  try {
    app.parse(static_cast<int>(av.size()), av.data());
  } catch (const CLI::CallForHelp&) {
    help_ = true;
    help_text_ = format_help(usage, opts, about);
    return;
  } catch (const CLI::ExtrasError& e) {
    std::string extra = e.what();  // "The following argument(s) were not expected: --stepz 3"
    const auto colon = extra.find(": ");
    extra = colon == std::string::npos ? extra : extra.substr(colon + 2);
    std::vector<std::string> tokens;  // CLI11 lists them last first
    for (size_t a = 0, b; a < extra.size(); a = b + 1) {
      b = extra.find(' ', a);
      if (b == std::string::npos) b = extra.size();
      if (b > a) tokens.insert(tokens.begin(), extra.substr(a, b - a));
    }
    std::string first = tokens.empty() ? extra : tokens[0];
    for (const auto& t : tokens)
      if (t.rfind("-", 0) == 0) {
        first = t;
        break;
      }
    DP_FAIL(command_, ": ", first.rfind("-", 0) == 0 ? "unknown option " : "unexpected argument '", first,
            first.rfind("-", 0) == 0 ? "" : "'", " (see '", hint(), " --help')");
  } catch (const CLI::ParseError& e) {
    DP_FAIL(command_, ": ", e.what(), " (see '", hint(), " --help')");
  }
  for (auto& [k, v] : store)
    if (!v.empty()) values_[k] = v;
  for (auto& [k, n] : counts)
    if (n > 0) flags_[k] = static_cast<int>(n);
}

std::string Args::hint() const {
  return command_.rfind("bench_", 0) == 0 ? command_ : "diffpipe " + command_;
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

std::vector<int64_t> Args::integers(const std::string& k, int64_t lo, int64_t hi) const {
  std::vector<int64_t> out;
  if (!values_.count(k)) return out;
  const std::string s = str(k);
  for (size_t at = 0; at != std::string::npos;) {
    const size_t comma = s.find(',', at);
    const std::string tok = s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(tok.c_str(), &end, 10);
    DP_CHECK(!tok.empty() && *end == 0 && errno == 0 && v >= lo && v <= hi, command_, ": --", k, ": '", tok,
             "' is not an integer in [", lo, ", ", hi, "] (a comma-separated list)");
    out.push_back(v);
    at = comma == std::string::npos ? comma : comma + 1;
  }
  return out;
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
