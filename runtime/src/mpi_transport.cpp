#include "mpi_transport.h"

#include <climits>

#include "diffpipe/runtime/compute_lane.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/mpi_env.h"

namespace diffpipe {

MpiTransport::MpiTransport() {
  DP_CHECK(mpi::world().active, "MPI transport: MPI is not initialised (start the program with mpirun)");
  rank_ = mpi::world().rank;
  size_ = mpi::world().size;
}

MpiTransport::~MpiTransport() { stop(); }

void MpiTransport::start() {
  thread_ = std::thread([this] {
    use_one_cpu_thread_here();  // its tensor copies must not start an OpenMP pool (compute_lane.h)
    progress_loop();
  });
}

// Shutdown has a deadline: sends a stopped or unreachable rank never takes are given up after 5 s (the job is
// ending with an error then; MPI_Abort follows), instead of waiting for them forever.
void MpiTransport::stop() {
  if (!thread_.joinable()) return;
  try {
    flush(std::chrono::milliseconds(5000));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[diffpipe] rank %d: shutting down without %s\n", rank_, e.what());
    abandon_ = true;
  }
  stop_ = true;
  out_cv_.notify_all();
  thread_.join();
}

std::string MpiTransport::unfinished_ranks() const {
  std::lock_guard<std::mutex> lk(dst_mu_);
  std::string s;
  for (const auto& [r, n] : unfinished_)
    if (n > 0) s += detail::cat(s.empty() ? "" : ", ", n, " to rank ", r);
  return s;
}

void MpiTransport::rethrow() const {
  std::lock_guard<std::mutex> lk(err_mu_);
  if (error_) std::rethrow_exception(error_);
}

void MpiTransport::fail(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lk(err_mu_);
    if (!error_) error_ = e;
  }
  in_cv_.notify_all();
  out_cv_.notify_all();
}

void MpiTransport::send(int dst, Message msg) {
  rethrow();
  DP_CHECK(dst >= 0 && dst < size_, name(), " transport: rank ", rank_, " sends to rank ", dst, " outside [0, ", size_,
           ")");
  msg.src = rank_;
  ++in_flight_;
  if (dst != rank_) {
    std::lock_guard<std::mutex> lk(dst_mu_);
    ++unfinished_[dst];
  }
  {
    std::lock_guard<std::mutex> lk(out_mu_);
    outq_.emplace_back(dst, std::move(msg));
  }
  out_cv_.notify_one();
}

std::optional<Message> MpiTransport::recv(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(in_mu_);
  const bool got = in_cv_.wait_for(lk, timeout, [&] {
    std::lock_guard<std::mutex> lk2(err_mu_);
    return !inbox_.empty() || error_;
  });
  if (!inbox_.empty()) {
    Message m = std::move(inbox_.front());
    inbox_.pop_front();
    return m;
  }
  lk.unlock();
  rethrow();
  (void)got;
  return std::nullopt;
}

void MpiTransport::flush(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (in_flight_.load() > 0) {
    rethrow();
    if (std::chrono::steady_clock::now() > deadline)
      DP_FAIL(name(), " transport: rank ", rank_, ": ", in_flight_.load(), " send(s) not completed within ",
              timeout.count(), " ms (", unfinished_ranks(), "; is the receiving rank alive?)");
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  rethrow();
}

void MpiTransport::deliver(Message m) {
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    inbox_.push_back(std::move(m));
  }
  in_cv_.notify_one();
}

