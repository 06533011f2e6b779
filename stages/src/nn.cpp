#include "nn.h"

#include <atomic>
#include <cmath>

namespace diffpipe::nn {

namespace {
std::atomic<bool> g_batch_invariant{false};
}
void set_batch_invariant(bool on) { g_batch_invariant = on; }
bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     bool upcast) {
  if (batch_invariant() && q.size(0) > 1) {  // one sample at a time (see nn.h)
    std::vector<at::Tensor> outs;
    for (int64_t i = 0; i < q.size(0); ++i)
      outs.push_back(attention(q.slice(0, i, i + 1), k.slice(0, i, i + 1), v.slice(0, i, i + 1), mask, upcast));
    return at::cat(outs);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const auto in_dtype = q.scalar_type();
  const bool up = upcast && in_dtype != at::kFloat;
  at::Tensor qq = up ? q.to(at::kFloat) : q, kk = up ? k.to(at::kFloat) : k;
  at::Tensor scores = at::matmul(qq * scale, kk.transpose(-1, -2));  // [B, H, Lq, Lk]
  if (mask.defined()) scores = scores + mask.to(scores.scalar_type());
  at::Tensor probs = at::softmax(scores, -1);
  if (up) probs = probs.to(in_dtype);
  return at::matmul(probs, v);  // [B, H, Lq, D]
}

}  // namespace diffpipe::nn
