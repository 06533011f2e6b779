// Transport: one rank's endpoint for sending messages to any rank (itself included) and receiving its own.
// Implementations: in-process (queues between threads; a "world" of N endpoints in one process), MPI (CPU
// tensors, non-blocking, one progress thread owns every MPI call), NCCL (GPU tensors over ncclSend/ncclRecv
// on dedicated streams, headers over MPI). All pass one typed test suite (tests/runtime/test_transport.cpp).
// Thread-safety: send() from any thread; recv() from one consumer thread. Messages between one pair of
// ranks arrive in the order sent. A failed transport reports its error from send()/recv()/flush().
#pragma once
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "diffpipe/runtime/message.h"

namespace diffpipe {

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;
  // Queues `msg` for `dst`; returns at once. The tensors must not be modified afterwards.
  virtual void send(int dst, Message msg) = 0;
  // The next message for this rank, or nullopt after `timeout`.
  virtual std::optional<Message> recv(std::chrono::milliseconds timeout) = 0;
  // Waits until every queued send has completed; throws naming the peer after `timeout`.
  virtual void flush(std::chrono::milliseconds timeout) = 0;
};

// N connected in-process endpoints (ranks 0..n-1), e.g. one per thread.
std::vector<std::shared_ptr<Transport>> make_inproc_world(int n);

// This process's MPI endpoint (MPI must be initialised: see mpi_env.h). CUDA tensors are staged to the host.
std::shared_ptr<Transport> make_mpi_transport();

// NCCL endpoint: GPU tensors over NCCL, headers (and CPU tensors) over MPI. Only in CUDA builds;
// nccl_available() says whether this build has it.
bool nccl_available();
std::shared_ptr<Transport> make_nccl_transport(int cuda_device);

}  // namespace diffpipe
