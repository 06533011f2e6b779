// Which LoRA files a run fuses into its model, and how strongly (stages/lora.h reads and applies them), and which
// ControlNet it loads beside it. No LibTorch.
#pragma once
#include <string>
#include <vector>

namespace diffpipe {

struct LoraSpec {
  std::string path;
  double scale = 1.0;
};
// "FILE" or "FILE:SCALE" (a number after the last ':'); throws naming the text when the scale is not a finite number.
LoraSpec parse_lora_spec(const std::string& text);
// A comma-separated list of those ("" = none).
std::vector<LoraSpec> parse_lora_list(const std::string& text);

// What a run adds to a model folder as it loads: LoRA files fused into its weights, a ControlNet folder beside it.
struct ModelAddons {
  std::vector<LoraSpec> loras;
  std::string controlnet;  // a ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors), "" = none
};

}  // namespace diffpipe
