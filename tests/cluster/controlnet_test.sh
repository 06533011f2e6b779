#!/usr/bin/env bash
# ControlNet through `diffpipe generate` under mpirun and `diffpipe serve`:
#   controlnet_test.sh DIFFPIPE_BIN WORKDIR   (the reference: $DIFFPIPE_GOLDEN_CONTROLNET, made by
#   tests/stages/make_controlnet_golden.py)
# Checks: a JSONL file whose lines name their control images gives the same PNG bytes on 1 rank, pipelined on 3 ranks
# (the ControlNet loads on the denoise rank) and with 2 replicas; a control image changes the image, scale 0 gives the
# plain one, another control image another, acting in part of the steps another; the JSONL control keys equal the
# flags; the PNG records the control
# image, scale and ControlNet; a control image without --controlnet, of another size, and a ControlNet that does not
# fit are refused by name writing nothing; serve --controlnet answers a control_image (base64) with the CLI's pixels
# and a wrong-size one with a 400 naming control_image; with the SDXL ControlNet of a --sdxl reference: 1 and 3 ranks
# alike, scale 0 the plain SDXL image, and refused on the SD folder; two ControlNets (comma lists, JSONL and HTTP
# lists): 1 and 3 ranks alike, the PNG records both, counts and entries are checked; with an inpainting folder, 1 and
# 3 ranks alike. Exit 77 = skipped.
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_CONTROLNET:-$(dirname "$0")/../../../shared/golden/tiny-controlnet}
[ -f "$GOLD/golden.json" ] || { echo "SKIP: ControlNet reference $GOLD is absent (set DIFFPIPE_GOLDEN_CONTROLNET)"; exit 77; }
GOLD=$(cd "$GOLD" && pwd)
MODEL=$GOLD/model
CN=$GOLD/controlnet
source "$(dirname "$0")/lib.sh"
printf '{"prompt": "a red circle", "control_image": "%s"}\n{"prompt": "two green triangles", "control_image": "%s", "control_scale": 0.5}\n{"prompt": "a blue square"}\n' \
  "$GOLD/control_0.png" "$GOLD/control_1.png" > "$WORK/jobs.jsonl"
COMMON=(generate --model "$MODEL" --controlnet "$CN" --prompts "$WORK/jobs.jsonl" --steps 4 --seed 5 --threads 1
        --batch-invariant --quiet --timeout 60)
