#!/usr/bin/env bash
# The Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline folder) through `diffpipe generate` under mpirun:
#   upscale_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_UPSCALE, made by tests/stages/make_upscale_golden.py)
# Checks: a JSONL file whose lines name their low-resolution images gives the same PNG bytes on 1 rank, pipelined on
# 3 ranks and with --placement replicas (--batch-invariant); the output is 4x the input; the noise level defaults
# to diffusers' 20 and changes the image; --image equals --image-prompt; a missing image, a level above
# max_noise_level, a size other than 4x, both image flags and an unreadable file are refused by name, writing
# nothing. With $DIFFPIPE_GOLDEN_IF too (DeepFloyd IF stage III): an IF folder whose upscaler/ is this folder runs
# encode | denoise | superres | decode | x4 and makes 4x stage II's images, byte-identical (previews too) on 1, 3 and
# 5 ranks; --x4-noise-level changes the image, the JSONL x4_* keys match the flags, the PNG records them; a level above
# max_noise_level and an upscaler/ of another kind are refused by name. Exit 77 = skipped (folder absent).
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

refused no-image "image_prompt: the x4 upscaler needs the low-resolution image"
refused level "noise_level: must be in [0, 350]" --image "$GOLD/low_0.png" --noise-level 351
refused size "the x4 upscaler makes 64x64" --image "$GOLD/low_0.png" --width 32 --height 32
refused both "give --image or --image-prompt, not both" --image "$GOLD/low_0.png" --image-prompt "$GOLD/low_1.png"
refused missing "$WORK/none.png" --image "$WORK/none.png"

# inline images (data URIs): a JSONL line carrying the PNG itself gives the file's image, on 3 ranks too
python3 - "$GOLD/low_0.png" "$WORK/inline.jsonl" <<'PY'
import base64, json, sys
uri = "data:image/png;base64," + base64.b64encode(open(sys.argv[1], "rb").read()).decode()
open(sys.argv[2], "w").write(json.dumps({"prompt": "a red circle", "image_prompt": uri, "seed": 5}) + "\n")
PY
timeout 120 $MPIRUN -np 3 "$BIN" generate --model "$MODEL" --prompts "$WORK/inline.jsonl" --steps 4 --threads 1 --quiet \
  --out "$WORK/inline" 2> "$WORK/inline.log" || bad "inline image run failed: $(tail -1 "$WORK/inline.log")"
same_pixels "$WORK/a/img-00000-seed5.png" "$WORK/inline/img-00000-seed5.png" \
  && ok "an inline PNG (data URI) gives the file's image on 3 ranks" || bad "inline image differs from the file's"
grep -aq "Image: inline PNG" "$WORK/inline/img-00000-seed5.png" && ok "the PNG records an inline input briefly" \
  || bad "PNG parameters lack the inline note"

# over HTTP: the images API takes the input as "image" (base64 PNG or data URI), never as a path on the server
serve_up "$WORK/serve.log" --model "$MODEL" --steps 4
if [ -n "$URL" ]; then
  python3 - "$URL" "$GOLD/low_0.png" "$WORK/a/img-00000-seed5.png" "$WORK/c/img-00000-seed5.png" <<'PY' && ok "serve: upscaled over HTTP (the CLI's image, at noise_level 200 too; missing, path and corrupt images and a level above 350 are 400s naming the field)" || bad "serve: upscaler over HTTP"
import base64, sys
import http_util
url, low, cli, cli200 = sys.argv[1:5]
b64 = base64.b64encode(open(low, "rb").read()).decode()
post = lambda body: http_util.post(url, body)
pixels = http_util.png_pixels
st, r = post({"prompt": "a red circle", "image": b64, "seed": 5})
assert st == 200, (st, r)
size, px = pixels(base64.b64decode(r["data"][0]["b64_json"]))
assert size == (64, 64), size
assert px == pixels(open(cli, "rb").read())[1], "HTTP image differs from the CLI's"
st, r = post({"prompt": "a red circle", "image": "data:image/png;base64," + b64, "seed": 5})
assert st == 200, (st, r)
st, r = post({"prompt": "a red circle", "image": b64, "seed": 5, "noise_level": 200})
assert st == 200, (st, r)
assert pixels(base64.b64decode(r["data"][0]["b64_json"]))[1] == pixels(open(cli200, "rb").read())[1], "noise_level 200 differs from the CLI's"
st, r = post({"prompt": "a red circle", "image": b64, "noise_level": 351})
assert st == 400 and r["error"]["param"] == "noise_level" and "must be in [0, 350]" in r["error"]["message"], (st, r)
for body, want in [({"prompt": "x"}, "image_prompt: the x4 upscaler needs"),
                   ({"prompt": "x", "image": low}, "invalid base64"),
                   ({"prompt": "x", "image": base64.b64encode(b"not a png").decode()}, "not a PNG")]:
    st, r = post(body)
    assert st == 400 and r["error"]["param"] == "image" and want in r["error"]["message"], (body.keys(), st, r)
PY
else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

