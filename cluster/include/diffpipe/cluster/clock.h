// The runner's clock: every timing decision (arrivals, deadlines, cancellation times, "no progress" timeouts)
// reads it, so tests can drive time by hand (ManualClock) and check deadlines and timeouts in milliseconds.
// Blocking waits still poll in short real-time slices. Thread-safe.
#pragma once
#include <atomic>
#include <chrono>
#include <memory>

namespace diffpipe {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual double now() const = 0;  // seconds since the clock's start
};

class SteadyClock : public Clock {
 public:
  SteadyClock() : start_(std::chrono::steady_clock::now()) {}
  double now() const override {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

class ManualClock : public Clock {
 public:
  double now() const override { return t_.load(); }
  void advance(double s) { t_.store(t_.load() + s); }
  void set(double s) { t_.store(s); }

 private:
  std::atomic<double> t_{0};
};

}  // namespace diffpipe
