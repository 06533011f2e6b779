#!/usr/bin/env bash
# Stable Diffusion 3 (three text encoders, the MMDiT transformer, flow matching) through `diffpipe generate` under
# mpirun and `diffpipe serve`:
#   sd3_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_SD3, made by tests/stages/make_sd3_golden.py)
# Checks: the same PNG bytes on 1 rank, pipelined on 3 ranks (encode | denoise | decode) and with --placement replicas
# (--batch-invariant); the folder without T5 runs and differs; a negative prompt, guidance, clip_skip and the size
# change the image; --sampler flow_euler is the default and recorded; JSONL = flags; image-to-image on 1 and 3 ranks
# alike at the default strength 0.6, inpainting too; a LoRA fused and per request; skip-layer guidance (flags = JSONL,
# 1 rank = 3 ranks, recorded); refusals by name (a diffusion sampler, a size beyond the position table, a folder
# missing transformer/, skip-layer guidance without guidance or on a block it lacks); serve gives the CLI's pixels.
# Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_SD3:-$(dirname "$0")/../../../shared/golden/tiny-sd3}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: SD3 folder $MODEL is absent (set DIFFPIPE_GOLDEN_SD3)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 5 --seed 5 --width 32 --height 32
        --threads 1 --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
grep -q "rank 1 \[.*\]: denoise" "$WORK/np3.log" && ok "np 3: the transformer runs on a rank of its own" \
  || bad "np 3 placement not as expected: $(grep 'rank 1' "$WORK/np3.log" | head -1)"

ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 9 --steps 5 --width 32 --height 32 --threads 1 --quiet)
run_one() {  # run_one NAME ARGS...: one image into $WORK/NAME
  local name=$1; shift
  timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$name" 2> "$WORK/$name.log" || bad "$name failed: $(tail -2 "$WORK/$name.log")"
}
run_one base
run_one neg --negative-prompt "blurry, dark"
run_one g3 --guidance 3
run_one skip --clip-skip 1
for v in neg g3 skip; do
  [ -f "$WORK/$v/img-00000-seed9.png" ] && ! same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/$v/img-00000-seed9.png" \
    && ok "$v changes the image" || bad "$v changed nothing"
done
run_one flow --sampler flow_euler
same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/flow/img-00000-seed9.png" \
  && png_text "$WORK/flow/img-00000-seed9.png" | grep -aq "Sampler: flow_euler" \
  && ok "--sampler flow_euler is the folder's default (the same pixels), recorded in the PNG" \
  || bad "--sampler flow_euler: other pixels or not recorded"
timeout 60 "$BIN" "${ONE[@]/$MODEL/$GOLD/model_no_t5}" --out "$WORK/not5" 2> "$WORK/not5.log" \
  || bad "the folder without T5 failed: $(tail -2 "$WORK/not5.log")"
[ -f "$WORK/not5/img-00000-seed9.png" ] && ! same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/not5/img-00000-seed9.png" \
  && ok "the folder without text_encoder_3 runs (zero T5 tokens) and differs" || bad "no-T5 folder: no image or the same"
timeout 60 "$BIN" "${ONE[@]}" --width 48 --height 32 --out "$WORK/wide" 2> "$WORK/wide.log" || bad "wide run failed"
[ "$(png_size "$WORK/wide/img-00000-seed9.png" 2>/dev/null)" = "48 32" ] && ok "--width 48 --height 32 gives 48x32" \
  || bad "wide image size"
echo '{"prompt": "a red circle", "seed": 9, "negative_prompt": "blurry, dark"}' > "$WORK/j.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/j.jsonl" --steps 5 --width 32 --height 32 --threads 1 \
  --quiet --out "$WORK/jsonl" 2> "$WORK/jsonl.log" || bad "JSONL run failed: $(tail -2 "$WORK/jsonl.log")"
cmp -s "$WORK/neg/img-00000-seed9.png" "$WORK/jsonl/img-00000-seed9.png" && ok "JSONL gives the flags' PNG bytes" \
  || bad "JSONL differs from the flags"

refused ddim "flow_euler (the default)" --sampler ddim
dit_img2img "$WORK/wide/img-00000-seed9.png"  # StableDiffusion3Img2ImgPipeline
refused big "pos_embed_max_size 12" --width 128 --height 128
missing_component transformer
# LoRA (the reference's diffusers file: transformer and CLIP layers): fused with --lora, or per request with
# --lora-adapters; a request choosing the adapter gets the fused run's pixels, one choosing none the base's
LORA=$GOLD/lora.safetensors
if [ -f "$LORA" ]; then dit_lora "$LORA" lora "$WORK/base/img-00000-seed9.png"
else echo "note: no $LORA (make_sd3_golden.py makes it); the LoRA checks skipped"; fi
# T5 tokens per prompt (--max-sequence-length; StableDiffusion3Pipeline's default 256): 512 gives another image
run_one t5_512 --max-sequence-length 512
[ -f "$WORK/t5_512/img-00000-seed9.png" ] && ! same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/t5_512/img-00000-seed9.png" \
  && ok "--max-sequence-length 512 runs T5 at 512 tokens (another image)" || bad "--max-sequence-length changed nothing"
