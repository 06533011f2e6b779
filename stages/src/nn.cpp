#include "nn.h"

#include <atomic>
#include <cmath>
#include <optional>

namespace diffpipe::nn {

namespace {
std::atomic<bool> g_batch_invariant{false};
}
void set_batch_invariant(bool on) { g_batch_invariant = on; }
bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  std::optional<at::Tensor> m;
  if (mask.defined()) m = mask.to(q.scalar_type());
  return at::scaled_dot_product_attention(q, k, v, m);  // scale 1/sqrt(D)
}

}  // namespace diffpipe::nn
