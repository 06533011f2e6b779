#!/usr/bin/env bash
# diffpipe profile and diffpipe plan as a user runs them: a profile of the embedded model, a plan for 3 ranks
# whose pipeline file `generate` runs under mpirun, a plan for 64 ranks, a given pipeline file simulated,
# `bench --predict`, and bad input refused with a message naming the file, field or option.
#   plan_test.sh DIFFPIPE_BIN MODEL WORKDIR
set -u
BIN=$1; MODEL=$2; WORK=$3
. "$(dirname "$0")/lib.sh"

P=$WORK/profile.json
if "$BIN" profile --model "$MODEL" --batches 1,4 --steps 4 --threads 1 --out "$P" 2> "$WORK/profile.log"; then
  python3 - "$P" <<'PY' && ok "profile: 4 stages, heavy denoise with 4 calls, times at batch 1 and 4" || bad "profile content: $(head -c 300 "$P")"
import json, sys
p = json.load(open(sys.argv[1]))
names = [s["name"] for s in p["stages"]]
d = p["stages"][1]
assert names == ["encode", "denoise", "decode", "upscale"], names
assert d["heavy"] and d["multi_step"] and d["calls"] == 4, d
assert [b["batch"] for b in d["batches"]] == [1, 4] and all(b["seconds"] > 0 for b in d["batches"])
assert p["stages"][0]["out_bytes"] > 0 and d["weight_bytes"] > 0
PY
else
  bad "profile failed: $(tail -3 "$WORK/profile.log")"
fi

# a plan for 3 ranks, run as planned
if "$BIN" plan --profile "$P" --nodes 1 --ranks-per-node 3 --out "$WORK/p3.toml" > "$WORK/plan3.log" 2>&1; then
  grep -q "^best: " "$WORK/plan3.log" && grep -q "sim img/s" "$WORK/plan3.log" && [ -f "$WORK/p3.toml" ] \
    && ok "plan for 3 ranks: a table and a pipeline file" || bad "plan output: $(cat "$WORK/plan3.log")"
  if $MPIRUN -np 3 "$BIN" generate --model "$MODEL" --pipeline "$WORK/p3.toml" --prompts "$WORK/prompts.txt" --steps 4 \
       --out "$WORK/out3" --quiet > /dev/null 2> "$WORK/gen3.log"; then
    [ "$(ls "$WORK"/out3/img-*.png | wc -l)" = 3 ] && ok "generate runs the planned pipeline file on 3 ranks" \
      || bad "planned run made $(ls "$WORK"/out3/img-*.png | wc -l) images"
  else
    bad "generate with the planned file: $(tail -3 "$WORK/gen3.log")"
  fi
  "$BIN" plan --profile "$P" --nodes 1 --ranks-per-node 3 --pipeline "$WORK/p3.toml" > "$WORK/given.log" 2>&1 \
    && grep -q "pipeline file $WORK/p3.toml" "$WORK/given.log" && ok "plan --pipeline simulates a given file" \
    || bad "plan --pipeline: $(tail -3 "$WORK/given.log")"
else
  bad "plan failed: $(tail -3 "$WORK/plan3.log")"
fi

# a cluster of 64 ranks: every simulated candidate in the JSON report
if "$BIN" plan --profile "$P" --nodes 8 --ranks-per-node 8 --json "$WORK/p64.json" > "$WORK/plan64.log" 2>&1; then
  python3 - "$WORK/p64.json" <<'PY' && ok "plan for 64 ranks: ranked candidates, the first simulated" || bad "64-rank report"
import json, sys
c = json.load(open(sys.argv[1]))
assert c[0]["simulated"] and c[0]["simulated_images_per_s"] > 0 and c[0]["latency_s"]["p99"] > 0
sims = [x["simulated_images_per_s"] for x in c if x["simulated"]]
assert sims[0] == max(sims) and len(sims) >= 2
PY
else
  bad "plan 64: $(tail -3 "$WORK/plan64.log")"
fi

# bench --predict: the prediction beside the measurement
if "$BIN" bench --model "$MODEL" --images 6 --steps 4 --threads 1 --predict "$P" --out "$WORK/bench.json" 2> "$WORK/bench.log"; then
  python3 -c "
import json; r = json.load(open('$WORK/bench.json'))['runs'][0]
assert r['predicted']['images_per_s'] > 0 and r['predicted']['measured_over_predicted'] > 0" \
    && ok "bench --predict reports predicted and measured" || bad "bench --predict report"
else
  bad "bench --predict: $(tail -3 "$WORK/bench.log")"
fi

# bad input: non-zero exit, a message naming what is wrong, no crash
refused() {  # refused WHAT PATTERN CMD...: exit 1 and PATTERN on stderr
  local what=$1 pat=$2; shift 2
  "$@" > /dev/null 2> "$WORK/err.log"; local rc=$?
  [ $rc = 1 ] && grep -q -- "$pat" "$WORK/err.log" && ok "refused: $what" || bad "$what: rc $rc, $(head -2 "$WORK/err.log")"
}
refused "plan without a profile" "--profile FILE is required" "$BIN" plan --nodes 2
refused "a missing profile file" "/nonexistent.json: cannot read" "$BIN" plan --profile /nonexistent.json
python3 -c "
import json; p = json.load(open('$P')); del p['stages'][2]['batches'][0]['seconds']
json.dump(p, open('$WORK/broken.json', 'w'))"
refused "a profile without a field" "broken.json: stages\[2\].batches\[0\].seconds must be a number" \
  "$BIN" plan --profile "$WORK/broken.json"
refused "batch sizes out of order" "batch-sizes: sizes must ascend" "$BIN" plan --profile "$P" --batch-sizes 8,4
refused "too little device memory" "no placement fits in" "$BIN" plan --profile "$P" --ranks-per-node 2 --device-memory-gib 0.01
refused "a pipeline file for another world" "rank 5 is out of range" \
  "$BIN" plan --profile "$P" --ranks-per-node 2 --pipeline <(printf '[encode]\nranks=[0]\n[denoise]\nranks=[5]\n')
refused "profile rounds below 2" "rounds must be in \[2, 20\]" "$BIN" profile --model "$MODEL" --out "$WORK/x.json" --rounds 1
refused "bench --predict at other steps" "measured at 4 steps, this run makes 6" \
  "$BIN" bench --model "$MODEL" --images 2 --steps 6 --predict "$P"

echo "plan tests: $passed passed, $fails failed"
[ $fails = 0 ]
