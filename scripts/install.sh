#!/usr/bin/env bash
# Installs everything diffpipe needs to build and test, idempotently:
#   - Debian packages (Open MPI, Boost, nlohmann-json, toml++, CLI11, ICU, libpng, GoogleTest,
#     ccache, ninja)
#   - LibTorch from PyPI's `torch` package at a pinned version (CMake finds it via torch.utils.cmake_prefix_path).
# The product never runs Python; Python only hosts LibTorch's C++ libraries and the reference packages tests and
# benchmarks compare against. They live in a virtual environment inside the project, .venv/ (ignored by git;
# DIFFPIPE_VENV overrides), since Debian's own python3 refuses `pip install` (PEP 668). The environment sees the
# base interpreter's packages, so a torch already installed there is used as is.
set -euo pipefail
TORCH_VERSION="${DIFFPIPE_TORCH_VERSION:-2.11.0}"

pkgs=(build-essential cmake ninja-build ccache pkg-config git
      libopenmpi-dev openmpi-bin libboost-dev nlohmann-json3-dev libicu-dev libpng-dev zlib1g-dev
      libgtest-dev libgmock-dev python3-pip python3-venv time libcli11-dev libtomlplusplus-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[install] apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${DIFFPIPE_VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] virtual environment $VENV"
  ${PYTHON:-python3} -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
have=$($PY -c 'import torch;print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" != "$TORCH_VERSION" ]; then
  echo "[install] torch==$TORCH_VERSION from PyPI (LibTorch C++ libraries)"
  $PY -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
# Reference packages for tests and tools only, never for the product: numpy; pytorch-fid (its Inception-v3
# for the FID reference test) with the torchvision that matches the pinned torch, scipy, Pillow, safetensors.
$PY -c 'import numpy' 2>/dev/null || $PY -m pip install --quiet --disable-pip-version-check numpy
if ! $PY -c 'import torchvision, pytorch_fid, scipy, PIL, safetensors' 2>/dev/null; then
  echo "[install] reference packages for tests: torchvision, pytorch-fid, scipy, pillow, safetensors"
  $PY -m pip install --quiet --disable-pip-version-check --no-deps "torchvision==${DIFFPIPE_TORCHVISION_VERSION:-0.26.0}" \
      "pytorch-fid==0.3.0" && $PY -m pip install --quiet --disable-pip-version-check scipy pillow safetensors \
    || echo "[install] warning: reference packages unavailable; tests/apps/inception_reference_test.sh will skip"
fi
# The serving test's client nobody here wrote: the official openai package (tests/apps/serve_test.sh).
if ! $PY -c 'import openai' 2>/dev/null; then
  echo "[install] reference client for tests: openai"
  $PY -m pip install --quiet --disable-pip-version-check "openai==${DIFFPIPE_OPENAI_VERSION:-3.57.0}" \
    || echo "[install] warning: openai unavailable; tests/apps/serve_test.sh will skip"
fi
# The side-by-side benchmark's reference (benchmarks/vs_diffusers.py): diffusers + transformers, pinned.
if ! $PY -c 'import diffusers, transformers' 2>/dev/null; then
  echo "[install] reference packages for benchmarks: diffusers, transformers"
  $PY -m pip install --quiet --disable-pip-version-check "diffusers==${DIFFPIPE_DIFFUSERS_VERSION:-0.42.1}" \
      "transformers==${DIFFPIPE_TRANSFORMERS_VERSION:-5.24.0}" \
    || echo "[install] warning: diffusers/transformers unavailable; benchmarks/vs_diffusers.py will not run"
fi
# SentencePiece (and protobuf, which transformers needs to read spiece.model): tests/stages/make_t5_golden.py
# makes a spiece.model reference with them.
if ! $PY -c 'import sentencepiece, google.protobuf' 2>/dev/null; then
  $PY -m pip install --quiet --disable-pip-version-check "sentencepiece==${DIFFPIPE_SENTENCEPIECE_VERSION:-0.2.3}" \
      "protobuf==${DIFFPIPE_PROTOBUF_VERSION:-7.36.2}" \
    || echo "[install] warning: sentencepiece unavailable; the spiece.model tokenizer check will skip"
fi
# peft: diffusers' LoRA loading, which tests/stages/make_lora_golden.py uses to make the LoRA reference.
if ! $PY -c 'import peft' 2>/dev/null; then
  $PY -m pip install --quiet --disable-pip-version-check "peft==${DIFFPIPE_PEFT_VERSION:-0.21.2}" \
    || echo "[install] warning: peft unavailable; the LoRA golden tests will skip"
fi
echo "[install] ok: torch $($PY -c 'import torch;print(torch.__version__)') at $($PY -c 'import torch;print(torch.utils.cmake_prefix_path)')"
