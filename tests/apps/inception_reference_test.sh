#!/usr/bin/env bash
# `diffpipe eval fid --inception` against pytorch-fid itself: tools/fid_reference.py builds pytorch-fid's FID
# Inception-v3 with random weights (saved as safetensors), computes pool3 features and FID of two image folders
# with pytorch-fid's code; diffpipe must give the same features (PNG loading, 299x299 resize, every block) and
# the same FID (mean, covariance, sqrtm with its checks).
#   inception_reference_test.sh DIFFPIPE_BIN WORKDIR      exit 77 = skipped (reference packages absent)
set -u
BIN=$1; WORK=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${DIFFPIPE_VENV:-$HERE/../../.venv}/bin/python  # scripts/install.sh's environment
[ -x "$PY" ] || PY=python3
$PY -c 'import torch, torchvision, pytorch_fid, scipy, safetensors, PIL' 2>/dev/null || {
  echo "SKIP: $PY lacks torch/torchvision/pytorch_fid/scipy/safetensors/PIL (scripts/install.sh installs them)"
  exit 77
}
rm -rf "$WORK"; mkdir -p "$WORK"
"$BIN" data --out "$WORK/a" --count 24 --seed 5 2>/dev/null && "$BIN" data --out "$WORK/b" --count 24 --seed 6 2>/dev/null \
  || { echo "FAIL: diffpipe data"; exit 1; }
$PY "$HERE/../../tools/fid_reference.py" --weights "$WORK/inception.safetensors" --real "$WORK/a" \
  --generated "$WORK/b" --out "$WORK/ref.json" 2> "$WORK/ref.log" || { echo "FAIL: reference"; tail -5 "$WORK/ref.log"; exit 1; }
"$BIN" eval features --inception "$WORK/inception.safetensors" --images "$WORK/a" --out "$WORK/features.safetensors" \
  > /dev/null || { echo "FAIL: eval features"; exit 1; }
"$BIN" eval fid --inception "$WORK/inception.safetensors" --real "$WORK/a" --generated "$WORK/b" > "$WORK/fid.json" \
  || { echo "FAIL: eval fid"; exit 1; }
$PY - "$WORK" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
w = sys.argv[1]
ref = json.load(open(f"{w}/ref.json"))
ours = json.load(open(f"{w}/fid.json"))
r = np.array(ref["features_real"]); c = load_file(f"{w}/features.safetensors")["features"]
assert c.shape == r.shape == (24, 2048), (c.shape, r.shape)
ferr = np.abs(c - r).max() / np.abs(r).max()
fid_err = abs(ours["fid"] - ref["fid"]) / ref["fid"]
print(f"features: max |diff| / max |ref| = {ferr:.2e}; FID {ours['fid']:.4f} vs pytorch-fid {ref['fid']:.4f} "
      f"(relative {fid_err:.2e})")
ok = ferr < 1e-4 and fid_err < 1e-3 and ours["extractor"] == "inception-v3 pool3"
print("ok" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
