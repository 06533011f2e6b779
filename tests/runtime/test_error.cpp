// Error messages for people: LibTorch's C++ backtraces stay out of them unless debug output is on (#14).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "diffpipe/runtime/error.h"

using namespace diffpipe;

TEST(Error, LibTorchBacktracesOnlyWithDebug) {
  std::string plain, full;
  try {
    (void)at::ones({2}).view({3});  // a LibTorch error, thrown with a C++ backtrace
    FAIL() << "view should throw";
  } catch (const std::exception& e) {
    set_debug(false);
    plain = describe(e);
    set_debug(true);
    full = describe(e);
    set_debug(false);
  }
  EXPECT_NE(plain.find("shape '[3]' is invalid for input of size 2"), std::string::npos) << plain;
  EXPECT_EQ(plain.find("frame #"), std::string::npos) << "no backtrace without --debug:\n" << plain;
  EXPECT_GT(full.size(), plain.size()) << "--debug keeps LibTorch's whole message";
  const Error ours("file.json: key 'x' must be positive");
  EXPECT_EQ(describe(ours), ours.what()) << "diffpipe's own errors are unchanged";
}
