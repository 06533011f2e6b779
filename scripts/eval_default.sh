#!/usr/bin/env bash
# Evaluates a trained shapes model (default models/shapes-sd) on 256 held-out captions:
# fidelity (colour/shape/position), CLIP score of generated vs real images of the same captions, and FID
# against held-out real images next to the real-vs-real floor. Prints one JSON line per figure.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-models/shapes-sd}; OUT=${2:-build/eval}; N=${N:-256}; STEPS=${STEPS:-25}
B=${DIFFPIPE_BIN:-./build/apps/diffpipe}
rm -rf "$OUT"; mkdir -p "$OUT"
$B data --out "$OUT/real" --count "$N" --seed 1000 2>/dev/null
$B data --out "$OUT/real2" --count "$N" --seed 2000 2>/dev/null
grep -o '"prompt":"[^"]*"' "$OUT/real/images.jsonl" | sed 's/"prompt":"\(.*\)"/\1/' > "$OUT/prompts.txt"
$B generate --model "$M" --prompts "$OUT/prompts.txt" --steps "$STEPS" --seed 1000 --out "$OUT/gen" --quiet \
  --no-contact-sheet 2> "$OUT/generate.log"
echo "{\"metric\":\"fidelity generated\", \"value\":$($B eval fidelity --images "$OUT/gen")}"
echo "{\"metric\":\"fidelity real\", \"value\":$($B eval fidelity --images "$OUT/real")}"
echo "{\"metric\":\"clip-score generated\", \"value\":$($B eval clip-score --images "$OUT/gen" --model "$M")}"
echo "{\"metric\":\"clip-score real\", \"value\":$($B eval clip-score --images "$OUT/real" --model "$M")}"
echo "{\"metric\":\"fid generated vs real\", \"value\":$($B eval fid --real "$OUT/real" --generated "$OUT/gen" --model "$M")}"
echo "{\"metric\":\"fid real vs real (floor)\", \"value\":$($B eval fid --real "$OUT/real" --generated "$OUT/real2" --model "$M")}"
