#!/usr/bin/env bash
# Retrains the shipped default model (models/shapes-sd) from scratch on the CPU, module by module.
# Steps and batch sizes are the ones recorded in models/shapes-sd/MODEL_CARD.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/shapes-sd}
B=${DIFFPIPE_BIN:-./build/apps/diffpipe}
$B train vae  --model "$OUT" --steps 2000 --batch 32 --lr 2e-3
$B train text --model "$OUT" --steps 1500 --batch 64 --lr 2e-3
$B train sr   --model "$OUT" --steps 600  --batch 16 --lr 2e-3
# the denoiser in two phases, as the shipped one was trained: a 6000-step cosine run, then resumed to 9000 steps
# (the schedule restarts at 0.33x the peak rate and decays again)
$B train unet --model "$OUT" --steps 6000 --batch 64 --lr 1e-3
$B train unet --model "$OUT" --steps 9000 --batch 64 --lr 1e-3 --resume
rm -f "$OUT"/*/checkpoint.safetensors
