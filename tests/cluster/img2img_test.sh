#!/usr/bin/env bash
# Image-to-image on a Stable Diffusion folder through `diffpipe generate` under mpirun, and the image routes of
# `diffpipe serve` driven by the official openai client:
#   img2img_test.sh DIFFPIPE_BIN WORKDIR   (the folder: $DIFFPIPE_GOLDEN_IMG2IMG, made by tests/stages/make_img2img_golden.py)
# Checks: a JSONL file whose lines name their starting images gives the same PNG bytes on 1 rank, pipelined on 3 ranks
# and with --placement replicas (--batch-invariant); the output has the input's size (40x32); --strength and the
# input image change the output; the JSONL strength key equals the flag; an inline image equals the file; the PNG
# records image and strength; strength without an image, out of [0, 1] or leaving no step, a size other than the
# image's, an image whose sides are not multiples of 8 and a missing file are refused by name, writing nothing.
# Inpainting (--mask): on tiny-sd (blending) and on the 9-channel inpainting folder, 2 images, byte-identical on 1 and 3
# ranks; the PNG records the mask; an inpainting folder without a mask, a mask without an image and a mask of another
# size are refused. Over HTTP: images.edit (a multipart upload) gives the CLI's pixels, with a transparent-region mask
# generate --mask's; JSON edits with base64 too; a mask of another size, a missing or corrupt image, variations on a
# folder without image_encoder/ and a bad strength are 400s naming the field. With
# $DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG (a Stable unCLIP folder with image_encoder/): images.create_variation gives the
# CLI's --image-prompt image. Exit 77 = skipped (folder absent).
set -u
BIN=$1; WORK=$2
GOLD=${DIFFPIPE_GOLDEN_IMG2IMG:-$(dirname "$0")/../../../shared/golden/tiny-img2img}
[ -f "$GOLD/golden.json" ] || { echo "SKIP: image-to-image reference $GOLD is absent (set DIFFPIPE_GOLDEN_IMG2IMG)"; exit 77; }
GOLD=$(cd "$GOLD" && pwd)
MODEL=$GOLD/model
PY=${DIFFPIPE_VENV:-$(dirname "$0")/../../.venv}/bin/python
source "$(dirname "$0")/lib.sh"
printf '{"prompt": "a red circle", "image_prompt": "%s"}\n{"prompt": "two green triangles", "image_prompt": "%s", "seed": 3, "strength": 0.5}\n' \
  "$GOLD/input_0.png" "$GOLD/input_1.png" > "$WORK/jobs.jsonl"
COMMON=(generate --model "$MODEL" --prompts "$WORK/jobs.jsonl" --steps 8 --seed 5 --strength 0.7 --threads 1
        --batch-invariant --quiet --timeout 60)

one_rank_run 2
same_as_one_rank np3 3 "np 3 (encode | denoise | decode)"
same_as_one_rank rep2 2 "np 2 --placement replicas" --placement replicas
[ "$(png_size "$WORK"/np1/img-00000-seed5.png)" = "40 32" ] && ok "40x32 in, 40x32 out" \
  || bad "output size $(png_size "$WORK"/np1/img-00000-seed5.png)"
grep -aq "Image: $GOLD/input_0.png, Denoising strength: 0.7" "$WORK"/np1/img-00000-seed5.png \
  && ok "the PNG records the starting image and strength" || bad "PNG parameters lack image and strength"

ONE=(generate --model "$MODEL" --prompt "two green triangles" --seed 3 --steps 8 --threads 1 --quiet)
timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/input_1.png" --strength 0.5 --out "$WORK/a" 2> "$WORK/a.log" \
  || bad "--image run failed: $(tail -1 "$WORK/a.log")"
same_pixels "$WORK/a/img-00000-seed3.png" "$WORK/np1/img-00001-seed3.png" \
  && ok "a JSONL line's strength gives the flag's image" || bad "JSONL strength differs from --strength"
timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/input_1.png" --strength 0.9 --out "$WORK/b" 2> "$WORK/b.log" || bad "strength 0.9 failed"
same_pixels "$WORK/a/img-00000-seed3.png" "$WORK/b/img-00000-seed3.png" && bad "--strength did not change the image" \
  || ok "--strength 0.9 changes the image"
timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/input_0.png" --strength 0.5 --out "$WORK/c" 2> "$WORK/c.log" || bad "other image failed"
same_pixels "$WORK/a/img-00000-seed3.png" "$WORK/c/img-00000-seed3.png" && bad "the starting image changed nothing" \
  || ok "another starting image gives another output"
