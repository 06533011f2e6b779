// Minimal leveled logging to stderr, prefixed with the rank when one is set.
// Thread-safety: log() may be called from any thread (one line is written with one fprintf).
#pragma once
#include <string>

namespace diffpipe {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };

void set_log_level(LogLevel l);
void set_log_rank(int rank);  // -1: no rank prefix
bool log_enabled(LogLevel l);
void log(LogLevel l, const std::string& msg);

}  // namespace diffpipe

#define DP_LOG(level, ...)                                                              \
  do {                                                                                  \
    if (::diffpipe::log_enabled(::diffpipe::LogLevel::level))                           \
      ::diffpipe::log(::diffpipe::LogLevel::level, ::diffpipe::detail::cat(__VA_ARGS__)); \
  } while (0)
