// Image-generation metrics on feature vectors: the Frechet distance between Gaussians fitted to two feature
// sets (as pytorch-fid computes it: mean, covariance with N-1, matrix square root of the covariance product with
// the eps retry and the imaginary-part check), and CLIP score. Pure functions on CPU double tensors.
#pragma once
#include <ATen/ATen.h>

namespace diffpipe::metrics {

struct Gaussian {
  at::Tensor mu;     // [D] float64
  at::Tensor sigma;  // [D, D] float64
};

Gaussian fit_gaussian(const at::Tensor& features);  // features: [N, D], N >= 2
// |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)). Throws when the square root keeps a significant
// imaginary part (as pytorch-fid does).
double frechet_distance(const Gaussian& a, const Gaussian& b, double eps = 1e-6);
// 100 * max(cos(text_i, image_i), 0), averaged over i. text, image: [N, D].
double clip_score(const at::Tensor& text, const at::Tensor& image);

}  // namespace diffpipe::metrics
