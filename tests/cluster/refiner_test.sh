#!/usr/bin/env bash
# The SDXL base handing its latents to a refiner (`--refiner DIR`: the refine stage between denoise and decode) through
# `diffpipe generate` under mpirun and `diffpipe serve`:
#   refiner_test.sh DIFFPIPE_BIN WORKDIR   (the base: $DIFFPIPE_GOLDEN_SDXL's model; the refiner: $DIFFPIPE_GOLDEN_IMG2IMG's
#   sdxl-refiner-model, made by tests/stages/make_img2img_golden.py --sdxl)
# Checks: the same PNG bytes on 1 rank, 3 ranks, 4 ranks (the refiner on a rank of its own), 2 replicas and a pipeline
# file placing [refine]; the refiner
# changes the image; previews (the base's) pass the refine rank to decode; --denoising-end/--refiner-steps/
# --refiner-strength change the image, their JSONL keys give the flags' image and the PNG records them; run.json names
# the refiner; serve answers with the CLI's pixels and a 400 naming a bad field; bad settings and folders are refused by
# name, writing nothing; `profile --refiner` measures the refine stage and a plan made from it runs with the same
# bytes. Exit 77 = skipped (folders absent).
set -u
BIN=$1; WORK=$2
MODEL=${DIFFPIPE_GOLDEN_SDXL:-$(dirname "$0")/../../../shared/golden/tiny-sdxl}/model
REF=${DIFFPIPE_GOLDEN_IMG2IMG:-$(dirname "$0")/../../../shared/golden/tiny-img2img}/sdxl-refiner-model
[ -d "$MODEL" ] || { echo "SKIP: SDXL folder $MODEL is absent (set DIFFPIPE_GOLDEN_SDXL)"; exit 77; }
[ -d "$REF" ] || { echo "SKIP: refiner folder $REF is absent (set DIFFPIPE_GOLDEN_IMG2IMG)"; exit 77; }
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --refiner "$REF" --prompts "$WORK/prompts.txt" --images 2 --steps 8 --seed 5
        --threads 1 --batch-invariant --quiet --timeout 60)

one_rank_run 6
same_as_one_rank np3 3 "np 3 (encode | denoise | refine, decode)"
same_as_one_rank np4 4 "np 4 (encode | denoise | refine | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
printf '[encode]\nranks = [0]\n[denoise]\nranks = [1]\n[refine]\nranks = [2]\nmax_batch = 4\n[decode]\nranks = [0]\n' \
  > "$WORK/refine.toml"
same_as_one_rank file3 3 "a pipeline file placing [refine] on rank 2" --pipeline "$WORK/refine.toml"
grep -q "Refiner: $REF" "$WORK/np1/run.json" && ok "run.json names the refiner" || bad "run.json lacks the refiner"

# profile and plan a base + refiner deployment; the planned pipeline file gives the 1-rank bytes
if timeout 120 "$BIN" profile --model "$MODEL" --refiner "$REF" --batches 1,2 --steps 8 --threads 1 \
     --out "$WORK/profile.json" 2> "$WORK/profile.log"; then
  python3 - "$WORK/profile.json" <<'PY' && ok "profile --refiner: the refine stage measured (multi-step, after denoise)" \
    || bad "profile content: $(head -c 300 "$WORK/profile.json")"
import json, sys
p = json.load(open(sys.argv[1]))
names = [s["name"] for s in p["stages"]]
assert names == ["encode", "denoise", "refine", "decode"], names
r = p["stages"][2]
assert r["multi_step"] and r["calls"] == 2 and r["weight_bytes"] > 0, r  # 8 steps, the refiner's last 20 %
PY
  timeout 120 "$BIN" plan --profile "$WORK/profile.json" --nodes 1 --ranks-per-node 3 --out "$WORK/plan3.toml" \
    > "$WORK/plan3.log" 2>&1 || bad "plan: $(tail -2 "$WORK/plan3.log")"
  grep -q "refine" "$WORK/plan3.toml" 2>/dev/null && grep -q -- "--refiner REFINER" "$WORK/plan3.toml" \
    && ok "plan for 3 ranks: a pipeline file that places refine and says to pass --refiner" \
    || bad "plan file: $(cat "$WORK/plan3.toml" 2>/dev/null | head -20)"
  same_as_one_rank planned3 3 "the planned pipeline file on 3 ranks" --pipeline "$WORK/plan3.toml"
else
  bad "profile --refiner failed: $(tail -2 "$WORK/profile.log")"
fi

