// Which stages a model folder's pipeline has, in order, without loading anything (torch-free: placement,
// planner and command line use it). Stable Diffusion: encode -> denoise -> decode; a folder with
// super_resolution/ adds upscale; a Stable unCLIP folder runs encode -> prior -> denoise -> decode. The stages themselves are registered in stages/model_stages.h.
#pragma once
#include <string>
#include <vector>

#include "diffpipe/stages/lora_spec.h"

namespace diffpipe {

struct PipelineStage {
  std::string name;
  bool heavy = false;     // the main stage: extra ranks become its replicas
  bool own_rank = false;  // a light stage with many steps (the unCLIP prior): derived placements give it a rank
                          // of its own when there are enough ranks (one each besides the heavy stage's)
};

// The folder's pipeline (throws naming the folder when it has none of the known layouts).
std::vector<PipelineStage> pipeline_layout(const std::string& model_dir);
// ... with what the run adds: an SDXL refiner (addons.refiner) runs as `refine` between denoise and decode.
std::vector<PipelineStage> pipeline_layout(const std::string& model_dir, const ModelAddons& addons);
// The pipeline of a Stable Diffusion folder without super-resolution (encode, denoise, decode).
std::vector<PipelineStage> default_pipeline_layout();
// Every stage name registered for model folders (a pipeline file may place only these).
std::vector<std::string> known_stage_names();

}  // namespace diffpipe
