#include "diffpipe/runtime/error.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace diffpipe {
namespace {
std::atomic<bool> g_debug{[] {
  const char* v = std::getenv("DIFFPIPE_DEBUG");
  return v && *v && std::strcmp(v, "0") != 0;
}()};
}  // namespace

void set_debug(bool on) { g_debug = on; }
bool debug() { return g_debug; }

std::string describe(const std::exception& e) {
  if (!g_debug)
    if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

}  // namespace diffpipe
