// The registry of stages that model folders use. Each entry is one Stage class (stages/src/model_stages.cpp
// registers encode, denoise, decode and upscale), registered once with what it consumes and produces and which
// model components a rank running it must load. model_pipeline() turns a folder's stage list into the
// PipelineDef the runner drives. A new stage (the prior, previews...) is one class and one register call.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/model.h"
#include "diffpipe/stages/pipeline.h"
#include "diffpipe/stages/stage.h"

namespace diffpipe {

struct ModelStage {
  StageDef def;            // def.make is filled in by model_pipeline()
  unsigned components = 0; // Component bits SdModel::load needs for it
  std::function<std::unique_ptr<Stage>(const SdModel&, const StageConfig&)> make;
};

// Adds (or replaces) a stage under def.name. Thread-safe; normally called once at start-up.
void register_model_stage(ModelStage s);
// The entry for `name`; throws naming the known stages when there is none.
ModelStage find_model_stage(const std::string& name);

// The components a rank running `stages` must load.
unsigned components_for(const std::vector<std::string>& stages);
// The pipeline of `stages` (in order) over a loaded model; the model must outlive the result.
PipelineDef model_pipeline(const SdModel& model, const std::vector<std::string>& stages);

}  // namespace diffpipe
