// Up-front memory estimates: what a rank needs for the stages placed on it (their weights, in the run's dtype,
// plus the activations of one batched call of each, since a rank's stages run at the same time), so that a run
// that would run out of memory is refused before any work, with the numbers. The activation model counts the
// UNet's skip connections over its levels plus a working set at the top level, and the VAE decoder's largest
// feature maps at full resolution; it matches measured peaks within about 30 % (docs/results.md).
#pragma once
#include <c10/core/ScalarType.h>

#include <string>
#include <vector>

#include "diffpipe/stages/lora_spec.h"

namespace diffpipe {

struct MemoryNeed {
  double weights = 0, activations = 0;  // bytes
  double runtime = 0.4e9;               // the process itself: LibTorch, MPI, buffers (measured about 0.4 GB)
  double total() const { return weights + activations + runtime; }
};

// Request sizes 0 mean the model's default size. `rows` per UNet call: max_batch x 2 with guidance.
// `addons`: its ControlNets load with the UNet (their weights, and about half the UNet's activations for the
// residuals they add); its per-request LoRA adapters stay beside the UNet's and text encoders' weights.
MemoryNeed estimate_rank_memory(const std::string& model_dir, const std::vector<std::string>& stages, int width,
                                int height, int max_batch, bool guidance, c10::ScalarType dtype,
                                const ModelAddons& addons = {});
// MemAvailable of this machine (bytes), or 0 when unknown.
double available_host_memory();

}  // namespace diffpipe
