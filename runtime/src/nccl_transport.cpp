// NCCL transport: headers (and CPU tensors) over MPI, CUDA tensors over ncclSend/ncclRecv.
// Two communicators: "up" carries data from lower to higher ranks, "down" from higher to lower, each on its
// own stream, so no cycle of blocked sends can form (the highest rank never sends on "up"). A message to
// self pairs ncclSend and ncclRecv in one group. Communicators are bootstrapped with ncclGetUniqueId on
// rank 0 broadcast over MPI.
#include "diffpipe/runtime/transport.h"

#ifdef DIFFPIPE_WITH_NCCL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/mpi_env.h"
#include "mpi_transport.h"

#define DP_CUDA_CHECK(call)                                                                              \
  do {                                                                                                   \
    cudaError_t _e = (call);                                                                             \
    if (_e != cudaSuccess) DP_FAIL(__FILE__, ":", __LINE__, ": ", #call, " failed: ", cudaGetErrorString(_e)); \
  } while (0)
#define DP_NCCL_CHECK(call)                                                                              \
  do {                                                                                                   \
    ncclResult_t _r = (call);                                                                            \
    if (_r != ncclSuccess) DP_FAIL(__FILE__, ":", __LINE__, ": ", #call, " failed: ", ncclGetErrorString(_r)); \
  } while (0)

namespace diffpipe {

namespace {

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    default: return ncclUint8;  // moved as raw bytes
  }
}

class NcclTransport : public MpiTransport {
 public:
  explicit NcclTransport(int device) {
    int n = 0;
    DP_CUDA_CHECK(cudaGetDeviceCount(&n));
    DP_CHECK(n > 0, "NCCL transport: no CUDA device");
    device_ = device % n;  // several ranks per node share the node's GPUs round-robin
    DP_CUDA_CHECK(cudaSetDevice(device_));
    for (int c = 0; c < 2; ++c) {
      ncclUniqueId id;
      if (rank_ == 0) DP_NCCL_CHECK(ncclGetUniqueId(&id));
      DP_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
      DP_NCCL_CHECK(ncclCommInitRank(&comm_[c], size_, id, rank_));
      DP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_[c], cudaStreamNonBlocking));
    }
  }
  ~NcclTransport() override {
    stop();
    for (int c = 0; c < 2; ++c) {
      if (comm_[c]) ncclCommDestroy(comm_[c]);
      if (stream_[c]) cudaStreamDestroy(stream_[c]);
    }
  }
  std::string name() const override { return "nccl"; }

 protected:
  struct Token {
    cudaEvent_t done = nullptr;
    std::vector<at::Tensor> keep;
  };
  bool via_device(const at::Tensor& t) const override { return t.is_cuda(); }

  // Raw-byte view of a tensor for NCCL (count, type).
  static std::pair<size_t, ncclDataType_t> count_of(const at::Tensor& t) {
    const ncclDataType_t ty = nccl_type(t.scalar_type());
    if (ty == ncclUint8 && t.scalar_type() != at::kByte) return {t.numel() * t.element_size(), ncclUint8};
    return {static_cast<size_t>(t.numel()), ty};
  }

  void device_send(int dst, const at::Tensor& t0, PendingSend& p) override {
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor t = t0.contiguous();
    const int c = dst > rank_ ? 0 : 1;
    // order after the producer's work on its current stream
    cudaEvent_t ready;
    DP_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    DP_CUDA_CHECK(cudaEventRecord(ready, c10::cuda::getCurrentCUDAStream(device_).stream()));
    DP_CUDA_CHECK(cudaStreamWaitEvent(stream_[c], ready, 0));
    cudaEventDestroy(ready);
    auto [count, ty] = count_of(t);
    DP_NCCL_CHECK(ncclSend(t.data_ptr(), count, ty, dst, comm_[c], stream_[c]));
    auto* tok = p.device_token ? static_cast<Token*>(p.device_token) : new Token();
    if (tok->done) cudaEventDestroy(tok->done);
    DP_CUDA_CHECK(cudaEventCreateWithFlags(&tok->done, cudaEventDisableTiming));
    DP_CUDA_CHECK(cudaEventRecord(tok->done, stream_[c]));
    tok->keep.push_back(t);
    p.device_token = tok;
  }

  bool device_send_done(PendingSend& p) override {
    if (!p.device_token) return true;
    auto* tok = static_cast<Token*>(p.device_token);
    const cudaError_t q = cudaEventQuery(tok->done);
    if (q == cudaErrorNotReady) return false;
    DP_CUDA_CHECK(q);
    cudaEventDestroy(tok->done);
    delete tok;
    p.device_token = nullptr;
    return true;
  }

  at::Tensor device_recv(int src, const TensorSpec& s) override {
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor t = at::empty(s.shape, at::TensorOptions().dtype(s.dtype).device(at::kCUDA, device_));
    const int c = src < rank_ ? 0 : 1;
    auto [count, ty] = count_of(t);
    DP_NCCL_CHECK(ncclRecv(t.data_ptr(), count, ty, src, comm_[c], stream_[c]));
    DP_CUDA_CHECK(cudaStreamSynchronize(stream_[c]));
    return t;
  }

 public:
  // A message to self over NCCL (the one-GPU check): send and receive grouped, then delivered.
  Message self_roundtrip(const Message& m) {
    c10::cuda::CUDAGuard guard(device_);
    Message out = m;
    out.src = rank_;
    out.tensors.clear();
    DP_CUDA_CHECK(cudaStreamSynchronize(c10::cuda::getCurrentCUDAStream(device_).stream()));
    for (const auto& t0 : m.tensors) {
      at::Tensor t = t0.contiguous();
      if (!t.is_cuda()) {
        out.tensors.push_back(t.clone());
        continue;
      }
      at::Tensor r = at::empty_like(t);
      auto [count, ty] = count_of(t);
      DP_NCCL_CHECK(ncclGroupStart());
      DP_NCCL_CHECK(ncclSend(t.data_ptr(), count, ty, rank_, comm_[0], stream_[0]));
      DP_NCCL_CHECK(ncclRecv(r.data_ptr(), count, ty, rank_, comm_[0], stream_[0]));
      DP_NCCL_CHECK(ncclGroupEnd());
      DP_CUDA_CHECK(cudaStreamSynchronize(stream_[0]));
      out.tensors.push_back(r);
    }
    return out;
  }

 private:
  int device_;
  ncclComm_t comm_[2] = {nullptr, nullptr};
  cudaStream_t stream_[2] = {nullptr, nullptr};
};

