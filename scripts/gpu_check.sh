#!/usr/bin/env bash
# One call on the GPU machine: build against its LibTorch+CUDA, then check and time. Writes $OUT/gpu_log.txt.
#   bash scripts/gpu_prepare.sh   (here, once)   then the device tool with carry [".gpu"]:
#   bash scripts/gpu_check.sh     (GPU_CHECK_PARTS=golden,variants,vs_b1,vs_b8 by default; also transport,
#                                  pipeline, sd15, scheduler, sdxl, plan; dit: SD3 / FLUX.1 golden checks on CUDA
#                                  (references made there); profile: one UNet / VAE call of each side
#                                  traced, GPU time by kernel kind; switches: diffpipe's UNet and VAE call per
#                                  environment switch (SWITCHES="A=0 B=1"); now: diffpipe's kernels by kind and
#                                  batch 8 end to end, alone). The build is kept in build-gpu/ while the machine
#                                  is warm (~30 s after a call); a fresh machine starts in ~40 s.
# With 15 minutes of device time a session (2026-11-28: three calls fitted, see docs/results.md):
#   GOLDEN_DTYPES=float16 VS_B1_COMPILE= VS_B8_ROUNDS=1 GPU_CHECK_PARTS=golden,switches,vs_b1,vs_b8 (about 5 min:
#   build 76 s, init-model 33 s, torch.compile of the batch-16 UNet and the VAE inside vs_b8, which gets the time
#   left of GPU_CHECK_BUDGET_S), and GPU_CHECK_PARTS=profile (about 3.5 min) when a change needs a breakdown.
# Libraries the GPU image lacks (ICU, libpng, nlohmann-json, GoogleTest headers) come from .gpu/deps.tar.xz,
# built from this project's Debian machine; the reference folder from .gpu/golden; diffusers' wheel from .gpu/wheels.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
LOG=$OUT/gpu_log.txt
exec > >(tee -a "$LOG") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }
# GPU_CHECK_PARTS: which parts to run after the build (default: all)
PARTS=${GPU_CHECK_PARTS:-golden,variants,vs_b1,vs_b8}
want() { case ",$PARTS," in *",$1,"*) return 0;; *) return 1;; esac; }
ROOT=$PWD
T_START=$(date +%s)
left() { echo $(( ${GPU_CHECK_BUDGET_S:-570} - ($(date +%s) - T_START) )); }  # seconds left of this call
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN="mpirun --oversubscribe"
step "machine"; nvidia-smi -L; nproc; python3 -c 'import torch;print(torch.__version__, torch.cuda.get_device_name(0))'
step "deps"
tar -C .gpu -xJf .gpu/deps.tar.xz
mkdir -p .gpu/golden && tar -C .gpu/golden -xJf .gpu/golden.tar.xz
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
# Only what the parts asked for use (the whole tree takes longer): the app, the stage tests, the benchmarks.
TARGETS="diffpipe bench_sd"
want golden && TARGETS="$TARGETS test_stages"
want transport && TARGETS="$TARGETS test_transport bench_transport"
want sd15 && TARGETS="$TARGETS bench_pipeline"
want scheduler && TARGETS="$TARGETS bench_scheduler"
cmake --build build-gpu -j16 --target $TARGETS > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" -A5 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
B=build-gpu
export DIFFPIPE_GOLDEN=$ROOT/.gpu/golden/tiny-sd
for r in SDXL:tiny-sdxl T5:tiny-t5 IF:tiny-if DDPM:tiny-ddpm UPSCALE:tiny-upscale; do  # the generated references, when they travelled
  [ -d "$ROOT/.gpu/golden/${r#*:}" ] && export "DIFFPIPE_GOLDEN_${r%%:*}=$ROOT/.gpu/golden/${r#*:}"
done
if want golden; then
step "golden checks (and CUDA graphs / fused kernels): cuda float16, float32, bfloat16"
for dt in ${GOLDEN_DTYPES:-float16 float32 bfloat16}; do
  echo "--- cuda $dt"
  DIFFPIPE_TEST_DEVICE=cuda DIFFPIPE_TEST_DTYPE=$dt timeout 120 $B/tests/test_stages --gtest_filter="${GOLDEN_FILTER:-Golden*:Cuda.*}" 2>&1 \
    | grep -E "golden[-a-z0-9]*\]|cuda\]|OK|FAILED|PASSED|Failure|Which|rel_err|differs|Expected|actual"