# DeepFloyd IF stage III: an IF folder with upscaler/ (this folder) runs x4 after decode, in one pipeline
IFGOLD=${DIFFPIPE_GOLDEN_IF:-$(dirname "$0")/../../../shared/golden/tiny-if}
if [ -d "$IFGOLD/model" ]; then
  IFX4=$WORK/if-x4; mkdir -p "$IFX4"
  for p in "$IFGOLD"/model/*; do ln -s "$(cd "$(dirname "$p")" && pwd)/$(basename "$p")" "$IFX4/"; done
  ln -s "$(cd "$MODEL" && pwd)" "$IFX4/upscaler"
  COMMON=(generate --model "$IFX4" --prompts "$WORK/prompts.txt" --steps 4 --sr-steps 3 --x4-steps 3 --seed 5 --threads 1
          --batch-invariant --previews 1 --quiet --timeout 60)
  timeout 120 "$BIN" "${COMMON[@]}" --out "$WORK/if1" 2> "$WORK/if1.log" || bad "IF + x4, 1 rank failed: $(tail -2 "$WORK/if1.log")"
  [ "$(png_size "$WORK"/if1/img-00000-seed5.png)" = "128 128" ] && ok "IF stage III: 16 -> 32 (stage II) -> 128 px" \
    || bad "IF + x4 size: $(png_size "$WORK"/if1/img-00000-seed5.png)"
  for np in 3 5; do
    timeout 180 $MPIRUN -np $np "$BIN" "${COMMON[@]}" --out "$WORK/if$np" 2> "$WORK/if$np.log" || bad "IF + x4 np $np failed"
    [ "$(ls "$WORK"/if1/img-*.png | wc -l)" = 6 ] && same_pngs "$WORK/if1" "$WORK/if$np" \
      && ok "IF + x4 on $np ranks: the same PNG bytes (images and previews) as 1 rank" || bad "IF + x4 np $np differs"
  done
  grep -q "x4(max_batch" "$WORK/if5.log" && ok "5 ranks: x4 placed ($(grep -o 'rank [0-9] [^:]*: [^+]*x4' "$WORK/if5.log" | head -1))" \
    || bad "5 ranks: no x4 in the placement"
  IFONE=(generate --model "$IFX4" --prompt "a red circle" --seed 9 --steps 4 --sr-steps 3 --threads 1 --quiet)
  timeout 60 "$BIN" "${IFONE[@]}" --x4-steps 3 --out "$WORK/x4a" 2> /dev/null || bad "x4a failed"
  timeout 60 "$BIN" "${IFONE[@]}" --x4-steps 3 --x4-noise-level 200 --out "$WORK/x4b" 2> /dev/null || bad "x4b failed"
  same_pixels "$WORK/x4a/img-00000-seed9.png" "$WORK/x4b/img-00000-seed9.png" && bad "--x4-noise-level changed nothing" \
    || ok "--x4-noise-level changes the image"
  echo '{"prompt": "a red circle", "seed": 9, "x4_steps": 3, "x4_noise_level": 200}' > "$WORK/x4.jsonl"
  timeout 60 "$BIN" generate --model "$IFX4" --prompts "$WORK/x4.jsonl" --steps 4 --sr-steps 3 --threads 1 --quiet \
    --out "$WORK/x4j" 2> "$WORK/x4j.log" || bad "x4 JSONL run failed: $(tail -1 "$WORK/x4j.log")"
  same_pixels "$WORK/x4b/img-00000-seed9.png" "$WORK/x4j/img-00000-seed9.png" && ok "JSONL x4_steps/x4_noise_level give the flags' image" \
    || bad "JSONL x4 keys differ from the flags"
  grep -aq "x4 steps: 3, x4 CFG scale: 9, x4 noise level: 200" "$WORK/x4b/img-00000-seed9.png" \
    && ok "the PNG records stage III's settings" || bad "PNG lacks stage III's settings"
  if timeout 60 "$BIN" "${IFONE[@]}" --x4-noise-level 351 --out "$WORK/x4c" 2> "$WORK/x4c.log"; then bad "--x4-noise-level 351 accepted"
  else grep -q "x4_noise_level: must be in \[0, 350\]" "$WORK/x4c.log" && ok "--x4-noise-level 351 refused by name" \
    || bad "unclear: $(tail -1 "$WORK/x4c.log")"; fi
  BADX4=$WORK/if-badx4; mkdir -p "$BADX4"; for p in "$IFX4"/*; do [ "$(basename "$p")" = upscaler ] || ln -s "$(readlink -f "$p")" "$BADX4/"; done
  ln -s "$(readlink -f "$IFGOLD/model")" "$BADX4/upscaler"  # an IF folder where an upscaler should be
  if timeout 60 "$BIN" "${IFONE[@]}" --model "$BADX4" --out "$WORK/bx" 2> "$WORK/bx.log"; then bad "a non-upscaler upscaler/ accepted"
  else grep -q "upscaler: not a StableDiffusionUpscalePipeline folder" "$WORK/bx.log" && ok "upscaler/ of another kind refused by name" \
    || bad "unclear: $(tail -1 "$WORK/bx.log")"; fi
else
  echo "note: IF folder $IFGOLD/model absent: IF stage III checks skipped"
fi

echo "upscale: $passed passed, $fails failed"
[ $fails = 0 ]
