# Shared by the cluster shell tests (sourced): MPI as root, pass/fail counters, PNG comparison, the prompts file.
# Needs WORK set; creates it afresh.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # http_util.py
MPIRUN="mpirun --oversubscribe"
rm -rf "$WORK"; mkdir -p "$WORK"
fails=0; passed=0
ok()   { echo "ok: $*"; passed=$((passed+1)); }
bad()  { echo "FAIL: $*"; fails=$((fails+1)); }
same_pngs() {  # same_pngs DIR_A DIR_B: every image of A has a byte-identical twin in B
  local n=0 s=0
  for f in "$1"/img-*.png; do n=$((n+1)); cmp -s "$f" "$2/$(basename "$f")" && s=$((s+1)); done
  [ $n -gt 0 ] && [ $s = $n ]
}
# The placement checks of the model tests: "${COMMON[@]}" (set by the test) on one rank into $WORK/np1, then on other
# placements, each compared with it byte for byte.
one_rank_run() {  # one_rank_run N: the 1-rank run makes N images
  timeout 120 "$BIN" "${COMMON[@]}" --out "$WORK/np1" 2> "$WORK/np1.log" || bad "1-rank run failed: $(tail -2 "$WORK/np1.log")"
  [ "$(ls "$WORK"/np1/img-*.png 2>/dev/null | wc -l)" = "$1" ] && ok "1 rank: $1 images" || bad "1 rank: expected $1 images"
}
same_as_one_rank() {  # same_as_one_rank NAME NP LABEL [ARGS...]: NP ranks with ARGS into $WORK/NAME, the PNGs of np1
  local name=$1 np=$2 label=$3; shift 3
  timeout 180 $MPIRUN -np "$np" "$BIN" "${COMMON[@]}" "$@" --out "$WORK/$name" 2> "$WORK/$name.log" \
    || bad "$label failed: $(tail -2 "$WORK/$name.log")"
  same_pngs "$WORK/np1" "$WORK/$name" && ok "$label: the same PNG bytes as 1 rank" || bad "$label: images differ from 1 rank"
}
prior_placements() {  # the prior models' (Stable unCLIP, Kandinsky 2.2): at 4 ranks the derived placement gives the
                      # prior a rank of its own, and a pipeline file places [prior] alone on rank 1 of 3; each as np1
  same_as_one_rank np4 4 "np 4"
  grep -q "rank 1 \[.*\]: prior(" "$WORK/np4.log" && ! grep -q "rank 1 \[.*\]: prior(.*denoise" "$WORK/np4.log" \
    && ok "np 4: the derived placement gives the prior a rank of its own" || bad "np 4: prior not on its own rank: $(grep 'rank 1' "$WORK/np4.log")"
  cat > "$WORK/pipe.toml" <<'TOML'
[encode]
ranks = [0]
[prior]
ranks = [1]
max_batch = 4
[denoise]
ranks = [2]
[decode]
ranks = [0]
TOML
  same_as_one_rank file3 3 "pipeline file (prior alone on rank 1 of 3)" --pipeline "$WORK/pipe.toml"
}
png_text() {  # png_text FILE: the PNG's text chunks (the "parameters" generate writes)
  python3 - "$1" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
i, text = 8, ""
while i < len(data):
    n = int.from_bytes(data[i:i + 4], "big"); kind = data[i + 4:i + 8]; body = data[i + 8:i + 8 + n]
    if kind in (b"tEXt", b"iTXt"): text += body.decode("latin-1")
    i += 12 + n
print(text)
PY
}
same_pixels() {  # same_pixels A.png B.png: the same decoded pixel rows (the PNG text chunks may differ)
  python3 - "$1" "$2" <<'PY'
import sys, zlib, struct
def pixels(f):
    d = open(f, "rb").read(); i = 8; idat = b""
    while i < len(d):
        n, t = struct.unpack(">I4s", d[i:i + 8]); i += 8
        if t == b"IDAT": idat += d[i:i + n]
        i += n + 4
    return zlib.decompress(idat)
sys.exit(0 if pixels(sys.argv[1]) == pixels(sys.argv[2]) else 1)
PY
}
close_pixels() {  # close_pixels A.png B.png: the same size, every 8-bit value within +-1
  python3 - "$1" "$2" <<'PY'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f).convert("RGB")).astype(int) for f in sys.argv[1:3])
