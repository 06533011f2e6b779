#!/usr/bin/env bash
# Latent Consistency Models and UniPC through `diffpipe generate` and `serve`:
#   samplers_test.sh DIFFPIPE_BIN WORKDIR   (the folders: $DIFFPIPE_GOLDEN_LCM, made by tests/stages/make_lcm_golden.py)
# Checks: an LCM-distilled folder (time_cond_proj_dim UNet, LCMScheduler) gives the same PNG bytes on 1 rank, on
# 3 pipelined ranks and on 2 replicas; its guidance is an input (another scale, another image) and its negative
# prompt is not used (the same pixels, as diffusers); `--sampler lcm` on an ordinary SD folder equals the JSONL key
# and differs from DDIM; image-to-image on the distilled folder gives the same PNG bytes on 1 and 3 ranks, and a
# strength too small for the steps is refused by name; too many steps are refused naming original_inference_steps; over HTTP `"sampler": "lcm"`
# gives the CLI's pixels; `--sampler unipc` (text-to-image and image-to-image) gives the same PNG bytes on 1 and 3
# ranks, equals the JSONL key and differs from DPM-Solver++; `--sampler dpmpp_2m_sde_karras` gives the same bytes on 1
# rank and 3 replicas; heun image-to-image the same on 1 and 3 ranks; --guidance-rescale equals its JSONL and HTTP key and is recorded. Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_LCM:-$(dirname "$0")/../../../shared/golden/tiny-lcm}
MODEL=$GOLD/lcm-model
[ -d "$MODEL" ] || { echo "SKIP: LCM folder $MODEL is absent (set DIFFPIPE_GOLDEN_LCM)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps 4 --seed 5 --threads 1
        --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
grep -aq "Sampler: model default" "$WORK/np1/img-00000-seed5.png" && ok "the folder's LCMScheduler runs by default" \
  || bad "PNG lacks the sampler"

ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 9 --steps 4 --threads 1 --quiet)
run() {  # run NAME ARGS...: "${ONE[@]}" ARGS into $WORK/NAME
  local name=$1; shift
  timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$name" 2> "$WORK/$name.log" || bad "$name failed: $(tail -2 "$WORK/$name.log")"
}
run g8 --guidance 8.5
run g2 --guidance 2
run neg --guidance 8.5 --negative-prompt "blurry, dark"
P=img-00000-seed9.png
cmp -s "$WORK/g8/$P" "$WORK/g2/$P" && bad "the guidance scale did not change the distilled UNet's image" \
  || ok "the guidance scale reaches the distilled UNet (embedded) and changes the image"
same_pixels "$WORK/g8/$P" "$WORK/neg/$P" \
  && ok "a negative prompt leaves the distilled UNet's pixels as they are (no unconditional row)" \
  || bad "a negative prompt changed a distilled UNet's image"
grep -q "the negative prompt is not used" "$WORK/neg.log" && ok "generate warns that the negative prompt is not used" \
  || bad "no warning about the unused negative prompt"

# image-to-image on the distilled folder (LatentConsistencyModelImg2ImgPipeline: every step, strength's share)
I2I=(generate --model "$MODEL" --prompt "a blue square" --image "$GOLD/input_0.png" --strength 0.5 --seed 3 --steps 4
     --threads 1 --batch-invariant --quiet --timeout 60)
timeout 60 "$BIN" "${I2I[@]}" --out "$WORK/i2i1" 2> "$WORK/i2i1.log" || bad "img2img failed: $(tail -2 "$WORK/i2i1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${I2I[@]}" --out "$WORK/i2i3" 2> "$WORK/i2i3.log" \
  || bad "3-rank img2img failed: $(tail -2 "$WORK/i2i3.log")"
same_pngs "$WORK/i2i1" "$WORK/i2i3" && ok "image-to-image: 1 and 3 ranks give the same PNG bytes" \
  || bad "image-to-image differs across ranks"
refused strength "int(50 x 0.05) = 2" --image "$GOLD/input_0.png" --strength 0.05

SD=$GOLD/model
ONE=(generate --model "$SD" --prompt "a red circle" --seed 9 --steps 4 --guidance 1.5 --threads 1 --quiet)
run sdlcm --sampler lcm
run sdddim --sampler ddim
printf '%s\n' '{"prompt": "a red circle", "seed": 9, "sampler": "lcm"}' > "$WORK/lcm.jsonl"
timeout 60 "$BIN" generate --model "$SD" --prompts "$WORK/lcm.jsonl" --steps 4 --guidance 1.5 --threads 1 --quiet \
  --out "$WORK/sdjsonl" 2> "$WORK/sdjsonl.log" || bad "JSONL lcm run failed: $(tail -2 "$WORK/sdjsonl.log")"
