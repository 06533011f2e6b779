#!/usr/bin/env bash
# The Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline folder) through `diffpipe generate` under mpirun:
#   upscale_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_UPSCALE, made by tests/stages/make_upscale_golden.py)
# Checks: a JSONL file whose lines name their low-resolution images gives the same PNG bytes on 1 rank, pipelined on
# 3 ranks and with --placement replicas (--batch-invariant); the output is 4x the input; the noise level defaults
# to diffusers' 20 and changes the image; --image equals --image-prompt; a missing image, a level above
# max_noise_level, a size other than 4x, both image flags and an unreadable file are refused by name, writing
# nothing. Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_UPSCALE:-$(dirname "$0")/../../../shared/golden/tiny-upscale}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: upscaler folder $MODEL is absent (set DIFFPIPE_GOLDEN_UPSCALE)"; exit 77; }
GOLD=$(cd "$GOLD" && pwd)
source "$(dirname "$0")/lib.sh"
printf '{"prompt": "a red circle", "image_prompt": "%s"}\n{"prompt": "two green triangles", "image_prompt": "%s", "seed": 3}\n' \
  "$GOLD/low_0.png" "$GOLD/low_1.png" > "$WORK/jobs.jsonl"
COMMON=(generate --model "$MODEL" --prompts "$WORK/jobs.jsonl" --steps 4 --seed 5 --threads 1 --batch-invariant
        --quiet --timeout 60)

one_rank_run 2
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
png_size() { python3 -c 'import sys,struct;d=open(sys.argv[1],"rb").read(24);print(*struct.unpack(">II",d[16:24]))' "$1"; }
[ "$(png_size "$WORK"/np1/img-00000-seed5.png)" = "64 64" ] && ok "16x16 in, 64x64 out" \
  || bad "output size $(png_size "$WORK"/np1/img-00000-seed5.png)"
grep -q '"noise_level":20' "$WORK/np1/images.jsonl" && ok "noise level defaults to 20 (diffusers')" \
  || bad "default noise level not 20: $(head -c 300 "$WORK/np1/images.jsonl")"

grep -aq "Image: $GOLD/low_0.png, Noise level: 20" "$WORK"/np1/img-00000-seed5.png && ok "the PNG records the input image and level" \
  || bad "PNG parameters lack the input image"

ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 5 --steps 4 --threads 1 --quiet)
timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/low_0.png" --out "$WORK/a" 2> "$WORK/a.log" || bad "--image run failed: $(tail -1 "$WORK/a.log")"
timeout 60 "$BIN" "${ONE[@]}" --image-prompt "$GOLD/low_0.png" --out "$WORK/b" 2> "$WORK/b.log" || bad "--image-prompt run failed"
same_pixels "$WORK/a/img-00000-seed5.png" "$WORK/b/img-00000-seed5.png" && ok "--image and --image-prompt give the same image" \
  || bad "--image and --image-prompt differ"
timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/low_0.png" --noise-level 200 --out "$WORK/c" 2> "$WORK/c.log" || bad "level 200 failed"
same_pixels "$WORK/a/img-00000-seed5.png" "$WORK/c/img-00000-seed5.png" && bad "--noise-level did not change the image" \
  || ok "--noise-level 200 changes the image"
timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/low_1.png" --out "$WORK/d" 2> "$WORK/d.log" || bad "second image failed"
same_pixels "$WORK/a/img-00000-seed5.png" "$WORK/d/img-00000-seed5.png" && bad "the input image did not change the output" \
  || ok "another input image gives another output"

refused() {  # refused NAME EXPECTED-TEXT ARGS...: the run fails naming EXPECTED-TEXT and writes no image
  local name=$1 want=$2; shift 2
  if timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$name" 2> "$WORK/$name.log"; then bad "$name: accepted"
  elif grep -qF -- "$want" "$WORK/$name.log" && [ -z "$(ls "$WORK/$name" 2>/dev/null | grep '^img-')" ]; then
    ok "$name: refused naming '$want', no image written"
  else bad "$name: unclear refusal: $(tail -1 "$WORK/$name.log")"; fi
}
refused no-image "image_prompt: the x4 upscaler needs the low-resolution image"
refused level "noise_level: must be in [0, 350]" --image "$GOLD/low_0.png" --noise-level 351
refused size "the x4 upscaler makes 64x64" --image "$GOLD/low_0.png" --width 32 --height 32
refused both "give --image or --image-prompt, not both" --image "$GOLD/low_0.png" --image-prompt "$GOLD/low_1.png"
refused missing "$WORK/none.png" --image "$WORK/none.png"

echo "upscale: $passed passed, $fails failed"
[ $fails = 0 ]
