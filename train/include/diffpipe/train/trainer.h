// Training building blocks for diffpipe's own models: AdamW with checkpointed moments, checkpoints
// (weights + moments + step, resumable), the cosine learning-rate schedule, batches of the synthetic shapes
// data, and Trainer (one module's optimisation loop with progress and checkpoints).
#pragma once
#include <ATen/ATen.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "diffpipe/stages/weights.h"

namespace diffpipe::train {

constexpr uint64_t kTrainSeed = 0;  // held-out evaluation uses other seeds

// AdamW over a named parameter set, with its moments saved in checkpoints.
struct AdamW {
  double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.0;
  int64_t step = 0;
  std::map<std::string, at::Tensor> m, v;
  void update(const std::map<std::string, at::Tensor>& params, double lr_now);
};

// Every tensor of `w`, marked as requiring gradients.
std::map<std::string, at::Tensor> trainable(const Weights& w);
void save_checkpoint(const std::string& path, const std::map<std::string, at::Tensor>& params, const AdamW& opt);
// Restores parameters and optimizer state; returns the step reached. Errors name the file and the tensor.
int64_t load_checkpoint(const std::string& path, std::map<std::string, at::Tensor>& params, AdamW& opt);
// Detached copies (what a model folder stores).
std::map<std::string, at::Tensor> strip(const std::map<std::string, at::Tensor>& params);
// Images of scenes [index, index + n) of `seed` as [n, 3, size, size] in [-1, 1], and their captions.
at::Tensor scene_batch(uint64_t seed, uint64_t index, int n, int size, std::vector<std::string>* captions = nullptr);
// Linear warm-up, then cosine decay to 10 % of `lr`.
double cosine_lr(double lr, int64_t step, int64_t steps);

struct TrainOptions {
  std::string model;  // the model folder trained into
  int64_t steps = 0, batch = 0;
  double lr = 0;
  bool resume = false;
  int64_t save_every = 500;
};

// One module's optimisation: AdamW over `params` (resumed from DIR/checkpoint.safetensors with resume), the
// cosine schedule, a checkpoint every save_every steps and at the end, progress and loss on stderr.
class Trainer {
 public:
  Trainer(std::string name, const TrainOptions& o, const std::string& dir, std::map<std::string, at::Tensor>& params,
          double weight_decay = 0);
  int64_t start() const { return start_; }  // the first step to run
  // Backward pass, update, progress line every 50 steps, checkpoint every save_every steps.
  void step(int64_t step, const at::Tensor& loss);
  void finish();

 private:
  std::string name_;
  const TrainOptions& o_;
  std::string ck_;
  std::map<std::string, at::Tensor>& params_;
  AdamW opt_;
  int64_t start_ = 0;
  double avg_ = 0;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

}  // namespace diffpipe::train
