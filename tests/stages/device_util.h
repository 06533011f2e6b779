// The device and dtype the stage golden tests run on: CPU float32 by default; DIFFPIPE_TEST_DEVICE=cuda and
// DIFFPIPE_TEST_DTYPE=float16|bfloat16 run the same checks on a GPU (scripts/gpu_check.sh) or in bfloat16 on the
// CPU, with the golden README's 16-bit module tolerance.
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>

#include <cstdlib>
#include <string>

#include "diffpipe/stages/weights.h"

namespace diffpipe::test {

inline DeviceSpec device_spec() {
  DeviceSpec s;
  const char* d = std::getenv("DIFFPIPE_TEST_DEVICE");
  const char* t = std::getenv("DIFFPIPE_TEST_DTYPE");
  if (d && std::string(d) == "cuda") s.device = at::Device(at::kCUDA, 0);
  if (t && std::string(t) == "float16") s.dtype = at::kHalf;
  if (t && std::string(t) == "bfloat16") s.dtype = at::kBFloat16;
  return s;
}
// Measured on an H200 (docs/results.md): float16 meets the README's 2e-2; bfloat16's 8-bit mantissa gives
// 1.9e-2 to 2.3e-2 on the UNet; CUDA float32 UNet outputs differ by up to 9e-4 (cuDNN's convolution
// algorithms at these shapes).
inline double module_tol(const DeviceSpec& s) {
  return s.dtype == at::kHalf ? 2e-2 : s.dtype == at::kBFloat16 ? 3e-2 : s.device.is_cuda() ? 2e-3 : 1e-4;
}
// A whole pipeline's final latents: 16-bit rounding moves trajectories (the golden README's 1e-3 is for float32).
inline double pipeline_tol(const DeviceSpec& s) { return s.dtype != at::kFloat ? 0.1 : 1e-3; }
// A generated reference folder: $env_var, else `name` beside the tiny-sd folder (scripts/test.sh exports the
// variables for the references it makes under build/golden).
inline std::string sibling_golden(const char* env_var, const std::string& name) {
  const char* env = std::getenv(env_var);
  if (env && *env) return env;
  const char* sd = std::getenv("DIFFPIPE_GOLDEN");
  const std::string base = sd && *sd ? std::string(sd) : std::string(DIFFPIPE_DEFAULT_GOLDEN);
  return base.substr(0, base.rfind('/')) + "/" + name;
}
// Skips the test unless the generated reference `name` ($env_var, else beside tiny-sd) holds `inside` (a file or
// folder); the message says how to make it. Declares `dir`.
#define DP_REQUIRE_GENERATED(dir, env_var, name, inside, script)                                              \
  const std::string dir = ::diffpipe::test::sibling_golden(env_var, name);                                    \
  if (!std::filesystem::exists(dir + "/" inside))                                                             \
  GTEST_SKIP() << "reference folder " << dir << " (" inside ") is absent (make it with tests/stages/" script   \
               << " --out DIR and set " env_var "=DIR)"

// An input on the test device, floating inputs in the test dtype.
inline at::Tensor on_device(const at::Tensor& t, const DeviceSpec& s) {
  return at::isFloatingType(t.scalar_type()) ? t.to(s.device, s.dtype) : t.to(s.device);
}

}  // namespace diffpipe::test
