// The diffpipe subcommands. Each takes the arguments after its name and returns the process exit code.
#pragma once
#include "cli.h"
#include "diffpipe/stages/lora_spec.h"

namespace diffpipe::apps {

// What generate and serve add to the model from their options: --lora (fused), --lora-adapters, --controlnet.
ModelAddons model_addons(const cli::Args& a);

int generate_main(int argc, char** argv);
int init_model_main(int argc, char** argv);
int data_main(int argc, char** argv);
int eval_main(int argc, char** argv);
int train_main(int argc, char** argv);
int bench_main(int argc, char** argv);
int serve_main(int argc, char** argv);
int profile_main(int argc, char** argv);
int plan_main(int argc, char** argv);

}  // namespace diffpipe::apps