cmp -s "$WORK/sdlcm/$P" "$WORK/sdjsonl/$P" && ok "--sampler lcm equals the JSONL key" || bad "--sampler lcm differs from JSONL"
same_pixels "$WORK/sdlcm/$P" "$WORK/sdddim/$P" && bad "lcm and ddim gave the same image" || ok "lcm differs from ddim"
grep -aq "Sampler: lcm" "$WORK/sdlcm/$P" && ok "the PNG records the sampler" || bad "PNG lacks 'Sampler: lcm'"
refused steps "original_inference_steps (50" --sampler lcm --steps 51

# UniPC on tiny-sd: placements, JSONL, image-to-image
UC=(generate --model "$SD" --prompts "$WORK/prompts.txt" --sampler unipc --steps 6 --seed 4 --threads 1 --batch-invariant
    --quiet --timeout 60)
timeout 60 "$BIN" "${UC[@]}" --out "$WORK/uc1" 2> "$WORK/uc1.log" || bad "unipc failed: $(tail -2 "$WORK/uc1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${UC[@]}" --out "$WORK/uc3" 2> "$WORK/uc3.log" || bad "3-rank unipc failed: $(tail -2 "$WORK/uc3.log")"
same_pngs "$WORK/uc1" "$WORK/uc3" && ok "unipc: 1 and 3 ranks give the same PNG bytes" || bad "unipc differs across ranks"
timeout 60 "$BIN" "${UC[@]/unipc/dpmpp_2m}" --out "$WORK/ucd" 2> "$WORK/ucd.log" || bad "dpmpp_2m failed: $(tail -2 "$WORK/ucd.log")"
[ -f "$WORK/uc1/img-00000-seed4.png" ] && ! same_pixels "$WORK/uc1/img-00000-seed4.png" "$WORK/ucd/img-00000-seed4.png" \
  && ok "unipc differs from dpmpp_2m" || bad "unipc gave dpmpp_2m's image"
printf '%s\n' '{"prompt": "a photo of a cat", "seed": 4, "sampler": "unipc"}' > "$WORK/uc.jsonl"
timeout 60 "$BIN" generate --model "$SD" --prompts "$WORK/uc.jsonl" --steps 6 --threads 1 --batch-invariant --quiet \
  --out "$WORK/ucj" 2> "$WORK/ucj.log" || bad "JSONL unipc failed: $(tail -2 "$WORK/ucj.log")"
cmp -s "$WORK/uc1/img-00000-seed4.png" "$WORK/ucj/img-00000-seed4.png" && ok "--sampler unipc equals the JSONL key" \
  || bad "JSONL unipc differs"
UI=(generate --model "$SD" --prompt "a blue square" --image "$GOLD/input_0.png" --strength 0.6 --sampler unipc --seed 3
    --steps 8 --threads 1 --batch-invariant --quiet --timeout 60)
timeout 60 "$BIN" "${UI[@]}" --out "$WORK/ui1" 2> "$WORK/ui1.log" || bad "unipc img2img failed: $(tail -2 "$WORK/ui1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${UI[@]}" --out "$WORK/ui3" 2> "$WORK/ui3.log" \
  || bad "3-rank unipc img2img failed: $(tail -2 "$WORK/ui3.log")"
same_pngs "$WORK/ui1" "$WORK/ui3" && ok "unipc image-to-image: 1 and 3 ranks give the same PNG bytes" \
  || bad "unipc image-to-image differs across ranks"
# DPM++ 2M SDE (Karras): stochastic, each request's noise its own seed's, so placement does not change the bytes
SDE=("${UC[@]/unipc/dpmpp_2m_sde_karras}")
timeout 60 "$BIN" "${SDE[@]}" --out "$WORK/sde1" 2> "$WORK/sde1.log" || bad "dpmpp_2m_sde_karras failed: $(tail -2 "$WORK/sde1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${SDE[@]}" --placement replicas --out "$WORK/sde3" 2> "$WORK/sde3.log" \
  || bad "3-rank dpmpp_2m_sde_karras failed: $(tail -2 "$WORK/sde3.log")"
same_pngs "$WORK/sde1" "$WORK/sde3" && [ -f "$WORK/sde1/img-00000-seed4.png" ] \
  && ! same_pixels "$WORK/sde1/img-00000-seed4.png" "$WORK/ucd/img-00000-seed4.png" \
  && ok "dpmpp_2m_sde_karras: 1 rank and 3 replicas give the same PNG bytes, unlike dpmpp_2m's" \
  || bad "dpmpp_2m_sde_karras across placements"

# Heun (two UNet calls a step): image-to-image from a first-order call, 1 and 3 ranks alike
HI=("${UI[@]/unipc/heun}")
timeout 60 "$BIN" "${HI[@]}" --out "$WORK/hi1" 2> "$WORK/hi1.log" || bad "heun img2img failed: $(tail -2 "$WORK/hi1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${HI[@]}" --out "$WORK/hi3" 2> "$WORK/hi3.log" || bad "3-rank heun failed: $(tail -2 "$WORK/hi3.log")"
same_pngs "$WORK/hi1" "$WORK/hi3" && [ -f "$WORK/hi1/img-00000-seed3.png" ] \
  && ! same_pixels "$WORK/hi1/img-00000-seed3.png" "$WORK/ui1/img-00000-seed3.png" \
  && ok "heun image-to-image: 1 and 3 ranks give the same PNG bytes, unlike unipc's" || bad "heun across ranks"

