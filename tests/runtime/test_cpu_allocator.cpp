// The caching CPU allocator: blocks are reused by size class, the free cache respects its bound, small blocks
// bypass it, data survives, and concurrent use from several threads is safe.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <thread>

#include "diffpipe/runtime/cpu_allocator.h"

using namespace diffpipe;

namespace {
constexpr size_t kMiB = size_t(1) << 20;
at::Tensor floats(size_t bytes) { return at::empty({static_cast<int64_t>(bytes / 4)}, at::kFloat); }
}  // namespace

TEST(CpuAllocator, ReusesFreedBlocksOfTheSameClass) {
  cpu_allocator::install(256 * kMiB);
  cpu_allocator::release_cached();
  void* first;
  {
    at::Tensor a = floats(8 * kMiB);
    first = a.data_ptr();
  }
  EXPECT_GE(cpu_allocator::stats().cached_bytes, 8 * kMiB);
  const auto before = cpu_allocator::stats();
  at::Tensor b = floats(8 * kMiB);
  EXPECT_EQ(b.data_ptr(), first) << "a freed block of the same size is handed out again";
  EXPECT_EQ(cpu_allocator::stats().hits, before.hits + 1);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data_ptr()) % (2 * kMiB), 0u) << "large blocks are 2 MiB aligned";
  b.fill_(3.0f);
  EXPECT_EQ(b.sum().item<double>(), 3.0 * (8 * kMiB / 4));
}

TEST(CpuAllocator, FitsSlightlySmallerRequestsButNotMuchSmallerOnes) {
  cpu_allocator::install(256 * kMiB);
  cpu_allocator::release_cached();
  void* p;
  {
    at::Tensor a = floats(10 * kMiB);
    p = a.data_ptr();
  }
  {
    at::Tensor tiny_fit = floats(9 * kMiB);  // within a quarter: reuses the 10 MiB block
    EXPECT_EQ(tiny_fit.data_ptr(), p);
  }
  at::Tensor small = floats(4 * kMiB);  // far smaller: a new block, the 10 MiB one stays cached
  EXPECT_NE(small.data_ptr(), p);
  EXPECT_GE(cpu_allocator::stats().cached_bytes, 10 * kMiB);
}

TEST(CpuAllocator, FreeCacheStaysWithinItsBound) {
  cpu_allocator::install(48 * kMiB);
  cpu_allocator::release_cached();
  {
    std::vector<at::Tensor> ts;
    for (int i = 0; i < 10; ++i) ts.push_back(floats(16 * kMiB));
    EXPECT_GE(cpu_allocator::stats().live_bytes, 160 * kMiB);
  }
  EXPECT_LE(cpu_allocator::stats().cached_bytes, 48 * kMiB);
  { at::Tensor big = floats(64 * kMiB); }  // larger than the bound: returned to the system at once
  EXPECT_LE(cpu_allocator::stats().cached_bytes, 48 * kMiB);
  cpu_allocator::install(0);  // bound 0: nothing is kept
  EXPECT_EQ(cpu_allocator::stats().cached_bytes, 0u);
  { at::Tensor t = floats(8 * kMiB); }
  EXPECT_EQ(cpu_allocator::stats().cached_bytes, 0u);
}

TEST(CpuAllocator, SmallBlocksBypassTheCache) {
  cpu_allocator::install(64 * kMiB);
  const auto before = cpu_allocator::stats();
  for (int i = 0; i < 100; ++i) {
    at::Tensor t = floats(64 * 1024);
    t.fill_(1.0f);
  }
  const auto after = cpu_allocator::stats();
  EXPECT_EQ(after.hits + after.misses, before.hits + before.misses);
}

TEST(CpuAllocator, ConcurrentThreadsKeepTheirData) {
  cpu_allocator::install(128 * kMiB);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([t, &bad] {
      for (int i = 0; i < 60; ++i) {
        const size_t bytes = (size_t(1 + (i * 7 + t) % 9)) * 512 * 1024;
        at::Tensor a = floats(bytes);
        a.fill_(static_cast<float>(t * 1000 + i));
        at::Tensor b = floats(bytes * 2);
        b.fill_(-1.0f);
        if (a.min().item<float>() != a.max().item<float>() || a[0].item<float>() != float(t * 1000 + i)) ++bad;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0) << "a block was handed to two tensors at once";
  EXPECT_EQ(cpu_allocator::stats().live_bytes, 0u) << "every large block came back";
  cpu_allocator::install(cpu_allocator::default_bound());
}