ONE=(generate --model "$MODEL" --refiner "$REF" --prompt "a red circle" --seed 9 --steps 8 --threads 1 --batch-invariant
     --quiet --timeout 60)
timeout 60 "$BIN" generate --model "$MODEL" --prompt "a red circle" --seed 9 --steps 8 --threads 1 --batch-invariant \
  --quiet --out "$WORK/base" 2> "$WORK/base.log" || bad "base run failed: $(tail -2 "$WORK/base.log")"
timeout 60 "$BIN" "${ONE[@]}" --out "$WORK/d08" 2> "$WORK/d08.log" || bad "refiner run failed: $(tail -2 "$WORK/d08.log")"
[ -f "$WORK/d08/img-00000-seed9.png" ] && ! same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/d08/img-00000-seed9.png" \
  && ok "the refiner changes the image (denoising_end 0.8)" || bad "the refiner changed nothing"
timeout 60 "$BIN" "${ONE[@]}" --denoising-end 0.6 --refiner-steps 10 --out "$WORK/d06" 2> "$WORK/d06.log" \
  || bad "--denoising-end 0.6 failed: $(tail -2 "$WORK/d06.log")"
[ -f "$WORK/d06/img-00000-seed9.png" ] && ! same_pixels "$WORK/d08/img-00000-seed9.png" "$WORK/d06/img-00000-seed9.png" \
  && ok "--denoising-end 0.6 --refiner-steps 10 change the image" || bad "--denoising-end changed nothing"
grep -aq "Refiner from: 0.6, Refiner steps: 10" "$WORK/d06/img-00000-seed9.png" \
  && ok "the PNG records denoising_end and refiner_steps" || bad "the PNG lacks the refiner settings"
timeout 60 "$BIN" "${ONE[@]}" --denoising-end 1 --refiner-strength 0.5 --out "$WORK/after" 2> "$WORK/after.log" \
  || bad "--denoising-end 1 failed: $(tail -2 "$WORK/after.log")"
[ -f "$WORK/after/img-00000-seed9.png" ] && ! same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/after/img-00000-seed9.png" \
  && ok "--denoising-end 1 --refiner-strength 0.5: the finished image is refined" || bad "refining the finished image changed nothing"
printf '{"prompt": "a red circle", "seed": 9, "denoising_end": 0.6, "refiner_steps": 10}\n{"prompt": "a red circle", "seed": 9, "denoising_end": 1, "refiner_strength": 0.5}\n' \
  > "$WORK/rf.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --refiner "$REF" --prompts "$WORK/rf.jsonl" --steps 8 --threads 1 \
  --batch-invariant --quiet --out "$WORK/rfj" 2> "$WORK/rfj.log" || bad "JSONL run failed: $(tail -2 "$WORK/rfj.log")"
cmp -s "$WORK/d06/img-00000-seed9.png" "$WORK/rfj/img-00000-seed9.png" \
  && same_pixels "$WORK/after/img-00000-seed9.png" "$WORK/rfj/img-00001-seed9.png" \
  && ok "JSONL denoising_end/refiner_steps/refiner_strength give the flags' images" || bad "JSONL differs from the flags"
# a request may skip the refiner: the base's own image (the run without --refiner), beside refined ones in one batch
printf '{"prompt": "a red circle", "seed": 9, "refiner": false}\n{"prompt": "a red circle", "seed": 9}\n' > "$WORK/skip.jsonl"
timeout 180 $MPIRUN -np 4 "$BIN" generate --model "$MODEL" --refiner "$REF" --prompts "$WORK/skip.jsonl" --steps 8 \
  --threads 1 --batch-invariant --quiet --out "$WORK/skip" 2> "$WORK/skip.log" || bad "skip run failed: $(tail -2 "$WORK/skip.log")"
same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/skip/img-00000-seed9.png" \
  && same_pixels "$WORK/d08/img-00000-seed9.png" "$WORK/skip/img-00001-seed9.png" \
  && grep -aq "Refiner: skipped" "$WORK/skip/img-00000-seed9.png" \
  && ok "\"refiner\": false on 4 ranks: the base's own image beside a refined one, recorded in the PNG" \
  || bad "skipping the refiner"
timeout 60 "$BIN" "${ONE[@]}" --skip-refiner --out "$WORK/skipflag" 2> "$WORK/skipflag.log" || bad "--skip-refiner failed"
same_pixels "$WORK/base/img-00000-seed9.png" "$WORK/skipflag/img-00000-seed9.png" \
  && ok "--skip-refiner gives the base's own image" || bad "--skip-refiner changed the image"
