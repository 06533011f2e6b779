#!/usr/bin/env bash
# LoRA files fused at load time, through `diffpipe generate` under mpirun and `diffpipe serve`:
#   lora_test.sh DIFFPIPE_BIN WORKDIR   (the reference: $DIFFPIPE_GOLDEN_LORA, made by tests/stages/make_lora_golden.py)
# Checks: --lora gives the same PNG bytes on 1 rank and pipelined on 3 ranks (the encode rank fuses the text
# encoder's part, the denoise rank the UNet's); it changes the image; at scale 0 it gives the plain image; two files
# at half scale each give the one at full scale (the updates add); the PNG records the LoRA; a rerun into the same
# folder with another scale is refused (the run's identity); a file that does not fit is refused naming the file and
# key on every rank, writing nothing; serve --lora answers with the CLI's pixels. Per-request adapters
# (--lora-adapters, JSONL/HTTP "lora"): a mixed batch alike on 1 and 3 ranks, each image its fused twin's within 1,
# the PNG names them, an unknown one is refused (by line; over HTTP a 400 naming lora). Exit 77 = skipped.
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_LORA:-$(dirname "$0")/../../../shared/golden/tiny-lora}
[ -f "$GOLD/golden.json" ] || { echo "SKIP: LoRA reference $GOLD is absent (set DIFFPIPE_GOLDEN_LORA)"; exit 77; }
GOLD=$(cd "$GOLD" && pwd)
MODEL=$GOLD/model
LORA=$GOLD/lora_peft.safetensors
source "$(dirname "$0")/lib.sh"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --steps 4 --seed 5 --threads 1 --batch-invariant
        --quiet --timeout 60 --lora "$LORA:0.8")
one_rank_run 3
same_as_one_rank np3 3 "np 3 (encode | denoise | decode), --lora"
ONE=(generate --model "$MODEL" --prompt "a red circle" --seed 2 --steps 4 --threads 1 --quiet)
run() { local out=$1; shift; timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$out" 2> "$WORK/$out.log" || bad "$out failed: $(tail -1 "$WORK/$out.log")"; }
run plain
run full --lora "$LORA"
run zero --lora "$LORA:0"
run halves --lora "$LORA:0.5,$GOLD/lora_kohya.safetensors:0.5"
P=img-00000-seed2.png
same_pixels "$WORK/plain/$P" "$WORK/full/$P" && bad "--lora changed nothing" || ok "--lora changes the image"
same_pixels "$WORK/plain/$P" "$WORK/zero/$P" && ok "scale 0 gives the plain image" || bad "scale 0 differs from no LoRA"
python3 - "$WORK/full/$P" "$WORK/halves/$P" <<'PY' && ok "the peft and kohya files at 0.5 each add up to one at 1 (8-bit values within 1)" || bad "two half LoRAs differ from one full"
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int32) for f in sys.argv[1:3])
print("max |full - halves|:", int(np.abs(a - b).max()))
sys.exit(0 if a.shape == b.shape and np.abs(a - b).max() <= 1 else 1)
PY
grep -aq "LoRA: $LORA (1)" "$WORK/full/$P" && ok "the PNG records the LoRA and its scale" || bad "PNG parameters lack the LoRA"
if timeout 60 "$BIN" "${ONE[@]}" --lora "$LORA:0.3" --out "$WORK/full" 2> "$WORK/rerun.log"; then bad "a rerun with another LoRA scale was accepted"
else grep -q "settings" "$WORK/rerun.log" && ok "a rerun into the folder with another LoRA scale is refused" || bad "unclear: $(tail -1 "$WORK/rerun.log")"; fi
python3 - "$WORK/bad.safetensors" <<'PY'
import json, struct, sys
name = "lora_unet_input_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
hdr = json.dumps({name: {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(hdr)) + hdr + b"\0\0\0\0")
PY
if timeout 120 $MPIRUN -np 3 "$BIN" "${ONE[@]}" --lora "$WORK/bad.safetensors" --out "$WORK/bad" 2> "$WORK/bad.log"; then bad "a LoRA naming a layer the folder lacks was accepted"
elif grep -q "bad.safetensors: key 'lora_unet_input_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_down.weight' names no layer" "$WORK/bad.log" \
  && [ -z "$(ls "$WORK/bad" 2>/dev/null | grep '^img-')" ]; then ok "3 ranks: a LoRA that does not fit is refused naming file and key, nothing written"
else bad "unclear refusal: $(tail -2 "$WORK/bad.log")"; fi

# per-request adapters (--lora-adapters): one JSONL batch mixing them, 1 and 3 ranks alike; each line near its fused
# twin (the branches stay unfused: rounding apart); the PNG names the adapter; an unknown one is refused by line
ADS="style=$LORA,kohya=$GOLD/lora_kohya.safetensors"
printf '%s\n' '{"prompt": "a red circle", "seed": 2, "lora": "style:0.8"}' '{"prompt": "a red circle", "seed": 2}' \
  '{"prompt": "a red circle", "seed": 2, "lora": {"style": 0.5, "kohya": 0.5}}' > "$WORK/ad.jsonl"
AD=(generate --model "$MODEL" --lora-adapters "$ADS" --prompts "$WORK/ad.jsonl" --steps 4 --threads 1 --batch-invariant
    --quiet --timeout 60)
timeout 60 "$BIN" "${AD[@]}" --out "$WORK/ad1" 2> "$WORK/ad1.log" || bad "adapters run failed: $(tail -2 "$WORK/ad1.log")"
timeout 180 $MPIRUN -np 3 "$BIN" "${AD[@]}" --out "$WORK/ad3" 2> "$WORK/ad3.log" || bad "3-rank adapters run failed: $(tail -2 "$WORK/ad3.log")"
same_pngs "$WORK/ad1" "$WORK/ad3" && ok "per-request adapters: 1 and 3 ranks give the same PNG bytes" || bad "adapters differ across ranks"
run fused08 --lora "$LORA:0.8"
near() {  # near A.png B.png: 8-bit values within 1
  python3 - "$1" "$2" <<'PY'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int32) for f in sys.argv[1:3])
