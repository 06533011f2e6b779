#!/usr/bin/env bash
# Trains the shipped DALL-E-2-style model (models/shapes-unclip) from the shipped shapes model, on the CPU:
# the diffusion prior (text embedding -> image-tower embedding), then the decoder UNet (the shapes UNet grown by
# a class embedding of the noise-augmented image embedding). Steps and batches as models/shapes-unclip/MODEL_CARD.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/shapes-unclip}; FROM=${2:-models/shapes-sd}
B=${DIFFPIPE_BIN:-./build/apps/diffpipe}
$B train prior   --model "$OUT" --from "$FROM" --steps 3000 --batch 64 --lr 1e-3
$B train decoder --model "$OUT" --from "$FROM" --steps 2000 --batch 64 --lr 5e-4
rm -f "$OUT"/*/checkpoint.safetensors
