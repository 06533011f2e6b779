#!/usr/bin/env bash
# DeepFloyd IF (T5 text encoder, pixel-space UNet with learned variance, DDPM + dynamic thresholding, and the
# folder's super_resolution/ stage II as the superres stage) through `diffpipe generate` under mpirun:
#   if_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_IF/model, made by tests/stages/make_if_golden.py)
# Checks: the same PNG bytes on 1 rank, pipelined on 3 ranks, with a pipeline file giving superres a rank of its own,
# and with --placement replicas (same threads, --batch-invariant); the image is stage II's enlargement of the
# requested size; a negative prompt and the stage-II settings change it; case and surrounding spaces of the prompt do
# not (IF lower-cases and strips); samplers without the folder's thresholding, clip_skip, an out-of-range
# --sr-noise-level, and a folder without a T5 tokenizer are refused by name. Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_IF:-$(dirname "$0")/../../../shared/golden/tiny-if}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: IF folder $MODEL is absent (set DIFFPIPE_GOLDEN_IF)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 6 --seed 5 --threads 1
        --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np3 3 "np 3 (derived placement)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
cat > "$WORK/pipe.toml" <<'TOML'
[encode]
ranks = [0]
[denoise]
ranks = [1]
[superres]
ranks = [2]
[decode]
ranks = [0]
TOML
same_as_one_rank file3 3 "pipeline file (stage II alone on rank 2 of 3)" --pipeline "$WORK/pipe.toml"
grep -q "rank 2 \[.*\]: superres(" "$WORK/file3.log" && ok "pipeline file: superres alone on rank 2" \
  || bad "pipeline file: superres not on rank 2: $(grep 'rank 2' "$WORK/file3.log")"

ONE=(generate --model "$MODEL" --seed 9 --steps 6 --threads 1 --quiet)
timeout 60 "$BIN" "${ONE[@]}" --prompt "a red circle" --width 24 --height 16 --out "$WORK/a" 2> "$WORK/a.log" || bad "run a failed"
size=$(python3 -c 'import sys,struct;d=open(sys.argv[1],"rb").read(24);print(*struct.unpack(">II",d[16:24]))' \
  "$WORK"/a/img-00000-seed9.png 2>/dev/null)
[ "$size" = "48 32" ] && ok "--width 24 --height 16: stage I at 24x16, stage II enlarges it to 48x32" \
  || bad "image size: '$size'"
timeout 60 "$BIN" "${ONE[@]}" --prompt "  A RED Circle " --width 24 --height 16 --out "$WORK/b" 2> "$WORK/b.log" || bad "run b failed"
timeout 60 "$BIN" "${ONE[@]}" --prompt "a red circle" --width 24 --height 16 --previews 2 --out "$WORK/p" 2> "$WORK/p.log" \
  || bad "previews run failed"
psize=$(python3 -c 'import sys,struct;d=open(sys.argv[1],"rb").read(24);print(*struct.unpack(">II",d[16:24]))' \
  "$WORK"/p/img-00000-seed9-preview-2.png 2>/dev/null)
[ "$(ls "$WORK"/p/*preview*.png 2>/dev/null | wc -l)" = 2 ] && [ "$psize" = "24 16" ] \
  && ok "--previews 2: two stage-I previews (24x16) pass through stage II to the output" || bad "previews: '$psize', $(ls "$WORK/p")"
# the PNG chunk records the prompt as given, so compare pixels
same_pixels "$WORK/a/img-00000-seed9.png" "$WORK/b/img-00000-seed9.png" \
  && ok "case and surrounding spaces do not change the image (IF preprocessing)" || bad "preprocessing: the images differ"
same_pixels "$WORK/a/img-00000-seed9.png" "$WORK/p/img-00000-seed9.png" \
  && ok "previews do not change the final image" || bad "previews changed the final image"
timeout 60 "$BIN" "${ONE[@]}" --prompt "a red circle" --width 24 --height 16 --negative-prompt "blurry" --out "$WORK/n" \
  2> "$WORK/n.log" || bad "negative run failed"
cmp -s "$WORK/a/img-00000-seed9.png" "$WORK/n/img-00000-seed9.png" && bad "a negative prompt did not change the image" \
  || ok "a negative prompt changes the image"

timeout 60 "$BIN" "${ONE[@]}" --prompt "a red circle" --width 24 --height 16 --sr-noise-level 100 --out "$WORK/l" \
  2> "$WORK/l.log" || bad "sr-noise-level run failed"
cmp -s "$WORK/a/img-00000-seed9.png" "$WORK/l/img-00000-seed9.png" && bad "--sr-noise-level did not change the image" \
  || ok "--sr-noise-level changes the image (stage II runs)"
grep -aq "SR noise level: 100" "$WORK/l/img-00000-seed9.png" && ok "the PNG records stage II's settings" \
  || bad "PNG chunk lacks the stage-II settings"
if timeout 60 "$BIN" "${ONE[@]}" --prompt x --sr-noise-level 1000 --out "$WORK/snl" 2> "$WORK/snl.log"; then
  bad "--sr-noise-level 1000 accepted"
else grep -q "sr_noise_level: must be in \[0, 1000)" "$WORK/snl.log" && ok "--sr-noise-level 1000 refused by name" \
  || bad "unclear: $(tail -1 "$WORK/snl.log")"; fi
if timeout 60 "$BIN" "${ONE[@]}" --prompt x --sampler euler --out "$WORK/s" 2> "$WORK/s.log"; then bad "euler accepted"
else grep -q "does not apply the dynamic thresholding" "$WORK/s.log" && ok "a sampler without thresholding refused by name" \
  || bad "sampler refusal unclear: $(tail -1 "$WORK/s.log")"; fi
if timeout 60 "$BIN" "${ONE[@]}" --prompt x --clip-skip 1 --out "$WORK/c" 2> "$WORK/c.log"; then bad "clip_skip accepted"
else grep -q "clip_skip: not supported for DeepFloyd IF" "$WORK/c.log" && ok "clip_skip refused by name" \
  || bad "clip_skip refusal unclear: $(tail -1 "$WORK/c.log")"; fi
mkdir -p "$WORK/broken/tokenizer"
for p in "$MODEL"/*; do [ "$(basename "$p")" = tokenizer ] || ln -s "$p" "$WORK/broken/"; done
cp "$MODEL/tokenizer/tokenizer_config.json" "$WORK/broken/tokenizer/"
if timeout 60 "$BIN" generate --model "$WORK/broken" --prompt x --out "$WORK/bo" 2> "$WORK/broken.log"; then
  bad "a folder without a T5 tokenizer accepted"
else grep -q "neither tokenizer.json nor spiece.model found" "$WORK/broken.log" \
  && ok "a folder without a T5 tokenizer refused naming it" || bad "missing tokenizer error unclear: $(tail -1 "$WORK/broken.log")"; fi

echo "if: $passed passed, $fails failed"
[ $fails = 0 ]
