#!/usr/bin/env bash
# One call on the GPU machine: build against its LibTorch+CUDA, then check and time. Writes $OUT/gpu_log.txt.
#   bash scripts/gpu_prepare.sh   (here, once)   then the device tool with carry [".gpu"]:
#   bash scripts/gpu_check.sh     (GPU_CHECK_PARTS=golden,speed by default; also transport,pipeline,sd15,scheduler)
# Libraries the GPU image lacks (ICU, libpng, nlohmann-json, GoogleTest headers) come from .gpu/deps.tar.xz,
# built from this project's Debian machine; the reference folder from .gpu/golden; diffusers' wheel from .gpu/wheels.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
LOG=$OUT/gpu_log.txt
exec > >(tee -a "$LOG") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }
# GPU_CHECK_PARTS: which parts to run after the build (default: all)
PARTS=${GPU_CHECK_PARTS:-golden,speed}
want() { case ",$PARTS," in *",$1,"*) return 0;; *) return 1;; esac; }
ROOT=$PWD
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN="mpirun --oversubscribe"
step "machine"; nvidia-smi -L; nproc; python3 -c 'import torch;print(torch.__version__, torch.cuda.get_device_name(0))'
step "deps"
tar -C .gpu -xJf .gpu/deps.tar.xz
DEPS=$ROOT/.gpu/deps
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
ZL=$(ls /usr/lib/x86_64-linux-gnu/libz.so /usr/lib/x86_64-linux-gnu/libz.so.1 2>/dev/null | head -1)
TP=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
step "configure + build"
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP;$DEPS" \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DZLIB_LIBRARY="$ZL" -DZLIB_INCLUDE_DIR="$DEPS/include" > "$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
grep -E "diffpipe:" "$OUT/configure.log"
cmake --build build-gpu -j16 > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" -A5 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
B=build-gpu
export DIFFPIPE_GOLDEN=$ROOT/.gpu/golden/tiny-sd
if want golden; then
step "golden checks: cpu float32, cuda float32, cuda float16, cuda bfloat16"
timeout 120 $B/tests/test_stages --gtest_filter='Golden.*' 2>&1 | grep -E "golden\]|OK|FAILED|PASSED"
for dt in float32 float16 bfloat16; do
  echo "--- cuda $dt"
  DIFFPIPE_TEST_DEVICE=cuda DIFFPIPE_TEST_DTYPE=$dt timeout 120 $B/tests/test_stages --gtest_filter='Golden.*' 2>&1 \
    | grep -E "golden\]|OK|FAILED|PASSED|Failure|Which|rel_err"
done
fi
if want transport; then
step "transport suite: NCCL self-send (1 rank), MPI (2 ranks)"
timeout 120 $MPIRUN -np 1 $B/tests/test_transport 2>&1 | grep -E "OK|FAILED|PASSED|SKIPPED \]" | grep -v "^\[  SKIPPED" | head -30
timeout 120 $MPIRUN -np 2 $B/tests/test_transport 2>&1 | grep -E "PASSED|FAILED" | head -4
step "transport benchmarks"
timeout 120 $MPIRUN -np 1 $B/benchmarks/bench_transport --transport nccl --device cuda --iters 200
timeout 120 $MPIRUN -np 2 $B/benchmarks/bench_transport --transport mpi --device cuda --iters 200
timeout 120 $MPIRUN -np 2 $B/benchmarks/bench_transport --transport mpi --device cpu --iters 200
fi
if want pipeline; then
step "pipeline on the GPU: 1 rank vs 3 processes sharing the GPU (MPI transport), float16, reference model"
G=$DIFFPIPE_GOLDEN/model
for np in 1 3; do
  timeout 180 $MPIRUN -np $np $B/apps/diffpipe generate --model $G --prompt "a photo of a cat" --prompt "a red circle" \
    --images 3 --steps 12 --device cuda --dtype float16 --max-batch 1 --out $OUT/gpu-np$np --quiet --no-contact-sheet 2>&1 | tail -2
done
same=0; for f in $OUT/gpu-np1/img-*.png; do cmp -s $f $OUT/gpu-np3/$(basename $f) && same=$((same+1)); done
echo "np3 vs np1 (cuda float16, max_batch 1): $same/6 images byte-identical"
rm -rf $OUT/gpu-np1 $OUT/gpu-np3
fi
if want sd15 || want scheduler || want speed; then
t0=$(date +%s); $B/apps/diffpipe init-model --out /tmp/sd15 --preset sd15 --save-dtype float16; echo "init-model: $(( $(date +%s) - t0 )) s"
fi
if want sd15; then
step "pipeline throughput: SD 1.5 architecture (random weights), 512x512, float16"
for np in 1 3; do
  echo "--- $np rank(s)"
  timeout 240 $MPIRUN -np $np $B/benchmarks/bench_pipeline --model /tmp/sd15 --requests 8 --steps 20 --device cuda \
    --dtype float16 --max-batch 8
done
fi
if want scheduler; then
step "scheduler: Poisson arrivals, step vs static vs one-at-a-time, SD 1.5 architecture 512x512 float16"
timeout 400 $B/benchmarks/bench_scheduler --model /tmp/sd15 --requests 24 --device cuda --dtype float16 --rates 0.5,1,2,4
fi
if want speed; then
step "vs diffusers (eager and torch.compile): SD 1.5 architecture, 512 px, float16, guidance 7.5"
pip install --quiet --no-deps .gpu/wheels/diffusers-*.whl 2>&1 | tail -1
VS="python3 benchmarks/vs_diffusers.py --model /tmp/sd15 --device cuda --dtype float16 --size 512 --bench $B/benchmarks/bench_sd"
echo "--- batch 1: denoising steps/s with guidance (target >= 105 on an H100), UNet and VAE alone"
timeout 240 $VS --images 1 --steps 50 --parts loop,unet,vae --rounds 3 --compile --json $OUT/speed_b1.json 2>&1 | grep -v -E "Loading|deprecat|accelerate"
echo "--- batch 8 x 50 steps: images/s end to end (target >= 1.2x diffusers + torch.compile)"
timeout 240 $VS --images 8 --steps 50 --parts e2e --rounds 2 --compile --json $OUT/speed_b8.json 2>&1 | grep -v -E "Loading|deprecat|accelerate"
fi
step "done"
