// A multi-producer queue whose every wait has a deadline. Thread-safety: all methods are thread-safe.
// An optional capacity bounds it: push() then waits (with a timeout) instead of growing without limit.
#pragma once
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>

namespace diffpipe {

template <typename T>
class BlockingQueue {
 public:
  explicit BlockingQueue(size_t capacity = 0) : capacity_(capacity) {}
  // false when the queue stayed full for `timeout` or was closed
  bool push(T v, std::chrono::milliseconds timeout = std::chrono::milliseconds::max()) {
    std::unique_lock<std::mutex> lk(mu_);
    auto ok = [&] { return closed_ || capacity_ == 0 || q_.size() < capacity_; };
    if (timeout == std::chrono::milliseconds::max()) cv_space_.wait(lk, ok);
    else if (!cv_space_.wait_for(lk, timeout, ok)) return false;
    if (closed_) return false;
    q_.push_back(std::move(v));
    cv_items_.notify_one();
    return true;
  }
  std::optional<T> pop(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!cv_items_.wait_for(lk, timeout, [&] { return !q_.empty() || closed_; })) return std::nullopt;
    if (q_.empty()) return std::nullopt;
    T v = std::move(q_.front());
    q_.pop_front();
    cv_space_.notify_one();
    return v;
  }
  std::optional<T> try_pop() { return pop(std::chrono::milliseconds(0)); }
  void close() {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
    cv_items_.notify_all();
    cv_space_.notify_all();
  }
  bool closed() const {
    std::lock_guard<std::mutex> lk(mu_);
    return closed_;
  }
  size_t size() const {
    std::lock_guard<std::mutex> lk(mu_);
    return q_.size();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_items_, cv_space_;
  std::deque<T> q_;
  size_t capacity_;
  bool closed_ = false;
};

}  // namespace diffpipe
