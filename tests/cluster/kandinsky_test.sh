#!/usr/bin/env bash
# Kandinsky 2.2 (encode: the prior's text encoder -> prior -> denoise: the image-conditioned UNet -> decode: MoVQ)
# through `diffpipe generate` under mpirun and `diffpipe serve`:
#   kandinsky_test.sh DIFFPIPE_BIN WORKDIR    (the folder: $DIFFPIPE_GOLDEN_KANDINSKY, made by make_kandinsky_golden.py)
# Checks: the same PNG bytes on 1 rank, on placements with the prior on its own rank (derived at 4 ranks, a pipeline
# file at 3) and with 2 denoiser replicas; the settings reach the images (negative prompt, prior guidance and steps,
# guidance), a JSONL line equals the flags, the PNG records the prior's settings (no noise level); refusals name the
# setting and write nothing; serve gives the CLI's pixels for the same request; the hub's two folders (decoder +
# --prior) give the combined folder's pixels (the PNG text names the prior folder); image variations (an image prompt
# alone) and image-to-image (with a prompt) on 1 and 4 ranks, and over HTTP (variations, edits). Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_KANDINSKY:-$(dirname "$0")/../../build/golden/tiny-kandinsky}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: Kandinsky 2.2 folder $MODEL is absent (set DIFFPIPE_GOLDEN_KANDINSKY)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 5 --prior-steps 6 --width 32
        --height 32 --seed 3 --threads 1 --batch-invariant --quiet --timeout 60)

one_rank_run 6
prior_placements
same_as_one_rank replicas 3 "2 denoiser replicas" --placement replicas

# the hub's layout: the decoder folder with --prior gives the combined folder's bytes (4 ranks)
SEP=()
for x in "${COMMON[@]}"; do [ "$x" = "$MODEL" ] && SEP+=("$GOLD/decoder" --prior "$GOLD/prior") || SEP+=("$x"); done
timeout 180 $MPIRUN -np 4 "$BIN" "${SEP[@]}" --out "$WORK/sep" 2> "$WORK/sep.log" || bad "decoder + --prior failed: $(tail -2 "$WORK/sep.log")"
n=0; for f in "$WORK"/np1/img-*.png; do same_pixels "$f" "$WORK/sep/$(basename "$f")" && n=$((n+1)); done
[ $n = 6 ] && ok "decoder folder + --prior prior folder, 4 ranks: the combined folder's pixels (6 images)" \
  || bad "decoder + --prior differs from the combined folder ($n of 6 the same)"
timeout 60 "$BIN" generate --model "$GOLD/decoder" --prompt x --steps 2 --width 32 --height 32 --out "$WORK/nop" \
  > /dev/null 2> "$WORK/nop.log" && bad "a decoder folder without --prior accepted" \
  || { grep -q -- "--prior DIR" "$WORK/nop.log" && ok "a decoder folder without --prior refused naming --prior" \
       || bad "decoder without prior: $(tail -1 "$WORK/nop.log")"; }

one() { timeout 60 "$BIN" generate --model "$MODEL" --seed 5 --steps 4 --width 32 --height 32 --threads 1 --quiet "$@"; }
ONE=(generate --model "$MODEL" --prompt "a red circle" --steps 2 --width 32 --height 32 --threads 1 --quiet)
P=(--prompt "a photo of a cat")
one "${P[@]}" --prior-steps 5 --out "$WORK/s-base" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 5 --negative-prompt "blurry" --out "$WORK/s-neg" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 5 --prior-guidance 1 --out "$WORK/s-pg1" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 3 --out "$WORK/s-p3" 2>> "$WORK/settings.log"
one "${P[@]}" --prior-steps 5 --guidance 1 --out "$WORK/s-g1" 2>> "$WORK/settings.log"
printf '{"prompt": "a photo of a cat", "prior_steps": 3}\n' > "$WORK/p3.jsonl"
one --prompts "$WORK/p3.jsonl" --out "$WORK/s-p3j" 2>> "$WORK/settings.log"
img() { ls "$1"/img-*.png 2>/dev/null | head -1; }
[ -n "$(img "$WORK/s-base")" ] && ok "a single prompt on 1 rank" || bad "single run failed: $(tail -2 "$WORK/settings.log")"
for d in s-neg s-pg1 s-p3 s-g1; do
  cmp -s "$(img "$WORK/s-base")" "$(img "$WORK/$d")" && bad "$d: same image as the default settings" \
    || ok "$d: the setting changes the image"
