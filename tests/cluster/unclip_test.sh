#!/usr/bin/env bash
# The Stable unCLIP pipeline (encode -> prior -> denoise -> decode) through `diffpipe generate` under mpirun:
#   unclip_test.sh DIFFPIPE_BIN WORKDIR       (the folder: $DIFFPIPE_GOLDEN_UNCLIP, default ../shared/golden/tiny-unclip)
# Checks: the same PNG bytes on 1 rank and on placements with the prior on its own rank (derived at 4 ranks, and a
# pipeline file at 3), same threads and --batch-invariant as the SD tests; the prior settings reach the images
# (another --prior-guidance / --noise-level changes them; a JSONL line's prior_steps equals the flag); out-of-range
# settings refused naming the setting; the PNG chunk records them. Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_UNCLIP:-$(dirname "$0")/../../../shared/golden/tiny-unclip}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: Stable unCLIP folder $MODEL is absent (set DIFFPIPE_GOLDEN_UNCLIP)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 8 --prior-steps 6 --width 16
        --height 16 --seed 3 --threads 1 --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np2 2 "np 2"
prior_placements

# the n-th image alone, from its JSON line's seed
seed=$(sed -n 4p "$WORK/np1/images.jsonl" | python3 -c 'import json,sys;print(json.load(sys.stdin)["seed"])')
prompt=$(sed -n 4p "$WORK/np1/images.jsonl" | python3 -c 'import json,sys;print(json.load(sys.stdin)["prompt"])')
file=$(sed -n 4p "$WORK/np1/images.jsonl" | python3 -c 'import json,sys;print(json.load(sys.stdin)["file"])')
timeout 60 "$BIN" generate --model "$MODEL" --prompt "$prompt" --seed "$seed" --steps 8 --prior-steps 6 --width 16 \
  --height 16 --threads 1 --batch-invariant --quiet --out "$WORK/one" 2> "$WORK/one.log"
cmp -s "$file" "$WORK/one/$(ls "$WORK/one" | grep '^img-' | head -1)" \
  && ok "generate --prompt P --seed s reproduces image 4 alone" || bad "image 4 not reproduced alone"

# the prior's settings reach the pixels; JSONL keys equal the flags
one() { timeout 60 "$BIN" generate --model "$MODEL" --seed 5 --steps 8 --width 16 --height 16 --threads 1 --quiet "$@"; }
P=(--prompt "a photo of a cat")
one "${P[@]}" --prior-steps 6 --out "$WORK/s-base" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 6 --prior-guidance 1 --out "$WORK/s-g1" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 6 --noise-level 500 --out "$WORK/s-n500" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 3 --out "$WORK/s-p3" 2>> "$WORK/settings.log"
printf '{"prompt": "a photo of a cat", "prior_steps": 3}\n' > "$WORK/p3.jsonl"
one --prompts "$WORK/p3.jsonl" --out "$WORK/s-p3j" 2>> "$WORK/settings.log"
img() { ls "$1"/img-*.png | head -1; }
for d in s-g1 s-n500 s-p3; do
  cmp -s "$(img "$WORK/s-base")" "$(img "$WORK/$d")" && bad "$d: same image as the default settings" \
    || ok "$d: the setting changes the image"
done
cmp -s "$(img "$WORK/s-p3")" "$(img "$WORK/s-p3j")" && ok "JSONL prior_steps = --prior-steps" || bad "JSONL prior_steps differs from the flag"
t=$(png_text "$(img "$WORK/s-n500")")
[[ $t == *"Prior steps: 6"* && $t == *"Noise level: 500"* ]] && ok "PNG parameters record the prior settings" \
  || bad "PNG parameters lack the prior settings: $t"