one_rank_run 3
same_as_one_rank np3 3 "np 3 (encode | denoise + ControlNet | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
ONE=(generate --model "$MODEL" --prompt "two green triangles" --seed 6 --steps 4 --threads 1 --quiet)
run() { local out=$1; shift; timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$out" 2> "$WORK/$out.log" || bad "$out failed: $(tail -1 "$WORK/$out.log")"; }
run plain
run plain-cn --controlnet "$CN"
run half --controlnet "$CN" --control-image "$GOLD/control_1.png" --control-scale 0.5
run zero --controlnet "$CN" --control-image "$GOLD/control_1.png" --control-scale 0
run other --controlnet "$CN" --control-image "$GOLD/control_0.png" --control-scale 0.5
P=img-00000-seed6.png
same_pixels "$WORK/plain/$P" "$WORK/plain-cn/$P" && ok "a request without a control image: the plain image" || bad "--controlnet alone changed the image"
same_pixels "$WORK/plain/$P" "$WORK/half/$P" && bad "the control image changed nothing" || ok "a control image changes the image"
same_pixels "$WORK/plain/$P" "$WORK/zero/$P" && ok "scale 0 gives the plain image" || bad "scale 0 differs from the plain image"
same_pixels "$WORK/half/$P" "$WORK/other/$P" && bad "another control image gave the same image" || ok "another control image, another image"
same_pixels "$WORK/half/$P" "$WORK/np1/img-00001-seed6.png" && ok "JSONL control_image/control_scale give the flags' image" \
  || bad "JSONL control keys differ from the flags"
run mid --controlnet "$CN" --control-image "$GOLD/control_1.png" --control-scale 0.5 --control-start 0.25 --control-end 0.75
printf '{"prompt": "two green triangles", "seed": 6, "control_image": "%s", "control_scale": 0.5, "control_start": 0.25, "control_end": 0.75}\n' \
  "$GOLD/control_1.png" > "$WORK/mid.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --controlnet "$CN" --prompts "$WORK/mid.jsonl" --steps 4 --threads 1 --quiet \
  --out "$WORK/midj" 2> "$WORK/midj.log" || bad "JSONL control_start/control_end failed: $(tail -1 "$WORK/midj.log")"
same_pixels "$WORK/half/$P" "$WORK/mid/$P" && bad "--control-start/--control-end changed nothing" \
  || ok "--control-start 0.25 --control-end 0.75 changes the image"
same_pixels "$WORK/mid/$P" "$WORK/midj/$P" && ok "JSONL control_start/control_end give the flags' image" \
  || bad "JSONL control_start/control_end differ from the flags"
grep -aq "Control image: $GOLD/control_1.png, Control scale: 0.5" "$WORK/half/$P" && grep -aq "ControlNet: $CN" "$WORK/half/$P" \
  && ok "the PNG records the control image, scale and ControlNet" || bad "PNG parameters lack the control settings"
run guess --controlnet "$CN" --control-image "$GOLD/control_1.png" --control-scale 0.5 --guess-mode
printf '{"prompt": "two green triangles", "seed": 6, "control_image": "%s", "control_scale": 0.5, "guess_mode": true}\n' \
  "$GOLD/control_1.png" > "$WORK/guess.jsonl"
timeout 60 "$BIN" generate --model "$MODEL" --controlnet "$CN" --prompts "$WORK/guess.jsonl" --steps 4 --threads 1 --quiet \
  --out "$WORK/guessj" 2> "$WORK/guessj.log" || bad "JSONL guess_mode failed: $(tail -1 "$WORK/guessj.log")"
same_pixels "$WORK/guess/$P" "$WORK/guessj/$P" && ! same_pixels "$WORK/guess/$P" "$WORK/half/$P" \
  && grep -aq "Guess mode: true" "$WORK/guess/$P" \
  && ok "--guess-mode = JSONL guess_mode, differs from the same request without it, recorded in the PNG" \
  || bad "guess mode: flags and JSONL differ, or it changed nothing"
refused guess-alone "guess_mode: only a request with a control_image uses it" --controlnet "$CN" --guess-mode
refused no-cn "runs without a ControlNet (start the run with --controlnet DIR)" --control-image "$GOLD/control_0.png"
python3 -c 'import sys; from PIL import Image; Image.new("RGB", (40, 32)).save(sys.argv[1])' "$WORK/wide.png"
refused size "is 40x32; the image is 32x32" --controlnet "$CN" --control-image "$WORK/wide.png"
mkdir -p "$WORK/badcn"; python3 - "$CN/config.json" "$WORK/badcn/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["cross_attention_dim"] = 64; json.dump(c, open(sys.argv[2], "w"))
PY
refused unfit "does not fit $MODEL/unet/config.json" --controlnet "$WORK/badcn"

# two ControlNets (a reference with controlnet2/): comma lists on the command line = JSONL lists, 1 and 3 ranks alike;
# the second alone (the first entry null) differs from both; a second image on a one-ControlNet run is refused
if [ -d "$GOLD/controlnet2" ]; then
  CN2="$CN,$GOLD/controlnet2"
  run two --controlnet "$CN2" --control-image "$GOLD/control_1.png,$GOLD/control2_1.png" --control-scale 1,0.6 \
    --control-start 0,0.25 --control-end 1,0.75
  printf '%s\n' "{\"prompt\": \"two green triangles\", \"seed\": 6, \"control_image\": [\"$GOLD/control_1.png\", \"$GOLD/control2_1.png\"], \"control_scale\": [1, 0.6], \"control_start\": [0, 0.25], \"control_end\": [1, 0.75]}" \
    "{\"prompt\": \"two green triangles\", \"seed\": 6, \"control_image\": [null, \"$GOLD/control2_1.png\"], \"control_scale\": 0.6}" > "$WORK/two.jsonl"
  TWO=(generate --model "$MODEL" --controlnet "$CN2" --prompts "$WORK/two.jsonl" --steps 4 --threads 1 --batch-invariant
       --quiet --timeout 60)
  timeout 60 "$BIN" "${TWO[@]}" --out "$WORK/two1" 2> "$WORK/two1.log" || bad "two ControlNets (JSONL) failed: $(tail -2 "$WORK/two1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${TWO[@]}" --out "$WORK/two3" 2> "$WORK/two3.log" || bad "two ControlNets on 3 ranks failed"
  same_pngs "$WORK/two1" "$WORK/two3" && ok "two ControlNets: 1 and 3 ranks give the same PNG bytes" || bad "two ControlNets differ across ranks"
  same_pixels "$WORK/two/$P" "$WORK/two1/img-00000-seed6.png" 2>/dev/null || python3 - "$WORK/two/$P" "$WORK/two1/img-00000-seed6.png" <<'PY'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int32) for f in sys.argv[1:3])
