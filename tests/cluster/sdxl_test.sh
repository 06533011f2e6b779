#!/usr/bin/env bash
# The SDXL pipeline (two text encoders, pooled + size conditioning) through `diffpipe generate` under mpirun:
#   sdxl_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_SDXL, made by tests/stages/make_sdxl_golden.py)
# Checks: the same PNG bytes on 1 rank, pipelined on 3 ranks and with --placement replicas (same threads,
# --batch-invariant); a non-square size gives that size and differs from the square one (the size ids reach the
# UNet); a negative prompt changes the image; clip_skip changes it (out of range refused); a folder missing
# text_encoder_2/ is refused by name; the size micro-conditioning (--original-width/--original-height/--crop-top/--crop-left and
# their JSONL keys) reaches the image and its PNG chunk; inpainting on 1 and 3 ranks alike, at the SDXL pipeline's
# default strength; the SDXL refiner (from $DIFFPIPE_GOLDEN_IMG2IMG): the same bytes on 1 and 3 ranks at the pipeline's
# default strength 0.3, aesthetic scores from flags, JSONL and HTTP change the image alike, base folders refuse them.
# Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_SDXL:-$(dirname "$0")/../../../shared/golden/tiny-sdxl}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: SDXL folder $MODEL is absent (set DIFFPIPE_GOLDEN_SDXL)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 6 --seed 5 --threads 1
        --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas

ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 9 --steps 6 --threads 1 --quiet)
timeout 60 "$BIN" "${ONE[@]}" --width 32 --height 32 --out "$WORK/sq" 2> "$WORK/sq.log" || bad "square run failed"
timeout 60 "$BIN" "${ONE[@]}" --width 48 --height 32 --out "$WORK/wide" 2> "$WORK/wide.log" || bad "wide run failed"
size=$(python3 -c 'import sys,struct;d=open(sys.argv[1],"rb").read(24);print(*struct.unpack(">II",d[16:24]))' \
  "$WORK"/wide/img-00000-seed9.png 2>/dev/null)
[ "$size" = "48 32" ] && ok "--width 48 --height 32 gives a 48x32 image" || bad "wide image size: '$size'"
timeout 60 "$BIN" "${ONE[@]}" --negative-prompt "blurry, dark" --out "$WORK/neg" 2> "$WORK/neg.log" || bad "negative run failed"
cmp -s "$WORK/sq/img-00000-seed9.png" "$WORK/neg/img-00000-seed9.png" \
  && bad "a negative prompt did not change the image" || ok "a negative prompt changes the image (encoded, not zeros)"

timeout 60 "$BIN" "${ONE[@]}" --original-width 96 --original-height 64 --crop-top 8 --crop-left 4 --out "$WORK/micro" \
  2> "$WORK/micro.log" || bad "micro-conditioning run failed: $(tail -2 "$WORK/micro.log")"
cmp -s "$WORK/sq/img-00000-seed9.png" "$WORK/micro/img-00000-seed9.png" \
  && bad "--original-width/--crop-top did not change the image" || ok "the size micro-conditioning changes the image"
grep -aq "Original size: 96x64, Crop top left: 8,4" "$WORK/micro/img-00000-seed9.png" \
  && ok "the PNG records the original size and crop" || bad "PNG chunk lacks the micro-conditioning"
echo '{"prompt": "a red circle", "seed": 9, "original_width": 96, "original_height": 64, "crop_top": 8, "crop_left": 4}' \
  > "$WORK/micro.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/micro.jsonl" --steps 6 --threads 1 --quiet \
  --out "$WORK/microj" 2> "$WORK/microj.log" || bad "JSONL micro run failed: $(tail -2 "$WORK/microj.log")"
cmp -s "$WORK/micro/img-00000-seed9.png" "$WORK/microj/img-00000-seed9.png" \
  && ok "JSONL keys original_width/original_height/crop_top/crop_left give the flags' image" \
  || bad "JSONL micro-conditioning differs from the flags'"
# inpainting (StableDiffusionXLInpaintPipeline's rules): the square image's centre repainted, 1 and 3 ranks alike
write_mask "$WORK/mask.png" 32 32 8 8 24 24
IP=(generate --model "$MODEL" --prompt "a blue square" --image "$WORK/sq/img-00000-seed9.png" --mask "$WORK/mask.png"
    --seed 3 --steps 5 --threads 1 --batch-invariant --quiet --timeout 60)
