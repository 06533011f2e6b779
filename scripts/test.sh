#!/usr/bin/env bash
# Installs, builds and runs every test (unit, golden, MPI transport, distributed pipeline, command line).
# Golden tests read $DIFFPIPE_GOLDEN (default ../shared/golden/tiny-sd) and skip when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The image-variations reference (Stable unCLIP img2img) is made here with diffusers (about 6 s) when no folder is
# given and ../shared/golden has none: its tests and the cluster checks that use it then run instead of skipping.
GOLD_DIR=${DIFFPIPE_GOLDEN:-$PWD/../shared/golden/tiny-sd}
UNCLIP_DIR=${DIFFPIPE_GOLDEN_UNCLIP:-$(dirname "$GOLD_DIR")/tiny-unclip}
if [ -z "${DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG:-}" ] && [ ! -d "$(dirname "$UNCLIP_DIR")/tiny-unclip-img2img" ] &&
   [ -d "$UNCLIP_DIR/model" ]; then
  PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python
  I2I=$PWD/build/golden/tiny-unclip-img2img
  if [ -f "$I2I/golden.json" ] || "$PY" tests/stages/make_unclip_img2img_golden.py --src "$UNCLIP_DIR" --out "$I2I" > build/golden-i2i.log 2>&1
  then export DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG=$I2I
  else echo "note: could not make the image-variations reference (build/golden-i2i.log); its tests will skip"; fi
fi
# The SDXL reference (tests/stages/make_sdxl_golden.py, about 6 s with diffusers), likewise.
if [ -z "${DIFFPIPE_GOLDEN_SDXL:-}" ] && [ ! -d "$(dirname "$GOLD_DIR")/tiny-sdxl" ] && [ -d "$GOLD_DIR/model" ]; then
  PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python
  XL=$PWD/build/golden/tiny-sdxl
  if [ -f "$XL/golden.json" ] || "$PY" tests/stages/make_sdxl_golden.py --src "$GOLD_DIR" --out "$XL" > build/golden-sdxl.log 2>&1
  then export DIFFPIPE_GOLDEN_SDXL=$XL
  else echo "note: could not make the SDXL reference (build/golden-sdxl.log); its tests will skip"; fi
fi
# The T5 text-encoder reference (tests/stages/make_t5_golden.py, a few seconds), likewise.
if [ -z "${DIFFPIPE_GOLDEN_T5:-}" ] && [ ! -d "$(dirname "$GOLD_DIR")/tiny-t5" ] && [ -d "$GOLD_DIR/model" ]; then
  PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python
  T5=$PWD/build/golden/tiny-t5
  if [ -f "$T5/golden.json" ] || "$PY" tests/stages/make_t5_golden.py --clip-vocab "$GOLD_DIR/model/tokenizer/vocab.json" \
       --out "$T5" > build/golden-t5.log 2>&1
  then export DIFFPIPE_GOLDEN_T5=$T5
  else echo "note: could not make the T5 reference (build/golden-t5.log); its tests will skip"; fi
fi
# DDPMScheduler trajectories (tests/stages/make_ddpm_golden.py, a second), likewise.
if [ -z "${DIFFPIPE_GOLDEN_DDPM:-}" ] && [ ! -d "$(dirname "$GOLD_DIR")/tiny-ddpm" ] && [ -d "$GOLD_DIR/model" ]; then
  PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python
  DDPM=$PWD/build/golden/tiny-ddpm
  if [ -f "$DDPM/golden.json" ] || "$PY" tests/stages/make_ddpm_golden.py --out "$DDPM" > build/golden-ddpm.log 2>&1
  then export DIFFPIPE_GOLDEN_DDPM=$DDPM
  else echo "note: could not make the DDPM reference (build/golden-ddpm.log); its tests will skip"; fi
fi
# The DeepFloyd-IF-layout UNet reference (tests/stages/make_if_golden.py, a few seconds), likewise.
if [ -z "${DIFFPIPE_GOLDEN_IF:-}" ] && [ ! -d "$(dirname "$GOLD_DIR")/tiny-if" ] && [ -d "$GOLD_DIR/model" ]; then
  PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python
  IFD=$PWD/build/golden/tiny-if
  if [ -f "$IFD/golden.json" ] || "$PY" tests/stages/make_if_golden.py --out "$IFD" > build/golden-if.log 2>&1
  then export DIFFPIPE_GOLDEN_IF=$IFD
  else echo "note: could not make the IF UNet reference (build/golden-if.log); its tests will skip"; fi
fi
cd build
ctest --output-on-failure -j1 --timeout 1200 "$@"