void MpiTransport::post(int dst, Message msg) {
  if (dst == rank_) {  // to self: no copy, no MPI
    deliver(std::move(msg));
    --in_flight_;
    return;
  }
  PendingSend p;
  p.dst = dst;
  p.kind = msg.kind;
  p.request = msg.request;
  std::vector<bool> dev;
  for (const auto& t : msg.tensors) dev.push_back(via_device(t));
  p.header = encode_header(msg, dev);
  p.reqs.resize(1);
  DP_CHECK(p.header.size() < INT_MAX, "message header too large");
  DP_MPI_CHECK(MPI_Isend(p.header.data(), static_cast<int>(p.header.size()), MPI_BYTE, dst,
                         static_cast<int>(Tag::Header), MPI_COMM_WORLD, &p.reqs[0]));
  for (size_t i = 0; i < msg.tensors.size(); ++i) {
    if (dev[i]) {
      device_send(dst, msg.tensors[i], p);
      continue;
    }
    at::Tensor c = msg.tensors[i].is_cuda() ? msg.tensors[i].to(at::kCPU) : msg.tensors[i].contiguous();
    const size_t nbytes = c.numel() * c.element_size();
    if (nbytes == 0) continue;
    DP_CHECK(nbytes < static_cast<size_t>(INT_MAX), "message ", msg_kind_name(msg.kind), " request ", msg.request,
             ": tensor of ", nbytes, " bytes exceeds one MPI message");
    p.reqs.emplace_back();
    DP_MPI_CHECK(MPI_Isend(c.data_ptr(), static_cast<int>(nbytes), MPI_BYTE, dst, static_cast<int>(Tag::Payload),
                           MPI_COMM_WORLD, &p.reqs.back()));
    p.keep.push_back(std::move(c));
  }
  pending_.push_back(std::move(p));
}

bool MpiTransport::poll_incoming() {
  int flag = 0;
  MPI_Status st;
  DP_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, static_cast<int>(Tag::Header), MPI_COMM_WORLD, &flag, &st));
  if (!flag) return false;
  int count = 0;
  MPI_Get_count(&st, MPI_BYTE, &count);
  std::vector<uint8_t> hdr(count);
  const int src = st.MPI_SOURCE;
  DP_MPI_CHECK(MPI_Recv(hdr.data(), count, MPI_BYTE, src, static_cast<int>(Tag::Header), MPI_COMM_WORLD,
                        MPI_STATUS_IGNORE));
  Message m;
  m.src = src;
  const auto specs = decode_header(hdr.data(), hdr.size(), &m);
  for (const auto& s : specs) {
    if (s.via_device) {
      m.tensors.push_back(device_recv(src, s));
      continue;
    }
    at::Tensor t = at::empty(s.shape, at::TensorOptions().dtype(s.dtype));
    const size_t nbytes = s.nbytes();
    if (nbytes > 0)
      DP_MPI_CHECK(MPI_Recv(t.data_ptr(), static_cast<int>(nbytes), MPI_BYTE, src, static_cast<int>(Tag::Payload),
                            MPI_COMM_WORLD, MPI_STATUS_IGNORE));
    m.tensors.push_back(std::move(t));
  }
  deliver(std::move(m));
  return true;
}

void MpiTransport::progress_loop() {
  try {
    while (true) {
      bool busy = false;
      std::deque<std::pair<int, Message>> batch;
      {
        std::lock_guard<std::mutex> lk(out_mu_);
        batch.swap(outq_);
      }
      for (auto& [dst, msg] : batch) {
        post(dst, std::move(msg));
        busy = true;
      }
      while (poll_incoming()) busy = true;
      for (auto it = pending_.begin(); it != pending_.end();) {
        int done = 0;
        DP_MPI_CHECK(MPI_Testall(static_cast<int>(it->reqs.size()), it->reqs.data(), &done, MPI_STATUSES_IGNORE));
        if (done && device_send_done(*it)) {
          {
            std::lock_guard<std::mutex> lk(dst_mu_);
            --unfinished_[it->dst];
          }
          it = pending_.erase(it);
          --in_flight_;
          busy = true;
        } else {
          ++it;
        }
      }
      if (stop_ && abandon_) break;
      if (stop_ && pending_.empty()) {
        std::lock_guard<std::mutex> lk(out_mu_);
        if (outq_.empty()) break;
      }
      if (!busy) {
        std::unique_lock<std::mutex> lk(out_mu_);
        out_cv_.wait_for(lk, std::chrono::microseconds(100), [&] { return !outq_.empty() || stop_.load(); });
      }
    }
  } catch (...) {
    fail(std::current_exception());
  }
}

std::shared_ptr<Transport> make_mpi_transport() {
  auto t = std::make_shared<MpiTransport>();
  t->start();
  return t;
}

}  // namespace diffpipe
