#include "diffpipe/stages/weights.h"

#include <cmath>
#include <sstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/philox.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"

namespace diffpipe {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

Weights Weights::load(const std::string& path, const DeviceSpec& spec) {
  DP_CHECK(file_exists(path), path, ": weights file not found");
  auto file = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> m;
  for (const auto& name : file->names()) {
    at::Tensor t = tensor_from_view(file, file->get(name));
    if (at::isFloatingType(t.scalar_type())) {
      // Always copy: the mapping is read-only and parameters may be trained in place later.
      t = t.to(spec.device, spec.dtype, /*non_blocking=*/false, /*copy=*/true);
    } else {
      t = t.to(spec.device, t.scalar_type(), false, true);
    }
    m.emplace(name, std::move(t));
  }
  return from_map(std::move(m), path);
}

void Weights::update(const std::string& key, const std::function<at::Tensor(const at::Tensor&)>& fn) {
  auto it = state_->tensors.find(prefix_ + key);
  DP_CHECK(it != state_->tensors.end(), state_->origin, ": no tensor '", prefix_ + key, "' to update");
  it->second = fn(it->second);
}

void Weights::insert(const std::string& key, const at::Tensor& t, const at::TensorOptions& like,
                     const std::string& from) {
  DP_CHECK(!state_->tensors.count(prefix_ + key), from, ": tensor '", prefix_ + key, "' is already in ", state_->origin);
  state_->tensors.emplace(prefix_ + key, t.to(like.device(), like.dtype()).contiguous());
}

void Weights::add_branch(const std::string& key, LoraBranch b) {
  DP_CHECK(state_->tensors.count(prefix_ + key), state_->origin, ": no tensor '", prefix_ + key, "' for a LoRA branch");
  state_->branches[prefix_ + key].push_back(std::move(b));
}

std::vector<LoraBranch> Weights::branches(const std::string& key) const {
  auto it = state_->branches.find(prefix_ + key);
  return it == state_->branches.end() ? std::vector<LoraBranch>() : it->second;
}

Weights Weights::from_map(std::map<std::string, at::Tensor> tensors, const std::string& origin) {
  Weights w;
  w.state_ = std::make_shared<State>();
  w.state_->origin = origin;
  w.state_->tensors = std::move(tensors);
  return w;
}

Weights Weights::initializer(uint64_t seed, const DeviceSpec& spec) {
  Weights w = from_map({}, "<random init, seed " + std::to_string(seed) + ">");
  w.state_->create = true;
  w.state_->seed = seed;
  w.state_->spec = spec;
  return w;
}

Weights Weights::initializer_from(std::map<std::string, at::Tensor> tensors, uint64_t seed) {
  Weights w = from_map(std::move(tensors), "<trained tensors + random init, seed " + std::to_string(seed) + ">");
  w.state_->create = true;
  w.state_->seed = seed;
  return w;
}

at::Tensor Weights::get(const std::string& key, const std::vector<int64_t>& shape) const {
  const std::string full = prefix_ + key;
  auto it = state_->tensors.find(full);
  if (it == state_->tensors.end() && state_->create) {
    // stream: a hash of the key, so each tensor's values do not depend on creation order
    uint64_t h = 1469598103934665603ull;
    for (char c : full) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
    at::Tensor t;
    const bool is_bias = full.size() >= 5 && full.compare(full.size() - 5, 5, ".bias") == 0;
    if (is_bias) {
      t = at::zeros(shape, at::TensorOptions().dtype(at::kFloat));
    } else if (shape.size() == 1) {
      t = at::ones(shape, at::TensorOptions().dtype(at::kFloat));
    } else {
      t = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
      philox_normal(state_->seed, h, t.data_ptr<float>(), t.numel());
      int64_t fan_in = 1;
      for (size_t d = 1; d < shape.size(); ++d) fan_in *= shape[d];
      const bool embedding = full.find("embedding") != std::string::npos;
      t.mul_(embedding ? 0.02 : 1.0 / std::sqrt(static_cast<double>(fan_in)));
    }
    it = state_->tensors.emplace(full, t.to(state_->spec.device, state_->spec.dtype)).first;
  }
  DP_CHECK(it != state_->tensors.end(), state_->origin, ": missing tensor '", full, "' (expected shape ",
           shape_str(shape), ")");
  at::Tensor t = it->second;
  if (t.sizes() != at::IntArrayRef(shape)) {
    // Legacy 1x1-conv attention weights [C, C, 1, 1] stand for linear [C, C].
    if (t.numel() == static_cast<int64_t>(c10::multiply_integers(shape)) && t.dim() == 4 &&
        shape.size() == 2 && t.size(2) == 1 && t.size(3) == 1) {
      t = t.reshape(shape);
    } else {
      DP_FAIL(state_->origin, ": tensor '", full, "' has shape ", shape_str(t.sizes()), " but the config implies ",
              shape_str(shape));
    }
  }
  state_->used.insert(full);
  return t;
}

bool Weights::has(const std::string& key) const { return state_->tensors.count(prefix_ + key) != 0; }

Weights Weights::sub(const std::string& prefix) const {
  Weights w = *this;
  w.prefix_ = prefix_ + prefix + ".";
  return w;
}

std::vector<std::string> Weights::unused() const {
  std::vector<std::string> out;
  for (const auto& kv : state_->tensors)
    if (!state_->used.count(kv.first)) out.push_back(kv.first);
  return out;
}

void Weights::rename_part(const std::string& from, const std::string& to) {
  std::map<std::string, at::Tensor> renamed;
  for (auto& kv : state_->tensors) {
    std::string k = kv.first;
    const auto pos = k.find(from);
    if (pos != std::string::npos) k.replace(pos, from.size(), to);
    renamed.emplace(k, kv.second);
  }
  state_->tensors.swap(renamed);
}

}  // namespace diffpipe
