#!/usr/bin/env bash
# Installs, builds and runs every test (unit, golden, MPI transport, distributed pipeline, command line).
# Golden tests read $DIFFPIPE_GOLDEN (default ../shared/golden/tiny-sd) and skip when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd build
ctest --output-on-failure -j1 --timeout 1200
