#!/usr/bin/env bash
# FLUX.1 (CLIP pooled + T5, the Flux transformer with its embedded guidance, flow matching) through `diffpipe generate`
# under mpirun and `diffpipe serve`:
#   flux_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_FLUX, made by tests/stages/make_flux_golden.py)
# Checks: the same PNG bytes on 1 rank, pipelined on 3 ranks (encode | denoise | decode) and with --placement replicas
# (--batch-invariant); the guidance (embedded, no unconditional row) and the size change the image; JSONL = flags;
# true CFG (a negative prompt with --true-cfg: its unconditional row crosses the wire alike on 1 and 3 ranks, changes
# the image, JSONL = flags, recorded in the PNG text); image-to-image on 1 and 3 ranks alike at the default strength
# 0.6; refusals by name (a negative prompt without true CFG, --true-cfg on a Stable Diffusion folder, a diffusion
# sampler, a mask, a folder missing transformer/); LoRA files in diffusers' and kohya-ss's formats, fused and per
# request; serve gives the CLI's pixels, true CFG included.
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

refused neg "without true CFG it runs no unconditional row" --negative-prompt "blurry"
# true CFG (FluxPipeline's true_cfg_scale): the negative prompt's row, mixed at the scale, the guidance still embedded
run_one tcfg --guidance 3.5 --negative-prompt "blurry" --true-cfg 4
run_one tcfg_empty --guidance 3.5 --true-cfg 4  # the empty negative prompt, as diffusers' negative_prompt=""
[ -f "$WORK/tcfg/img-00000-seed9.png" ] && ! same_pixels "$WORK/g35/img-00000-seed9.png" "$WORK/tcfg/img-00000-seed9.png" \
  && ! same_pixels "$WORK/tcfg/img-00000-seed9.png" "$WORK/tcfg_empty/img-00000-seed9.png" \
  && ok "true CFG changes the image, and its negative prompt matters" || bad "--true-cfg / --negative-prompt changed nothing"
png_text "$WORK/tcfg/img-00000-seed9.png" | grep -q "Negative prompt: blurry" \
  && png_text "$WORK/tcfg/img-00000-seed9.png" | grep -q "True CFG scale: 4" && ok "the PNG text records true CFG" \
  || bad "PNG text without true CFG: $(png_text "$WORK/tcfg/img-00000-seed9.png")"
timeout 120 $MPIRUN -np 3 "$BIN" "${ONE[@]}" --guidance 3.5 --negative-prompt "blurry" --true-cfg 4 --out "$WORK/tcfg3" \
  2> "$WORK/tcfg3.log" || bad "true CFG on 3 ranks failed: $(tail -2 "$WORK/tcfg3.log")"
cmp -s "$WORK/tcfg/img-00000-seed9.png" "$WORK/tcfg3/img-00000-seed9.png" \
  && ok "true CFG: 3 ranks (the unconditional row over the wire) = 1 rank, byte for byte" || bad "true CFG np3 differs"
echo '{"prompt": "a red circle", "seed": 9, "guidance": 3.5, "negative_prompt": "blurry", "true_cfg_scale": 4}' \
  > "$WORK/t.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/t.jsonl" --steps 4 --width 32 --height 32 --threads 1 \
  --quiet --out "$WORK/tjsonl" 2> "$WORK/tjsonl.log" || bad "true CFG JSONL failed: $(tail -2 "$WORK/tjsonl.log")"
cmp -s "$WORK/tcfg/img-00000-seed9.png" "$WORK/tjsonl/img-00000-seed9.png" && ok "true CFG: JSONL = flags" \
  || bad "true CFG JSONL differs from the flags"
refused tcfg_low "true_cfg_scale: must be in [1, 100]" --true-cfg 0.5
# T5 tokens per prompt (--max-sequence-length, the pipelines' max_sequence_length): 256 gives another image
run_one t5_256 --guidance 3.5 --max-sequence-length 256
[ -f "$WORK/t5_256/img-00000-seed9.png" ] && ! same_pixels "$WORK/g35/img-00000-seed9.png" "$WORK/t5_256/img-00000-seed9.png" \
  && ok "--max-sequence-length 256 runs T5 at 256 tokens (another image)" || bad "--max-sequence-length changed nothing"
