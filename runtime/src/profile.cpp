#include "diffpipe/runtime/profile.h"

#include <atomic>
#include <chrono>

namespace diffpipe::profile {

namespace {
std::atomic<bool> g_on{false};
std::function<void()> g_sync;
std::atomic<int64_t> g_ns[kSections];
std::atomic<int64_t> g_calls[kSections];
std::atomic<int64_t> g_max_ns[kSections];
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

const char* section_name(Section s) {
  static const char* names[kSections] = {"text encoder", "unet", "sampler", "vae", "upscale", "transport"};
  return names[static_cast<int>(s)];
}

void set_enabled(bool on) { g_on = on; }
bool enabled() { return g_on.load(std::memory_order_relaxed); }
void set_sync(std::function<void()> sync) { g_sync = std::move(sync); }

Scope::Scope(Section s) : section_(static_cast<int>(s)) {
  if (!enabled()) return;
  if (g_sync) g_sync();
  start_ns_ = now_ns();
}

Scope::~Scope() {
  if (start_ns_ < 0) return;
  if (g_sync) g_sync();
  const int64_t d = now_ns() - start_ns_;
  g_ns[section_] += d;
  g_calls[section_] += 1;
  int64_t m = g_max_ns[section_].load();
  while (d > m && !g_max_ns[section_].compare_exchange_weak(m, d)) {
  }
}

Totals totals() {
  Totals t;
  for (int i = 0; i < kSections; ++i) {
    t.seconds[i] = g_ns[i].load() / 1e9;
    t.calls[i] = g_calls[i].load();
    t.max_seconds[i] = g_max_ns[i].load() / 1e9;
  }
  return t;
}

void reset() {
  for (int i = 0; i < kSections; ++i) {
    g_ns[i] = 0;
    g_calls[i] = 0;
    g_max_ns[i] = 0;
  }
}

}  // namespace diffpipe::profile
