#!/usr/bin/env bash
# Distributed pipeline tests: launches mpirun itself with 1..5 ranks.
#   distributed_test.sh DIFFPIPE_BIN MODEL|random|golden WORKDIR
# Checks: identical images across rank counts and a pipeline file (float32, CPU, same batches and threads),
# clean shutdown (every rank exits 0), failure propagation (a thrown error and a crash end every rank
# non-zero within a bounded time, naming rank, stage and request), and bad pipeline files.
# Exit 77 = skipped (reference folder absent).
set -u
BIN=$1; MODEL=$2; WORK=$3
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN="mpirun --oversubscribe"
rm -rf "$WORK"; mkdir -p "$WORK"
fails=0; passed=0
ok()   { echo "ok: $*"; passed=$((passed+1)); }
bad()  { echo "FAIL: $*"; fails=$((fails+1)); }

if [ "$MODEL" = random ]; then
  MODEL=$WORK/model
  "$BIN" init-model --out "$MODEL" --seed 7 || { echo "FAIL: init-model"; exit 1; }
  STEPS=6
elif [ "$MODEL" = golden ]; then
  MODEL=${DIFFPIPE_GOLDEN:-$(dirname "$0")/../../../shared/golden/tiny-sd}/model
  [ -d "$MODEL" ] || { echo "SKIP: reference folder $MODEL is absent (set DIFFPIPE_GOLDEN)"; exit 77; }
  STEPS=8
fi
printf 'a red circle at the top left\na blue square\n# a comment\n\na green triangle on a black background\n' > "$WORK/prompts.txt"
COMMON=(generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 2 --steps $STEPS --seed 11 --quiet --timeout 60)

# 1) identical images for every rank count (max_batch 1: every stage sees the same batches)
for np in 1 2 3 4 5; do
  out=$WORK/np$np
  if timeout 300 $MPIRUN -np $np "$BIN" "${COMMON[@]}" --max-batch 1 --out "$out" 2> "$WORK/np$np.log"; then
    n=$(ls "$out"/img-*.png 2>/dev/null | wc -l)
    [ "$n" = 6 ] && ok "np=$np clean exit, 6 images" || bad "np=$np wrote $n images"
  else
    bad "np=$np exit code $?"; tail -5 "$WORK/np$np.log"
  fi
done
# data-parallel replicas (every stage on every rank) give the same images too
timeout 300 $MPIRUN -np 3 "$BIN" "${COMMON[@]}" --max-batch 1 --placement replicas --out "$WORK/rep3" 2> "$WORK/rep3.log" \
  && grep -q "rank 2 \[.*\]: encode(.*denoise(.*decode(" "$WORK/rep3.log" && ok "--placement replicas: every stage on every rank" \
  || bad "--placement replicas run failed or placed otherwise: $(grep 'rank 2' "$WORK/rep3.log")"
for np in 2 3 4 5 rep3; do
  d=$WORK/np$np; [ "$np" = rep3 ] && d=$WORK/rep3
  same=1
  for f in "$WORK"/np1/img-*.png; do cmp -s "$f" "$d/$(basename "$f")" || { same=0; echo "  differs: $np $(basename "$f")"; }; done
  [ $same = 1 ] && ok "$np: images byte-identical to the single-process run" || bad "$np: images differ"
done

# 1b) --batch-invariant: batched (default max_batch) on 1 and 4 ranks == unbatched, byte for byte
timeout 300 $MPIRUN -np 1 "$BIN" "${COMMON[@]}" --batch-invariant --max-batch 1 --out "$WORK/bi-ref" 2> "$WORK/bi-ref.log" \
  || bad "batch-invariant reference run failed"
for np in 1 4; do
  timeout 300 $MPIRUN -np $np "$BIN" "${COMMON[@]}" --batch-invariant --out "$WORK/bi$np" 2> "$WORK/bi$np.log" || bad "batch-invariant np=$np failed"
done
same=1
for f in "$WORK"/bi-ref/img-*.png; do
  for d in bi1 bi4; do cmp -s "$f" "$WORK/$d/$(basename "$f")" || { same=0; echo "  differs: $d $(basename "$f")"; }; done
done
[ $same = 1 ] && ok "batched with --batch-invariant: identical to unbatched, on 1 and 4 ranks" || bad "batch-invariant images differ"

