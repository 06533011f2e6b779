// Error type and checking macros shared by every module.
// Owns: diffpipe::Error (a std::runtime_error whose message names file, key or value) and DP_CHECK.
// Thread-safety: stateless; any thread may throw. Errors never cross threads as exceptions: workers store
// them and re-raise them at the waiting side (see cluster/).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace diffpipe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// An error every rank raised together (start-up agreement): rank 0 reports it, the others stay quiet.
class AgreedError : public Error {
 public:
  explicit AgreedError(const std::string& what) : Error(what) {}
};

// The message of `e` for people: a LibTorch error loses its C++ backtrace unless debug output is on
// (`diffpipe --debug ...` or DIFFPIPE_DEBUG=1). Every place that turns an exception into a message uses it.
std::string describe(const std::exception& e);
void set_debug(bool on);
bool debug();

namespace detail {
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace diffpipe

// DP_CHECK(cond, parts...): throws diffpipe::Error with the concatenated parts when cond is false.
#define DP_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) throw ::diffpipe::Error(::diffpipe::detail::cat(__VA_ARGS__)); \
  } while (0)

#define DP_FAIL(...) throw ::diffpipe::Error(::diffpipe::detail::cat(__VA_ARGS__))