refused skip-end "refiner: a request that skips the refiner" --skip-refiner --denoising-end 0.7

# previews are the base's: they pass the refine rank and decode shows them
timeout 180 $MPIRUN -np 4 "$BIN" "${ONE[@]}" --previews 2 --out "$WORK/prev" 2> "$WORK/prev.log" \
  || bad "previews on 4 ranks failed: $(tail -2 "$WORK/prev.log")"
[ "$(ls "$WORK"/prev/img-00000-seed9-preview-*.png 2>/dev/null | wc -l)" = 2 ] && cmp -s "$WORK/d08/img-00000-seed9.png" \
  "$WORK/prev/img-00000-seed9.png" && ok "4 ranks with --previews 2: two previews through the refine rank, the same image" \
  || bad "previews through the refine rank: $(ls "$WORK/prev" 2>/dev/null | tr '\n' ' ')"

refused no-base-step "denoising_end: 0.05 leaves the base no step" --denoising-end 0.05
refused bad-end "denoising_end: must be in (0, 1]" --denoising-end 1.5
refused strength-part "refiner_strength: only with denoising_end 1" --refiner-strength 0.5
if timeout 60 "$BIN" generate --model "$MODEL" --prompt x --denoising-end 0.7 --out "$WORK/noref" 2> "$WORK/noref.log"; then
  bad "--denoising-end without --refiner accepted"
else grep -q -- "--denoising-end needs --refiner DIR" "$WORK/noref.log" && ok "--denoising-end without --refiner refused" \
  || bad "unclear: $(tail -1 "$WORK/noref.log")"; fi
echo '{"prompt": "x", "denoising_end": 0.7}' > "$WORK/noref.jsonl"
if timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/noref.jsonl" --out "$WORK/norefj" 2> "$WORK/norefj.log"; then
  bad "JSONL denoising_end without a refiner accepted"
else grep -q "noref.jsonl:1: denoising_end: only a run with an SDXL refiner uses it" "$WORK/norefj.log" \
  && ok "JSONL denoising_end without a refiner refused naming the line" || bad "unclear: $(tail -1 "$WORK/norefj.log")"; fi
SD=$(dirname "$REF")/model  # an SD 1.x folder
if timeout 60 "$BIN" generate --model "$MODEL" --refiner "$SD" --prompt x --out "$WORK/sdref" 2> "$WORK/sdref.log"; then
  bad "an SD 1.x refiner accepted"
else grep -q "is not an SDXL pipeline" "$WORK/sdref.log" && ok "an SD 1.x folder as the refiner refused naming its class" \
  || bad "unclear: $(tail -1 "$WORK/sdref.log")"; fi
[ -z "$(ls "$WORK/sdref" 2>/dev/null | grep '^img-')" ] && ok "no output from the refused refiner" || bad "images written"

# serve batches as it likes (not batch-invariant): its image is compared with a run that does the same
timeout 60 "$BIN" generate --model "$MODEL" --refiner "$REF" --prompt "a red circle" --seed 9 --steps 8 --threads 1 \
  --quiet --denoising-end 0.6 --refiner-steps 10 --out "$WORK/cli" 2> "$WORK/cli.log" || bad "CLI run failed"
serve_up "$WORK/serve.log" --model "$MODEL" --refiner "$REF" --steps 8 --threads 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$WORK/cli/img-00000-seed9.png" <<'PY' \
    && ok "serve --refiner: denoising_end/refiner_steps give the CLI's pixels; a bad value is a 400 naming it; /v1/models names the refiner" \
    || bad "serve with a refiner"
import base64, sys
import http_util
url, cli = sys.argv[1:3]
body = {"prompt": "a red circle", "seed": 9, "denoising_end": 0.6, "refiner_steps": 10}
st, r = http_util.post(url, {"prompt": "a red circle", "seed": 9, "refiner": "no"})
assert st == 400 and r["error"]["param"] == "refiner", (st, r)
st, r = http_util.post(url, body)
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
import json, urllib.request
models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())
assert models["data"][0].get("refiner", "").endswith("sdxl-refiner-model"), models
for bad, param in (({"denoising_end": 0}, "denoising_end"), ({"refiner_strength": 2}, "refiner_strength"),
                   ({"denoising_end": 0.01}, "denoising_end")):
    st, r = http_util.post(url, {**body, **bad})
    assert st == 400 and r["error"]["param"] == param, (bad, st, r)
PY
else bad "serve with a refiner did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "refiner: $passed passed, $fails failed"
[ $fails = 0 ]
