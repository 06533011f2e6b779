#!/usr/bin/env bash
# Installs dependencies (scripts/install.sh) and builds diffpipe into build/ (Release, Ninja, ccache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
TP=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP" > build.configure.log 2>&1 \
  || { cat build.configure.log; exit 1; }
cmake --build build -j"$(nproc)"