# 2) a pipeline file: 4 ranks, two denoise replicas, encoder and decoder sharing rank 0
cat > "$WORK/pipeline.toml" <<'TOML'
transport = "mpi"   # CPU ranks
[encode]
ranks = [0]
max_batch = 1
[denoise]
ranks = [1, 2, 3]
max_batch = 1
[decode]
ranks = [0]
max_batch = 1
TOML
if timeout 300 $MPIRUN -np 4 "$BIN" "${COMMON[@]}" --pipeline "$WORK/pipeline.toml" --out "$WORK/pf" 2> "$WORK/pf.log"; then
  same=1
  for f in "$WORK"/np1/img-*.png; do cmp -s "$f" "$WORK/pf/$(basename "$f")" || same=0; done
  [ $same = 1 ] && ok "pipeline file: images identical" || bad "pipeline file: images differ"
  grep -q '"denoise_rank":3' "$WORK/pf/images.jsonl" && ok "pipeline file: replicas share the work" || bad "replica 3 got no work"
else
  bad "pipeline file run failed"; tail -5 "$WORK/pf.log"
fi

# 2b) a cascade model (random weights + a 2x super_resolution/): the upscale stage on its own rank gives the
# images of one process, enlarged; its failures name the stage; a model without super-resolution rejects [upscale]
if [ "$2" = random ]; then
  SRM=$WORK/model-sr
  "$BIN" init-model --out "$SRM" --seed 7 --super-resolution 2> /dev/null || bad "init-model --super-resolution"
  SRC=(generate --model "$SRM" --prompts "$WORK/prompts.txt" --steps 4 --seed 11 --quiet --timeout 60 --max-batch 1)
  # max_batch 1 as --max-batch 1 above: batched default kernels may move a few 8-bit values by 1 (docs/results.md)
  printf '[encode]\nranks=[0]\nmax_batch=1\n[denoise]\nranks=[1]\nmax_batch=1\n[decode]\nranks=[2]\nmax_batch=1\n[upscale]\nranks=[3]\nmax_batch=1\n' > "$WORK/sr.toml"
  timeout 300 $MPIRUN -np 1 "$BIN" "${SRC[@]}" --out "$WORK/sr1" 2> "$WORK/sr1.log" || bad "cascade np=1 failed"
  if timeout 300 $MPIRUN -np 4 "$BIN" "${SRC[@]}" --pipeline "$WORK/sr.toml" --out "$WORK/sr4" > "$WORK/sr4.log" 2>&1; then
    same=1
    for f in "$WORK"/sr1/img-*.png; do cmp -s "$f" "$WORK/sr4/$(basename "$f")" || same=0; done
    width=$(od -An -tu1 -j18 -N2 "$WORK/sr4/img-00000-seed11.png" | awk '{print $1 * 256 + $2}')
    [ $same = 1 ] && [ "$width" = 32 ] && grep -q "rank 3 \[cpu, float32\]: upscale" "$WORK/sr4.log" \
      && ok "cascade: upscale stage on rank 3, 32-px images identical to one process" \
      || bad "cascade: identical=$same width=$width"; grep -q "upscale" "$WORK/sr4.log" || tail -3 "$WORK/sr4.log"
  else
    bad "cascade np=4 failed"; tail -5 "$WORK/sr4.log"
  fi
  timeout 120 $MPIRUN -np 4 "$BIN" "${SRC[@]}" --pipeline "$WORK/sr.toml" --inject-failure upscale:1 --out "$WORK/srf" > "$WORK/srf.log" 2>&1
  rc=$?; { [ $rc != 0 ] && [ $rc != 124 ] && grep -q "rank 3, stage upscale, request 1" "$WORK/srf.log" \
          && grep -q '"status":"failed"' "$WORK/srf/images.jsonl" && [ "$(grep -c '"status":"done"' "$WORK/srf/images.jsonl")" = 2 ]; } \
    && ok "cascade: a failure in the upscale stage fails that request alone, the run exits non-zero (rc $rc)" \
    || bad "cascade failure: rc $rc"
  timeout 60 $MPIRUN -np 4 "$BIN" "${COMMON[@]}" --pipeline "$WORK/sr.toml" --out "$WORK/srn" > "$WORK/srn.log" 2>&1
  rc=$?; { [ $rc != 0 ] && [ $rc != 124 ] && grep -q "sr.toml: \[upscale\] places stage 'upscale', which this model's pipeline (encode -> denoise -> decode) does not have" "$WORK/srn.log"; } \
    && ok "[upscale] for a model without super-resolution rejected" || { bad "[upscale] without super-resolution: rc $rc"; tail -3 "$WORK/srn.log"; }
fi