# a folder whose scheduler class no sampler implements loads; requests name a sampler, the others are refused
mkdir -p "$WORK/deis/scheduler"; for p in "$SD"/*; do [ "$(basename "$p")" = scheduler ] || ln -s "$p" "$WORK/deis/"; done
python3 -c "import json,sys; c=json.load(open(sys.argv[1])); c['_class_name']='DEISMultistepScheduler'; json.dump(c, open(sys.argv[2],'w'))" \
  "$SD/scheduler/scheduler_config.json" "$WORK/deis/scheduler/scheduler_config.json"
if timeout 60 "$BIN" generate --model "$WORK/deis" --prompt x --steps 4 --threads 1 --out "$WORK/kd0" 2> "$WORK/kd0.log"; then
  bad "a request without a sampler ran on DEISMultistepScheduler"
else grep -q "scheduler/scheduler_config.json names scheduler class 'DEISMultistepScheduler' is not supported" "$WORK/kd0.log" \
  && ok "DEISMultistepScheduler folder: a request without a sampler refused naming the file" \
  || bad "unclear: $(tail -1 "$WORK/kd0.log")"; fi
timeout 60 "$BIN" generate --model "$WORK/deis" --prompt x --steps 4 --threads 1 --sampler lms --quiet --out "$WORK/kd1" \
  2> "$WORK/kd1.log" && [ -f "$WORK/kd1/img-00000-seed0.png" ] && ok "... and runs with --sampler lms" \
  || bad "--sampler lms on the DEIS folder: $(tail -1 "$WORK/kd1.log")"

# guidance_rescale: the flag, the JSONL key and the PNG chunk; a guided request only
RS=(generate --model "$SD" --prompt "a photo of a cat" --seed 4 --steps 5 --threads 1 --quiet --timeout 60)
timeout 60 "$BIN" "${RS[@]}" --guidance-rescale 0.7 --out "$WORK/rs" 2> "$WORK/rs.log" || bad "rescale failed: $(tail -2 "$WORK/rs.log")"
timeout 60 "$BIN" "${RS[@]}" --out "$WORK/rs0" 2> "$WORK/rs0.log" || bad "plain run failed"
printf '%s\n' '{"prompt": "a photo of a cat", "seed": 4, "guidance_rescale": 0.7}' > "$WORK/rs.jsonl"
timeout 60 "$BIN" generate --model "$SD" --prompts "$WORK/rs.jsonl" --steps 5 --threads 1 --quiet --out "$WORK/rsj" \
  2> "$WORK/rsj.log" || bad "JSONL rescale failed: $(tail -2 "$WORK/rsj.log")"
cmp -s "$WORK/rs/img-00000-seed4.png" "$WORK/rsj/img-00000-seed4.png" \
  && ! same_pixels "$WORK/rs/img-00000-seed4.png" "$WORK/rs0/img-00000-seed4.png" \
  && grep -aq "CFG rescale: 0.7" "$WORK/rs/img-00000-seed4.png" \
  && ok "--guidance-rescale 0.7 equals the JSONL key, changes the image and is recorded in the PNG" \
  || bad "guidance_rescale flag/JSONL/PNG"
if timeout 60 "$BIN" "${RS[@]}" --guidance 1 --guidance-rescale 0.5 --out "$WORK/rsbad" 2> "$WORK/rsbad.log"; then
  bad "guidance_rescale without guidance accepted"
else grep -q "guidance_rescale: only a guided request" "$WORK/rsbad.log" && ok "guidance_rescale without guidance refused by name" \
  || bad "unclear: $(tail -1 "$WORK/rsbad.log")"; fi

serve_up "$WORK/serve.log" --model "$SD" --steps 4 --guidance 1.5 --threads 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$WORK/sdlcm/$P" "$WORK/rs/img-00000-seed4.png" <<'PY' \
    && ok "serve: \"sampler\": \"lcm\" and \"guidance_rescale\" give the CLI's pixels; a bad rescale is a 400 naming it" \
    || bad "serve lcm / guidance_rescale"
import base64, sys
import http_util
url, cli, rs = sys.argv[1:4]
st, r = http_util.post(url, {"prompt": "a red circle", "seed": 9, "sampler": "lcm"})
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
body = {"prompt": "a photo of a cat", "seed": 4, "num_inference_steps": 5, "guidance_scale": 7.5, "guidance_rescale": 0.7}
st, r = http_util.post(url, body)
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(rs, "rb").read())[1], "rescale: serve differs"
st, r = http_util.post(url, {**body, "guidance_rescale": 2})
assert st == 400 and r["error"]["param"] == "guidance_rescale", (st, r)
PY
else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "samplers: $passed passed, $fails failed"
[ $fails = 0 ]
