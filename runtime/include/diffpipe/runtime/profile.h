// Per-process time accounting by pipeline part, for `generate --profile` and the benchmarks: each Scope adds
// its wall time and one call to its section. Off by default, when a Scope costs one relaxed atomic load.
// Thread-safe (atomics); set_sync() must be called before any Scope runs (at model load).
#pragma once
#include <cstdint>
#include <functional>

namespace diffpipe::profile {

enum class Section : int { TextEncoder = 0, UNet, Sampler, Vae, Upscale, Transport };
constexpr int kSections = 6;
const char* section_name(Section s);  // "text encoder", "unet", ...

void set_enabled(bool on);
bool enabled();
// Runs at both ends of every timed scope while profiling is on, before the clock is read: on a GPU a device
// synchronisation, so asynchronous work is charged to the scope that queued it (profiling then costs overlap).
void set_sync(std::function<void()> sync);

class Scope {
 public:
  explicit Scope(Section s);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  int section_;
  int64_t start_ns_ = -1;  // < 0: profiling was off at construction
};

struct Totals {
  double seconds[kSections] = {};
  double max_seconds[kSections] = {};  // the longest single call (a first call's warm-up shows here)
  int64_t calls[kSections] = {};
};
Totals totals();
void reset();

}  // namespace diffpipe::profile
