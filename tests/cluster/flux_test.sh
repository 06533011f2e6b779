#!/usr/bin/env bash
# FLUX.1 (CLIP pooled + T5, the Flux transformer with its embedded guidance, flow matching) through `diffpipe generate`
# under mpirun and `diffpipe serve`:
#   flux_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_FLUX, made by tests/stages/make_flux_golden.py)
# Checks: the same PNG bytes on 1 rank, pipelined on 3 ranks (encode | denoise | decode) and with --placement replicas
# (--batch-invariant); the guidance (embedded, no unconditional row) and the size change the image; JSONL = flags;
# image-to-image on 1 and 3 ranks alike at the default strength 0.6; refusals by name (a negative prompt, a diffusion
# sampler, a mask, a folder missing transformer/); serve gives the CLI's pixels.
# Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_FLUX:-$(dirname "$0")/../../../shared/golden/tiny-flux}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: Flux folder $MODEL is absent (set DIFFPIPE_GOLDEN_FLUX)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 4 --seed 5 --width 32 --height 32
        --guidance 3.5 --threads 1 --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas

ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 9 --steps 4 --width 32 --height 32 --threads 1 --quiet)
run_one() {  # run_one NAME ARGS...: one image into $WORK/NAME
  local name=$1; shift
  timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$name" 2> "$WORK/$name.log" || bad "$name failed: $(tail -2 "$WORK/$name.log")"
}
run_one g35 --guidance 3.5
run_one g5 --guidance 5
[ -f "$WORK/g5/img-00000-seed9.png" ] && ! same_pixels "$WORK/g35/img-00000-seed9.png" "$WORK/g5/img-00000-seed9.png" \
  && ok "the embedded guidance scale changes the image" || bad "--guidance changed nothing"
run_one wide --width 48
[ "$(png_size "$WORK/wide/img-00000-seed9.png" 2>/dev/null)" = "48 32" ] && ok "--width 48 --height 32 gives 48x32" \
  || bad "wide image size"
echo '{"prompt": "a red circle", "seed": 9, "guidance": 5}' > "$WORK/j.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/j.jsonl" --steps 4 --width 32 --height 32 --threads 1 \
  --quiet --out "$WORK/jsonl" 2> "$WORK/jsonl.log" || bad "JSONL run failed: $(tail -2 "$WORK/jsonl.log")"
cmp -s "$WORK/g5/img-00000-seed9.png" "$WORK/jsonl/img-00000-seed9.png" && ok "JSONL gives the flags' PNG bytes" \
  || bad "JSONL differs from the flags"

refused neg "no unconditional row" --negative-prompt "blurry"
refused ddim "flow_euler (the default)" --sampler ddim
dit_img2img "$WORK/wide/img-00000-seed9.png"  # FluxImg2ImgPipeline
missing_component transformer

# serve: one request at a time here, so its batch is the CLI's
serve_up "$WORK/serve.log" --model "$MODEL" --steps 4 --threads 1 --max-batch 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$WORK/g5/img-00000-seed9.png" <<'PY' && ok "serve: the CLI's pixels for the same request" || bad "serve"
import base64, sys
import http_util
url, cli = sys.argv[1:3]
st, r = http_util.post(url, {"prompt": "a red circle", "guidance_scale": 5, "seed": 9, "size": "32x32"})
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
st, r = http_util.post(url, {"prompt": "x", "negative_prompt": "y"})
assert st == 400 and "unconditional" in r["error"]["message"], (st, r)
PY
else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "flux: $passed passed, $fails failed"
[ $fails = 0 ]