sys.exit(0 if a.shape == b.shape and np.abs(a - b).max() <= 1 else 1)
PY
}
near "$WORK/ad1/img-00000-seed2.png" "$WORK/fused08/$P" && near "$WORK/ad1/img-00001-seed2.png" "$WORK/plain/$P" \
  && near "$WORK/ad1/img-00002-seed2.png" "$WORK/halves/$P" \
  && ok "one batch: adapter style at 0.8, none, both at 0.5 each give their fused twins' images (within 1)" \
  || bad "per-request adapters differ from their fused twins"
grep -aq "LoRA adapters: style:0.8 (style=$LORA)" "$WORK/ad1/img-00000-seed2.png" \
  && ok "the PNG records the request's adapters and their files" || bad "PNG parameters lack the adapters"
refused_lines() {  # refused_lines NAME EXPECTED LINE...: a JSONL run of these lines fails naming EXPECTED
  local name=$1 want=$2; shift 2
  printf '%s\n' "$@" > "$WORK/$name.jsonl"
  if timeout 60 "$BIN" generate --model "$MODEL" --lora-adapters "$ADS" --prompts "$WORK/$name.jsonl" --steps 4 --quiet \
    --out "$WORK/$name" 2> "$WORK/$name.log"; then bad "$name: accepted"
  elif grep -qF -- "$want" "$WORK/$name.log"; then ok "$name: refused naming '$want'"
  else bad "$name: unclear: $(tail -1 "$WORK/$name.log")"; fi
}
refused_lines adbad "adbad.jsonl:2: lora: no adapter 'nope' in this run (its adapters: style, kohya)" \
  '{"prompt": "x"}' '{"prompt": "y", "lora": "nope:1"}'