timeout 60 "$BIN" "${IP[@]}" --out "$WORK/ip1" 2> "$WORK/ip1.log" || bad "inpainting failed: $(tail -2 "$WORK/ip1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${IP[@]}" --out "$WORK/ip3" 2> "$WORK/ip3.log" \
  || bad "3-rank inpainting failed: $(tail -2 "$WORK/ip3.log")"
same_pngs "$WORK/ip1" "$WORK/ip3" && ok "inpainting: 1 and 3 ranks give the same PNG bytes" || bad "inpainting differs across ranks"
grep -aq "Mask: $WORK/mask.png, Denoising strength: 0.9999" "$WORK/ip1/img-00000-seed3.png" \
  && ok "inpainting's default strength is StableDiffusionXLInpaintPipeline's 0.9999 (recorded in the PNG)" \
  || bad "the PNG lacks the mask or the default strength"
if timeout 60 "$BIN" "${ONE[@]}" --crop-top -1 --out "$WORK/neg1" 2> "$WORK/neg1.log"; then bad "--crop-top -1 accepted"
else grep -q "crop-top" "$WORK/neg1.log" && ok "--crop-top -1 refused by name" || bad "unclear: $(tail -1 "$WORK/neg1.log")"; fi
# clip_skip (SDXL: hidden_states[-(clip_skip + 2)] of both encoders): changes the image, is recorded; out of range refused
timeout 60 "$BIN" "${ONE[@]}" --clip-skip 1 --out "$WORK/skip" 2> "$WORK/skip.log" || bad "clip_skip 1 failed: $(tail -2 "$WORK/skip.log")"
[ -f "$WORK/skip/img-00000-seed9.png" ] && ! same_pixels "$WORK/sq/img-00000-seed9.png" "$WORK/skip/img-00000-seed9.png" \
  && grep -aq "Clip skip: 2" "$WORK/skip/img-00000-seed9.png" && ok "--clip-skip 1 changes the image and is recorded" \
  || bad "clip_skip 1 changed nothing or is not recorded"
if timeout 60 "$BIN" "${ONE[@]}" --clip-skip 3 --out "$WORK/skip3" 2> "$WORK/skip3.log"; then bad "clip_skip 3 accepted"
else grep -q "clip_skip: must be in \[0, 3)" "$WORK/skip3.log" && ok "clip_skip beyond the encoders refused by name" \
  || bad "clip_skip refusal unclear: $(tail -1 "$WORK/skip3.log")"; fi
