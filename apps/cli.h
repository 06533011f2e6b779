// Command-line parsing for every diffpipe subcommand and benchmark, on CLI11. Each command declares its
// options once (name, value name, help, repeatable); -h/--help prints help made from those declarations, and an
// unknown option, a missing value or a malformed number is an error naming the command and the option.
// Single-threaded; used once at start-up.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace diffpipe::cli {

struct Opt {
  std::string name;   // without the leading "--"
  std::string value;  // value name shown in help ("N", "DIR"); empty = a flag without a value
  std::string help;
  bool repeat = false;  // may be given several times (all() returns every value)
};

class Args {
 public:
  // `command` names the command in messages ("generate", "train unet"); `usage` is the help text's first line
  // after "usage: "; `about` follows the option list.
  Args(const std::string& command, const std::string& usage, const std::vector<Opt>& opts, int argc, char** argv,
       const std::string& about = "");
  // -h or --help was given: nothing else was checked; print help_text() and exit 0.
  bool help_requested() const { return help_; }
  const std::string& help_text() const { return help_text_; }

  bool has(const std::string& k) const { return values_.count(k) || flags_.count(k); }
  std::string str(const std::string& k, const std::string& def = "") const;
  std::vector<std::string> all(const std::string& k) const;  // every value of a repeated option
  int64_t integer(const std::string& k, int64_t def) const;
  // A comma-separated list of integers in [lo, hi] ("7,8,9"); empty when the option is absent, never when given.
  std::vector<int64_t> integers(const std::string& k, int64_t lo, int64_t hi) const;
  uint64_t u64(const std::string& k, uint64_t def) const;
  double number(const std::string& k, double def) const;
  bool flag(const std::string& k) const { return flags_.count(k) != 0; }

 private:
  std::string hint() const;  // how the user runs this command
  std::string command_;
  bool help_ = false;
  std::string help_text_;
  std::map<std::string, std::vector<std::string>> values_;
  std::map<std::string, int> flags_;
};

}  // namespace diffpipe::cli
