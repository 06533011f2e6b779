#!/usr/bin/env bash
# The main job: install, build, then generate a few prompts with the stages pipelined over 3 MPI ranks
# (text encoder | denoiser | decoder) and write out/contact_sheet.png.
#   bash scripts/demo.sh [MODEL_DIR]
# MODEL_DIR defaults to the reference model in ../shared/golden/tiny-sd (random weights: it shows the
# machinery, not pictures); without it a random tiny model is made with `diffpipe init-model`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh > build.log 2>&1 || { tail -30 build.log; exit 1; }
MODEL=${1:-../shared/golden/tiny-sd/model}
if [ ! -d "$MODEL" ]; then
  MODEL=build/random-model
  ./build/apps/diffpipe init-model --out "$MODEL" --seed 0
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf out
mpirun --oversubscribe -np 3 ./build/apps/diffpipe generate --model "$MODEL" --prompts scripts/demo_prompts.txt \
  --images 2 --steps 20 --sampler dpmpp_2m --seed 1 --out out --quiet
echo "images: out/img-*.png, index: out/images.jsonl, contact sheet: out/contact_sheet.png"
