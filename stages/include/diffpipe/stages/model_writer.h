// Writes model folders in the diffusers layout: configs, safetensors weights, a byte-level CLIP tokenizer.
// Used by tests and tools to make a randomly initialised small model (so distributed tests never depend on
// downloaded weights), and by training to save what it learnt. Single-threaded; overwrites files.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace diffpipe {

// A byte-level CLIP BPE tokenizer: every byte symbol (with and without "</w>"), the start/end tokens, and
// the given merges (each "a b"), with vocab entries for every merge result. Returns the vocabulary size.
int64_t write_clip_tokenizer(const std::string& dir, const std::vector<std::string>& merges = {});

void write_json(const std::string& path, const nlohmann::json& j);
// config.json + weights file in `dir` (created).
void write_component(const std::string& dir, const nlohmann::json& config, const std::string& weights_name,
                     const std::map<std::string, at::Tensor>& weights, at::ScalarType dtype = at::kFloat);

struct RandomModelOptions {
  uint64_t seed = 0;
  std::string prediction_type = "epsilon";
  std::string timestep_spacing = "leading";
  std::string scheduler_class = "DDIMScheduler";
  std::string preset = "tiny";  // tiny | sd15 | sdxl (SD 1.5's / SDXL base's architecture, for speed tests) | tiny-xl
  at::ScalarType save_dtype = at::kFloat;
  bool super_resolution = false;        // also a random super_resolution/ (2x): a cascade model
};
// A complete SD-1.x-style model with random weights. tiny: text hidden 32, UNet [32, 64], VAE [32, 64]
// (16x16 images); sd15: the SD 1.5 architecture (text 768 x 12 layers, UNet [320, 640, 1280, 1280], VAE
// [128, 256, 512, 512]: 512x512 images).
void write_random_model(const std::string& dir, const RandomModelOptions& o);

}  // namespace diffpipe
