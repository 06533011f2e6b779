// Shared by the golden pipeline tests: runs denoising states to their end in one batch, as the denoise stage does.
#pragma once
#include <vector>

#include "diffpipe/stages/stages.h"

namespace diffpipe::test {

// Steps every state of `ds` (one batch, one UNet call per step) until done; returns each one's final latents.
inline std::vector<at::Tensor> denoise_to_end(const SdModel& model, std::vector<DenoiseState>& ds) {
  const DenoiseStage den(model);
  std::vector<DenoiseState*> batch;
  for (auto& s : ds) batch.push_back(&s);
  while (!ds.empty() && !ds[0].done()) den.step(batch);
  std::vector<at::Tensor> out;
  for (auto& s : ds) out.push_back(s.latents);
  return out;
}

}  // namespace diffpipe::test
