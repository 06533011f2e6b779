// Command-line parsing for the diffpipe subcommands: "--key value" and "--flag" options, declared up front,
// so an unknown option or a malformed number is an error naming the option (never silently ignored).
// Single-threaded; used once at start-up.
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace diffpipe::cli {

class Args {
 public:
  // value_opts: options that take a value; flag_opts: options without one; repeatable options collect values.
  Args(const std::string& command, int argc, char** argv, const std::set<std::string>& value_opts,
       const std::set<std::string>& flag_opts);
  bool has(const std::string& k) const { return values_.count(k) || flags_.count(k); }
  std::string str(const std::string& k, const std::string& def = "") const;
  std::vector<std::string> all(const std::string& k) const;  // every value of a repeated option
  int64_t integer(const std::string& k, int64_t def) const;
  uint64_t u64(const std::string& k, uint64_t def) const;
  double number(const std::string& k, double def) const;
  bool flag(const std::string& k) const { return flags_.count(k) != 0; }

 private:
  std::string command_;
  std::map<std::string, std::vector<std::string>> values_;
  std::set<std::string> flags_;
};

}  // namespace diffpipe::cli