done
cmp -s "$(img "$WORK/s-p3")" "$(img "$WORK/s-p3j")" && ok "JSONL prior_steps = --prior-steps" || bad "JSONL prior_steps differs from the flag"
t=$(png_text "$(img "$WORK/s-neg")")
[[ $t == *"Prior steps: 5"* && $t == *"Prior CFG scale: 4"* && $t == *"Negative prompt: blurry"* && $t != *"Noise level"* ]] \
  && ok "PNG parameters record the prior settings, no noise level" || bad "PNG parameters: $t"
refused r-i2i-size "image-to-image makes an image of its input's size, 48x40" --image-prompt "$GOLD/input.png"
timeout 60 "$BIN" generate --model "$MODEL" --prompt "" --negative-prompt "dark" --image-prompt "$GOLD/input.png" \
  --steps 2 --out "$WORK/r-varneg" > /dev/null 2> "$WORK/r-varneg.log" && bad "a variation with a negative prompt accepted" \
  || { grep -q "negative_prompt: a Kandinsky 2.2 image variation" "$WORK/r-varneg.log" \
       && ok "a variation with a negative prompt refused naming negative_prompt" || bad "r-varneg: $(tail -1 "$WORK/r-varneg.log")"; }
# variations: an image prompt's embedding (the prior's image encoder) instead of the prior's, on 1 and 4 ranks
V=(generate --model "$MODEL" --prompt "" --image-prompt "$GOLD/input.png" --images 2 --steps 4 --width 32 --height 32
   --seed 2 --threads 1 --batch-invariant --quiet)
timeout 60 "$BIN" "${V[@]}" --out "$WORK/v1" 2> "$WORK/v1.log" || bad "variation, 1 rank: $(tail -1 "$WORK/v1.log")"
timeout 120 $MPIRUN -np 4 "$BIN" "${V[@]}" --out "$WORK/v4" 2> "$WORK/v4.log" || bad "variation, 4 ranks failed"
same_pngs "$WORK/v1" "$WORK/v4" && ok "image variations: 2 images, the same PNG bytes on 1 and 4 ranks" \
  || bad "variations differ between 1 and 4 ranks"
cmp -s "$WORK/v1/img-00000-seed2.png" "$WORK/v1/img-00001-seed3.png" && bad "two seeds gave one variation" \
  || ok "variations of one image differ by seed"
# image-to-image: a prompt and a starting image (MoVQ latents noised at the strength), on 1 and 4 ranks
I=(generate --model "$MODEL" --prompt "a red circle" --image-prompt "$GOLD/input32.png" --images 2 --steps 5 --seed 2
   --threads 1 --batch-invariant --quiet)
timeout 60 "$BIN" "${I[@]}" --out "$WORK/i1" 2> "$WORK/i1.log" || bad "image-to-image, 1 rank: $(tail -1 "$WORK/i1.log")"
timeout 120 $MPIRUN -np 4 "$BIN" "${I[@]}" --out "$WORK/i4" 2> "$WORK/i4.log" || bad "image-to-image, 4 ranks failed"
same_pngs "$WORK/i1" "$WORK/i4" && ok "image-to-image: 2 images, the same PNG bytes on 1 and 4 ranks" \
  || bad "image-to-image differs between 1 and 4 ranks"
timeout 60 "$BIN" "${I[@]}" --strength 0.9 --out "$WORK/i9" 2> "$WORK/i9.log" || bad "strength 0.9 failed"
same_pixels "$WORK/i1/img-00000-seed2.png" "$WORK/i9/img-00000-seed2.png" && bad "--strength changed nothing" \
  || ok "image-to-image: --strength changes the image"
t=$(png_text "$WORK/i1/img-00000-seed2.png")
[[ $t == *"input32.png, Denoising strength: 0.3"* && $t == *"Prior steps:"* ]] \
  && ok "image-to-image PNG records the image and the default strength 0.3" || bad "image-to-image PNG parameters: $t"
