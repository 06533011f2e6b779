#!/usr/bin/env bash
# Installs dependencies (scripts/install.sh) and builds diffpipe into build/ (Release, Ninja, ccache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${DIFFPIPE_VENV:-$PWD/.venv}/bin/python  # made by install.sh
TP=$("$PY" -c 'import torch;print(torch.utils.cmake_prefix_path)')
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP" > build.configure.log 2>&1 \
  || { cat build.configure.log; exit 1; }
cmake --build build -j"$(nproc)"
