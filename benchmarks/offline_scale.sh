#!/usr/bin/env bash
# Offline generation at scale (#11), measured in one run:
#  1. rank 0's peak memory (coordinator + writer) for 100 and for 2,000 images at 128 px over 3 ranks: streaming
#     output keeps it flat (target: within 40 MB);
#  2. offline throughput of the embedded model over 3 ranks against one process, the same images.
# Outputs are checked first (every image has its line and its PNG).
#   bash benchmarks/offline_scale.sh [BUILD_DIR] [IMAGES_FOR_THROUGHPUT]     (PARTS=memory,throughput by default)
set -euo pipefail
B=${1:-build}; N=${2:-48}
BIN=$(cd "$B" && pwd)/apps/diffpipe
W=$(mktemp -d /tmp/diffpipe-offline-XXXX)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN="mpirun --oversubscribe"
check() {  # DIR N: N lines, N PNGs
  local lines pngs
  lines=$(wc -l < "$1/images.jsonl"); pngs=$(find "$1" -name 'img-*.png' | wc -l)
  [ "$lines" = "$2" ] && [ "$pngs" = "$2" ] || { echo "check failed: $1 has $lines lines, $pngs PNGs (want $2)"; exit 1; }
}
"$BIN" init-model --out "$W/m" --seed 1 2> /dev/null
PARTS=${PARTS:-memory,throughput}
if [[ $PARTS == *memory* ]]; then
echo "== rank 0 peak memory, 3 ranks, tiny random model at 128x128, 1 step, --max-batch 16"
declare -A RSS
for n in 100 2000; do
  $MPIRUN -np 3 sh -c "/usr/bin/time -f %M -o $W/rss.$n.\$OMPI_COMM_WORLD_RANK $BIN generate --model $W/m \
    --prompt 'a red circle' --images $n --steps 1 --width 128 --height 128 --max-batch 16 --out $W/o$n --quiet \
    --no-contact-sheet 2> /dev/null"
  check "$W/o$n" $n
  RSS[$n]=$(cat "$W/rss.$n.0")
  echo "  $n images: rank 0 peak RSS $((RSS[$n] / 1024)) MB (ranks 1, 2: $(( $(cat $W/rss.$n.1) / 1024 )), $(( $(cat $W/rss.$n.2) / 1024 )) MB)"
done
echo "  growth from 100 to 2000 images: $(( (RSS[2000] - RSS[100]) / 1024 )) MB (target: within 40 MB)"
fi
[[ $PARTS == *throughput* ]] || { rm -rf "$W"; exit 0; }

echo "== throughput: models/shapes-sd, $N images x 25 steps, guidance 5"
M=$(cd "$(dirname "$0")/.." && pwd)/models/shapes-sd
run() {  # NP OUT
  local t0 t1
  t0=$(date +%s.%N)
  $MPIRUN -np "$1" "$BIN" generate --model "$M" --prompt "a red circle at the top left" --prompt "a blue square" \
    --images $((N / 2)) --steps 25 --guidance 5 --out "$2" --quiet --no-contact-sheet "${@:3}" 2> /dev/null
  t1=$(date +%s.%N)
  check "$2" "$N"
  echo "$t0 $t1" | awk '{print $2 - $1}'
}
t1=$(run 1 "$W/np1"); t3=$(run 3 "$W/np3"); tr=$(run 3 "$W/rep3" --placement replicas)
for d in np3 rep3; do
  same=0; for f in "$W"/np1/img-*.png; do cmp -s "$f" "$W/$d/$(basename "$f")" && same=$((same + 1)); done
  eval "same_$d=$same"
done
awk -v a="$t1" -v b="$t3" -v c="$tr" -v n="$N" -v s="$same_np3" -v r="$same_rep3" 'BEGIN {
  printf "  1 process: %.1f s (%.2f images/s)\n", a, n / a
  printf "  3 ranks, pipelined (derived): %.1f s (%.2f images/s), ratio %.2fx; %d/%d PNGs byte-identical\n", b, n / b, a / b, s, n
  printf "  3 ranks, --placement replicas: %.1f s (%.2f images/s), ratio %.2fx; %d/%d PNGs byte-identical\n", c, n / c, a / c, r, n }'
rm -rf "$W"
