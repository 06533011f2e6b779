#!/usr/bin/env bash
# Offline runs at scale (#11): crash-safe resume (kill -9 mid-run, rerun = the same files and lines as an
# uninterrupted run, finished files untouched, also on another number of ranks), refusal of other settings and
# --overwrite, JSONL input, per-image seeds that reproduce alone, provenance in the PNG, sharded folders,
# webdataset shards, a cut last line, the folder lock, and a full disk.
#   offline_test.sh DIFFPIPE_BIN WORKDIR
set -u
BIN=$1; WORK=$2
rm -rf "$WORK"; mkdir -p "$WORK"
fails=0; passed=0
ok()  { echo "ok: $*"; passed=$((passed+1)); }
bad() { echo "FAIL: $*"; fails=$((fails+1)); }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN="mpirun --oversubscribe"
"$BIN" init-model --out "$WORK/m" --seed 5 2>/dev/null || { echo "FAIL: init-model"; exit 1; }
printf 'a red circle\na blue square at the top\n# comment\na green triangle\n' > "$WORK/p.txt"
RUN=(generate --model "$WORK/m" --prompts "$WORK/p.txt" --images 12 --steps 40 --seed 7 --max-batch 1 --quiet)

# what a line says, without what legitimately varies between runs (timing, which replica)
norm() { python3 - "$1" <<'PY'
import json, sys
rows = []
for l in open(sys.argv[1]):
    j = json.loads(l)
    for k in ("latency_s", "denoise_rank"):
        j.pop(k, None)
    j["file"] = j.get("file", "").split("/")[-1]
    rows.append(json.dumps(j, sort_keys=True))
print("\n".join(sorted(rows)))
PY
}

# 1) the reference: one uninterrupted run
"$BIN" "${RUN[@]}" --out "$WORK/ref" 2> "$WORK/ref.log" || bad "reference run failed: $(tail -2 "$WORK/ref.log")"
nref=$(wc -l < "$WORK/ref/images.jsonl")
[ "$nref" = 36 ] && ok "reference: 36 lines" || bad "reference: $nref lines"
grep -q "diffpipe: 36/36 images (100.0%), [0-9.]* images/s, elapsed" "$WORK/ref.log" \
  && ok "progress on stderr (plain lines when not a terminal)" || bad "progress line: $(grep images/s "$WORK/ref.log" | tail -1)"

# 2) killed midway (SIGKILL: no chance to clean up), then the same command again
"$BIN" "${RUN[@]}" --out "$WORK/kill" 2> /dev/null &
pid=$!
for i in $(seq 1 200); do
  n=$(cat "$WORK/kill/images.jsonl" 2>/dev/null | wc -l); [ "$n" -ge 8 ] && break; sleep 0.05