done
echo "--- cuda float16, the residual kernel and cuBLASLt epilogue on (DIFFPIPE_FUSED_RESIDUAL=1, off by default)"
DIFFPIPE_FUSED_RESIDUAL=1 DIFFPIPE_TEST_DEVICE=cuda DIFFPIPE_TEST_DTYPE=float16 timeout 120 $B/tests/test_stages \
  --gtest_filter='Golden.*' 2>&1 | grep -E "golden[-a-z0-9]*\]|OK|FAILED|PASSED|Failure|Which|rel_err|differs|Expected|actual"
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
if want sd15 || want scheduler || want variants || want vs_b1 || want vs_b8 || want plan || want profile || want switches || want now; then
# kept on a warm machine between calls (34 s to write)
[ -f /tmp/sd15/model_index.json ] || { t0=$(date +%s); $B/apps/diffpipe init-model --out /tmp/sd15 --preset sd15 --save-dtype float16; echo "init-model: $(( $(date +%s) - t0 )) s"; }
# The same folder with "force_upcast": false: the VAE decodes in float16, as diffusers' StableDiffusionPipeline
# always does (it ignores force_upcast; only its SDXL pipelines upcast). The fair batch-8 comparison uses it.
if [ ! -f /tmp/sd15-vae16/vae/config.json ]; then
  mkdir -p /tmp/sd15-vae16/vae
  for p in /tmp/sd15/*; do [ "$(basename $p)" = vae ] || ln -s $p /tmp/sd15-vae16/; done
  ln -s /tmp/sd15/vae/diffusion_pytorch_model.safetensors /tmp/sd15-vae16/vae/
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["force_upcast"]=False; json.dump(c,open(sys.argv[2],"w"),indent=1)' \
    /tmp/sd15/vae/config.json /tmp/sd15-vae16/vae/config.json
fi
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
if want variants; then
step "diffpipe variants, SD 1.5 architecture 512 px float16 (bench_sd alone; each line one process)"
# graphs, fused kernels and (16-bit) channels-last on by default; DIFFPIPE_*=0 turns one off; cuDNN autotuning opts in
# (at batch 8 through the pipeline it autotunes every new batch shape: 0.25 img/s and 35 GiB on an H100)
variant() {  # name, env..., then bench_sd args after --
  local name=$1; shift; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" timeout 120 $B/benchmarks/bench_sd --model /tmp/sd15 --size 512 --device cuda --dtype float16 \
    --guidance 7.5 "$@" > $OUT/v.json 2> $OUT/v.err || { echo "$name: FAILED"; tail -3 $OUT/v.err; return; }
  local images; images=$(echo "$@" | sed -E 's/.*--images ([0-9]+).*/\1/')
  python3 - "$name" "$OUT/v.json" "$images" <<'PY'
import json, sys
name, f, images = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.loads(open(f).read().strip().splitlines()[-1])
out = [f"{name:<28}"]
if "loop_s" in d: out.append(f"loop {max(d['loop_steps_per_s']):7.2f} steps/s")
if "unet_s" in d: out.append(f"unet {1000 * min(d['unet_s']):7.2f} ms")
if "e2e_s" in d: out.append(f"e2e {images / min(d['e2e_s']):6.3f} img/s")
out.append(f"peak {d['peak_bytes'] / 2**30:5.2f} GiB")
print("  ".join(out), flush=True)
PY
  grep -i "warn" $OUT/v.err | head -2
}
B1="--images 1 --steps 50 --parts loop,unet --rounds 3"
B8="--images 8 --steps 50 --parts e2e --rounds 2"
echo "--- batch 1 (guidance: UNet batch 2), 50 steps"
variant "b1 default" X=1 -- $B1
variant "b1 no graphs" DIFFPIPE_CUDA_GRAPHS=0 -- $B1
variant "b1 no fused kernels" DIFFPIPE_FUSED_KERNELS=0 -- $B1
variant "b1 none (before)" DIFFPIPE_CUDA_GRAPHS=0 DIFFPIPE_FUSED_KERNELS=0 DIFFPIPE_CHANNELS_LAST=0 -- $B1
variant "b1 +cudnn benchmark" DIFFPIPE_CUDNN_BENCHMARK=1 -- $B1
variant "b1 NCHW" DIFFPIPE_CHANNELS_LAST=0 -- $B1
variant "b1 ATen NHWC GroupNorm" DIFFPIPE_FUSED_NHWC=0 -- $B1
echo "--- batch 8 (UNet batch 16), 50 steps, end to end"
variant "b8 default" X=1 -- $B8
variant "b8 none (before)" DIFFPIPE_CUDA_GRAPHS=0 DIFFPIPE_FUSED_KERNELS=0 DIFFPIPE_CHANNELS_LAST=0 -- $B8
variant "b8 NCHW" DIFFPIPE_CHANNELS_LAST=0 -- $B8
variant "b8 ATen NHWC GroupNorm" DIFFPIPE_FUSED_NHWC=0 -- $B8
variant "b8 VAE float16" X=1 -- $B8 --model /tmp/sd15-vae16
fi
if want plan; then
step "placement planning: SD 1.5 architecture profile (512 px, float16, 50 steps), a plan for 16 x 8 GPUs, prediction vs measured"
timeout 300 $B/apps/diffpipe profile --model /tmp/sd15 --device cuda --dtype float16 --steps 50 --batches 1,2,4,8,16 \
  --out $OUT/profile_sd15.json 2>&1 | tail -25