refused r-prior "prior_steps: must be at least 2" --prior-steps 1
refused r-size "width: 40 is not a positive multiple of 16" --width 40
refused r-skip "clip_skip" --clip-skip 2
printf '{"prompt": "a cat", "prior_guidance": -1}\n' > "$WORK/badg.jsonl"
one --prompts "$WORK/badg.jsonl" --out "$WORK/badj" > /dev/null 2> "$WORK/badj.log" && bad "JSONL prior_guidance -1 accepted" \
  || { grep -q "badg.jsonl:1: key 'prior_guidance'" "$WORK/badj.log" && ok "JSONL prior_guidance -1 refused naming line and key" \
       || bad "JSONL prior_guidance: $(tail -1 "$WORK/badj.log")"; }

# serve: one request alone, as the CLI's run of it
one --prompt "a red circle" --negative-prompt "dark" --seed 9 --prior-steps 4 --out "$WORK/cli" 2> "$WORK/cli.log" \
  || bad "CLI run failed"
serve_up "$WORK/serve.log" --model "$MODEL" --steps 4 --threads 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$(img "$WORK/cli")" <<'PY' \
    && ok "serve: a Kandinsky request (prior_num_inference_steps) gives the CLI's pixels; one prior step is a 400 naming prior_steps" || bad "serve"
import base64, sys
import http_util
url, cli = sys.argv[1:3]
st, r = http_util.post(url, {"prompt": "a red circle", "negative_prompt": "dark", "seed": 9,
                             "prior_num_inference_steps": 4})
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
st, r = http_util.post(url, {"prompt": "a red circle", "prior_num_inference_steps": 1})
assert st == 400 and "prior_steps: must be at least 2" in r["error"]["message"], (st, r)
PY
  # /v1/images/edits (a prompt and an image): the CLI's image-to-image of the same image and seed, made alone
  timeout 60 "$BIN" generate --model "$MODEL" --prompt "a red circle" --image-prompt "$GOLD/input32.png" --steps 4 \
    --seed 7 --threads 1 --quiet --out "$WORK/ecli" 2> "$WORK/ecli.log" || bad "CLI image-to-image failed"
  python3 - "$URL" "$GOLD/input32.png" "$(img "$WORK/ecli")" <<'PY' \
    && ok "serve: /v1/images/edits gives the CLI's image-to-image" || bad "serve edits"
import base64, sys
import http_util
url, inp, cli = sys.argv[1:4]
uri = "data:image/png;base64," + base64.b64encode(open(inp, "rb").read()).decode()
st, r = http_util.post(url, {"prompt": "a red circle", "image": uri, "seed": 7}, route="/v1/images/edits")
assert st == 200, (st, r)
assert http_util.png_pixels(base64.b64decode(r["data"][0]["b64_json"]))[1] == http_util.png_pixels(open(cli, "rb").read())[1]
PY
  # /v1/images/variations (no prompt): the CLI's variation of the same image and seed, made alone
  timeout 60 "$BIN" generate --model "$MODEL" --prompt "" --image-prompt "$GOLD/input.png" --steps 4 --seed 7 \
    --threads 1 --quiet --out "$WORK/vcli" 2> "$WORK/vcli.log" || bad "CLI variation failed"
  python3 - "$URL" "$GOLD/input.png" "$(img "$WORK/vcli")" <<'PY' \
    && ok "serve: /v1/images/variations gives the CLI's variation" || bad "serve variations"
import base64, sys
import http_util
url, inp, cli = sys.argv[1:4]
uri = "data:image/png;base64," + base64.b64encode(open(inp, "rb").read()).decode()
st, r = http_util.post(url, {"image": uri, "seed": 7}, route="/v1/images/variations")
assert st == 200, (st, r)
assert http_util.png_pixels(base64.b64decode(r["data"][0]["b64_json"]))[1] == http_util.png_pixels(open(cli, "rb").read())[1]
PY
  kill $SPID 2>/dev/null; wait $SPID 2>/dev/null
else
  bad "serve did not come up: $(tail -3 "$WORK/serve.log")"
fi
echo "kandinsky: $passed passed, $fails failed"
[ $fails = 0 ]
