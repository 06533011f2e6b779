#!/usr/bin/env bash
# `diffpipe serve` with the official openai client (tests/apps/serve_client.py): on 1 rank and over 3 ranks, the
# images API (same pixels as generate), bad input, 64 concurrent clients, disconnect, and SIGTERM (in-flight work
# finishes, every rank exits 0). Exit 77 (skipped) when the Python reference packages are absent.
#   serve_test.sh DIFFPIPE_BIN WORKDIR
set -u
BIN=$1; WORK=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${DIFFPIPE_VENV:-$HERE/../../.venv}/bin/python
[ -x "$PY" ] || PY=python3
$PY -c 'import openai, PIL' 2>/dev/null || { echo "SKIP: $PY lacks openai/PIL (scripts/install.sh installs them)"; exit 77; }
rm -rf "$WORK"; mkdir -p "$WORK"
fails=0; passed=0
ok()  { echo "ok: $*"; passed=$((passed+1)); }
bad() { echo "FAIL: $*"; fails=$((fails+1)); }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$BIN" init-model --out "$WORK/m" --seed 4 2>/dev/null || { echo "FAIL: init-model"; exit 1; }
# The servers below batch as requests come: a request's two images may share a denoising batch or not, with other
# requests or not. With --batch-invariant (servers and references) an image's bytes cannot depend on that timing.
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 2 --seed 5 --steps 3 --width 16 --height 16 \
  --batch-invariant --out "$WORK/ref" --quiet 2>/dev/null || { echo "FAIL: reference generate"; exit 1; }
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --seed 5 --steps 3 --width 16 --height 16 \
  --batch-invariant --out "$WORK/ref/single" --quiet 2>/dev/null || { echo "FAIL: reference generate (one image)"; exit 1; }

start() {  # NP LOG extra-args...: starts the server on a free port, sets PID and URL
  local np=$1 log=$2; shift 2
  if [ "$np" = 1 ]; then "$BIN" serve --model "$WORK/m" --port 0 "$@" > "$log" 2>&1 &
  else mpirun --oversubscribe -np "$np" "$BIN" serve --model "$WORK/m" --port 0 "$@" > "$log" 2>&1 & fi
  PID=$!; URL=""
  for i in $(seq 1 300); do
    URL=$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -1)
    [ -n "$URL" ] && curl -sf "$URL/healthz" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not come up:"; tail -5 "$log"; return 1
}
stop_and_check() {  # LOG NAME: SIGTERM to rank 0 (which drains), then every rank must exit 0
  local target=$PID
  for p in $(pgrep -f "serve --model $WORK/m --port 0"); do  # under mpirun: rank 0's process itself
    tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -q '^OMPI_COMM_WORLD_RANK=0$' && target=$p
  done
  kill -TERM $target; wait $PID; local rc=$?
  [ $rc = 0 ] && grep -q "stopped" "$1" && ok "$2: SIGTERM: drained, exit 0" || { bad "$2: exit $rc after SIGTERM"; tail -3 "$1"; }
}

for np in 1 3; do
  if start $np "$WORK/serve$np.log" --queue 8 --max-n 8 --max-body-mb 1 --batch-invariant; then
    rss() { local p=$PID; [ "$np" != 1 ] && for q in $(pgrep -f "serve --model $WORK/m --port 0"); do
              tr '\0' '\n' < /proc/$q/environ 2>/dev/null | grep -q '^OMPI_COMM_WORLD_RANK=0$' && p=$q; done
            awk '/VmRSS/ {print int($2 / 1024)}' /proc/$p/status; }
    for part in basic disconnect load; do
      [ $part = load ] && before=$(rss)
      $PY "$HERE/serve_client.py" "$URL" "$WORK/ref" $part > "$WORK/client-$np-$part.log" 2>&1 \
        && ok "np $np, $part: $(grep -c '^ok:' "$WORK/client-$np-$part.log") checks" \
        || { bad "np $np, $part"; grep FAIL "$WORK/client-$np-$part.log"; tail -3 "$WORK/client-$np-$part.log"; }
    done
    after=$(rss)
    [ $((after - before)) -lt 150 ] && ok "np $np: rank 0 memory across the 64-client load: $before -> $after MB" \
      || bad "np $np: rank 0 memory grew from $before to $after MB under load"
    # SIGTERM while a request is in flight: it completes, then every rank exits 0
    $PY "$HERE/serve_client.py" "$URL" "$WORK/ref" inflight > "$WORK/client-$np-inflight.log" 2>&1 &
    cp=$!
    for i in $(seq 1 300); do  # SIGTERM once the request is really in flight
      curl -s "$URL/metrics" | grep -q '^diffpipe_open_requests 1' && break; sleep 0.05
    done
    stop_and_check "$WORK/serve$np.log" "np $np"
    wait $cp && ok "np $np: the request in flight at SIGTERM got its image" || { bad "np $np: in-flight request"; cat "$WORK/client-$np-inflight.log"; }
  else
    bad "np $np: server start"
  fi
done

# a failed image (500 for itself) and a request past its deadline (504); the server goes on
if start 1 "$WORK/serve-faults.log" --timeout-request 2 --inject-failure denoise:2; then
  $PY "$HERE/serve_client.py" "$URL" "$WORK/ref" faults > "$WORK/client-faults.log" 2>&1 \
    && ok "faults: $(grep -c '^ok:' "$WORK/client-faults.log") checks (500 for a failed image, 504 past the deadline)" \
    || { bad "faults"; grep FAIL "$WORK/client-faults.log"; tail -3 "$WORK/client-faults.log"; }
  stop_and_check "$WORK/serve-faults.log" "faults server"
else
  bad "faults server start"
fi

echo "$passed passed, $fails failed"
[ $fails = 0 ]
