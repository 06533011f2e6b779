#!/usr/bin/env bash
# Installs, builds and runs every test (unit, golden, MPI transport, distributed pipeline, command line).
# Golden tests read $DIFFPIPE_GOLDEN (default ../shared/golden/tiny-sd) and skip when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# the tests' python3 (their PNG and HTTP checks use numpy and Pillow) is the project's virtual environment, whatever
# the machine's own python3 has
export PATH="${DIFFPIPE_VENV:-$PWD/.venv}/bin:$PATH"
# References made here with diffusers/transformers (a few seconds each) when no folder is given and ../shared/golden
# has none, so that their tests (image variations, SDXL, T5, DDPM, DeepFloyd IF, the x4 upscaler, image-to-image,
# LoRA, ControlNet, LCM, UniPC, IP-Adapter, Kandinsky 2.2, Stable Diffusion 3, FLUX.1) run instead of skipping.
GOLD_DIR=${DIFFPIPE_GOLDEN:-$PWD/../shared/golden/tiny-sd}
UNCLIP_DIR=${DIFFPIPE_GOLDEN_UNCLIP:-$(dirname "$GOLD_DIR")/tiny-unclip}
PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python
# make_ref NAME ENV_VAR SCRIPT [ARGS...]: build/golden/NAME by tests/stages/SCRIPT, exported as ENV_VAR (unless that is
# set or ../shared/golden has NAME); a reference newer than every generator script is reused.
make_ref() {
  local name=$1 var=$2 script=$3; shift 3
  [ -n "${!var:-}" ] && return 0
  [ -d "$(dirname "$GOLD_DIR")/$name" ] && return 0
  local out=$PWD/build/golden/$name newest
  newest=$(ls -t tests/stages/*.py | head -1)
  if { [ -f "$out/golden.json" ] && [ "$out/golden.json" -nt "$newest" ]; } ||
     "$PY" "tests/stages/$script" "$@" --out "$out" > "build/golden-$name.log" 2>&1; then
    export "$var=$out"
  else
    echo "note: could not make the $name reference (build/golden-$name.log); its tests will skip"
  fi
}
if [ -d "$UNCLIP_DIR/model" ] && [ ! -d "$(dirname "$UNCLIP_DIR")/tiny-unclip-img2img" ]; then
  make_ref tiny-unclip-img2img DIFFPIPE_GOLDEN_UNCLIP_IMG2IMG make_unclip_img2img_golden.py --src "$UNCLIP_DIR"
fi
if [ -d "$GOLD_DIR/model" ]; then
  VOCAB=$GOLD_DIR/model/tokenizer/vocab.json
  make_ref tiny-sdxl DIFFPIPE_GOLDEN_SDXL make_sdxl_golden.py --src "$GOLD_DIR"
  make_ref tiny-t5 DIFFPIPE_GOLDEN_T5 make_t5_golden.py --clip-vocab "$VOCAB"
  make_ref tiny-ddpm DIFFPIPE_GOLDEN_DDPM make_ddpm_golden.py
  make_ref tiny-samplers DIFFPIPE_GOLDEN_SAMPLERS make_sampler_golden.py --src "$GOLD_DIR"
  make_ref tiny-ip-adapter DIFFPIPE_GOLDEN_IP_ADAPTER make_ip_adapter_golden.py --src "$GOLD_DIR" \
    ${DIFFPIPE_GOLDEN_SDXL:+--sdxl "$DIFFPIPE_GOLDEN_SDXL/model"}
  make_ref tiny-if DIFFPIPE_GOLDEN_IF make_if_golden.py --clip-vocab "$VOCAB"
  make_ref tiny-upscale DIFFPIPE_GOLDEN_UPSCALE make_upscale_golden.py --src "$GOLD_DIR"
  make_ref tiny-img2img DIFFPIPE_GOLDEN_IMG2IMG make_img2img_golden.py --src "$GOLD_DIR" \
    ${DIFFPIPE_GOLDEN_SDXL:+--sdxl "$DIFFPIPE_GOLDEN_SDXL/model"}
  make_ref tiny-lora DIFFPIPE_GOLDEN_LORA make_lora_golden.py --src "$GOLD_DIR" \
    ${DIFFPIPE_GOLDEN_SDXL:+--sdxl "$DIFFPIPE_GOLDEN_SDXL/model"}
  make_ref tiny-controlnet DIFFPIPE_GOLDEN_CONTROLNET make_controlnet_golden.py --src "$GOLD_DIR" \
    ${DIFFPIPE_GOLDEN_SDXL:+--sdxl "$DIFFPIPE_GOLDEN_SDXL/model"}
  make_ref tiny-lcm DIFFPIPE_GOLDEN_LCM make_lcm_golden.py --src "$GOLD_DIR" \
    ${DIFFPIPE_GOLDEN_SDXL:+--sdxl "$DIFFPIPE_GOLDEN_SDXL/model"}
  make_ref tiny-kandinsky DIFFPIPE_GOLDEN_KANDINSKY make_kandinsky_golden.py --src "$GOLD_DIR"
  make_ref tiny-sd3 DIFFPIPE_GOLDEN_SD3 make_sd3_golden.py --src "$GOLD_DIR"
  make_ref tiny-flux DIFFPIPE_GOLDEN_FLUX make_flux_golden.py --src "$GOLD_DIR"
fi
cd build
ctest --output-on-failure -j1 --timeout 1200 "$@"
