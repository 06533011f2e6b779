#include "nn.h"

#include "cuda_ops.h"

#include <atomic>
#include <cstdlib>
#include <string>
#include <cmath>
#include <optional>

namespace diffpipe::nn {

namespace {
std::atomic<bool> g_batch_invariant{false};
}
void set_batch_invariant(bool on) { g_batch_invariant = on; }

bool cuda_channels_last() {
  static const bool on = [] {
    const char* e = std::getenv("DIFFPIPE_CHANNELS_LAST");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

at::Tensor GroupNorm::operator()(const at::Tensor& x) const {
  at::Tensor y = fused_group_norm(x, weight, bias, groups, eps, /*silu=*/false);
  return y.defined() ? y : at::group_norm(x, groups, weight, bias, eps);
}

at::Tensor GroupNorm::silu(const at::Tensor& x) const {
  at::Tensor y = fused_group_norm(x, weight, bias, groups, eps, /*silu=*/true);
  return y.defined() ? y : at::silu(at::group_norm(x, groups, weight, bias, eps));
}
bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  std::optional<at::Tensor> m;
  if (mask.defined()) m = mask.to(q.scalar_type());
  return at::scaled_dot_product_attention(q, k, v, m);  // scale 1/sqrt(D)
}

}  // namespace diffpipe::nn
