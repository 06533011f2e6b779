#include "diffpipe/train/inception.h"

#include <vector>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

namespace {
// torchvision's BasicConv2d (conv without bias, batch norm eps 1e-3, ReLU) with the norm folded in.
struct Conv {
  at::Tensor w, b;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0;
  at::Tensor operator()(const at::Tensor& x) const { return at::relu(at::conv2d(x, w, b, {sh, sw}, {ph, pw})); }
};

Conv conv(const Weights& w, const std::string& name, int64_t in, int64_t out, int64_t kh, int64_t kw,
          int64_t stride = 1, int64_t ph = 0, int64_t pw = 0) {
  const Weights c = w.sub(name);
  const at::Tensor k0 = c.get("conv.weight", {out, in, kh, kw}), k = k0.to(at::kDouble);
  const at::Tensor g = c.get("bn.weight", {out}).to(at::kDouble), beta = c.get("bn.bias", {out}).to(at::kDouble);
  const at::Tensor mean = c.get("bn.running_mean", {out}).to(at::kDouble);
  const at::Tensor var = c.get("bn.running_var", {out}).to(at::kDouble);
  const at::Tensor scale = g / at::sqrt(var + 1e-3);
  const auto dt = k0.scalar_type();
  Conv r;
  r.w = (k * scale.view({out, 1, 1, 1})).to(dt);
  r.b = (beta - mean * scale).to(dt);
  r.sh = r.sw = stride;
  r.ph = ph;
  r.pw = pw;
  return r;
}

at::Tensor avg_pool_same(const at::Tensor& x) {  // TensorFlow's: padding not counted
  return at::avg_pool2d(x, {3, 3}, {1, 1}, {1, 1}, false, /*count_include_pad=*/false);
}

struct BlockA {  // FIDInceptionA
  Conv b1, b5_1, b5_2, d1, d2, d3, pool;
  BlockA(const Weights& w, int64_t in, int64_t pool_features)
      : b1(conv(w, "branch1x1", in, 64, 1, 1)), b5_1(conv(w, "branch5x5_1", in, 48, 1, 1)),
        b5_2(conv(w, "branch5x5_2", 48, 64, 5, 5, 1, 2, 2)), d1(conv(w, "branch3x3dbl_1", in, 64, 1, 1)),
        d2(conv(w, "branch3x3dbl_2", 64, 96, 3, 3, 1, 1, 1)), d3(conv(w, "branch3x3dbl_3", 96, 96, 3, 3, 1, 1, 1)),
        pool(conv(w, "branch_pool", in, pool_features, 1, 1)) {}
  at::Tensor operator()(const at::Tensor& x) const {
    return at::cat({b1(x), b5_2(b5_1(x)), d3(d2(d1(x))), pool(avg_pool_same(x))}, 1);
  }
};

struct BlockB {  // InceptionB (Mixed_6a): grid reduction
  Conv b3, d1, d2, d3;
  BlockB(const Weights& w, int64_t in)
      : b3(conv(w, "branch3x3", in, 384, 3, 3, 2)), d1(conv(w, "branch3x3dbl_1", in, 64, 1, 1)),
        d2(conv(w, "branch3x3dbl_2", 64, 96, 3, 3, 1, 1, 1)), d3(conv(w, "branch3x3dbl_3", 96, 96, 3, 3, 2)) {}
  at::Tensor operator()(const at::Tensor& x) const {
    return at::cat({b3(x), d3(d2(d1(x))), at::max_pool2d(x, {3, 3}, {2, 2})}, 1);
  }
};

struct BlockC {  // FIDInceptionC: factorised 7x7
  Conv b1, s1, s2, s3, d1, d2, d3, d4, d5, pool;
  BlockC(const Weights& w, int64_t in, int64_t c7)
      : b1(conv(w, "branch1x1", in, 192, 1, 1)), s1(conv(w, "branch7x7_1", in, c7, 1, 1)),
        s2(conv(w, "branch7x7_2", c7, c7, 1, 7, 1, 0, 3)), s3(conv(w, "branch7x7_3", c7, 192, 7, 1, 1, 3, 0)),
        d1(conv(w, "branch7x7dbl_1", in, c7, 1, 1)), d2(conv(w, "branch7x7dbl_2", c7, c7, 7, 1, 1, 3, 0)),
        d3(conv(w, "branch7x7dbl_3", c7, c7, 1, 7, 1, 0, 3)), d4(conv(w, "branch7x7dbl_4", c7, c7, 7, 1, 1, 3, 0)),
        d5(conv(w, "branch7x7dbl_5", c7, 192, 1, 7, 1, 0, 3)), pool(conv(w, "branch_pool", in, 192, 1, 1)) {}
  at::Tensor operator()(const at::Tensor& x) const {
    return at::cat({b1(x), s3(s2(s1(x))), d5(d4(d3(d2(d1(x))))), pool(avg_pool_same(x))}, 1);
  }
};

struct BlockD {  // InceptionD (Mixed_7a): grid reduction
  Conv a1, a2, s1, s2, s3, s4;
  BlockD(const Weights& w, int64_t in)
      : a1(conv(w, "branch3x3_1", in, 192, 1, 1)), a2(conv(w, "branch3x3_2", 192, 320, 3, 3, 2)),
        s1(conv(w, "branch7x7x3_1", in, 192, 1, 1)), s2(conv(w, "branch7x7x3_2", 192, 192, 1, 7, 1, 0, 3)),
        s3(conv(w, "branch7x7x3_3", 192, 192, 7, 1, 1, 3, 0)), s4(conv(w, "branch7x7x3_4", 192, 192, 3, 3, 2)) {}
  at::Tensor operator()(const at::Tensor& x) const {
    return at::cat({a2(a1(x)), s4(s3(s2(s1(x)))), at::max_pool2d(x, {3, 3}, {2, 2})}, 1);
  }
};

struct BlockE {  // FIDInceptionE_1 (average pool) / E_2 (max pool)
  Conv b1, t1, t2a, t2b, d1, d2, d3a, d3b, pool;
  bool max_pool;
  BlockE(const Weights& w, int64_t in, bool max)
      : b1(conv(w, "branch1x1", in, 320, 1, 1)), t1(conv(w, "branch3x3_1", in, 384, 1, 1)),
        t2a(conv(w, "branch3x3_2a", 384, 384, 1, 3, 1, 0, 1)), t2b(conv(w, "branch3x3_2b", 384, 384, 3, 1, 1, 1, 0)),
        d1(conv(w, "branch3x3dbl_1", in, 448, 1, 1)), d2(conv(w, "branch3x3dbl_2", 448, 384, 3, 3, 1, 1, 1)),
        d3a(conv(w, "branch3x3dbl_3a", 384, 384, 1, 3, 1, 0, 1)), d3b(conv(w, "branch3x3dbl_3b", 384, 384, 3, 1, 1, 1, 0)),
        pool(conv(w, "branch_pool", in, 192, 1, 1)), max_pool(max) {}
  at::Tensor operator()(const at::Tensor& x) const {
    const at::Tensor t = t1(x), d = d2(d1(x));
    const at::Tensor p = max_pool ? at::max_pool2d(x, {3, 3}, {1, 1}, {1, 1}) : avg_pool_same(x);
    return at::cat({b1(x), t2a(t), t2b(t), d3a(d), d3b(d), pool(p)}, 1);
  }
};
}  // namespace