$B/apps/diffpipe plan --profile $OUT/profile_sd15.json --nodes 16 --ranks-per-node 8 --device-memory-gib 80 --top 8 \
  --out $OUT/plan_128.toml --json $OUT/plan_128.json
timeout 240 $B/apps/diffpipe bench --model /tmp/sd15 --device cuda --dtype float16 --images 16 --steps 50 --rates 1,2 \
  --predict $OUT/profile_sd15.json --out $OUT/bench_predict.json 2>&1 | grep "bench:"
fi
if want sdxl; then
step "SDXL base architecture (random weights), 1024 px, float16, batch 1, 20 DDIM steps: vs diffusers eager"
[ -f /tmp/sdxl/model_index.json ] || { t0=$(date +%s); $B/apps/diffpipe init-model --out /tmp/sdxl --preset sdxl --save-dtype float16; echo "init-model sdxl: $(( $(date +%s) - t0 )) s"; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/diffusers-*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/site timeout 400 python3 benchmarks/vs_diffusers.py --model /tmp/sdxl --device cuda --dtype float16 \
  --size 1024 --images 1 --steps 20 --parts loop,unet,vae --rounds 2 --bench $B/benchmarks/bench_sd \
  --json $OUT/speed_sdxl.json 2>&1 | grep -v -E "Loading|deprecat|accelerate|it/s\]"
fi
if want dit; then
step "SD3 and FLUX.1 on CUDA: their tiny references made here (diffusers from the wheel, ~20 s), golden checks"
# (their random weights do not compress: made on the machine instead of carried, from the tiny-sd folder's tokenizer)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/diffusers-*.whl 2>&1 | tail -1
for r in sd3 flux; do
  [ -f /tmp/tiny-$r/golden.json ] || PYTHONPATH=/tmp/site timeout 120 python3 tests/stages/make_${r}_golden.py \
    --src "$DIFFPIPE_GOLDEN" --out /tmp/tiny-$r > $OUT/make_$r.log 2>&1 || { echo "make_${r}_golden failed"; tail -3 $OUT/make_$r.log; }
done
for dt in ${DIT_DTYPES:-float32 bfloat16 float16}; do
  echo "--- cuda $dt"
  DIFFPIPE_GOLDEN_SD3=/tmp/tiny-sd3 DIFFPIPE_GOLDEN_FLUX=/tmp/tiny-flux DIFFPIPE_TEST_DEVICE=cuda DIFFPIPE_TEST_DTYPE=$dt \
    timeout 150 $B/tests/test_stages --gtest_filter='GoldenSd3.*:GoldenFlux.*' 2>&1 \
    | grep -E "golden-[a-z0-9]*\]|OK|FAILED|PASSED|Failure|Expected|actual"
done
fi
if want vs_b1 || want vs_b8 || want profile; then
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/diffusers-*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site
VS="python3 benchmarks/vs_diffusers.py --model /tmp/sd15 --device cuda --dtype float16 --size 512 --bench $B/benchmarks/bench_sd"
fi
if want profile; then
step "where the GPU time goes: one UNet call and one VAE decode, diffpipe vs diffusers eager (kernel traces)"
# batch 8 (UNet batch 16, VAE 8 latents, both VAEs in float16), then batch 1 (UNet batch 2); traces in $OUT/traces.tar.xz
timeout 240 $VS --images 8 --steps 2 --parts unet,vae --rounds 3 --model /tmp/sd15-vae16 --trace /tmp/trace_b8 \
  --json $OUT/profile_b8.json 2>&1 | grep -v -E "Loading|deprecat|accelerate|it/s\]|should be kept in float32"
timeout 120 $VS --images 1 --steps 2 --parts unet --rounds 3 --trace /tmp/trace_b1 --json $OUT/profile_b1.json 2>&1 \
  | grep -v -E "Loading|deprecat|accelerate|it/s\]|should be kept in float32"
tar -C /tmp -cJf $OUT/traces.tar.xz trace_b8 trace_b1 2>/dev/null; ls -la $OUT/traces.tar.xz
fi
if want switches; then
step "diffpipe alone, one UNet call (batch 16) and one VAE decode (8 latents, float16), by switch"
cat > /tmp/unet_vae_line.py <<'PY'
import json, sys
d = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"{sys.argv[1]:<30} unet b16 {1000 * min(d['unet_s']):7.2f} ms  vae b8 {1000 * min(d['vae_s']):7.2f} ms  "
      f"peak {d['peak_bytes'] / 2**30:5.2f} GiB", flush=True)
