// In-process transport: a world of N mailboxes shared by N endpoints (threads). Tensors are passed by
// reference (no copies); ordering per (src, dst) pair is the queue order.
#include <condition_variable>
#include <deque>
#include <mutex>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/transport.h"

namespace diffpipe {

namespace {

struct Mailbox {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Message> q;
};

struct InprocWorld {
  explicit InprocWorld(int n) : boxes(n) {
    for (auto& b : boxes) b = std::make_unique<Mailbox>();
  }
  std::vector<std::unique_ptr<Mailbox>> boxes;
};

class InprocTransport : public Transport {
 public:
  InprocTransport(std::shared_ptr<InprocWorld> w, int rank) : world_(std::move(w)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(world_->boxes.size()); }
  std::string name() const override { return "inproc"; }
  void send(int dst, Message msg) override {
    DP_CHECK(dst >= 0 && dst < size(), "inproc transport: rank ", rank_, " sends to rank ", dst, " outside [0, ",
             size(), ")");
    msg.src = rank_;
    Mailbox& b = *world_->boxes[dst];
    {
      std::lock_guard<std::mutex> lk(b.mu);
      b.q.push_back(std::move(msg));
    }
    b.cv.notify_one();
  }
  std::optional<Message> recv(std::chrono::milliseconds timeout) override {
    Mailbox& b = *world_->boxes[rank_];
    std::unique_lock<std::mutex> lk(b.mu);
    if (!b.cv.wait_for(lk, timeout, [&] { return !b.q.empty(); })) return std::nullopt;
    Message m = std::move(b.q.front());
    b.q.pop_front();
    return m;
  }
  void flush(std::chrono::milliseconds) override {}  // delivery is immediate

 private:
  std::shared_ptr<InprocWorld> world_;
  int rank_;
};

}  // namespace

std::vector<std::shared_ptr<Transport>> make_inproc_world(int n) {
  DP_CHECK(n >= 1, "inproc transport: world size must be >= 1");
  auto w = std::make_shared<InprocWorld>(n);
  std::vector<std::shared_ptr<Transport>> out;
  for (int r = 0; r < n; ++r) out.push_back(std::make_shared<InprocTransport>(w, r));
  return out;
}

}  // namespace diffpipe