# 3) failure propagation: a thrown error on rank 1 (denoise) and a crash on the decoder
expect_failure() {  # name np inject expected-text
  local name=$1 np=$2 inj=$3 want=$4
  local t0=$(date +%s)
  timeout 120 $MPIRUN -np $np "$BIN" "${COMMON[@]}" --inject-failure "$inj" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then bad "$name: exit 0 despite the injected failure"
  elif [ $rc = 124 ]; then bad "$name: hung (killed by timeout)"
  elif ! grep -q "$want" "$WORK/$name.log"; then bad "$name: message lacks '$want'"; tail -5 "$WORK/$name.log"
  else ok "$name: every rank stopped (rc $rc) in ${dt}s, message names '$want'"; fi
}
expect_failure fail-throw 3 denoise:1 "rank 1, stage denoise, request 1"
expect_failure fail-crash 3 decode:2:crash "stage decode on request 2"
expect_failure fail-encode-np1 1 encode:0 "rank 0, stage encode, request 0"
# a thrown error fails its request alone: the other five images are written, and the JSON line says why
nd=$(grep -c '"status":"done"' "$WORK/fail-throw/images.jsonl"); nf=$(grep '"status":"failed"' "$WORK/fail-throw/images.jsonl" | grep -c '"reason":"rank 1, stage denoise, request 1: injected failure"')
{ [ "$nd" = 5 ] && [ "$nf" = 1 ]; } && ok "per-request failure: 5 done, 1 failed with its reason" || bad "per-request failure: $nd done, $nf failed"
# --fail-fast keeps the stop-everything behaviour: no rank finishes its other work
timeout 120 $MPIRUN -np 3 "$BIN" "${COMMON[@]}" --inject-failure denoise:0 --fail-fast --max-batch 1 --out "$WORK/ff" > "$WORK/ff.log" 2>&1
rc=$?; nd=$(grep -c '"status":"done"' "$WORK/ff/images.jsonl" 2>/dev/null || true)
{ [ $rc != 0 ] && [ $rc != 124 ] && grep -q "rank 1, stage denoise, request 0: injected failure" "$WORK/ff.log" && [ "${nd:-0}" -lt 6 ]; } \
  && ok "--fail-fast: the job stopped at the first failure (rc $rc, ${nd:-0} of 6 done)" || bad "--fail-fast: rc $rc, ${nd:-0} done"

# a stopped rank (SIGSTOP on the decoder): every rank ends within --timeout plus a few seconds of the last progress
# (the denoiser keeps working until its requests wait on the decoder), naming the silent rank, instead of waiting
# forever for sends to it
if [ "$2" = random ]; then
  t0=$(date +%s)
  timeout 120 $MPIRUN -np 3 "$BIN" generate --model "$MODEL" --prompt a --prompt b --images 50 --steps 50 --max-batch 1 \
    --timeout 8 --out "$WORK/stop" --quiet > "$WORK/stop.log" 2>&1 &
  mp=$!; pid2=""
  for i in $(seq 1 200); do
    for p in $(pgrep -f "generate --model $MODEL --prompt a --prompt b"); do
      tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -q '^OMPI_COMM_WORLD_RANK=2$' && pid2=$p
    done
    [ -n "$pid2" ] && break; sleep 0.1
  done
  sleep 1; [ -n "$pid2" ] && kill -STOP "$pid2"
  wait $mp; rc=$?; dt=$(( $(date +%s) - t0 ))
  [ -n "$pid2" ] && { kill -CONT "$pid2"; kill -9 "$pid2"; } 2>/dev/null
  { [ -n "$pid2" ] && [ $rc != 0 ] && [ $rc != 124 ] && [ $dt -lt 100 ] && grep -q "no progress for 8 s; waiting on request [0-9]* in decode on rank 2" "$WORK/stop.log"; } \
    && ok "SIGSTOP on the decode rank: the job ended in ${dt}s (rc $rc), naming rank 2" \
    || { bad "SIGSTOP on the decode rank: rc $rc in ${dt}s (pid ${pid2:-none})"; tail -5 "$WORK/stop.log"; }
fi

# diffpipe bench: one run, three placements over 3 ranks, outputs checked, figures and chart written
if [ "$2" = random ]; then
  if timeout 300 $MPIRUN -np 3 "$BIN" bench --model "$MODEL" --images 6 --steps 3 --rates 50 --out "$WORK/bench.json" \
       --svg "$WORK/bench.svg" > "$WORK/bench.log" 2>&1; then
    python3 - "$WORK/bench.json" <<'PY' && grep -q "<svg" "$WORK/bench.svg" && ok "bench: one, pipeline and replicas in one run; JSON + SVG" \
      || { bad "bench report"; tail -3 "$WORK/bench.log"; }
import json, sys
r = json.load(open(sys.argv[1]))
runs = {(x["placement"], x["mode"]): x for x in r["runs"]}
assert set(runs) == {(p, m) for p in ("one", "pipeline", "replicas") for m in ("closed", "open")}, runs.keys()
assert runs[("one", "closed")]["bytes_moved"] == 0, "one rank moves nothing"
assert runs[("pipeline", "closed")]["bytes_moved"] > 0
assert all(x["identical_to_first"] >= 0 and x["images_per_s"] > 0 and x["latency_s"]["p99"] >= x["latency_s"]["p50"] for x in r["runs"])
assert set(r["closed_loop_ratios"]) == {"pipeline/one", "replicas/one"}
assert set(runs[("pipeline", "closed")]["busy_fraction"]) == {"encode", "denoise", "decode"}
PY
  else
    bad "bench at np 3 failed"; tail -5 "$WORK/bench.log"
  fi