struct FidInception::Impl {
  Conv c1a, c2a, c2b, c3b, c4a;
  std::vector<BlockA> a;
  BlockB b;
  std::vector<BlockC> c;
  BlockD d;
  std::vector<BlockE> e;
  explicit Impl(const Weights& w)
      : c1a(conv(w, "Conv2d_1a_3x3", 3, 32, 3, 3, 2)), c2a(conv(w, "Conv2d_2a_3x3", 32, 32, 3, 3)),
        c2b(conv(w, "Conv2d_2b_3x3", 32, 64, 3, 3, 1, 1, 1)), c3b(conv(w, "Conv2d_3b_1x1", 64, 80, 1, 1)),
        c4a(conv(w, "Conv2d_4a_3x3", 80, 192, 3, 3)),
        a{BlockA(w.sub("Mixed_5b"), 192, 32), BlockA(w.sub("Mixed_5c"), 256, 64), BlockA(w.sub("Mixed_5d"), 288, 64)},
        b(w.sub("Mixed_6a"), 288),
        c{BlockC(w.sub("Mixed_6b"), 768, 128), BlockC(w.sub("Mixed_6c"), 768, 160), BlockC(w.sub("Mixed_6d"), 768, 160),
          BlockC(w.sub("Mixed_6e"), 768, 192)},
        d(w.sub("Mixed_7a"), 768),
        e{BlockE(w.sub("Mixed_7b"), 1280, false), BlockE(w.sub("Mixed_7c"), 2048, true)} {}
};

FidInception::FidInception(const Weights& w) : impl_(std::make_shared<Impl>(w)) {
  for (const auto& k : w.unused())  // the classifier is not needed; anything else means a different network
    DP_CHECK(k.rfind("fc.", 0) == 0 || k.find("num_batches_tracked") != std::string::npos || k.rfind("AuxLogits.", 0) == 0,
             w.origin(), ": unexpected tensor '", k, "' (not part of the FID Inception-v3)");
}

std::shared_ptr<FidInception> FidInception::load(const std::string& path, const DeviceSpec& spec) {
  return std::make_shared<FidInception>(Weights::load(path, spec));
}

at::Tensor FidInception::features(const at::Tensor& images) const {
  DP_CHECK(images.dim() == 4 && images.size(1) == 3, "inception: images must be [B, 3, H, W], got ", images.sizes());
  const Impl& m = *impl_;
  at::Tensor x = images.to(m.c1a.w.device(), m.c1a.w.scalar_type());
  // pytorch-fid resizes inputs in [0, 1] and then maps them to [-1, 1]; bilinear resizing is affine-equivariant,
  // so resizing the [-1, 1] images directly is the same computation
  x = at::upsample_bilinear2d(x, {299, 299}, false);
  x = at::max_pool2d(m.c2b(m.c2a(m.c1a(x))), {3, 3}, {2, 2});
  x = at::max_pool2d(m.c4a(m.c3b(x)), {3, 3}, {2, 2});
  for (const auto& blk : m.a) x = blk(x);
  x = m.b(x);
  for (const auto& blk : m.c) x = blk(x);
  x = m.d(x);
  for (const auto& blk : m.e) x = blk(x);
  return x.mean({2, 3}).to(at::kFloat);
}

}  // namespace diffpipe
