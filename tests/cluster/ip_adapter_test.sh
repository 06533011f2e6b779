#!/usr/bin/env bash
# IP-Adapter through `diffpipe generate` under mpirun and `serve`:
#   ip_adapter_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_IP_ADAPTER, made by
#   tests/stages/make_ip_adapter_golden.py)
# Checks: a JSONL batch mixing requests with and without an image prompt gives the same PNG bytes on 1 rank, 3
# pipelined ranks (the image encoder on the encode rank, the adapter's layers on the denoise rank) and 2 replicas;
# the flags equal the JSONL keys; the image prompt changes the image and the PNG records it; the batch's request
# without one has the pixels of a run without the adapter; with LoRA adapters and image-to-image in one batch, 1 and 3
# ranks agree and a request equals its run alone; IP-Adapter Plus gives the same bytes on 1 and 3 ranks; refusals name the
# option or file; over HTTP a base64 ip_adapter_image gives the CLI's pixels. Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_IP_ADAPTER:-$(dirname "$0")/../../../shared/golden/tiny-ip-adapter}
MODEL=$GOLD/model
[ -d "$MODEL" ] || { echo "SKIP: IP-Adapter folder $GOLD is absent (set DIFFPIPE_GOLDEN_IP_ADAPTER)"; exit 77; }
source "$(dirname "$0")/lib.sh"
IP=$GOLD/ip/ip-adapter.safetensors
cat > "$WORK/jobs.jsonl" <<JSONL
{"prompt": "a red circle", "seed": 1, "ip_adapter_image": "$GOLD/image_0.png"}
{"prompt": "a blue square", "seed": 2}
{"prompt": "two green triangles", "seed": 3, "ip_adapter_image": "$GOLD/image_1.png", "ip_adapter_scale": 0.6}
JSONL
COMMON=(generate --model "$MODEL" --ip-adapter "$IP" --prompts "$WORK/jobs.jsonl" --steps 4 --threads 1
        --batch-invariant --quiet --timeout 60)
one_rank_run 3
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas

# IP-Adapter Plus: the image encoder's hidden states (and the zero image's) travel from the encode rank
PLUS=$GOLD/ip/ip-adapter-plus.safetensors
if [ -f "$PLUS" ]; then
  PL=(generate --model "$MODEL" --ip-adapter "$PLUS" --prompts "$WORK/jobs.jsonl" --steps 4 --threads 1 --batch-invariant
      --quiet --timeout 60)
  timeout 60 "$BIN" "${PL[@]}" --out "$WORK/plus1" 2> "$WORK/plus1.log" || bad "Plus failed: $(tail -2 "$WORK/plus1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${PL[@]}" --out "$WORK/plus3" 2> "$WORK/plus3.log" \
    || bad "3-rank Plus failed: $(tail -2 "$WORK/plus3.log")"
  same_pngs "$WORK/plus1" "$WORK/plus3" && [ -f "$WORK/plus1/img-00000-seed1.png" ] \
    && ! same_pixels "$WORK/plus1/img-00000-seed1.png" "$WORK/np1/img-00000-seed1.png" \
    && same_pixels "$WORK/plus1/img-00001-seed2.png" "$WORK/np1/img-00001-seed2.png" \
    && ok "IP-Adapter Plus: 1 and 3 ranks give the same bytes; its image differs from the plain adapter's, the request without an image prompt does not" \
    || bad "IP-Adapter Plus across ranks"
else
  echo "note: no IP-Adapter Plus file at $PLUS (remake the reference); its checks skipped"
fi

# with per-request LoRA adapters and image-to-image in the same batch (tiny-lora's file fits tiny-sd)
LORA=${DIFFPIPE_GOLDEN_LORA:-$(dirname "$0")/../../../shared/golden/tiny-lora}/lora_peft.safetensors
if [ -f "$LORA" ]; then
  python3 -c "from PIL import Image; Image.open('$GOLD/image_0.png').convert('RGB').resize((32, 32)).save('$WORK/in32.png')"
  cat > "$WORK/combo.jsonl" <<JSONL
{"prompt": "a red circle", "seed": 1, "ip_adapter_image": "$GOLD/image_0.png", "lora": "s:0.7"}
{"prompt": "a blue square", "seed": 2, "lora": "s"}
{"prompt": "two triangles", "seed": 3, "ip_adapter_image": "$GOLD/image_1.png", "image_prompt": "$WORK/in32.png", "strength": 0.6}
JSONL
  sed -n 3p "$WORK/combo.jsonl" > "$WORK/combo3.jsonl"
  CB=(generate --model "$MODEL" --ip-adapter "$IP" --lora-adapters "s=$LORA" --steps 4 --threads 1 --batch-invariant --quiet)
  timeout 60 "$BIN" "${CB[@]}" --prompts "$WORK/combo.jsonl" --out "$WORK/cb1" 2> "$WORK/cb1.log" || bad "combo failed"
  timeout 180 $MPIRUN -np 3 "$BIN" "${CB[@]}" --prompts "$WORK/combo.jsonl" --out "$WORK/cb3" 2> "$WORK/cb3.log" \
    || bad "3-rank combo failed: $(tail -2 "$WORK/cb3.log")"
  timeout 60 "$BIN" "${CB[@]}" --prompts "$WORK/combo3.jsonl" --out "$WORK/cbone" 2> "$WORK/cbone.log" || bad "alone failed"
  same_pngs "$WORK/cb1" "$WORK/cb3" && cmp -s "$WORK/cbone/img-00000-seed3.png" "$WORK/cb1/img-00002-seed3.png" \
    && ok "image prompts beside LoRA adapters and image-to-image: 1 and 3 ranks alike, each request as alone" \
    || bad "the mixed batch of image prompts, adapters and image-to-image differs"