for bad_args in "--noise-level 1000:noise_level" "--prior-steps 0:prior-steps" "--prior-guidance -1:prior-guidance"; do
  args=${bad_args%%:*}; key=${bad_args##*:}
  if one "${P[@]}" $args --out "$WORK/bad" > "$WORK/bad.out" 2> "$WORK/bad.log"; then bad "$args accepted"
  elif grep -q "$key" "$WORK/bad.log"; then ok "$args refused naming $key"
  else bad "$args: message does not name $key: $(tail -1 "$WORK/bad.log")"; fi
  [ -e "$WORK/bad/images.jsonl" ] && bad "$args: the output folder was written to" || true
done
printf '{"prompt": "a cat", "noise_level": 5000}\n' > "$WORK/badn.jsonl"
one --prompts "$WORK/badn.jsonl" --out "$WORK/badj" > /dev/null 2> "$WORK/badj.log" && bad "JSONL noise_level 5000 accepted" \
  || { grep -q "badn.jsonl:1: noise_level" "$WORK/badj.log" && ok "JSONL noise_level 5000 refused naming line and key" \
       || bad "JSONL noise_level: $(tail -1 "$WORK/badj.log")"; }
# image variations (the StableUnCLIPImg2ImgPipeline reference folder, when present)
I2I=${DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG:-$(dirname "$GOLD")/tiny-unclip-img2img}
if [ -d "$I2I/model" ]; then
  VB=(generate --model "$I2I/model" --prompt "a photo of a cat" --images 3 --steps 8
      --width 16 --height 16 --noise-level 100 --seed 2 --threads 1 --batch-invariant --quiet)
  V=("${VB[@]}" --image-prompt "$I2I/input.png")
  timeout 60 "$BIN" "${V[@]}" --out "$WORK/v1" 2> "$WORK/v1.log" || bad "image variations, 1 rank: $(tail -1 "$WORK/v1.log")"
  timeout 120 $MPIRUN -np 4 "$BIN" "${V[@]}" --out "$WORK/v4" 2> "$WORK/v4.log" || bad "image variations, 4 ranks failed"
  same_pngs "$WORK/v1" "$WORK/v4" && ok "image variations: 3 images, the same PNG bytes on 1 and 4 ranks" \
    || bad "image variations differ between 1 and 4 ranks"
  URI="data:image/png;base64,$(base64 -w0 "$I2I/input.png")"  # the image inline: no shared file needed
  timeout 120 $MPIRUN -np 4 "$BIN" "${VB[@]}" --image-prompt "$URI" --out "$WORK/vuri" 2> "$WORK/vuri.log" \
    || bad "inline image prompt failed: $(tail -1 "$WORK/vuri.log")"
  same_pixels "$WORK/v1/img-00000-seed2.png" "$WORK/vuri/img-00000-seed2.png" \
    && ok "image variations: an inline (data URI) image prompt gives the file's image on 4 ranks" \
    || bad "inline image prompt differs from the file's"
  timeout 60 "$BIN" generate --model "$I2I/model" --prompt x --steps 2 --width 16 --height 16 --out "$WORK/v-none" \
    > /dev/null 2> "$WORK/v-none.log" && bad "a variations-only folder without --image-prompt accepted" \
    || { grep -q "give an image prompt" "$WORK/v-none.log" && ok "variations-only folder: no image prompt refused" \
         || bad "no image prompt: $(tail -1 "$WORK/v-none.log")"; }
  timeout 60 "$BIN" generate --model "$I2I/model" --prompt x --image-prompt "$WORK/missing.png" --steps 2 --width 16 \
    --height 16 --out "$WORK/v-miss" > /dev/null 2> "$WORK/v-miss.log" && bad "a missing image prompt accepted" \
    || { grep -q "missing.png" "$WORK/v-miss.log" && [ ! -e "$WORK/v-miss/images.jsonl" ] \
         && ok "a missing image prompt refused naming the file, before any output" \
         || bad "missing image prompt: $(tail -1 "$WORK/v-miss.log")"; }
  timeout 60 "$BIN" generate --model "$MODEL" --prompt x --image-prompt "$I2I/input.png" --steps 2 --width 16 \
    --height 16 --out "$WORK/v-noenc" > /dev/null 2> "$WORK/v-noenc.log" && bad "--image-prompt on a prior-only folder accepted" \
    || { grep -q "image_encoder" "$WORK/v-noenc.log" && ok "--image-prompt on a folder without image_encoder/ refused" \
         || bad "image prompt without encoder: $(tail -1 "$WORK/v-noenc.log")"; }
else
  echo "note: $I2I absent: image-variation checks skipped (tests/stages/make_unclip_img2img_golden.py makes it)"
fi
echo "unclip: $passed passed, $fails failed"
[ $fails = 0 ]
