#include "diffpipe/train/trainer.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstdio>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/train/shapes.h"

namespace diffpipe::train {

void AdamW::update(const std::map<std::string, at::Tensor>& params, double lr_now) {
  at::NoGradGuard ng;
  ++step;
  const double c1 = 1 - std::pow(b1, step), c2 = 1 - std::pow(b2, step);
  for (const auto& [k, p] : params) {
    if (!p.requires_grad() || !p.grad().defined()) continue;
    at::Tensor g = p.grad();
    auto& mk = m[k];
    auto& vk = v[k];
    if (!mk.defined()) {
      mk = at::zeros_like(p);
      vk = at::zeros_like(p);
    }
    mk.mul_(b1).add_(g, 1 - b1);
    vk.mul_(b2).addcmul_(g, g, 1 - b2);
    if (wd > 0 && p.dim() > 1) p.mul_(1 - lr_now * wd);
    p.addcdiv_(mk / c1, (vk / c2).sqrt().add_(eps), -lr_now);
    p.mutable_grad().zero_();
  }
}

std::map<std::string, at::Tensor> trainable(const Weights& w) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, t] : w.all()) {
    t.requires_grad_(true);
    out[k] = t;
  }
  return out;
}

void save_checkpoint(const std::string& path, const std::map<std::string, at::Tensor>& params, const AdamW& opt) {
  std::map<std::string, at::Tensor> all;
  for (const auto& [k, t] : params) all["param." + k] = t.detach();
  for (const auto& [k, t] : opt.m) all["adam_m." + k] = t;
  for (const auto& [k, t] : opt.v) all["adam_v." + k] = t;
  save_safetensors(path, all, {{"step", std::to_string(opt.step)}});
}

// Restores parameters and optimizer state; returns the step reached.
int64_t load_checkpoint(const std::string& path, std::map<std::string, at::Tensor>& params, AdamW& opt) {
  auto file = SafetensorsFile::open(path);
  at::NoGradGuard ng;
  for (auto& [k, p] : params) {
    DP_CHECK(file->has("param." + k), path, ": checkpoint lacks parameter '", k, "'");
    p.copy_(tensor_from_view(file, file->get("param." + k)));
    if (file->has("adam_m." + k)) {
      opt.m[k] = tensor_from_view(file, file->get("adam_m." + k)).clone();
      opt.v[k] = tensor_from_view(file, file->get("adam_v." + k)).clone();
    }
  }
  auto it = file->metadata().find("step");
  DP_CHECK(it != file->metadata().end(), path, ": checkpoint has no step");
  opt.step = std::stoll(it->second);
  return opt.step;
}

std::map<std::string, at::Tensor> strip(const std::map<std::string, at::Tensor>& params) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, t] : params) out[k] = t.detach().clone();
  return out;
}

// Images of scenes [index, index + n) of `seed` as [n, 3, size, size] in [-1, 1], and their captions.
at::Tensor scene_batch(uint64_t seed, uint64_t index, int n, int size, std::vector<std::string>* captions) {
  at::Tensor out = at::empty({n, 3, size, size});
  for (int i = 0; i < n; ++i) {
    const data::Scene s = data::sample_scene(seed, index + i);
    Image im = data::render(s);
    if (size != 64) im = data::downsample(im, 64 / size);
    out[i] = image_to_chw(im);
    if (captions) captions->push_back(data::caption(s));
  }
  return out;
}

double cosine_lr(double lr, int64_t step, int64_t steps) {
  const int64_t warm = std::min<int64_t>(100, steps / 10 + 1);
  if (step < warm) return lr * (step + 1) / warm;
  return lr * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * double(step - warm) / std::max<int64_t>(1, steps - warm))));
}


Trainer::Trainer(std::string name, const TrainOptions& o, const std::string& dir,
                 std::map<std::string, at::Tensor>& params, double weight_decay)
    : name_(std::move(name)), o_(o), ck_(path_join(dir, "checkpoint.safetensors")), params_(params) {
  opt_.wd = weight_decay;
  start_ = o.resume && file_exists(ck_) ? load_checkpoint(ck_, params_, opt_) : 0;
}

void Trainer::step(int64_t step, const at::Tensor& loss) {
  loss.backward();
  opt_.update(params_, cosine_lr(o_.lr, step, o_.steps));
  const double l = loss.item<double>();
  avg_ = step == 0 ? l : 0.98 * avg_ + 0.02 * l;
  if ((step + 1) % 50 == 0 || step + 1 == o_.steps)
    std::fprintf(stderr, "[train %s] step %lld/%lld loss %.5f (avg %.5f) %.1f s\n", name_.c_str(),
                 static_cast<long long>(step + 1), static_cast<long long>(o_.steps), l, avg_,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count());
  if ((step + 1) % o_.save_every == 0) save_checkpoint(ck_, params_, opt_);
}

void Trainer::finish() { save_checkpoint(ck_, params_, opt_); }

}  // namespace diffpipe::train