fi

# 4) bad pipeline files: a clear message, non-zero exit, no hang
bad_pipeline() {  # name np content expected-text
  local name=$1 np=$2 content=$3 want=$4
  printf '%s\n' "$content" > "$WORK/$name.toml"
  timeout 60 $MPIRUN -np $np "$BIN" "${COMMON[@]}" --pipeline "$WORK/$name.toml" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ] || [ $rc = 124 ]; then bad "$name: rc $rc"
  elif [ "$(grep -c "diffpipe: error" "$WORK/$name.log")" != 1 ]; then bad "$name: expected one error message"
  elif grep -q "$want" "$WORK/$name.log"; then ok "$name: rejected ('$want')"
  else bad "$name: message lacks '$want'"; cat "$WORK/$name.log" | tail -3; fi
}
bad_pipeline unknown-stage 2 $'[encode]\nranks=[0]\n[denoise]\nranks=[1]\n[decode]\nranks=[0]\n[refiner]\nranks=[1]' "unknown stage or key 'refiner'"
bad_pipeline rank-range 2 $'[encode]\nranks=[0]\n[denoise]\nranks=[5]\n[decode]\nranks=[0]' "rank 5 is out of range"
bad_pipeline no-rank 2 $'[encode]\nranks=[0]\n[denoise]\nranks=[]\n[decode]\nranks=[1]' "stage 'denoise' has no rank"
bad_pipeline extra-ranks 3 $'[encode]\nranks=[0]\n[denoise]\nranks=[1]\n[decode]\nranks=[0]' "more ranks than needed: rank(s) 2"
bad_pipeline syntax 2 $'[encode]\nranks = [0\n' "syntax.toml:3:2: Error while parsing array: encountered end-of-file"

# 5) cancellation and deadlines across ranks: the rest finish, every rank exits 0
if timeout 120 $MPIRUN -np 3 "$BIN" generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 3 --steps 40 \
     --max-batch 2 --cancel-at 1:0 --cancel-at 4:0.3 --out "$WORK/cancel" --quiet 2> "$WORK/cancel.log"; then
  nc=$(grep -c '"status":"cancelled"' "$WORK/cancel/images.jsonl"); nd=$(grep -c '"status":"done"' "$WORK/cancel/images.jsonl")
  [ "$nc" -ge 1 ] && [ $((nc + nd)) = 9 ] && ok "cancellation: $nc cancelled, $nd done, all ranks exit 0" \
    || bad "cancellation: $nc cancelled, $nd done"
else
  bad "cancellation run failed"; tail -5 "$WORK/cancel.log"
fi
if timeout 120 $MPIRUN -np 3 "$BIN" generate --model "$MODEL" --prompts "$WORK/prompts.txt" --images 4 --steps 30 \
     --max-batch 1 --deadline 0.05 --out "$WORK/deadline" --quiet 2> "$WORK/deadline.log"; then
  nt=$(grep -c '"status":"timed out"' "$WORK/deadline/images.jsonl"); n=$(wc -l < "$WORK/deadline/images.jsonl")
  [ "$nt" -ge 1 ] && [ "$n" = 12 ] && grep -q '"reason":"deadline passed while' "$WORK/deadline/images.jsonl" \
    && ok "deadlines: $nt of 12 timed out with a reason" || bad "deadlines: $nt timed out of $n lines"
else
  bad "deadline run failed"; tail -5 "$WORK/deadline.log"
fi

# 6) a bad model folder fails every rank with one message
timeout 60 $MPIRUN -np 3 "$BIN" generate --model "$WORK/no-such-model" --prompt x --out "$WORK/nm" > "$WORK/nm.log" 2>&1
rc=$?; { [ $rc != 0 ] && [ $rc != 124 ] && grep -q "no-such-model: model folder not found" "$WORK/nm.log"; } \
  && ok "missing model folder rejected on all ranks" || bad "missing model folder: rc $rc"
timeout 60 $MPIRUN -np 3 "$BIN" generate --model "$WORK/no-such-model" --prompt x --stepz 3 > "$WORK/opt.log" 2>&1
rc=$?; n=$(grep -c "unknown option --stepz" "$WORK/opt.log")
{ [ $rc != 0 ] && [ $rc != 124 ] && [ "$n" = 1 ]; } && ok "unknown option at np 3: reported once, rc $rc" \
  || bad "unknown option at np 3: rc $rc, printed $n times"

echo "$passed passed, $fails failed"
[ $fails = 0 ]
