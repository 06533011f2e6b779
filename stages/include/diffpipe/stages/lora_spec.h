// Which LoRA files a run fuses into its model, and how strongly (stages/lora.h reads and applies them). No LibTorch.
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

}  // namespace diffpipe
