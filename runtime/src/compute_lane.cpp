#include "diffpipe/runtime/compute_lane.h"

#include <ATen/Parallel.h>
#include <dirent.h>
#include <dlfcn.h>

namespace diffpipe {

void ComputeLane::open() {
  std::lock_guard<std::mutex> lk(mu_);
  open_ = true;
  closed_ = false;
}

bool ComputeLane::is_open() const {
  std::lock_guard<std::mutex> lk(mu_);
  return open_ && !closed_;
}

size_t ComputeLane::calls() const {
  std::lock_guard<std::mutex> lk(mu_);
  return calls_;
}

void ComputeLane::run(const std::function<void()>& f) {
  Job job{&f, nullptr, false};
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (!open_ || closed_ || std::this_thread::get_id() == server_) {
      lk.unlock();
      f();
      return;
    }
    jobs_.push_back(&job);
    ++calls_;
    cv_work_.notify_one();
    cv_done_.wait(lk, [&] { return job.done; });
  }
  if (job.error) std::rethrow_exception(job.error);
}

void ComputeLane::serve() {
  std::unique_lock<std::mutex> lk(mu_);
  server_ = std::this_thread::get_id();
  while (true) {
    cv_work_.wait(lk, [&] { return !jobs_.empty() || closed_; });
    if (jobs_.empty()) break;  // closed and drained
    Job* job = jobs_.front();
    jobs_.pop_front();
    lk.unlock();
    try {
      (*job->f)();
    } catch (...) {
      job->error = std::current_exception();
    }
    lk.lock();
    job->done = true;
    cv_done_.notify_all();
  }
  server_ = std::thread::id();
}

void ComputeLane::close() {
  std::lock_guard<std::mutex> lk(mu_);
  closed_ = true;
  cv_work_.notify_all();
}

void use_one_cpu_thread_here() {
  // LibTorch sets each thread's OpenMP and MKL thread counts to the process setting on the thread's first
  // parallel call (one copy of that check in LibTorch, get_num_threads() runs it; one in code compiled here);
  // run both first, or they would undo what follows.
  (void)at::get_num_threads();
  at::internal::lazy_init_num_threads();
  // Looked up at run time: the OpenMP runtime is LibTorch's (not linked here directly); absent in a LibTorch
  // built without OpenMP, where there is nothing to limit.
  using SetThreads = void (*)(int);
  if (auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"))) set(1);
}

int process_thread_count() {
  DIR* d = opendir("/proc/self/task");
  if (!d) return 0;
  int n = 0;
  while (const dirent* e = readdir(d))
    if (e->d_name[0] != '.') ++n;
  closedir(d);
  return n;
}

}  // namespace diffpipe
