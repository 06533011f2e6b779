#include "diffpipe/train/metrics.h"

#include <cmath>

#include "diffpipe/runtime/error.h"

namespace diffpipe::metrics {

Gaussian fit_gaussian(const at::Tensor& f0) {
  DP_CHECK(f0.dim() == 2 && f0.size(0) >= 2, "fit_gaussian: need [N >= 2, D] features, got ", f0.dim(), "-d");
  at::Tensor f = f0.to(at::kDouble).cpu();
  Gaussian g;
  g.mu = f.mean(0);
  at::Tensor c = f - g.mu;
  g.sigma = at::matmul(c.t(), c) / static_cast<double>(f.size(0) - 1);
  return g;
}

namespace {
// sqrtm of a (possibly non-symmetric) matrix through its eigendecomposition, in complex arithmetic.
at::Tensor sqrtm(const at::Tensor& a) {
  auto [vals, vecs] = at::linalg_eig(a);
  at::Tensor s = at::sqrt(vals);
  return at::matmul(vecs * s.unsqueeze(0), at::linalg_inv(vecs));
}
}  // namespace

double frechet_distance(const Gaussian& a, const Gaussian& b, double eps) {
  DP_CHECK(a.mu.sizes() == b.mu.sizes() && a.sigma.sizes() == b.sigma.sizes(), "frechet_distance: dimensions differ");
  const at::Tensor diff = a.mu - b.mu;
  at::Tensor covmean = sqrtm(at::matmul(a.sigma, b.sigma));
  if (!at::isfinite(at::view_as_real(covmean)).all().item<bool>()) {
    const at::Tensor off = at::eye(a.sigma.size(0), a.sigma.options()) * eps;
    covmean = sqrtm(at::matmul(a.sigma + off, b.sigma + off));
  }
  const double imag = at::imag(covmean.diagonal()).abs().max().item<double>();
  DP_CHECK(imag <= 1e-3, "frechet_distance: imaginary component ", imag, " in the covariance square root");
  const double tr = at::real(covmean).trace().item<double>();
  return diff.dot(diff).item<double>() + a.sigma.trace().item<double>() + b.sigma.trace().item<double>() - 2 * tr;
}

double clip_score(const at::Tensor& text, const at::Tensor& image) {
  DP_CHECK(text.dim() == 2 && text.sizes() == image.sizes(), "clip_score: need two [N, D] tensors of one shape");
  at::Tensor t = text.to(at::kDouble), i = image.to(at::kDouble);
  at::Tensor cos = (t * i).sum(1) / (t.norm(2, 1) * i.norm(2, 1)).clamp_min(1e-12);
  return (100.0 * cos.clamp_min(0)).mean().item<double>();
}

}  // namespace diffpipe::metrics
