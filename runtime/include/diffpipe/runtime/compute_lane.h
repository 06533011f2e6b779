// One thread for a CPU rank's tensor work.
//
// Why: LibTorch's CPU kernels parallelise through OpenMP (GNU libgomp), which keeps a pool of worker threads for
// every thread that starts parallel work. Once the process holds more such threads than it has CPUs, libgomp
// stops spinning between parallel regions and puts its workers to sleep, so every parallel region (a GroupNorm,
// an add, each layer) pays for waking them. A rank whose stages run on threads of their own holds one pool per
// stage thread and is past that limit: measured on a 2-core CPU, a small add took 100 us instead of 15 and the
// embedded model's UNet call 46 ms instead of 21 (docs/results.md, "One OpenMP pool per CPU rank").
//
// The runner therefore runs every CPU stage's tensor work (construction, add, step) through a ComputeLane served
// by the rank's calling thread, which loaded the model and already owns the process's pool; the rank's other
// threads (stage workers, dispatcher, coordinator, transport) call use_one_cpu_thread_here(), so whatever small
// tensor work they do runs serially and never starts a pool of its own.
//
// Thread-safety: run() from any thread; serve() from one thread; close() from any thread.
#pragma once
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace diffpipe {

class ComputeLane {
 public:
  // Runs f on the serving thread and returns when it has; rethrows what f threw. Runs f on the calling thread
  // when the lane is not open, is closed, or the caller is the serving thread itself.
  void run(const std::function<void()>& f);
  // Makes run() post its work here from now on, until close().
  void open();
  // Serves posted work on the calling thread until close(), then returns (work posted before close() runs).
  void serve();
  void close();
  bool is_open() const;
  size_t calls() const;  // work run through the lane (posted, not inline)

 private:
  struct Job {
    const std::function<void()>* f;
    std::exception_ptr error;
    bool done = false;
  };
  mutable std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::deque<Job*> jobs_;
  bool open_ = false, closed_ = false;
  std::thread::id server_;
  size_t calls_ = 0;
};

// This thread's LibTorch parallel loops (elementwise work, copies, reductions, oneDNN) run on this thread alone
// from now on: its OpenMP thread count becomes 1, after LibTorch's own per-thread set-up so that it does not undo
// it. Other threads keep their settings. MKL's matrix products keep their own count: leave them to the lane.
void use_one_cpu_thread_here();

// How many threads the process has now (Linux: /proc/self/task; 0 where unknown). For tests and benchmarks.
int process_thread_count();

}  // namespace diffpipe
