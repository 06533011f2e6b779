// Private: the MPI transport. One progress thread owns every MPI call of this endpoint: it posts
// non-blocking sends (header, then one payload per tensor straight from the tensor's memory), probes for
// headers, receives payloads, and retires completed sends. Subclasses (NCCL) move device tensors
// themselves through the device hooks.
#pragma once
#include <mpi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <exception>
#include <mutex>
#include <thread>

#include "diffpipe/runtime/transport.h"

namespace diffpipe {

class MpiTransport : public Transport {
 public:
  MpiTransport();
  ~MpiTransport() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  void send(int dst, Message msg) override;
  std::optional<Message> recv(std::chrono::milliseconds timeout) override;
  void flush(std::chrono::milliseconds timeout) override;
  void start();  // starts the progress thread; call once the object is fully built

 protected:
  struct PendingSend {
    int dst = -1;
    MsgKind kind = MsgKind::Test;
    uint64_t request = 0;
    std::vector<uint8_t> header;
    std::vector<at::Tensor> keep;  // payload memory kept alive until completion
    std::vector<MPI_Request> reqs;
    void* device_token = nullptr;  // subclass completion handle
  };
  // Device hooks (the MPI transport stages device tensors through the host instead).
  virtual bool via_device(const at::Tensor&) const { return false; }
  virtual void device_send(int, const at::Tensor&, PendingSend&) {}
  virtual bool device_send_done(PendingSend&) { return true; }
  virtual at::Tensor device_recv(int, const TensorSpec&) { return at::Tensor(); }
  void stop();   // flushes and joins (subclasses call it in their destructor)
  int rank_ = 0, size_ = 1;

 private:
  void progress_loop();
  void post(int dst, Message msg);
  bool poll_incoming();
  void deliver(Message m);
  void fail(std::exception_ptr e);
  void rethrow() const;

  std::mutex out_mu_;
  std::condition_variable out_cv_;
  std::deque<std::pair<int, Message>> outq_;
  std::deque<PendingSend> pending_;  // progress thread only
  std::atomic<size_t> in_flight_{0};  // queued + pending sends

  std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::deque<Message> inbox_;

  mutable std::mutex err_mu_;
  std::exception_ptr error_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> abandon_{false};  // shutting down with sends a peer never took: give them up
  mutable std::mutex dst_mu_;
  std::map<int, int> unfinished_;     // destination rank -> queued or pending sends (for messages)
  std::string unfinished_ranks() const;
  std::thread thread_;
};

}  // namespace diffpipe
