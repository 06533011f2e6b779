// What a user asks for: one image's generation settings. Plain value type (no LibTorch), so the scheduler,
// the wire format and the command line share it. Validation names the offending field.
#pragma once
#include <cstdint>
#include <string>

namespace diffpipe {

struct GenerationParams {
  std::string prompt;
  std::string negative_prompt;  // "" = the unconditional embedding of the empty prompt
  int steps = 25;               // inference steps
  double guidance = 7.5;        // classifier-free guidance scale; <= 1 skips the unconditional pass
  std::string sampler;          // "" = the model's scheduler_config.json class; else ddim|euler|euler_a|dpmpp_2m|dpmpp_2m_karras|pndm
  uint64_t seed = 0;
  int width = 0, height = 0;    // 0 = the model's default size
  int clip_skip = 0;            // 0 = last text-encoder layer, 1 = penultimate, ...

  bool uses_cfg() const { return guidance > 1.0; }
};

}  // namespace diffpipe