fi

ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 1 --steps 4 --threads 1 --batch-invariant --quiet)
timeout 60 "$BIN" "${ONE[@]}" --ip-adapter "$IP" --ip-adapter-image "$GOLD/image_0.png" --out "$WORK/flag" \
  2> "$WORK/flag.log" || bad "flags run failed: $(tail -2 "$WORK/flag.log")"
P=img-00000-seed1.png
cmp -s "$WORK/flag/$P" "$WORK/np1/$P" && ok "--ip-adapter-image equals the JSONL key" || bad "flags differ from JSONL"
timeout 60 "$BIN" "${ONE[@]}" --out "$WORK/plain" 2> "$WORK/plain.log" || bad "plain run failed"
[ -f "$WORK/flag/$P" ] && ! same_pixels "$WORK/flag/$P" "$WORK/plain/$P" && ok "the image prompt changes the image" \
  || bad "the image prompt changed nothing"
timeout 60 "$BIN" generate --model "$MODEL" --prompt "a blue square" --seed 2 --steps 4 --threads 1 --batch-invariant \
  --quiet --out "$WORK/plain2" 2> "$WORK/plain2.log" || bad "plain run 2 failed"
same_pixels "$WORK/np1/img-00001-seed2.png" "$WORK/plain2/img-00000-seed2.png" \
  && ok "the batch's request without an image prompt has the pixels of a run without the adapter" \
  || bad "a request without an image prompt changed beside ones with"
grep -aq "IP-Adapter image: $GOLD/image_0.png, IP-Adapter scale: 1" "$WORK/flag/$P" && ok "the PNG records the image prompt" \
  || bad "PNG lacks the image prompt"
refused no-adapter "ip_adapter_image: " --ip-adapter-image "$GOLD/image_0.png"
refused no-file "nope.safetensors: IP-Adapter file not found" --ip-adapter "$WORK/nope.safetensors"
mkdir -p "$WORK/lonely" && cp "$IP" "$WORK/lonely/"
refused no-encoder "image encoder folder is not there" --ip-adapter "$WORK/lonely/ip-adapter.safetensors"
refused bad-scale "ip_adapter_scale: only a request with an ip_adapter_image" --ip-adapter "$IP" --ip-adapter-scale 0.5

# serve batches as it likes (not batch-invariant): its image is compared with a run that does the same
timeout 60 "$BIN" generate --model "$MODEL" --prompt "a red circle" --seed 1 --steps 4 --threads 1 --quiet \
  --ip-adapter "$IP" --ip-adapter-image "$GOLD/image_0.png" --out "$WORK/flagnb" 2> "$WORK/flagnb.log" \
  || bad "run for serve failed: $(tail -2 "$WORK/flagnb.log")"
serve_up "$WORK/serve.log" --model "$MODEL" --steps 4 --threads 1 --ip-adapter "$IP"
if [ -n "$URL" ]; then
  python3 - "$URL" "$GOLD/image_0.png" "$WORK/flagnb/$P" <<'PY' && ok "serve: a base64 ip_adapter_image gives the CLI's pixels; a bad one is a 400 naming it; /v1/models says ip_adapter" || bad "serve ip-adapter"
import base64, sys
import http_util
url, img, cli = sys.argv[1:4]
body = {"prompt": "a red circle", "seed": 1, "ip_adapter_image": base64.b64encode(open(img, "rb").read()).decode()}
st, r = http_util.post(url, body)
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert http_util.png_pixels(png)[1] == http_util.png_pixels(open(cli, "rb").read())[1], "serve differs from the CLI"
st, r = http_util.post(url, {**body, "ip_adapter_image": "bm90IGEgcG5n"})
assert st == 400 and r["error"]["param"] == "ip_adapter_image", (st, r)
import json, urllib.request
models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())
assert models["data"][0]["ip_adapter"] is True, models
PY
else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "ip-adapter: $passed passed, $fails failed"
[ $fails = 0 ]