PY
# the defaults first (X=1: no switch), then the folded biases and the fused q/k/v projection off, the residual kernel
# (off by default until measured) on, and cuBLAS's reduced-precision reductions allowed (PyTorch's default)
for v in ${SWITCHES:-X=1 DIFFPIPE_FOLD_BIAS=0 DIFFPIPE_FUSED_QKV=0 DIFFPIPE_FUSED_RESIDUAL=1 DIFFPIPE_FP16_REDUCTION=1}; do
  env $v timeout 90 $B/benchmarks/bench_sd --model /tmp/sd15-vae16 --size 512 --device cuda --dtype float16 --images 8 \
    --parts unet,vae --rounds 3 > $OUT/v.json 2> $OUT/v.err && python3 /tmp/unet_vae_line.py "$v" $OUT/v.json \
    || { echo "$v: FAILED"; tail -3 $OUT/v.err; }
done
fi
if want now; then
step "diffpipe alone: one UNet call's kernels by kind (batch 16), then batch 8 x 50 steps end to end"
S15="$B/benchmarks/bench_sd --model /tmp/sd15-vae16 --size 512 --device cuda --dtype float16 --images 8"
timeout 60 $S15 --parts unet --rounds 2 --trace /tmp/now > /dev/null 2> $OUT/v.err \
  && python3 benchmarks/kernel_breakdown.py diffpipe=/tmp/now.unet.json --top 16 || tail -3 $OUT/v.err
timeout 90 $S15 --steps 50 --parts e2e --rounds 2 > $OUT/e2e_b8.json 2> $OUT/v.err && python3 - $OUT/e2e_b8.json <<'PY' || tail -3 $OUT/v.err
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
w = min(d["e2e_s"])
print(f"batch 8 x 50 steps e2e: {w:.3f} s = {8 / w:.3f} img/s; breakdown (a profiled round, "
      f"{d.get('e2e_profiled_s', 0):.3f} s) " +
      ", ".join(f"{k} {v:.3f} s" for k, v in d.get("e2e_profile_s", {}).items() if v > 0) +
      f"; peak {d['peak_bytes'] / 2**30:.2f} GiB", flush=True)
PY
fi
if want vs_b1; then
step "vs diffusers (eager and torch.compile), batch 1: denoising steps/s with guidance (target >= 105 on an H100)"
timeout 300 $VS --images 1 --steps 50 --parts ${VS_B1_PARTS:-loop,unet} --rounds 3 ${VS_B1_COMPILE---compile} \
  --json $OUT/speed_b1.json 2>&1 \
  | grep -v -E "Loading|deprecat|accelerate|it/s\]"
fi
if want vs_b8; then
step "vs diffusers (eager and torch.compile), batch 8 x 50 steps: images/s end to end (target >= 1.2x + torch.compile)"
# both decode in float16 here (see /tmp/sd15-vae16); VS_B8_MODEL=/tmp/sd15 keeps diffpipe's float32 VAE
timeout $(( $(left) > 60 ? $(left) : 60 )) $VS --images 8 --steps 50 --parts e2e --rounds ${VS_B8_ROUNDS:-2} --compile \
  --json $OUT/speed_b8.json \
  --model ${VS_B8_MODEL:-/tmp/sd15-vae16} 2>&1 \
  | grep -v -E "Loading|deprecat|accelerate|it/s\]"
fi
step "done"