sys.exit(0 if np.abs(a - b).max() <= 1 else 1)
PY
  [ $? = 0 ] && ok "comma lists on the command line give the JSONL lists' image (within 1: batch-invariant there)" \
    || bad "command-line lists differ from JSONL lists"
  ! same_pixels "$WORK/two1/img-00000-seed6.png" "$WORK/two1/img-00001-seed6.png" && ! same_pixels "$WORK/half/$P" "$WORK/two/$P" \
    && ok "both ControlNets, the second alone and the first alone give three images" || bad "the ControlNets' inputs changed nothing"
  grep -aq "Control image 2: $GOLD/control2_1.png, Control scale 2: 0.6, Control steps 2: 0.25-0.75" "$WORK/two/$P" \
    && grep -aq "ControlNet: $CN, $GOLD/controlnet2" "$WORK/two/$P" && ok "the PNG records both ControlNets' settings" \
    || bad "PNG parameters lack the second ControlNet"
  refused one-net "control_image (entry 2): $MODEL runs with 1 ControlNet (--controlnet), not 2" --controlnet "$CN" \
    --control-image "$GOLD/control_1.png,$GOLD/control2_1.png"
  refused scale-count "key '--control-scale' has 3 entries for 2 ControlNet inputs" --controlnet "$CN2" \
    --control-image "$GOLD/control_1.png,$GOLD/control2_1.png" --control-scale 1,1,1
else
  echo "note: no second ControlNet in $GOLD (remake it): the two-ControlNet checks are skipped"
fi

# ControlNet on inpainting (a reference with inpaint-model/): the 9-channel inpainting folder with the ControlNet,
# 1 and 3 ranks alike, and the ControlNet changes the inpainted image
if [ -d "$GOLD/inpaint-model" ]; then
  IPC=(generate --model "$GOLD/inpaint-model" --controlnet "$CN" --prompt "two green triangles" --image "$GOLD/start_1.png"
       --mask "$GOLD/mask.png" --control-image "$GOLD/control_1.png" --control-scale 0.8 --seed 6 --steps 4 --threads 1
       --batch-invariant --quiet --timeout 60)
  timeout 60 "$BIN" "${IPC[@]}" --out "$WORK/ipc1" 2> "$WORK/ipc1.log" || bad "ControlNet inpainting failed: $(tail -2 "$WORK/ipc1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${IPC[@]}" --out "$WORK/ipc3" 2> "$WORK/ipc3.log" || bad "3-rank ControlNet inpainting failed"
  timeout 60 "$BIN" "${IPC[@]}" --control-scale 0 --out "$WORK/ipc0" 2> /dev/null || bad "ControlNet inpainting at scale 0 failed"
  same_pngs "$WORK/ipc1" "$WORK/ipc3" && ! same_pixels "$WORK/ipc1/$P" "$WORK/ipc0/$P" \
    && ok "ControlNet on a 9-channel inpainting folder: 1 and 3 ranks alike, the ControlNet changes the image" \
    || bad "ControlNet inpainting: ranks differ or the ControlNet changed nothing"
fi

# an SDXL ControlNet (the reference made with --sdxl): 1 and 3 ranks alike; scale 0 is the plain SDXL image
XLMODEL=$(python3 -c 'import json,sys; x=json.load(open(sys.argv[1])).get("sdxl"); print(x["model"] if x else "")' "$GOLD/golden.json")
if [ -n "$XLMODEL" ] && [ -d "$GOLD/sdxl-controlnet" ]; then
  XL=(generate --model "$XLMODEL" --controlnet "$GOLD/sdxl-controlnet" --prompts "$WORK/jobs.jsonl" --steps 4 --seed 5
      --threads 1 --batch-invariant --quiet --timeout 60)
  timeout 120 "$BIN" "${XL[@]}" --out "$WORK/xl1" 2> "$WORK/xl1.log" || bad "SDXL ControlNet failed: $(tail -2 "$WORK/xl1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${XL[@]}" --out "$WORK/xl3" 2> "$WORK/xl3.log" \
    || bad "SDXL ControlNet on 3 ranks failed: $(tail -2 "$WORK/xl3.log")"
  same_pngs "$WORK/xl1" "$WORK/xl3" && ok "SDXL ControlNet: 1 and 3 ranks give the same PNG bytes" || bad "SDXL ControlNet differs across ranks"
  XONE=(generate --model "$XLMODEL" --prompt "two green triangles" --seed 6 --steps 4 --threads 1 --quiet --timeout 60)
  timeout 60 "$BIN" "${XONE[@]}" --out "$WORK/xlplain" 2> /dev/null
  timeout 60 "$BIN" "${XONE[@]}" --controlnet "$GOLD/sdxl-controlnet" --control-image "$GOLD/control_1.png" \
    --control-scale 0 --out "$WORK/xlzero" 2> /dev/null
  same_pixels "$WORK/xlplain/$P" "$WORK/xlzero/$P" && ! same_pixels "$WORK/xlplain/$P" "$WORK/xl1/img-00001-seed6.png" \
    && ok "SDXL ControlNet: scale 0 gives the plain image, scale 0.5 another" || bad "SDXL ControlNet scale 0/0.5 check"
  refused xl-on-sd "does not fit $MODEL/unet/config.json" --controlnet "$GOLD/sdxl-controlnet"
