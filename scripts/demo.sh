#!/usr/bin/env bash
# The main job: install, build, then generate a few prompts with the stages pipelined over 3 MPI ranks
# (text encoder | denoiser | decoder + super-resolution) and write demo-out/contact_sheet.png (its own folder:
# a user's out/ is never touched); then the same prompts with the DALL-E-2-style model models/shapes-unclip
# over 4 ranks (demo-out/unclip/); then edits of the first image with the default model: image-to-image under a new
# prompt, and inpainting of its centre (scripts/demo_mask.png) (demo-out/edits/).
#   bash scripts/demo.sh [MODEL_DIR]
# MODEL_DIR defaults to diffpipe's own model, models/shapes-sd (trained by `diffpipe train`, see its
# MODEL_CARD.md); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh > build.log 2>&1 || { tail -30 build.log; exit 1; }
MODEL=${1:-models/shapes-sd}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=demo-out
rm -rf "$OUT"
mpirun --oversubscribe -np 3 ./build/apps/diffpipe generate --model "$MODEL" --prompts scripts/demo_prompts.txt \
  --images 2 --steps 25 --guidance 5 --seed 1 --out "$OUT" --quiet
echo "images: $OUT/img-*.png, index: $OUT/images.jsonl, contact sheet: $OUT/contact_sheet.png"
# the second line: the DALL-E-2-style model (prior on its own rank: encode | prior | denoise | decode)
if [ -z "${1:-}" ] && [ -d models/shapes-unclip ]; then
  mpirun --oversubscribe -np 4 ./build/apps/diffpipe generate --model models/shapes-unclip \
    --prompts scripts/demo_prompts.txt --images 2 --steps 25 --guidance 5 --seed 1 --out "$OUT/unclip" --quiet
  echo "DALL-E-2-style model (models/shapes-unclip): $OUT/unclip/contact_sheet.png"
fi
# the third line: editing the first image with the same model (image-to-image, then inpainting of its centre)
if [ -z "${1:-}" ]; then
  FIRST=$OUT/img-00000-seed1.png
  printf '%s\n' \
    "{\"prompt\": \"a large green square in the center on a black background\", \"image_prompt\": \"$FIRST\", \"strength\": 0.7}" \
    "{\"prompt\": \"a small white circle in the center on a black background\", \"image_prompt\": \"$FIRST\", \"mask\": \"scripts/demo_mask.png\"}" \
    > "$OUT/edits.jsonl"
  mpirun --oversubscribe -np 3 ./build/apps/diffpipe generate --model "$MODEL" --prompts "$OUT/edits.jsonl" \
    --images 2 --steps 25 --guidance 5 --seed 1 --out "$OUT/edits" --quiet
  echo "edits of $FIRST (image-to-image, inpainting): $OUT/edits/contact_sheet.png"
fi