refused msl_big "max-sequence-length: must be in [1, 512]" --max-sequence-length 600
SD_MODEL=${DIFFPIPE_GOLDEN:-$(dirname "$0")/../../../shared/golden/tiny-sd}/model
if [ -d "$SD_MODEL" ]; then
  if timeout 60 "$BIN" generate --model "$SD_MODEL" --prompt x --steps 2 --width 64 --height 64 --true-cfg 3 --quiet \
       --out "$WORK/sd_tcfg" 2> "$WORK/sd_tcfg.log"; then bad "--true-cfg accepted on a Stable Diffusion folder"
  else grep -q "true_cfg_scale: FLUX.1 folders only" "$WORK/sd_tcfg.log" && ok "--true-cfg on an SD folder: refused by name" \
    || bad "unclear --true-cfg refusal: $(tail -1 "$WORK/sd_tcfg.log")"; fi
  if timeout 60 "$BIN" generate --model "$SD_MODEL" --prompt x --steps 2 --width 64 --height 64 --max-sequence-length 77 \
       --quiet --out "$WORK/sd_msl" 2> "$WORK/sd_msl.log"; then bad "--max-sequence-length accepted on an SD folder"
  else grep -q "max-sequence-length: .* is not an SD3 or FLUX.1 folder" "$WORK/sd_msl.log" \
    && ok "--max-sequence-length on an SD folder: refused by name" || bad "unclear refusal: $(tail -1 "$WORK/sd_msl.log")"; fi
fi
refused ddim "flow_euler (the default)" --sampler ddim
# LoRA files fused or per request: diffusers' format, kohya-ss's (the original model's names, fused projections) and
# XLabs-AI's (x-flux's attention processors' layers)
for f in lora lora_kohya lora_xlabs; do
  if [ -f "$GOLD/$f.safetensors" ]; then dit_lora "$GOLD/$f.safetensors" "$f" "$WORK/g35/img-00000-seed9.png"
  else echo "note: no $GOLD/$f.safetensors (make_flux_golden.py makes it); its LoRA checks skipped"; fi
done
dit_img2img "$WORK/wide/img-00000-seed9.png"  # FluxImg2ImgPipeline
missing_component transformer

# serve: one request at a time here, so its batch is the CLI's
serve_up "$WORK/serve.log" --model "$MODEL" --steps 4 --threads 1 --max-batch 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$WORK/g5/img-00000-seed9.png" "$WORK/tcfg/img-00000-seed9.png" <<'PY' \
    && ok "serve: the CLI's pixels for the same requests (true CFG too); bad settings are 400s" || bad "serve"
import base64, sys
import http_util
url, cli, tcfg = sys.argv[1:4]
for body, want in (({"prompt": "a red circle", "guidance_scale": 5, "seed": 9, "size": "32x32"}, cli),
                   ({"prompt": "a red circle", "guidance_scale": 3.5, "seed": 9, "size": "32x32",
                     "negative_prompt": "blurry", "true_cfg_scale": 4}, tcfg)):
    st, r = http_util.post(url, body)
    assert st == 200, (st, r)
    png = base64.b64decode(r["data"][0]["b64_json"])
    assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(want, "rb").read())[1], f"serve differs: {body}"
st, r = http_util.post(url, {"prompt": "x", "negative_prompt": "y"})
assert st == 400 and "unconditional" in r["error"]["message"], (st, r)
st, r = http_util.post(url, {"prompt": "x", "true_cfg_scale": 0.5})
assert st == 400 and "true_cfg_scale" in r["error"]["message"], (st, r)
PY
else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "flux: $passed passed, $fails failed"
[ $fails = 0 ]