else
  echo "note: no SDXL ControlNet in $GOLD (make_controlnet_golden.py --sdxl): its checks are skipped"
fi

SCN=$CN; [ -d "$GOLD/controlnet2" ] && SCN="$CN,$GOLD/controlnet2"
serve_up "$WORK/serve.log" --model "$MODEL" --controlnet "$SCN" --steps 4 --threads 1
if [ -n "$URL" ]; then
  python3 - "$URL" "$GOLD/control_1.png" "$WORK/half/$P" "$WORK/wide.png" "$GOLD/control2_1.png" "$WORK/two/$P" \
    "$GOLD/start_0.png" <<'PY' && ok "serve --controlnet: a control_image over HTTP gives the CLI's pixels (two ControlNets: lists, too; a multipart edit with two control_image parts = JSON lists); a wrong size or count is a 400 naming the field" || bad "serve --controlnet"
import base64, io, os, sys
import http_util
from PIL import Image
url, ctl, cli, wide, ctl2, two = sys.argv[1:7]
post = lambda body: http_util.post(url, body)
b64 = lambda f: base64.b64encode(open(f, "rb").read()).decode()
st, r = post({"prompt": "two green triangles", "seed": 6, "control_image": b64(ctl), "controlnet_conditioning_scale": 0.5})
assert st == 200, (st, r)
got = Image.open(io.BytesIO(base64.b64decode(r["data"][0]["b64_json"]))).convert("RGB").tobytes()
assert got == Image.open(cli).convert("RGB").tobytes(), "HTTP image differs from the CLI's"
st, r = post({"prompt": "x", "control_image": b64(wide)})
assert st == 400 and r["error"]["param"] == "control_image" and "40x32" in r["error"]["message"], (st, r)
if os.path.exists(two):  # two ControlNets: lists of images and settings, as diffusers' pipelines take them
    st, r = post({"prompt": "two green triangles", "seed": 6, "control_image": [b64(ctl), b64(ctl2)],
                  "controlnet_conditioning_scale": [1, 0.6], "control_guidance_start": [0, 0.25],
                  "control_guidance_end": [1, 0.75]})
    assert st == 200, (st, r)
    got = Image.open(io.BytesIO(base64.b64decode(r["data"][0]["b64_json"]))).convert("RGB").tobytes()
    assert got == Image.open(two).convert("RGB").tobytes(), "HTTP two-ControlNet image differs from the CLI's"
    st, r = post({"prompt": "x", "control_image": [b64(ctl), b64(ctl2)], "controlnet_conditioning_scale": [1, 2, 3]})
    assert st == 400 and r["error"]["param"] == "controlnet_conditioning_scale", (st, r)
    # images.edit as multipart: one control_image part per ControlNet (and per-ControlNet scales), in order
    import json, urllib.request
    start = sys.argv[7]
    fields = [("prompt", None, b"two green triangles"), ("seed", None, b"6"), ("strength", None, b"0.75"),
              ("image", "start.png", open(start, "rb").read()), ("control_image", "a.png", open(ctl, "rb").read()),
              ("control_image", "b.png", open(ctl2, "rb").read()), ("controlnet_conditioning_scale", None, b"1"),
              ("controlnet_conditioning_scale", None, b"0.6")]
    bnd = "diffpipe-test-boundary"
    body = b"".join((f'--{bnd}\r\nContent-Disposition: form-data; name="{n}"' + (f'; filename="{f}"\r\n'
                     'Content-Type: image/png' if f else "") + "\r\n\r\n").encode() + v + b"\r\n" for n, f, v in fields)
    body += f"--{bnd}--\r\n".encode()
    req = urllib.request.Request(url + "/v1/images/edits", body, {"Content-Type": f"multipart/form-data; boundary={bnd}"})
    with urllib.request.urlopen(req, timeout=60) as h:
        multi = json.loads(h.read())["data"][0]["b64_json"]
    st, r = http_util.post(url, {"prompt": "two green triangles", "seed": 6, "strength": 0.75, "image": b64(start),
                                 "control_image": [b64(ctl), b64(ctl2)], "controlnet_conditioning_scale": [1, 0.6]},
                           "/v1/images/edits")
    assert st == 200, (st, r)
    px = lambda b: Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").tobytes()
    assert px(multi) == px(r["data"][0]["b64_json"]), "multipart control_image parts differ from JSON lists"
PY
else bad "serve --controlnet did not come up: $(tail -2 "$WORK/serve.log")"; fi
kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "controlnet: $passed passed, $fails failed"
[ $fails = 0 ]
