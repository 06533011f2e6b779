#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "diffpipe/runtime/compute_lane.h"

using namespace diffpipe;

// Work posted from several threads runs on the serving thread, one call at a time, and each caller waits for its
// own; an exception reaches the caller that posted it; close() lets serve() return once the work is done.
TEST(ComputeLane, PostedWorkRunsOnTheServingThreadOneAtATime) {
  ComputeLane lane;
  lane.open();
  std::thread::id server;
  std::atomic<int> running{0}, overlap{0}, ran{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        int result = -1;
        lane.run([&] {
          if (running.fetch_add(1) != 0) ++overlap;
          EXPECT_EQ(std::this_thread::get_id(), server);
          std::this_thread::sleep_for(std::chrono::microseconds(50));
          result = i;
          ++ran;
          running.fetch_sub(1);
        });
        EXPECT_EQ(result, i) << "run() returned before its work was done";
      }
      EXPECT_THROW(lane.run([] { throw std::runtime_error("boom"); }), std::runtime_error);
    });
  std::thread closer([&] {
    for (auto& t : callers) t.join();
    lane.close();
  });
  server = std::this_thread::get_id();
  lane.serve();  // returns after close()
  closer.join();
  EXPECT_EQ(ran.load(), 100);
  EXPECT_EQ(overlap.load(), 0);
  EXPECT_EQ(lane.calls(), 104u);
  EXPECT_FALSE(lane.is_open());
}

// Not open, closed, or called from the serving thread: the work runs on the caller's thread at once.
TEST(ComputeLane, RunsInlineWhenNotServing) {
  ComputeLane lane;
  std::thread::id where;
  lane.run([&] { where = std::this_thread::get_id(); });
  EXPECT_EQ(where, std::this_thread::get_id());
  lane.open();
  std::thread other([&] { lane.run([&] { lane.run([&] { where = std::this_thread::get_id(); }); }); lane.close(); });
  lane.serve();
  other.join();
  EXPECT_EQ(where, std::this_thread::get_id()) << "nested run() on the serving thread runs inline";
  std::thread after([&] { lane.run([&] { where = std::this_thread::get_id(); }); });
  const auto after_id = after.get_id();
  after.join();
  EXPECT_EQ(where, after_id) << "after close() work runs on its caller";
  EXPECT_EQ(lane.calls(), 1u);
}

// A thread set to one CPU thread runs LibTorch's parallel work itself: no OpenMP pool threads appear; another
// thread keeps the process setting.
TEST(ComputeLane, OneCpuThreadHereStartsNoPool) {
  const int T = at::get_num_threads();
  int inside = 0, before = 0, after = 0;
  std::thread t([&] {
    use_one_cpu_thread_here();
    inside = at::get_num_threads();
    before = process_thread_count();
    at::Tensor x = at::ones({int64_t(1) << 22});
    EXPECT_EQ(x.add(1).sum().item<double>(), 2.0 * (int64_t(1) << 22));
    after = process_thread_count();
  });
  t.join();
  EXPECT_EQ(inside, 1);
  ASSERT_GT(before, 0);
  EXPECT_EQ(after, before);
  EXPECT_EQ(at::get_num_threads(), T) << "the calling thread keeps its setting";
  if (T > 1) {  // the control: a thread left alone does start a pool for the same work
    std::thread u([&] {
      before = process_thread_count();
      (void)at::ones({int64_t(1) << 22}).add(1);
      after = process_thread_count();
    });
    u.join();
    EXPECT_GT(after, before);
  }
}
