// `diffpipe train`: trains diffpipe's own small model, one module at a time, into a diffusers-layout folder.
//   train vae   | text | unet | sr  --model DIR [--steps N] [--batch B] [--lr LR] [--seed S] [--resume]
//   train all   --model DIR        (every module in order, default steps)
//   train prior | decoder  --model OUT --from DIR   (the Stable unCLIP variant of a trained shapes model)
// Each module checkpoints to DIR/<module>/checkpoint.safetensors (weights + AdamW moments + step) every
// --save-every steps and resumes from it with --resume. Progress: step, loss, elapsed, on stderr.
// The recipes live in train/ (diffpipe/train/recipes.h); this is the command.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstring>

#include "cli.h"
#include "commands.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/train/recipes.h"

namespace diffpipe::apps {

using train::TrainOptions;

int train_main(int argc, char** argv) {
  const char* help =
      "usage: diffpipe train vae|text|unet|sr|all --model DIR [--steps N] [--batch B] [--lr LR] [--resume]\n"
      "                      [--save-every N] [--threads N]\n"
      "       diffpipe train prior|decoder --model OUT --from DIR [options]\n"
      "  trains one module of diffpipe's own model into DIR (diffusers layout); unet needs vae and text first;\n"
      "  prior then decoder make OUT a Stable unCLIP model from the trained shapes model DIR\n";
  if (argc < 1 || !std::strcmp(argv[0], "--help") || !std::strcmp(argv[0], "-h")) {
    std::fputs(help, argc < 1 ? stderr : stdout);
    return argc < 1 ? 2 : 0;
  }
  const std::string what = argv[0];
  cli::Args a("train " + what, "diffpipe train vae|text|unet|sr|all|prior|decoder --model DIR [options]",
              {{"model", "DIR", "the model folder to train into (diffusers layout)"},
               {"from", "DIR", "prior, decoder: the trained shapes model they build on (default models/shapes-sd)"},
               {"steps", "N", "optimiser steps"},
               {"batch", "B", "batch size (>= 2)"},
               {"lr", "LR", "learning rate (AdamW)"},
               {"resume", "", "continue from the folder's checkpoint"},
               {"save-every", "N", "checkpoint every N steps (default 500)"},
               {"threads", "N", "CPU threads"},
               {"seed", "S", "initialisation seed (default 0)"}},
              argc - 1, argv + 1, "trains one module of diffpipe's own model into DIR; unet needs vae and text first");
  if (a.help_requested()) {
    std::fputs(a.help_text().c_str(), stdout);
    return 0;
  }
  DP_CHECK(a.has("model"), "train: --model DIR is required");
  if (a.has("threads")) at::set_num_threads(static_cast<int>(a.integer("threads", 2)));
  at::manual_seed(static_cast<uint64_t>(a.integer("seed", 0)));
  make_dirs(a.str("model"));
  auto opts = [&](int64_t steps, int64_t batch, double lr) {
    TrainOptions o{a.str("model"), a.integer("steps", steps), a.integer("batch", batch), a.number("lr", lr), a.flag("resume"),
                   a.integer("save-every", 500)};
    DP_CHECK(o.steps >= 1 && o.batch >= 2 && o.lr > 0, "train: --steps >= 1, --batch >= 2, --lr > 0");
    return o;
  };
  const auto t0 = std::chrono::steady_clock::now();
  // defaults: the shipped model's recipe (scripts/train_default.sh, models/shapes-sd/MODEL_CARD.md)
  if (what == "vae" || what == "all") train::train_vae(opts(2000, 32, 2e-3));
  if (what == "text" || what == "all") train::train_text(opts(1500, 64, 2e-3));
  if (what == "sr" || what == "all") train::train_sr(opts(600, 16, 2e-3));
  if (what == "unet" || what == "all") train::train_unet(opts(9000, 64, 1e-3));  // shipped: 6000, then resumed to 9000
  const std::string from = a.str("from", "models/shapes-sd");
  if (what == "prior") train::train_prior(opts(3000, 64, 1e-3), from);  // models/shapes-unclip/MODEL_CARD.md
  if (what == "decoder") train::train_decoder(opts(2000, 64, 5e-4), from);
  DP_CHECK(what == "vae" || what == "text" || what == "unet" || what == "sr" || what == "all" || what == "prior" ||
               what == "decoder",
           "train: unknown module '", what, "' (vae, text, unet, sr, all, prior, decoder)");
  std::fprintf(stderr, "diffpipe: train %s finished in %.1f s\n", what.c_str(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}

}  // namespace diffpipe::apps
