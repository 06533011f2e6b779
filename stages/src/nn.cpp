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
  if (batch_invariant() && q.size(0) > 1) {  // one sample at a time (see nn.h)
    std::vector<at::Tensor> outs;
    for (int64_t i = 0; i < q.size(0); ++i)
      outs.push_back(attention(q.slice(0, i, i + 1), k.slice(0, i, i + 1), v.slice(0, i, i + 1),
                               mask.defined() && mask.size(0) > 1 ? mask.slice(0, i, i + 1) : mask));
    return at::cat(outs);
  }
  std::optional<at::Tensor> m;
  if (mask.defined()) m = mask.to(q.scalar_type());
  return at::scaled_dot_product_attention(q, k, v, m);  // scale 1/sqrt(D)
}

}  // namespace diffpipe::nn