# a low strength keeps the image: closer to the input than a high one (mean absolute difference of the 8-bit values)
"$PY" - "$GOLD/input_1.png" "$WORK/a/img-00000-seed3.png" "$WORK/b/img-00000-seed3.png" <<'PY' \
  && ok "strength 0.5 stays closer to the input than 0.9" || bad "strength does not control closeness to the input"
import sys
import numpy as np
from PIL import Image
x, lo, hi = (np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in sys.argv[1:4])
d_lo, d_hi = np.abs(lo - x).mean(), np.abs(hi - x).mean()
print(f"mean |output - input|: strength 0.5 {d_lo:.1f}, strength 0.9 {d_hi:.1f}")
sys.exit(0 if d_lo < d_hi else 1)
PY

refused no-image "strength: only image-to-image uses it" --strength 0.5
refused range "--strength must be in [0, 1]" --image "$GOLD/input_0.png" --strength 1.5
refused no-step "strength: 0.1 x 8 steps leaves no denoising step" --image "$GOLD/input_0.png" --strength 0.1
refused size "image-to-image makes an image of its input's size, 40x32" --image "$GOLD/input_0.png" --width 64
refused missing "$WORK/none.png" --image "$WORK/none.png"
"$PY" -c 'import sys; from PIL import Image; Image.new("RGB", (36, 32), (90, 120, 200)).save(sys.argv[1])' "$WORK/odd.png"
refused odd "is 36x32; image-to-image needs sides that are multiples of 8" --image "$WORK/odd.png"
echo '{"prompt": "x", "image_prompt": "'"$GOLD/input_0.png"'", "strength": "high"}' > "$WORK/badkey.jsonl"
if timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/badkey.jsonl" --quiet --out "$WORK/badkey" 2> "$WORK/badkey.log"; then
  bad "a string strength in JSONL accepted"
else grep -q "badkey.jsonl:1: key 'strength' has the wrong type" "$WORK/badkey.log" && ok "JSONL strength of the wrong type refused by line and key" \
  || bad "unclear: $(tail -1 "$WORK/badkey.log")"; fi

# inline images (data URIs) on 3 ranks give the file's image
python3 - "$GOLD/input_1.png" "$WORK/inline.jsonl" <<'PY'
import base64, json, sys
uri = "data:image/png;base64," + base64.b64encode(open(sys.argv[1], "rb").read()).decode()
open(sys.argv[2], "w").write(json.dumps({"prompt": "two green triangles", "image_prompt": uri, "seed": 3, "strength": 0.5}) + "\n")
PY
timeout 120 $MPIRUN -np 3 "$BIN" generate --model "$MODEL" --prompts "$WORK/inline.jsonl" --steps 8 --threads 1 --quiet \
  --out "$WORK/inline" 2> "$WORK/inline.log" || bad "inline image run failed: $(tail -1 "$WORK/inline.log")"
same_pixels "$WORK/a/img-00000-seed3.png" "$WORK/inline/img-00000-seed3.png" \
  && ok "an inline starting image (data URI) gives the file's image on 3 ranks" || bad "inline image differs from the file's"

