// `diffpipe init-model`: writes a randomly initialised tiny model in the diffusers layout (for tests,
// benchmarks and as a starting point for training). Deterministic for a given seed.
#include <cstdio>
#include <cstring>

#include "cli.h"
#include "commands.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/model_writer.h"

namespace diffpipe::apps {

int init_model_main(int argc, char** argv) {
  cli::Args a("init-model", "diffpipe init-model --out DIR [options]",
              {{"out", "DIR", "where to write the model (diffusers layout)"},
               {"seed", "S", "weight seed (default 0)"},
               {"prediction-type", "TYPE", "epsilon | v_prediction"},
               {"timestep-spacing", "SPACING", "leading | linspace | trailing"},
               {"scheduler", "CLASS", "scheduler_config.json class (e.g. DDIMScheduler)"},
               {"preset", "NAME", "tiny (default) | sd15 | sdxl (SD 1.5's / SDXL base's architecture) | tiny-xl (a tiny SDXL)"},
               {"save-dtype", "TYPE", "float32 (default) | float16"},
               {"super-resolution", "", "add a random 2x super_resolution/ stage"}},
              argc, argv, "writes a randomly initialised model (tests and benchmarks)");
  if (a.help_requested()) {
    std::fputs(a.help_text().c_str(), stdout);
    return 0;
  }
  DP_CHECK(a.has("out"), "init-model: --out DIR is required");
  DP_CHECK(mpi::world().size == 1, "init-model: run it as one process");
  RandomModelOptions o;
  o.seed = a.u64("seed", 0);
  o.prediction_type = a.str("prediction-type", o.prediction_type);
  o.timestep_spacing = a.str("timestep-spacing", o.timestep_spacing);
  o.scheduler_class = a.str("scheduler", o.scheduler_class);
  o.preset = a.str("preset", o.preset);
  o.super_resolution = a.flag("super-resolution");
  const std::string sd = a.str("save-dtype", "float32");
  DP_CHECK(sd == "float32" || sd == "float16", "init-model: --save-dtype must be float32 or float16");
  o.save_dtype = sd == "float16" ? at::kHalf : at::kFloat;
  write_random_model(a.str("out"), o);
  SdModel::validate(a.str("out"));  // what we wrote must load
  std::fprintf(stderr, "diffpipe: wrote a random %s model (seed %llu) to %s\n", o.preset.c_str(),
               static_cast<unsigned long long>(o.seed), a.str("out").c_str());
  return 0;
}

}  // namespace diffpipe::apps
