#include "diffpipe/runtime/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>

namespace diffpipe {

namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::Info)};
std::atomic<int> g_rank{-1};
}  // namespace

void set_log_level(LogLevel l) { g_level = static_cast<int>(l); }
void set_log_rank(int rank) { g_rank = rank; }
bool log_enabled(LogLevel l) { return static_cast<int>(l) >= g_level.load(); }

void log(LogLevel l, const std::string& msg) {
  static const char* names[] = {"debug", "info", "warn", "error"};
  const auto t = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  const int r = g_rank.load();
  if (r >= 0)
    std::fprintf(stderr, "[diffpipe %.3f rank %d %s] %s\n", t, r, names[static_cast<int>(l)], msg.c_str());
  else
    std::fprintf(stderr, "[diffpipe %s] %s\n", names[static_cast<int>(l)], msg.c_str());
}

}  // namespace diffpipe
