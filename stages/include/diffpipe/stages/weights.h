// A model's parameters by their diffusers/transformers key, loaded from one safetensors file, checked
// against the shapes the config implies. Owns: the tensors (moved to the requested device and dtype).
// Thread-safety: built on one thread at load time, then read-only.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace diffpipe {

struct DeviceSpec {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // floating parameters are converted to this
  // CPU only: run batch-size-dependent kernels sample by sample so results do not depend on batch neighbours
  // (see stages/src/nn.h). Off by default: at small shapes it costs much of batching's speed.
  bool batch_invariant = false;
};

// One low-rank branch of a layer, kept apart from its weight (a per-request LoRA adapter, --lora-adapters): the
// layer adds factor x scale x up(down(x)) to its output for the rows whose request chose adapter `adapter`.
struct LoraBranch {
  int adapter = 0;
  at::Tensor down, up;  // as the file stores them: [r, in] and [out, r] (convolutions: [r, in, k, k], [out, r, 1, 1])
  double factor = 1.0;  // alpha / rank (rsLoRA: alpha / sqrt(rank)); the request's scale multiplies it
};

class Weights {
 public:
  // Loads every tensor of a safetensors file. Floating tensors become spec.dtype on spec.device.
  static Weights load(const std::string& path, const DeviceSpec& spec);
  // Wraps tensors already in memory (tests, training).
  static Weights from_map(std::map<std::string, at::Tensor> tensors, const std::string& origin);

  // An empty set that creates every tensor a model asks for, initialised from `seed` (counter-based, so
  // the same seed gives the same weights anywhere): 1-D "weight" -> ones, "bias" -> zeros, embeddings
  // N(0, 0.02), other weights N(0, 1/fan_in). Building a model on it yields a complete random model whose
  // keys and shapes come from the model code itself (see all()).
  static Weights initializer(uint64_t seed, const DeviceSpec& spec = {});
  // The same, starting from `tensors` (fine-tuning: a model grown by new layers keeps the trained ones).
  static Weights initializer_from(std::map<std::string, at::Tensor> tensors, uint64_t seed);
  const std::map<std::string, at::Tensor>& all() const { return state_->tensors; }

  // The tensor `prefix + key` with exactly `shape`; throws naming the file, the key and both shapes.
  at::Tensor get(const std::string& key, const std::vector<int64_t>& shape) const;
  bool has(const std::string& key) const;
  Weights sub(const std::string& prefix) const;  // keys relative to prefix + "."
  // Keys present in the file but never read (checked after a model is built).
  std::vector<std::string> unused() const;
  const std::string& origin() const { return state_->origin; }
  // Replaces the tensor `key` by fn(old) (LoRA fusion, before a model is built); throws naming the file when absent.
  void update(const std::string& key, const std::function<at::Tensor(const at::Tensor&)>& fn);
  // Renames keys (legacy checkpoints): the first occurrence of `from` in each key becomes `to`.
  void rename_part(const std::string& from, const std::string& to);
  // Adds a tensor the model's file lacks (an IP-Adapter's layers, before a model is built): floating tensors become
  // the set's dtype and device (`like`'s); throws naming both origins when the key exists.
  void insert(const std::string& key, const at::Tensor& t, const at::TensorOptions& like, const std::string& from);
  // Per-request LoRA: branches attached to the weight `key` (before a model is built), and those of a key.
  void add_branch(const std::string& key, LoraBranch b);
  std::vector<LoraBranch> branches(const std::string& key) const;

 private:
  struct State {
    std::string origin;
    std::map<std::string, at::Tensor> tensors;
    std::set<std::string> used;
    std::map<std::string, std::vector<LoraBranch>> branches;
    bool create = false;  // initializer mode
    uint64_t seed = 0;
    DeviceSpec spec;
  };
  std::shared_ptr<State> state_;
  std::string prefix_;
};

std::string shape_str(at::IntArrayRef s);

}  // namespace diffpipe