sys.exit(0 if a.shape == b.shape and np.abs(a - b).max() <= 1 else 1)
PY
}
write_mask() {  # write_mask FILE W H X0 Y0 X1 Y1: a W x H greyscale PNG, white in [X0, X1) x [Y0, Y1), black elsewhere
  python3 - "$@" <<'PY'
import sys, zlib, struct
f, w, h, x0, y0, x1, y1 = sys.argv[1], *map(int, sys.argv[2:])
rows = b"".join(b"\0" + bytes(255 if x0 <= x < x1 and y0 <= y < y1 else 0 for x in range(w)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
open(f, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
}
png_size() { python3 -c 'import sys,struct;d=open(sys.argv[1],"rb").read(24);print(*struct.unpack(">II",d[16:24]))' "$1"; }
refused() {  # refused NAME EXPECTED-TEXT ARGS...: "$BIN" "${ONE[@]}" ARGS fails naming EXPECTED-TEXT, no image in $WORK/NAME
  local name=$1 want=$2; shift 2
  if timeout 60 "$BIN" "${ONE[@]}" "$@" --out "$WORK/$name" 2> "$WORK/$name.log"; then bad "$name: accepted"
  elif grep -qF -- "$want" "$WORK/$name.log" && [ -z "$(ls "$WORK/$name" 2>/dev/null | grep '^img-')" ]; then
    ok "$name: refused naming '$want', no image written"
  else bad "$name: unclear refusal: $(tail -1 "$WORK/$name.log")"; fi
}
serve_up() {  # serve_up LOG ARGS...: "$BIN" serve --port 0 ARGS in the background; sets SPID, and URL once healthy ("" if never)
  local log=$1; shift
  "$BIN" serve --port 0 "$@" > "$log" 2>&1 &
  SPID=$!; URL=""
  for i in $(seq 1 300); do
    URL=$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -1)
    [ -n "$URL" ] && curl -sf "$URL/healthz" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  URL=""
}
dit_lora() {  # dit_lora FILE NAME BASE.png: SD3/Flux LoRA FILE fused (--lora, "${ONE[@]}" into $WORK/NAME) changes
              # BASE's image; a JSONL request choosing it per request (--lora-adapters) gets the fused run's pixels
              # (every value within +-1: merged weights and a branch's products round apart), one choosing none
              # BASE's exactly (the same settings as ONE: its --steps and the folder's default guidance)
  local lora=$1 name=$2 base=$3 steps
  steps=$(printf '%s\n' "${ONE[@]}" | grep -A1 -x -- --steps | tail -1)
  run_one "$name" --lora "$lora"
  printf '{"prompt": "a red circle", "seed": 9, "lora": "style"}\n{"prompt": "a red circle", "seed": 9}\n' > "$WORK/$name.jsonl"
  timeout 60 "$BIN" generate --model "$MODEL" --prompts "$WORK/$name.jsonl" --steps "$steps" --width 32 --height 32 \
    --threads 1 --batch-invariant --quiet --lora-adapters "style=$lora" --out "$WORK/$name-adapters" \
    2> "$WORK/$name-adapters.log" || bad "per-request LoRA failed: $(tail -2 "$WORK/$name-adapters.log")"
  [ -f "$WORK/$name/img-00000-seed9.png" ] && ! same_pixels "$WORK/$name/img-00000-seed9.png" "$base" \
    && close_pixels "$WORK/$name/img-00000-seed9.png" "$WORK/$name-adapters/img-00000-seed9.png" \
    && same_pixels "$base" "$WORK/$name-adapters/img-00001-seed9.png" \
    && ok "LoRA $(basename "$lora"): --lora changes the image; a per-request adapter gives the fused pixels (+-1), none the base's" \
    || bad "LoRA $(basename "$lora"): fused, per-request and base images do not relate as expected"
}
dit_img2img() {  # dit_img2img IMAGE: SD3/Flux image-to-image from IMAGE (48x32) on 1 and 3 ranks: the same bytes, the
                 # image's size, the pipelines' default strength 0.6 recorded; then inpainting (a mask) alike
  local I2I=(generate --model "$MODEL" --prompt "a blue square" --image "$1" --seed 3 --steps 5 --threads 1
             --batch-invariant --quiet --timeout 60)
  timeout 60 "$BIN" "${I2I[@]}" --out "$WORK/i2i1" 2> "$WORK/i2i1.log" || bad "img2img failed: $(tail -2 "$WORK/i2i1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${I2I[@]}" --out "$WORK/i2i3" 2> "$WORK/i2i3.log" \
    || bad "3-rank img2img failed: $(tail -2 "$WORK/i2i3.log")"
  same_pngs "$WORK/i2i1" "$WORK/i2i3" && ok "image-to-image: 1 and 3 ranks give the same PNG bytes" \
    || bad "image-to-image differs across ranks"
  [ "$(png_size "$WORK/i2i1/img-00000-seed3.png" 2>/dev/null)" = "48 32" ] \
    && png_text "$WORK/i2i1/img-00000-seed3.png" | grep -aq "Denoising strength: 0.6" \
    && ok "image-to-image keeps the image's size; the pipeline's default strength 0.6 is recorded" \
    || bad "image-to-image size or strength: $(png_text "$WORK/i2i1/img-00000-seed3.png")"
  write_mask "$WORK/mask.png" 48 32 8 8 24 24
  timeout 60 "$BIN" "${I2I[@]}" --mask "$WORK/mask.png" --out "$WORK/inp1" 2> "$WORK/inp1.log" \
    || bad "inpainting failed: $(tail -2 "$WORK/inp1.log")"
  timeout 180 $MPIRUN -np 3 "$BIN" "${I2I[@]}" --mask "$WORK/mask.png" --out "$WORK/inp3" 2> "$WORK/inp3.log" \
    || bad "3-rank inpainting failed: $(tail -2 "$WORK/inp3.log")"
  same_pngs "$WORK/inp1" "$WORK/inp3" && [ -f "$WORK/inp1/img-00000-seed3.png" ] \
    && ! same_pixels "$WORK/inp1/img-00000-seed3.png" "$WORK/i2i1/img-00000-seed3.png" \
    && png_text "$WORK/inp1/img-00000-seed3.png" | grep -aq "Denoising strength: 0.6" \
    && ok "inpainting: 1 and 3 ranks give the same PNG bytes, not image-to-image's; the default strength 0.6 recorded" \
    || bad "inpainting: ranks differ, the mask changed nothing, or the strength is not 0.6"
}
missing_component() {  # missing_component NAME: $MODEL without NAME/ (links to the rest) is refused naming it
  mkdir -p "$WORK/no-$1"; for p in "$MODEL"/*; do [ "$(basename "$p")" = "$1" ] || ln -s "$p" "$WORK/no-$1/"; done
  if timeout 60 "$BIN" generate --model "$WORK/no-$1" --prompt x --out "$WORK/no-$1-out" 2> "$WORK/no-$1.log"; then
    bad "a folder without $1/ accepted"
  else grep -q "$1" "$WORK/no-$1.log" && [ -z "$(ls "$WORK/no-$1-out" 2>/dev/null | grep '^img-')" ] \
    && ok "a folder without $1/ refused naming it, no image written" \
    || bad "missing $1 error unclear: $(tail -1 "$WORK/no-$1.log")"; fi
}
printf 'a photo of a cat\na red circle above a blue square\nthree small triangles\n' > "$WORK/prompts.txt"
