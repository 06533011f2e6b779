#include "nn.h"

#include "cuda_ops.h"
#include "diffpipe/runtime/error.h"

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

namespace {
thread_local const AdapterRows* g_adapter_rows = nullptr;
}
const AdapterRows* active_adapter_rows() { return g_adapter_rows; }
AdapterScope::AdapterScope(const AdapterRows* rows) : prev_(g_adapter_rows) { g_adapter_rows = rows; }
AdapterScope::~AdapterScope() { g_adapter_rows = prev_; }

AdapterRows AdapterRows::row(int64_t i) const {
  AdapterRows one;
  for (const auto& s : scales) one.scales.push_back(s.defined() ? s.slice(0, i, i + 1) : s);
  for (auto [from, to] :
       {std::pair{&ip_embeds, &one.ip_embeds}, {&ip_scales, &one.ip_scales}, {&ip_tokens, &one.ip_tokens}})
    if (from->defined()) *to = from->slice(0, i, i + 1);
  return one;
}

std::vector<LoraBranch> layer_branches(const Weights& w, const std::string& key, const at::Tensor& weight,
                                       int64_t conv_k) {
  std::vector<LoraBranch> out = w.branches(key);
  for (LoraBranch& b : out) {
    const int64_t r = b.down.size(0), o = weight.size(0);
    b.down = b.down.to(weight.device(), weight.scalar_type());
    b.up = b.up.to(weight.device(), weight.scalar_type());
    if (conv_k > 0) {
      b.down = b.down.reshape({r, weight.size(1), conv_k, conv_k}).contiguous();
      b.up = b.up.reshape({o, r, 1, 1}).contiguous();
    } else {
      b.down = b.down.reshape({r, -1}).contiguous();
      b.up = b.up.reshape({o, r}).contiguous();
    }
  }
  return out;
}

namespace {
// Each branch whose adapter some row chose: f(branch) -> its output [rows, ...], times each row's scale x factor.
template <typename F>
at::Tensor sum_branches(at::Tensor y, int64_t rows, int64_t per_row, const std::vector<LoraBranch>& branches, F&& f) {
  const AdapterRows* a = active_adapter_rows();
  if (!a) return y;
  for (const LoraBranch& b : branches) {
    if (b.adapter >= static_cast<int>(a->scales.size()) || !a->scales[b.adapter].defined()) continue;
    const at::Tensor& s = a->scales[b.adapter];
    DP_CHECK(s.size(0) == rows, "LoRA adapters: a layer's input has ", rows, " rows, the batch's scales ", s.size(0));
    at::Tensor d = f(b);
    at::Tensor k = (s * b.factor).to(d.scalar_type());
    if (per_row > 1) k = k.repeat_interleave(per_row);
    std::vector<int64_t> shape(static_cast<size_t>(d.dim()), 1);
    shape[0] = d.size(0);
    y = y + d * k.view(shape);
  }
  return y;
}
}  // namespace

at::Tensor add_branches(const at::Tensor& y, const at::Tensor& x, const std::vector<LoraBranch>& branches,
                        int64_t stride, int64_t padding) {
  return sum_branches(y, x.size(0), 1, branches, [&](const LoraBranch& b) {
    if (b.down.dim() == 4) return at::conv2d(at::conv2d(x, b.down, {}, {stride, stride}, {padding, padding}), b.up);
    return at::linear(at::linear(x, b.down), b.up);
  });
}

at::Tensor add_branches_rows(const at::Tensor& y, const at::Tensor& x, const std::vector<LoraBranch>& branches) {
  return sum_branches(y, x.size(0), x.size(2) * x.size(3), branches, [&](const LoraBranch& b) {
    return at::linear(at::linear(x.permute({0, 2, 3, 1}).reshape({-1, x.size(1)}), b.down), b.up);
  });
}

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

at::Tensor GroupNorm::silu_after_add(const at::Tensor& x, const at::Tensor& add) const {
  at::Tensor y = fused_group_norm(x, weight, bias, groups, eps, /*silu=*/true, add);
  return y.defined() ? y : silu(x + add);
}
at::Tensor linear_plus(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& r) {
  const at::Tensor y = fused_linear_residual(x, weight, bias, r);
  return y.defined() ? y.view(r.sizes()) : r + at::linear(x, weight, bias).reshape(r.sizes());
}

bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  std::optional<at::Tensor> m;
  if (mask.defined()) m = mask.to(q.scalar_type());
  return at::scaled_dot_product_attention(q, k, v, m);  // scale 1/sqrt(D)
}

}  // namespace diffpipe::nn
