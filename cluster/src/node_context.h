// What one rank's dispatcher, stage workers and coordinator share: options, transport, clock, the first
// failure, the stop flag, the cancelled requests, and per-stage busy time. Internal to the runner.
#pragma once
#include <atomic>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/compute_lane.h"
#include "diffpipe/runtime/profile.h"

namespace diffpipe::runner {

struct NodeContext {
  NodeContext(const RunOptions& o, Transport& t, const PipelineDef& p, const Clock& c)
      : opts(o), transport(t), pipeline(p), clock(c), busy_us(p.size()) {
    for (auto& b : busy_us) b = 0;
    touch();
  }
  const RunOptions& opts;
  Transport& transport;
  const PipelineDef& pipeline;
  const Clock& clock;
  std::atomic<bool> stop{false};

  int rank() const { return transport.rank(); }
  // Every message leaves through here: its hand-over to the transport is the profile's "transport" time.
  void send(int dst, Message m) {
    profile::Scope prof(profile::Section::Transport);
    if (dst != transport.rank())
      for (const auto& t : m.tensors) bytes_sent += t.numel() * static_cast<int64_t>(t.element_size());
    transport.send(dst, std::move(m));
  }

  // The first failure wins; it ends the job.
  void set_failure(const std::string& what) {
    std::lock_guard<std::mutex> lk(mu_);
    if (failure_.empty()) failure_ = what;
    failed_ = true;
  }
  bool failed() const { return failed_; }
  std::string failure() {
    std::lock_guard<std::mutex> lk(mu_);
    return failure_;
  }

  void cancel(uint64_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    cancelled_.insert(id);
  }
  bool is_cancelled(uint64_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    return cancelled_.count(id) != 0;
  }

  // Activity (any message or finished work) for the dispatcher's silence deadline, on the run's clock.
  void touch() { last_activity_ = clock.now(); }
  double last_activity() const { return last_activity_; }

  // CPU ranks: every stage's tensor work runs here, on the rank's calling thread (runtime/compute_lane.h)
  ComputeLane lane;
  std::vector<std::atomic<int64_t>> busy_us;  // per pipeline stage
  std::atomic<size_t> images_done{0}, failed_requests{0};
  std::atomic<int64_t> bytes_sent{0};                        // tensor bytes to other ranks
  std::atomic<size_t> peak_queued{0}, peak_active{0};        // coordinator: admission queue and admitted requests

 private:
  std::mutex mu_;
  std::string failure_;
  std::atomic<bool> failed_{false};
  std::set<uint64_t> cancelled_;
  std::atomic<double> last_activity_{0};
};

}  // namespace diffpipe::runner