mkdir -p "$WORK/broken"; for p in "$MODEL"/*; do [ "$(basename "$p")" = text_encoder_2 ] || ln -s "$p" "$WORK/broken/"; done
if timeout 60 "$BIN" generate --model "$WORK/broken" --prompt x --out "$WORK/b" 2> "$WORK/broken.log"; then
  bad "a folder without text_encoder_2/ accepted"
else grep -q "text_encoder_2" "$WORK/broken.log" && ok "a folder without text_encoder_2/ refused naming it" \
  || bad "missing text_encoder_2 error unclear: $(tail -1 "$WORK/broken.log")"; fi
[ ! -e "$WORK/b" ] || [ -z "$(ls "$WORK/b" | grep '^img-')" ] && ok "no output from the refused folder" || bad "refused folder wrote images"

# the SDXL refiner (text_encoder_2 alone, aesthetic-score conditioning), made by make_img2img_golden.py --sdxl
REF=${DIFFPIPE_GOLDEN_IMG2IMG:-$(dirname "$0")/../../../shared/golden/tiny-img2img}/sdxl-refiner-model
if [ -d "$REF" ]; then
  RF_SERVE=(generate --model "$REF" --prompt "a blue square" --image "$WORK/wide/img-00000-seed9.png" --seed 3 --steps 10
            --threads 1 --quiet --timeout 60)
  RF=("${RF_SERVE[@]}" --batch-invariant)
  timeout 60 "$BIN" "${RF[@]}" --out "$WORK/rf1" 2> "$WORK/rf1.log" || bad "refiner failed: $(tail -2 "$WORK/rf1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${RF[@]}" --out "$WORK/rf3" 2> "$WORK/rf3.log" \
    || bad "3-rank refiner failed: $(tail -2 "$WORK/rf3.log")"
  same_pngs "$WORK/rf1" "$WORK/rf3" && ok "refiner: 1 and 3 ranks give the same PNG bytes" || bad "refiner differs across ranks"
  grep -aq "Denoising strength: 0.3" "$WORK/rf1/img-00000-seed3.png" \
    && ok "refiner: the default strength is StableDiffusionXLImg2ImgPipeline's 0.3" || bad "refiner PNG lacks strength 0.3"
  timeout 60 "$BIN" "${RF[@]}" --aesthetic-score 8 --negative-aesthetic-score 1 --out "$WORK/rfa" 2> "$WORK/rfa.log" \
    || bad "refiner with scores failed: $(tail -2 "$WORK/rfa.log")"
  [ -f "$WORK/rf1/img-00000-seed3.png" ] && [ -f "$WORK/rfa/img-00000-seed3.png" ] \
    && ! same_pixels "$WORK/rf1/img-00000-seed3.png" "$WORK/rfa/img-00000-seed3.png" \
    && ok "--aesthetic-score/--negative-aesthetic-score change the image" || bad "the aesthetic scores changed nothing"
  grep -aq "Aesthetic score: 8, Negative aesthetic score: 1" "$WORK/rfa/img-00000-seed3.png" \
    && ok "the PNG records the aesthetic scores" || bad "PNG lacks the aesthetic scores"
  printf '{"prompt": "a blue square", "seed": 3, "image_prompt": "%s", "aesthetic_score": 8, "negative_aesthetic_score": 1}\n' \
    "$WORK/wide/img-00000-seed9.png" > "$WORK/rf.jsonl"
  timeout 60 "$BIN" generate --model "$REF" --prompts "$WORK/rf.jsonl" --steps 10 --threads 1 --batch-invariant --quiet \
    --out "$WORK/rfj" 2> "$WORK/rfj.log" || bad "refiner JSONL failed: $(tail -2 "$WORK/rfj.log")"
  cmp -s "$WORK/rfa/img-00000-seed3.png" "$WORK/rfj/img-00000-seed3.png" \
    && ok "JSONL aesthetic_score/negative_aesthetic_score give the flags' image" || bad "refiner JSONL differs from flags"
  refused aes-base "aesthetic_score: only an SDXL refiner folder" --aesthetic-score 7
  # serve batches as it likes (not batch-invariant): its image is compared with a run that does the same
  timeout 60 "$BIN" "${RF_SERVE[@]}" --aesthetic-score 8 --negative-aesthetic-score 1 --out "$WORK/rfs" 2> "$WORK/rfs.log" \
    || bad "refiner (not batch-invariant) failed: $(tail -2 "$WORK/rfs.log")"
  serve_up "$WORK/serve.log" --model "$REF" --steps 10 --threads 1
  if [ -n "$URL" ]; then
    python3 - "$URL" "$WORK/wide/img-00000-seed9.png" "$WORK/rfs/img-00000-seed3.png" <<'PY' \
      && ok "serve (refiner): JSON edits with aesthetic_score give the CLI's pixels; a bad score is a 400 naming it" \
      || bad "serve refiner"
import base64, sys
import http_util
url, inp, cli = sys.argv[1:4]
body = {"prompt": "a blue square", "seed": 3, "aesthetic_score": 8, "negative_aesthetic_score": 1,
        "image": base64.b64encode(open(inp, "rb").read()).decode()}
st, r = http_util.post(url, body, "/v1/images/edits")
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
st, r = http_util.post(url, {**body, "aesthetic_score": -1}, "/v1/images/edits")
assert st == 400 and r["error"]["param"] == "aesthetic_score", (st, r)
PY
  else bad "refiner serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
  kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null
else
  echo "note: no refiner folder at $REF (make_img2img_golden.py --sdxl makes it); its checks skipped"
fi

echo "sdxl: $passed passed, $fails failed"
[ $fails = 0 ]