// Self-sends through NCCL rather than the in-memory shortcut, so one rank exercises the NCCL path.
class NcclTransportFacade : public Transport {
 public:
  explicit NcclTransportFacade(int device) : impl_(std::make_shared<NcclTransport>(device)) { impl_->start(); }
  int rank() const override { return impl_->rank(); }
  int size() const override { return impl_->size(); }
  std::string name() const override { return "nccl"; }
  void send(int dst, Message msg) override {
    if (dst == impl_->rank()) {
      bool any_cuda = false;
      for (const auto& t : msg.tensors) any_cuda = any_cuda || t.is_cuda();
      if (any_cuda) msg = impl_->self_roundtrip(msg);
    }
    impl_->send(dst, std::move(msg));
  }
  std::optional<Message> recv(std::chrono::milliseconds timeout) override { return impl_->recv(timeout); }
  void flush(std::chrono::milliseconds timeout) override { impl_->flush(timeout); }

 private:
  std::shared_ptr<NcclTransport> impl_;
};

}  // namespace

bool nccl_available() { return true; }

std::shared_ptr<Transport> make_nccl_transport(int cuda_device) {
  DP_CHECK(mpi::world().active, "NCCL transport: MPI is not initialised (start the program with mpirun)");
  return std::make_shared<NcclTransportFacade>(cuda_device);
}

}  // namespace diffpipe

#else  // no CUDA/NCCL in this build

#include "diffpipe/runtime/error.h"

namespace diffpipe {
bool nccl_available() { return false; }
std::shared_ptr<Transport> make_nccl_transport(int) {
  DP_FAIL("NCCL transport: this build has no CUDA/NCCL (configure where the CUDA toolkit, NCCL and a CUDA "
          "LibTorch are found)");
}
}  // namespace diffpipe
#endif