done
kill -9 $pid; wait $pid 2>/dev/null
before=$(wc -l < "$WORK/kill/images.jsonl")
ls -i "$WORK"/kill/img-*.png 2>/dev/null | sort -k2 > "$WORK/inodes.before"
if [ "$before" -ge 1 ] && [ "$before" -lt 36 ]; then
  # continue on 3 ranks: another placement makes the same pixels (max-batch 1)
  $MPIRUN -np 3 "$BIN" "${RUN[@]}" --out "$WORK/kill" 2> "$WORK/resume.log" || bad "resume failed: $(tail -2 "$WORK/resume.log")"
  grep -q "continuing an earlier run: $before of 36 images already have a line" "$WORK/resume.log" \
    && ok "killed after $before images; the rerun continues from there" || bad "resume message: $(grep continuing "$WORK/resume.log")"
  if [ "$(norm "$WORK/kill/images.jsonl")" = "$(norm "$WORK/ref/images.jsonl")" ]; then
    ok "resumed run: the same 36 lines as the uninterrupted run, none lost or twice"
  else
    bad "resumed lines differ: $(wc -l < "$WORK/kill/images.jsonl") lines"
  fi
  same=1
  for f in "$WORK"/ref/img-*.png; do cmp -s "$f" "$WORK/kill/$(basename "$f")" || same=0; done
  [ $same = 1 ] && ok "resumed run: every PNG byte-identical to the uninterrupted run" || bad "resumed PNGs differ"
  ls -i "$WORK"/kill/img-*.png | sort -k2 | join -1 2 -2 2 - <(sort -k2 "$WORK/inodes.before") > "$WORK/inodes.join"
  changed=$(awk '$2 != $3' "$WORK/inodes.join" | wc -l)
  [ "$changed" = 0 ] && [ -s "$WORK/inodes.before" ] && ok "files finished before the kill were not rewritten" \
    || bad "$changed finished files rewritten"
  ls "$WORK"/kill/*.tmp > /dev/null 2>&1 && bad "temporary files left behind" || true
else
  bad "kill came too early or too late ($before lines)"
fi

# 3) other settings are refused; --overwrite replaces the run
"$BIN" "${RUN[@]}" --steps 41 --out "$WORK/kill" > "$WORK/other.log" 2>&1
rc=$?; { [ $rc = 1 ] && grep -q "holds a run with other settings" "$WORK/other.log"; } && ok "other settings refused (rc $rc)" \
  || bad "other settings: rc $rc $(tail -1 "$WORK/other.log")"
"$BIN" generate --model "$WORK/m" --prompt "one" --steps 2 --out "$WORK/kill" --overwrite --quiet 2> /dev/null \
  && [ "$(wc -l < "$WORK/kill/images.jsonl")" = 1 ] && [ "$(ls "$WORK"/kill/img-*.png | wc -l)" = 1 ] \
  && ok "--overwrite replaced the earlier run (1 line, 1 PNG)" || bad "--overwrite"

# 4) every image has its own seed and reproduces alone; provenance in the PNG
line=$(grep '"index":17,' "$WORK/ref/images.jsonl")
seed=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["seed"])')
prompt=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prompt"])')
[ "$seed" = 24 ] && ok "image 17 has seed 7 + 17" || bad "image 17 seed $seed"
"$BIN" generate --model "$WORK/m" --prompt "$prompt" --seed "$seed" --steps 40 --out "$WORK/alone" --quiet 2> /dev/null
cmp -s "$WORK/alone/img-00000-seed24.png" "$WORK/ref/img-00017-seed24.png" && ok "generate --prompt P --seed s reproduces it alone" \
  || bad "image 17 not reproduced alone"
python3 - "$WORK/ref/img-00017-seed24.png" "$prompt" <<'PY' && ok "PNG 'parameters' text chunk: prompt, steps, sampler, CFG, seed, size" || bad "provenance chunk"
import sys, zlib, struct
data = open(sys.argv[1], "rb").read()
pos, text = 8, {}
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind in (b"tEXt", b"iTXt"):
        key, rest = body.split(b"\0", 1)
        if kind == b"iTXt":
            rest = rest[2:].split(b"\0", 2)[2]
        text[key.decode()] = rest.decode()
    pos += 12 + n
p = text.get("parameters", "")
assert p.startswith(sys.argv[2] + "\n"), p
assert "Steps: 40" in p and "Seed: 24" in p and "CFG scale: 7.5" in p and "Size: 16x16" in p, p
PY

# 5) JSONL input: per-line settings; errors name the line and the key
cat > "$WORK/jobs.jsonl" <<'EOF'
{"prompt": "a red circle", "images": 2}
{"prompt": "a blue square", "seed": 100, "steps": 3, "guidance": 1}
{"prompt": "a green triangle", "negative_prompt": "red", "width": 24, "height": 16}
EOF
if "$BIN" generate --model "$WORK/m" --prompts "$WORK/jobs.jsonl" --steps 2 --seed 1 --out "$WORK/jl" --quiet 2> "$WORK/jl.log"; then
  python3 - "$WORK/jl/images.jsonl" <<'PY' && ok "JSONL: images, seed, steps, guidance, negative prompt and size per line" || bad "JSONL lines"
import json, sys
rows = {j["index"]: j for j in map(json.loads, open(sys.argv[1]))}
assert len(rows) == 4, rows
assert [rows[i]["seed"] for i in range(4)] == [1, 2, 100, 4], [rows[i]["seed"] for i in range(4)]
assert rows[2]["steps"] == 3 and rows[2]["guidance"] == 1 and rows[0]["steps"] == 2
assert rows[3]["negative_prompt"] == "red" and rows[3]["width"] == 24 and rows[3]["height"] == 16
PY
else
  bad "JSONL run failed: $(tail -2 "$WORK/jl.log")"
fi
printf '{"prompt": "ok"}\n{"prompt": "x", "stepz": 3}\n' > "$WORK/bad.jsonl"
"$BIN" generate --model "$WORK/m" --prompts "$WORK/bad.jsonl" --out "$WORK/badjl" > "$WORK/badjl.log" 2>&1
grep -q "bad.jsonl:2: unknown key 'stepz'" "$WORK/badjl.log" && ok "JSONL error names line and key" || bad "JSONL error: $(tail -1 "$WORK/badjl.log")"
printf '{"prompt": "ok", "steps": "many"}\n' > "$WORK/bad2.jsonl"
"$BIN" generate --model "$WORK/m" --prompts "$WORK/bad2.jsonl" --out "$WORK/badjl2" > "$WORK/badjl2.log" 2>&1
grep -q "bad2.jsonl:1: key 'steps' has the wrong type" "$WORK/badjl2.log" && ok "JSONL type error names line and key" \
  || bad "JSONL type error: $(tail -1 "$WORK/badjl2.log")"

# 6) many images: folders of at most --shard-size files; webdataset tar shards
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 10 --steps 2 --shard-size 4 --out "$WORK/sh" --quiet 2> /dev/null
dirs=$(ls -d "$WORK"/sh/0000*/ 2>/dev/null | wc -l); most=$(for d in "$WORK"/sh/0000*/; do ls "$d" | wc -l; done | sort -n | tail -1)
[ "$dirs" = 3 ] && [ "$most" = 4 ] && ok "sharded folders: 3 folders of at most 4 files" || bad "sharded folders: $dirs dirs, max $most"
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 10 --steps 2 --shard-size 4 --format webdataset --out "$WORK/wds" --quiet 2> /dev/null
if [ -f "$WORK/wds/00000.tar" ] && [ -f "$WORK/wds/00002.tar" ]; then
  n=$(tar -tf "$WORK/wds/00000.tar" | wc -l); mkdir -p "$WORK/wdsx"; tar -xf "$WORK/wds/00001.tar" -C "$WORK/wdsx"
  cmp -s "$WORK/wdsx/000000005.png" "$WORK/sh/00001/img-00000005-seed5.png" && [ "$n" = 8 ] \
    && [ "$(grep -c '"shard":"00001.tar"' "$WORK/wds/images.jsonl")" = 4 ] && ls "$WORK"/wds/*.part > /dev/null 2>&1; rc=$?
  [ $rc != 0 ] && [ "$n" = 8 ] && cmp -s "$WORK/wdsx/000000005.png" "$WORK/sh/00001/img-00000005-seed5.png" \
    && ok "webdataset: tar shards of KEY.png + KEY.json, the same PNG bytes, lines name shard and key" \
    || bad "webdataset content ($n members)"
else
  bad "webdataset shards missing: $(ls "$WORK/wds")"
fi

# partial images: --previews K writes K denoised estimates per image, growing closer to it; the image is the same
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 2 --steps 8 --previews 2 --out "$WORK/pv" --quiet 2> /dev/null
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 2 --steps 8 --out "$WORK/pv0" --quiet 2> /dev/null
python3 - "$WORK/pv" "$WORK/pv0" <<'PY' && ok "--previews 2: 2 partial images per image, approaching it; the image unchanged" || bad "previews"
import sys, zlib, struct
def pixels(path):  # 8-bit RGB PNG without filters beyond what zlib + per-row filter 0..4 give
    data = open(path, "rb").read()
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR": w, h = struct.unpack(">II", body[:8])
        if kind == b"IDAT": idat += body
        pos += 12 + n
    raw, out, prev, stride = zlib.decompress(idat), [], bytearray(w * 3), w * 3
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - 3] if x >= 3 else 0; b = prev[x]; c = prev[x - 3] if x >= 3 else 0
            p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = [0, a, b, (a + b) // 2, a if pa <= pb and pa <= pc else (b if pb <= pc else c)][f]
            line[x] = (line[x] + pred) & 255
        out += line; prev = line
    return out
import os
a, b = sys.argv[1], sys.argv[2]
assert sorted(f for f in os.listdir(a) if "preview" in f) == ["img-00000-seed0-preview-1.png", "img-00000-seed0-preview-2.png",
                                                            "img-00001-seed1-preview-1.png", "img-00001-seed1-preview-2.png"]
assert open(f"{a}/img-00000-seed0.png", "rb").read() == open(f"{b}/img-00000-seed0.png", "rb").read()
final = pixels(f"{a}/img-00000-seed0.png")
d = [sum(abs(x - y) for x, y in zip(pixels(f"{a}/img-00000-seed0-preview-{k}.png"), final)) for k in (1, 2)]
assert d[1] < d[0], d
PY

# 7) a cut last line (killed while writing it) is repaired and its image made again
head -c -20 "$WORK/ref/images.jsonl" > "$WORK/cut.jsonl"; mkdir -p "$WORK/cut"; cp "$WORK/ref/run.json" "$WORK/cut/"
cp "$WORK/cut.jsonl" "$WORK/cut/images.jsonl"
"$BIN" "${RUN[@]}" --out "$WORK/cut" 2> "$WORK/cut.log"
grep -q "the last line was cut" "$WORK/cut.log" && [ "$(norm "$WORK/cut/images.jsonl")" = "$(norm "$WORK/ref/images.jsonl")" ] \
  && ok "cut last line repaired; the run completes with every line once" || bad "cut line: $(tail -2 "$WORK/cut.log")"

# 8) two jobs in one folder: the second is refused while the first holds it
( flock -x 9; sleep 3 ) 9> "$WORK/ref/.diffpipe.lock" &
lk=$!; sleep 0.5
"$BIN" "${RUN[@]}" --out "$WORK/ref" > "$WORK/lock.log" 2>&1
rc=$?; wait $lk
{ [ $rc = 1 ] && grep -q "another diffpipe job.* is writing here" "$WORK/lock.log"; } && ok "a second job on the same folder is refused" \
  || bad "lock: rc $rc $(tail -1 "$WORK/lock.log")"

# 9) a full disk stops the run with a message; images.jsonl keeps only complete lines
if mkdir -p "$WORK/small" && mount -t tmpfs -o size=96k tmpfs "$WORK/small" 2> /dev/null; then
  "$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 400 --steps 1 --out "$WORK/small/o" --quiet > "$WORK/full.log" 2>&1
  rc=$?
  python3 -c "import json,sys; [json.loads(l) for l in open('$WORK/small/o/images.jsonl')]" 2> /dev/null; okjson=$?
  { [ $rc != 0 ] && [ $rc -lt 128 ] && grep -q "disk full?" "$WORK/full.log" && [ $okjson = 0 ]; } \
    && ok "full disk: rc $rc, named, no cut line" || bad "full disk: rc $rc json=$okjson $(tail -1 "$WORK/full.log")"
  umount "$WORK/small"
else
  echo "skip: full disk (cannot mount a small tmpfs here)"
fi

echo "$passed passed, $fails failed"
[ $fails = 0 ]