# inpainting: a mask on tiny-sd (the kept region blended back) and on the 9-channel inpainting folder, on 1 and 3 ranks
if [ -f "$GOLD/mask_0.png" ] && [ -d "$GOLD/inpaint-model" ]; then
  printf '{"prompt": "a red circle", "image_prompt": "%s", "mask": "%s"}\n{"prompt": "two green triangles", "image_prompt": "%s", "mask": "%s", "strength": 0.75}\n' \
    "$GOLD/input_0.png" "$GOLD/mask_0.png" "$GOLD/input_1.png" "$GOLD/mask_1.png" > "$WORK/inpaint.jsonl"
  for m in model inpaint-model; do
    IP=(generate --model "$GOLD/$m" --prompts "$WORK/inpaint.jsonl" --steps 8 --seed 5 --threads 1 --batch-invariant --quiet)
    timeout 120 "$BIN" "${IP[@]}" --out "$WORK/ip-$m-1" 2> "$WORK/ip-$m-1.log" || bad "inpainting ($m), 1 rank: $(tail -1 "$WORK/ip-$m-1.log")"
    timeout 180 $MPIRUN -np 3 "$BIN" "${IP[@]}" --out "$WORK/ip-$m-3" 2> "$WORK/ip-$m-3.log" || bad "inpainting ($m), 3 ranks failed"
    [ "$(ls "$WORK/ip-$m-1"/img-*.png 2>/dev/null | wc -l)" = 2 ] && same_pngs "$WORK/ip-$m-1" "$WORK/ip-$m-3" \
      && ok "inpainting on $m: 2 images, the same PNG bytes on 1 and 3 ranks" || bad "inpainting on $m: 1 and 3 ranks differ"
  done
  grep -aq "Mask: $GOLD/mask_0.png, Denoising strength: 1" "$WORK/ip-model-1/img-00000-seed5.png" \
    && ok "the PNG records the mask and the default strength 1" || bad "PNG parameters lack the mask"
  same_pixels "$WORK/ip-model-1/img-00000-seed5.png" "$WORK/ip-inpaint-model-1/img-00000-seed5.png" \
    && bad "the 9-channel UNet gave the plain UNet's image" || ok "the inpainting UNet and the plain one differ"
  IONE=(generate --model "$GOLD/inpaint-model" --prompt "a red circle" --seed 5 --steps 8 --threads 1 --quiet)
  if timeout 60 "$BIN" "${IONE[@]}" --image "$GOLD/input_0.png" --out "$WORK/ip-nomask" 2> "$WORK/ip-nomask.log"; then
    bad "an inpainting folder without a mask accepted"
  else grep -q "is an inpainting folder" "$WORK/ip-nomask.log" && ok "an inpainting folder refuses a request without a mask" \
    || bad "unclear: $(tail -1 "$WORK/ip-nomask.log")"; fi
  timeout 60 "$BIN" generate --model "$MODEL" --prompt "two green triangles" --image "$GOLD/input_1.png" \
    --mask "$GOLD/mask_1.png" --strength 0.75 --seed 6 --steps 8 --threads 1 --batch-invariant --quiet \
    --out "$WORK/ip-one" 2> /dev/null \
    || bad "a single inpainting request failed"
  refused mask-no-image "mask: inpainting needs an image" --mask "$GOLD/mask_0.png"
  refused mask-size "the image 40x32" --image "$GOLD/input_0.png" --mask "$WORK/odd.png"
else
  bad "the reference lacks the inpainting files (mask_0.png, inpaint-model/): remake it"
fi

# over HTTP with the openai client: images.edit uploads the PNG as a multipart form
if ! "$PY" -c 'import openai, PIL' 2> /dev/null; then
  echo "note: $PY lacks openai/PIL (scripts/install.sh installs them): HTTP checks skipped"
else
  IPMASK=""; [ -f "$WORK/ip-one/img-00000-seed6.png" ] && IPMASK=$GOLD/mask_1.png
  # serve batches requests as they come: both sides batch-invariant, so its n=2 edit and a single JSON edit are the
  # CLI's image whatever the batches
  timeout 60 "$BIN" "${ONE[@]}" --image "$GOLD/input_1.png" --strength 0.5 --batch-invariant --out "$WORK/a-bi" \
    2> "$WORK/a-bi.log" || bad "--batch-invariant run failed: $(tail -1 "$WORK/a-bi.log")"
  serve_up "$WORK/serve.log" --model "$MODEL" --steps 8 --threads 1 --batch-invariant
  if [ -n "$URL" ]; then
    "$PY" -W ignore::DeprecationWarning - "$URL" "$GOLD/input_1.png" "$WORK/a-bi/img-00000-seed3.png" "$WORK/odd.png" \
      ${IPMASK:+"$IPMASK" "$WORK/ip-one/img-00000-seed6.png" "$GOLD/input_1.png"} <<'PY' \
      && ok "serve: images.edit (multipart; with a mask: inpainting) and JSON edits give the CLI's images; bad uploads are 400s naming the field" \
      || bad "serve: image edits"
import base64, io, json, sys, urllib.error, urllib.request
import openai
from PIL import Image
url, inp, cli = sys.argv[1:4]
c = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
want = Image.open(cli).convert("RGB").tobytes()
px = lambda b64: Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
r = c.images.edit(image=open(inp, "rb"), prompt="two green triangles", n=2, response_format="b64_json",
                  extra_body={"seed": 3, "strength": 0.5})
assert len(r.data) == 2 and px(r.data[0].b64_json).size == (40, 32), r
assert px(r.data[0].b64_json).tobytes() == want, "images.edit differs from generate --image"
assert px(r.data[1].b64_json).tobytes() != want, "the second image (seed 4) equals the first"
body = json.dumps({"prompt": "two green triangles", "seed": 3, "strength": 0.5,
                   "image": base64.b64encode(open(inp, "rb").read()).decode()}).encode()
