// A caching allocator for LibTorch's CPU tensors. Every denoising step allocates and frees the same large
// activations; through malloc each one is a fresh mmap whose pages the kernel faults in and zeroes again
// (about a fifth of a CPU UNet step). Blocks of 256 KiB and more are kept after free in size classes (at most
// 12.5 % rounding) and handed out again to requests of their class or up to a quarter smaller; blocks of 2 MiB and more are 2 MiB aligned and asked for transparent
// huge pages. Smaller blocks go to LibTorch's default allocator. The free cache is bounded: a freed block
// that would push it over the bound is returned to the system, and a failed allocation empties it and retries.
// install() also sets glibc's mmap threshold to 256 KiB and its trim threshold to 1 GiB, so smaller blocks are
// recycled inside malloc's arenas instead of being mapped and unmapped each step.
// Thread-safe (one mutex, taken only for large blocks). install() is idempotent; the last bound given wins.
#pragma once
#include <cstddef>
#include <cstdint>

namespace diffpipe::cpu_allocator {

// The default bound: a quarter of the machine's memory shared by the ranks on it (mpi::world().local_size),
// e.g. 6 GiB for one process on 24 GiB. `generate --cpu-cache-mb` overrides it.
size_t default_bound();

void install(size_t max_cached_bytes = default_bound());
bool installed();

struct Stats {
  size_t cached_bytes = 0;  // free blocks held
  size_t live_bytes = 0;    // large blocks in use
  uint64_t hits = 0, misses = 0;
};
Stats stats();
void release_cached();  // returns every free block to the system

}  // namespace diffpipe::cpu_allocator
