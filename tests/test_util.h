// Helpers shared by the tests: the golden reference folder and tensor comparisons.
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <string>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe::test {

// The reference folder: $DIFFPIPE_GOLDEN or ../shared/golden/tiny-sd beside the source tree.
inline std::string golden_dir() {
  const char* env = std::getenv("DIFFPIPE_GOLDEN");
  return env && *env ? std::string(env) : std::string(DIFFPIPE_DEFAULT_GOLDEN);
}

#define DP_REQUIRE_GOLDEN(dir)                                                                            \
  const std::string dir = ::diffpipe::test::golden_dir();                                             \
  if (!::diffpipe::dir_exists(dir + "/model"))                                                           \
  GTEST_SKIP() << "reference folder " << dir << " is absent (set DIFFPIPE_GOLDEN to a folder in the "     \
               << "shared/golden layout to run this test)"

// max |a - b| / max |b|
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble).cpu(), y = b.to(at::kDouble).cpu();
  const double denom = std::max(y.abs().max().item<double>(), 1e-30);
  return (x - y).abs().max().item<double>() / denom;
}

// The message of the diffpipe::Error that f throws ("" when it throws none).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A scratch directory unique to the test.
inline std::string scratch_dir(const std::string& name) {
  std::string d = std::string(DIFFPIPE_BINARY_DIR) + "/test-scratch/" + name;
  std::string cmd = "rm -rf '" + d + "' && mkdir -p '" + d + "'";
  if (std::system(cmd.c_str()) != 0) throw std::runtime_error("cannot create " + d);
  return d;
}

}  // namespace diffpipe::test