with urllib.request.urlopen(urllib.request.Request(url + "/v1/images/edits", body, {"Content-Type": "application/json"}), timeout=60) as h:
    assert px(json.loads(h.read())["data"][0]["b64_json"]).tobytes() == want, "JSON edits differ"
def refused(call, param, text):
    try:
        call()
    except openai.BadRequestError as e:
        err = e.body if isinstance(e.body, dict) and "param" in e.body else e.body.get("error", {})
        assert err.get("param") == param and text in err.get("message", ""), (param, e.body)
        return
    raise AssertionError(f"accepted: {param}")
refused(lambda: c.images.edit(image=open(inp, "rb"), mask=open(sys.argv[4], "rb"), prompt="x"), "mask", "is 36x32, the image 40x32")
if len(sys.argv) > 5:  # inpainting: the mask uploaded with the image gives generate --mask's image
    mask, ip_cli = sys.argv[5], sys.argv[6]
    r = c.images.edit(image=open(sys.argv[7], "rb"), mask=open(mask, "rb"), prompt="two green triangles",
                      response_format="b64_json", extra_body={"seed": 6, "strength": 0.75, "num_inference_steps": 8})
    assert px(r.data[0].b64_json).tobytes() == Image.open(ip_cli).convert("RGB").tobytes(), "inpainting over HTTP differs"
refused(lambda: c.images.edit(image=open(inp, "rb"), prompt="x", extra_body={"strength": "high"}), "strength", "must be a number")
refused(lambda: c.images.edit(image=open(inp, "rb"), prompt="x", extra_body={"strength": 0.01}), "strength", "leaves no denoising step")
refused(lambda: c.images.edit(image=io.BytesIO(b"not a png"), prompt="x"), "image", "not a PNG")
refused(lambda: c.images.create_variation(image=open(inp, "rb")), "image", "makes no image variations")
req = urllib.request.Request(url + "/v1/images/edits", json.dumps({"prompt": "x"}).encode(), {"Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=60); raise AssertionError("edits without an image accepted")
except urllib.error.HTTPError as e:
    err = json.loads(e.read())["error"]
    assert e.code == 400 and err["param"] == "image" and "'image' is required" in err["message"], err
PY
  else bad "serve did not come up: $(tail -2 "$WORK/serve.log")"; fi
  kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null

  # variations: a Stable unCLIP folder with image_encoder/ varies an image alone (no prompt)
  UNCLIP=${DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG:-$(dirname "$0")/../../../shared/golden/tiny-unclip-img2img}
  if [ -d "$UNCLIP/model/image_encoder" ]; then
    UIN=$(ls "$UNCLIP"/*.png | head -1)
    timeout 60 "$BIN" generate --model "$UNCLIP/model" --prompt "" --image-prompt "$UIN" --seed 7 --steps 8 --threads 1 \
      --quiet --out "$WORK/var" 2> "$WORK/var.log" || bad "unCLIP --image-prompt with an empty prompt failed: $(tail -1 "$WORK/var.log")"
    serve_up "$WORK/serve-unclip.log" --model "$UNCLIP/model" --steps 8 --threads 1
    if [ -n "$URL" ]; then
      "$PY" -W ignore::DeprecationWarning - "$URL" "$UIN" "$WORK/var/img-00000-seed7.png" <<'PY' \
        && ok "serve: images.create_variation on Stable unCLIP gives the CLI's --image-prompt image; a prompt is refused" \
        || bad "serve: variations"
import base64, io, sys
import openai
from PIL import Image
url, inp, cli = sys.argv[1:4]
c = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
r = c.images.create_variation(image=open(inp, "rb"), response_format="b64_json", extra_body={"seed": 7})
got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB").tobytes()
assert got == Image.open(cli).convert("RGB").tobytes(), "variation differs from generate --image-prompt"
try:
    c.images.create_variation(image=open(inp, "rb"), extra_body={"prompt": "a cat"})
    raise AssertionError("a prompt accepted")
except openai.BadRequestError as e:
    assert "variations take no prompt" in str(e.body), e.body
PY
    else bad "serve (unCLIP) did not come up: $(tail -2 "$WORK/serve-unclip.log")"; fi
    kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null
  else
    echo "note: no Stable unCLIP image-variations folder ($UNCLIP): the variations check is skipped"
  fi
fi

echo "img2img: $passed passed, $fails failed"
[ $fails = 0 ]
