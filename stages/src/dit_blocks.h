// Private: pieces shared by the diffusion transformers (SD3's MMDiT, Flux): adaLN modulation, the blocks' affine-free
// layer norms and their gelu-tanh feed forward. Include only from stages/src.
#pragma once
#include <string>

#include "nn.h"

namespace diffpipe::nn {

// LayerNorm without affine parameters, eps 1e-6 (every norm of the MMDiT/Flux blocks)
inline at::Tensor plain_norm(const at::Tensor& x) { return at::layer_norm(x, {x.size(-1)}, {}, {}, 1e-6); }

// x * (1 + scale) + shift, with [B, D] modulations broadcast over the tokens
inline at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
}

// diffusers' FeedForward with activation_fn "gelu-approximate": GELU (tanh) between two linear layers, 4x wide
struct GeluFeedForward {
  Linear proj, out;
  GeluFeedForward() = default;
  GeluFeedForward(const Weights& w, const std::string& p, int64_t dim)
      : proj(w, p + ".net.0.proj", dim, 4 * dim), out(w, p + ".net.2", 4 * dim, dim) {}
  at::Tensor operator()(const at::Tensor& x) const { return out(at::gelu(proj(x), "tanh")); }
};

// The timestep's 256-wide sinusoid (cos first) through a two-layer SiLU MLP (diffusers' Timesteps(256, True, 0) +
// TimestepEmbedding), also the guidance scale's and the pooled text's (PixArtAlphaTextProjection) form.
struct SiluMlp {
  Linear l1, l2;
  SiluMlp() = default;
  SiluMlp(const Weights& w, const std::string& p, int64_t in, int64_t out)
      : l1(w, p + ".linear_1", in, out), l2(w, p + ".linear_2", out, out) {}
  at::Tensor operator()(const at::Tensor& x) const { return l2(at::silu(l1(x))); }
};

}  // namespace diffpipe::nn
