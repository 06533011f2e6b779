#!/usr/bin/env bash
# Evaluates a trained shapes model (default models/shapes-sd) on 256 held-out captions (seed 1000):
# fidelity (colour/shape/position), CLIP score of generated vs real images of the same captions, and FID of the
# generated set against a second held-out real set (seed 2000) next to the floor: the real images of the same
# captions against that set. Prints one JSON line per figure. GUIDANCE (default 5, the model card's setting),
# STEPS (25) and N (256) can be set in the environment; NP > 1 generates over `mpirun -np NP` (FID-10K:
# N=10000 NP=3). The generation's wall time and images/s are printed too. EVAL_MODEL (default: the model) gives
# the image tower for CLIP score and FID: a model without one (models/shapes-unclip) is measured with
# models/shapes-sd's, so both models' figures share one embedding space.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-models/shapes-sd}; OUT=${2:-build/eval}; N=${N:-256}; STEPS=${STEPS:-25}; GUIDANCE=${GUIDANCE:-5}
B=${DIFFPIPE_BIN:-./build/apps/diffpipe}
EM=${EVAL_MODEL:-$M}
rm -rf "$OUT"; mkdir -p "$OUT"
$B data --out "$OUT/real" --count "$N" --seed 1000 2>/dev/null
$B data --out "$OUT/real2" --count "$N" --seed 2000 2>/dev/null
grep -o '"prompt":"[^"]*"' "$OUT/real/images.jsonl" | sed 's/"prompt":"\(.*\)"/\1/' > "$OUT/prompts.txt"
NP=${NP:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # harmless when not root
LAUNCH=(); [ "$NP" -gt 1 ] && LAUNCH=(mpirun --oversubscribe -np "$NP")
t0=$(date +%s.%N)
"${LAUNCH[@]}" $B generate --model "$M" --prompts "$OUT/prompts.txt" --steps "$STEPS" --guidance "$GUIDANCE" --seed 1000 \
  --out "$OUT/gen" --quiet --no-contact-sheet 2> "$OUT/generate.log"
t1=$(date +%s.%N)
echo "{\"metric\":\"generation\", \"value\":{\"images\":$N, \"ranks\":$NP, \"wall_s\":$(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}'), \"images_per_s\":$(echo "$t0 $t1 $N" | awk '{printf "%.3f", $3 / ($2 - $1)}')}}"
echo "{\"metric\":\"fidelity generated\", \"value\":$($B eval fidelity --images "$OUT/gen")}"
echo "{\"metric\":\"fidelity real\", \"value\":$($B eval fidelity --images "$OUT/real")}"
echo "{\"metric\":\"clip-score generated\", \"value\":$($B eval clip-score --images "$OUT/gen" --model "$EM")}"
echo "{\"metric\":\"clip-score real\", \"value\":$($B eval clip-score --images "$OUT/real" --model "$EM")}"
echo "{\"metric\":\"fid generated vs held-out real\", \"value\":$($B eval fid --real "$OUT/real2" --generated "$OUT/gen" --model "$EM")}"
echo "{\"metric\":\"fid real vs held-out real (floor)\", \"value\":$($B eval fid --real "$OUT/real2" --generated "$OUT/real" --model "$EM")}"
