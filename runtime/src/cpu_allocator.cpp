#include "diffpipe/runtime/cpu_allocator.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

#include "diffpipe/runtime/mpi_env.h"

namespace diffpipe::cpu_allocator {

namespace {

constexpr size_t kMinCached = size_t(1) << 18;  // smaller blocks: the default allocator
constexpr size_t kHuge = size_t(1) << 21;       // 2 MiB: transparent huge page size on x86-64

// Size classes: round up to 1/8 of the block's power of two (>= 64 B steps), so equal shapes share a class.
size_t size_class(size_t n) {
  size_t p = 1;
  while ((p << 1) <= n) p <<= 1;
  const size_t step = std::max<size_t>(p / 8, 64);
  return (n + step - 1) / step * step;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  explicit CachingCpuAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached) return base_->allocate(n);
    const size_t cls = size_class(n);
    void* p = take(cls);
    if (!p) {
      p = fresh(cls);
      if (!p) {
        release_cached();
        p = fresh(cls);
      }
      if (!p) throw std::bad_alloc();
    }
    return {p, p, &CachingCpuAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCpuAllocator::deleter; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void set_bound(size_t b) {
    std::lock_guard<std::mutex> lk(mu_);
    bound_ = b;
    trim_locked();
  }
  Stats stats() {
    std::lock_guard<std::mutex> lk(mu_);
    return st_;
  }
  void release_cached() {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [cls, p] : free_) std::free(p);
    free_.clear();
    st_.cached_bytes = 0;
  }

 private:
  static void deleter(void* p);

  // A cached block of class cls .. 1.25 cls, or nullptr.
  void* take(size_t cls) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.lower_bound(cls);  // the smallest cached block that fits, if it wastes at most a quarter
    if (it == free_.end() || it->first > cls + cls / 4) {
      ++st_.misses;
      return nullptr;
    }
    void* p = it->second;
    const size_t size = it->first;
    free_.erase(it);
    st_.cached_bytes -= size;
    live_[p] = size;
    st_.live_bytes += size;
    ++st_.hits;
    return p;
  }

  void* fresh(size_t cls) {
    const size_t align = cls >= kHuge ? kHuge : 64;
    const size_t bytes = (cls + align - 1) / align * align;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    if (cls >= kHuge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
    std::lock_guard<std::mutex> lk(mu_);
    live_[p] = cls;
    st_.live_bytes += cls;
    return p;
  }

  // Returns true when `p` was one of ours (now cached or freed).
  bool give_back(void* p) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    const size_t cls = it->second;
    live_.erase(it);
    st_.live_bytes -= cls;
    if (cls > bound_) {
      std::free(p);
      return true;
    }
    free_.emplace(cls, p);
    st_.cached_bytes += cls;
    trim_locked();
    return true;
  }

  // Frees the largest cached blocks until the cache fits its bound.
  void trim_locked() {
    while (st_.cached_bytes > bound_ && !free_.empty()) {
      auto it = std::prev(free_.end());
      st_.cached_bytes -= it->first;
      std::free(it->second);
      free_.erase(it);
    }
  }

  c10::Allocator* base_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;     // size class -> free block
  std::unordered_map<void*, size_t> live_;  // block in use -> size class
  size_t bound_ = 0;
  Stats st_;
};

CachingCpuAllocator* g_alloc = nullptr;
std::once_flag g_once;

void CachingCpuAllocator::deleter(void* p) {
  if (!p) return;
  if (g_alloc->give_back(p)) return;
  g_alloc->base_->raw_deleter()(p);  // a small block from the default allocator (raw_allocate path)
}

}  // namespace

size_t default_bound() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const size_t total = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(8) << 30;
  const size_t local = size_t(std::max(1, mpi::world().local_size));  // ranks sharing this node
  return total / 4 / local;
}

void install(size_t max_cached_bytes) {
  std::call_once(g_once, [] {
    // Blocks below kMinCached stay with malloc: keep them off mmap and keep freed heap memory mapped, so the
    // stage threads' arenas do not fault the same pages in again every step (measured: ~9 % of a bfloat16 UNet
    // step on a non-main thread with glibc's defaults).
    mallopt(M_MMAP_THRESHOLD, static_cast<int>(kMinCached));
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    g_alloc = new CachingCpuAllocator(c10::GetCPUAllocator());  // lives for the process: tensors may outlive main
    c10::SetAllocator(c10::DeviceType::CPU, g_alloc, /*priority=*/1);
  });
  g_alloc->set_bound(max_cached_bytes);
}

bool installed() { return g_alloc != nullptr; }

Stats stats() { return g_alloc ? g_alloc->stats() : Stats{}; }

void release_cached() {
  if (g_alloc) g_alloc->release_cached();
}

}  // namespace diffpipe::cpu_allocator
