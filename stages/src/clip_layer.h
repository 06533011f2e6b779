// One CLIP transformer encoder layer (transformers' CLIPEncoderLayer), shared by the text and the vision towers:
// pre-LN self-attention and MLP (quick_gelu or gelu), each with a residual. Include only from stages/src.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "nn.h"

namespace diffpipe::nn {

struct ClipLayer {
  LayerNorm ln1, ln2;
  Linear q, k, v, o, fc1, fc2;
  int64_t heads = 1;
  bool quick_gelu = true;
  ClipLayer() = default;
  // l: the layer's weights (encoder.layers.N); D hidden, F intermediate
  ClipLayer(const Weights& l, int64_t D, int64_t F, int64_t heads_, double eps, bool quick_gelu_)
      : heads(heads_), quick_gelu(quick_gelu_) {
    ln1 = LayerNorm(l, "layer_norm1", D, eps);
    ln2 = LayerNorm(l, "layer_norm2", D, eps);
    q = Linear(l, "self_attn.q_proj", D, D);
    k = Linear(l, "self_attn.k_proj", D, D);
    v = Linear(l, "self_attn.v_proj", D, D);
    o = Linear(l, "self_attn.out_proj", D, D);
    fc1 = Linear(l, "mlp.fc1", D, F);
    fc2 = Linear(l, "mlp.fc2", F, D);
  }
  // h [B, L, D]; mask: additive attention mask broadcastable to [B, heads, L, L], or undefined
  at::Tensor operator()(const at::Tensor& h, const at::Tensor& mask) const {
    const int64_t B = h.size(0), L = h.size(1), D = h.size(2);
    auto split = [&](const at::Tensor& t) { return t.view({B, L, heads, D / heads}).transpose(1, 2); };
    const at::Tensor y = ln1(h);
    const at::Tensor a = attention(split(q(y)), split(k(y)), split(v(y)), mask).transpose(1, 2).reshape({B, L, D});
    const at::Tensor h2 = h + o(a);
    at::Tensor m = fc1(ln2(h2));
    m = quick_gelu ? m * at::sigmoid(1.702 * m) : at::gelu(m);
    return h2 + fc2(m);
  }
};

}  // namespace diffpipe::nn