refused_lines adtype "adtype.jsonl:1: key 'lora' must be \"NAME[:SCALE],...\" or an object" '{"prompt": "y", "lora": 5}'
# textual inversion (--embeddings; a reference with ti_*.safetensors): 1 and 3 ranks alike, the token changes the
# image, the PNG records the file; a pickled file is refused
if [ -f "$GOLD/ti_multi.safetensors" ]; then
  TI=(generate --model "$MODEL" --embeddings "$GOLD/ti_shape.safetensors,$GOLD/ti_multi.safetensors:badstyle"
      --prompt "a red circle, badstyle" --prompt "a <shape-style> circle" --seed 2 --steps 4 --threads 1 --batch-invariant
      --quiet --timeout 60)
  timeout 60 "$BIN" "${TI[@]}" --out "$WORK/ti1" 2> "$WORK/ti1.log" || bad "embeddings run failed: $(tail -2 "$WORK/ti1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${TI[@]}" --out "$WORK/ti3" 2> "$WORK/ti3.log" || bad "3-rank embeddings run failed"
  timeout 60 "$BIN" generate --model "$MODEL" --prompt "a red circle, badstyle" --seed 2 --steps 4 --threads 1 --batch-invariant \
    --quiet --out "$WORK/tino" 2> /dev/null || bad "plain run failed"
  same_pngs "$WORK/ti1" "$WORK/ti3" && ! same_pixels "$WORK/ti1/$P" "$WORK/tino/$P" \
    && grep -aq "Embedding: $GOLD/ti_multi.safetensors (badstyle)" "$WORK/ti1/$P" \
    && ok "--embeddings: 1 and 3 ranks alike, the same prompt without them gives another image, the PNG names the file" \
    || bad "--embeddings: ranks differ, nothing changed or the PNG lacks it"
  printf 'x' > "$WORK/emb.pt"
  refused emb-pt "only .safetensors files are read" --embeddings "$WORK/emb.pt"
fi
printf '%s\n' '{"prompt": "a red circle", "seed": 2, "lora": "style:0.8"}' > "$WORK/adone.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --lora "$LORA" --lora-adapters "$ADS" --prompts "$WORK/adone.jsonl" --steps 4 \
  --threads 1 --quiet --out "$WORK/adone" 2> /dev/null || bad "single adapter run failed"

EMB=(); [ -f "$GOLD/ti_multi.safetensors" ] && EMB=(--embeddings "$GOLD/ti_multi.safetensors:badstyle")
serve_up "$WORK/serve.log" --model "$MODEL" --steps 4 --threads 1 --lora "$LORA" --lora-adapters "$ADS" "${EMB[@]}"
if [ -n "$URL" ]; then
  python3 - "$URL" "$WORK/full/$P" "$WORK/adone/img-00000-seed2.png" "${#EMB[@]}" <<'PY' && ok "serve --lora: the CLI's image over HTTP; an adapter request ({\"style\": 0.8}) the CLI's too; an unknown one a 400 naming lora; /v1/models lists the adapters" || bad "serve --lora / adapters"
import base64, sys
import http_util
url, cli, adcli = sys.argv[1:4]
post = lambda body: http_util.post(url, body)
pixels = lambda png: http_util.png_pixels(png)[1]
st, r = post({"prompt": "a red circle", "seed": 2})
assert st == 200, (st, r)
png = base64.b64decode(r["data"][0]["b64_json"])
assert pixels(png) == pixels(open(cli, "rb").read()), "serve --lora differs from the CLI"
# an adapter on top of the fused file, as the CLI ran it
st, r = post({"prompt": "a red circle", "seed": 2, "lora": {"style": 0.8}})
assert st == 200, (st, r)
assert pixels(base64.b64decode(r["data"][0]["b64_json"])) == pixels(open(adcli, "rb").read()), "adapter request differs"
st, bad = post({"prompt": "a red circle", "lora": "nope"})
assert st == 400 and bad["error"]["param"] == "lora" and "no adapter 'nope'" in bad["error"]["message"], (st, bad)
import json, urllib.request
models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())
assert models["data"][0]["lora_adapters"] == ["style", "kohya"], models
if sys.argv[4] != "0":  # served with --embeddings
    assert models["data"][0]["embedding_tokens"] == ["badstyle"], models
PY
else bad "serve --lora did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "lora: $passed passed, $fails failed"
[ $fails = 0 ]