# skip-layer guidance (StableDiffusion3Pipeline's skip_guidance_layers): block 1 left out of a third row on loop steps
# 1-3 of 5 (5 x 0.01 < i < 5 x 0.8); flags = JSONL, 1 rank = 3 ranks, recorded in the PNG
SLG=(--skip-layers 1 --skip-layer-scale 3 --skip-layer-stop 0.8)
run_one slg --negative-prompt "blurry, dark" "${SLG[@]}"
timeout 180 $MPIRUN -np 3 "$BIN" "${ONE[@]}" --negative-prompt "blurry, dark" "${SLG[@]}" --batch-invariant \
  --out "$WORK/slg3" 2> "$WORK/slg3.log" || bad "3-rank skip-layer guidance failed: $(tail -2 "$WORK/slg3.log")"
echo '{"prompt": "a red circle", "seed": 9, "negative_prompt": "blurry, dark", "skip_guidance_layers": [1], "skip_layer_guidance_scale": 3, "skip_layer_guidance_stop": 0.8}' > "$WORK/slg.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/slg.jsonl" --steps 5 --width 32 --height 32 --threads 1 \
  --quiet --out "$WORK/slg_jsonl" 2> "$WORK/slg_jsonl.log" || bad "JSONL skip-layer run failed: $(tail -2 "$WORK/slg_jsonl.log")"
[ -f "$WORK/slg/img-00000-seed9.png" ] && ! same_pixels "$WORK/neg/img-00000-seed9.png" "$WORK/slg/img-00000-seed9.png" \
  && same_pixels "$WORK/slg/img-00000-seed9.png" "$WORK/slg3/img-00000-seed9.png" \
  && cmp -s "$WORK/slg/img-00000-seed9.png" "$WORK/slg_jsonl/img-00000-seed9.png" \
  && png_text "$WORK/slg/img-00000-seed9.png" | grep -aq "Skip layers: 1 (scale 3, from 0.01 to 0.8)" \
  && ok "skip-layer guidance changes the image; 3 ranks and JSONL give its pixels; recorded in the PNG" \
  || bad "skip-layer guidance: no change, ranks or JSONL differ, or not recorded"
refused slg_unguided "needs classifier-free guidance" --skip-layers 1 --guidance 1
refused slg_block "skip_guidance_layers: block 7 is not in [0, 3)" --skip-layers 7
refused slg_list "--skip-layers: 'x' is not an integer in [0, 1048576]" --skip-layers 1,x

# serve: one request at a time here, so its batch is the CLI's
serve_up "$WORK/serve.log" --model "$MODEL" --steps 5 --threads 1 --max-batch 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$WORK/neg/img-00000-seed9.png" <<'PY' && ok "serve: the CLI's pixels for the same request" || bad "serve"
import base64, sys
import http_util
url, cli = sys.argv[1:3]
st, r = http_util.post(url, {"prompt": "a red circle", "negative_prompt": "blurry, dark", "seed": 9, "size": "32x32"})
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
st, r = http_util.post(url, {"prompt": "x", "sampler": "euler"})
assert st == 400 and "flow_euler" in r["error"]["message"], (st, r)
st, r = http_util.post(url, {"prompt": "a red circle", "negative_prompt": "blurry, dark", "seed": 9, "size": "32x32",
                             "skip_guidance_layers": [1], "skip_layer_guidance_scale": 3, "skip_layer_guidance_stop": 0.8})
assert st == 200, (st, r)
slg = open(sys.argv[2].replace("/neg/", "/slg/"), "rb").read()
assert http_util.png_pixels(base64.b64decode(r["data"][0]["b64_json"]))[1] == http_util.png_pixels(slg)[1], "serve SLG"
st, r = http_util.post(url, {"prompt": "x", "skip_guidance_layers": [9]})
assert st == 400 and "skip_guidance_layers" in r["error"]["message"], (st, r)
st, r = http_util.post(url, {"prompt": "x", "skip_guidance_layers": "1"})
assert st == 400 and "list of integers" in r["error"]["message"], (st, r)
PY
else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "sd3: $passed passed, $fails failed"
[ $fails = 0 ]
