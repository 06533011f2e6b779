#!/usr/bin/env bash
# diffpipe generate as a user runs it: outputs on success; on bad input a message naming the file, key or
# value, a non-zero exit, and no crash (exit codes >= 128 are signals and fail the test).
set -u
BIN=$1; WORK=$2
rm -rf "$WORK"; mkdir -p "$WORK"
fails=0; passed=0
ok()  { echo "ok: $*"; passed=$((passed+1)); }
bad() { echo "FAIL: $*"; fails=$((fails+1)); }
"$BIN" init-model --out "$WORK/m" --seed 3 2>/dev/null || { echo "FAIL: init-model"; exit 1; }

# success: PNGs, one JSON line per image (stdout and images.jsonl), a contact sheet
if "$BIN" generate --model "$WORK/m" --prompt "a red circle" --prompt "a blue square" --images 2 --steps 4 \
     --sampler euler_a --width 24 --height 16 --out "$WORK/out" > "$WORK/stdout" 2> "$WORK/stderr"; then
  n_png=$(ls "$WORK"/out/img-*.png | wc -l); n_json=$(wc -l < "$WORK/out/images.jsonl"); n_out=$(grep -c '"file"' "$WORK/stdout")
  [ "$n_png" = 4 ] && [ "$n_json" = 4 ] && [ "$n_out" = 4 ] && [ -f "$WORK/out/contact_sheet.png" ] \
    && ok "4 PNGs, 4 JSON lines, contact sheet" || bad "outputs: $n_png png, $n_json jsonl, $n_out stdout"
  grep -q '"prompt":"a blue square".*"seed":3' "$WORK/out/images.jsonl" && grep -q '"width":24' "$WORK/out/images.jsonl" \
    && ok "JSON lines carry prompt, seed and settings" || bad "JSON line content"
  head -c 8 "$WORK/out/img-00000-seed0.png" | od -c | grep -q 'P   N   G' && ok "PNG signature" || bad "not a PNG"
else
  bad "generate failed: $(tail -3 "$WORK/stderr")"
fi
# the same seed gives the same image; guidance 1 works
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 2 --steps 4 --sampler euler_a --width 24 --height 16 \
  --out "$WORK/again" --quiet 2>/dev/null
cmp -s "$WORK/out/img-00001-seed1.png" "$WORK/again/img-00001-seed1.png" && ok "same seed, same bytes" || bad "seed not reproducible"

# --profile: where the time went, per rank (every part that ran, and each stage thread's idle time)
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 2 --steps 3 --profile --out "$WORK/prof" --quiet \
  2> "$WORK/prof.log" && grep -q "rank 0: wall .*text encoder .*unet .*sampler .*vae .*idle: encode .*denoise .*decode" \
  "$WORK/prof.log" && ok "--profile breakdown" || bad "--profile: $(grep -A2 profile "$WORK/prof.log" | head -3)"

# sizes whose attention has many tokens run without materialising L x L scores: the reference model at 512 px is
# 128 x 128 latents (16,384 tokens; its L x L float32 scores alone would need 68 GB), in bounded memory
GOLD=${DIFFPIPE_GOLDEN:-}
if [ -n "$GOLD" ] && [ -d "$GOLD/model" ] && [ -x /usr/bin/time ]; then
  /usr/bin/time -f "%M" -o "$WORK/big.rss" "$BIN" generate --model "$GOLD/model" --prompt "a cat" --steps 2 \
    --width 512 --height 512 --out "$WORK/big" --quiet 2> "$WORK/big.log"
  rss_mb=$(( $(tail -1 "$WORK/big.rss") / 1024 ))
  w=$(od -An -tu1 -j18 -N2 "$WORK/big/img-00000-seed0.png" 2>/dev/null | awk '{print $1 * 256 + $2}')
  [ "$w" = 512 ] && [ "$rss_mb" -lt 4096 ] && ok "reference model at 512x512 (128x128 latents): peak RSS $rss_mb MB" \
    || bad "512x512 on the reference model: width '$w', peak RSS $rss_mb MB: $(tail -2 "$WORK/big.log")"
else
  echo "skip: 512x512 check needs DIFFPIPE_GOLDEN (reference folder) and /usr/bin/time"
fi

# SIGTERM mid-run: a message and exit 143 (128 + 15), no crash
"$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 500 --steps 50 --out "$WORK/term" --quiet \
  > /dev/null 2> "$WORK/term.log" &
pid=$!; sleep 2; kill -TERM $pid; wait $pid; rc=$?
[ $rc = 143 ] && grep -q "terminated (SIGTERM)" "$WORK/term.log" && ok "SIGTERM: message, rc 143" \
  || bad "SIGTERM: rc $rc: $(tail -1 "$WORK/term.log")"

# every sampler through the whole pipeline (PLMS makes steps + 1 model calls)
for s in ddim euler euler_karras euler_a heun kdpm2 lms dpmpp_2m dpmpp_2m_karras dpmpp_2m_sde dpmpp_3m_sde_karras pndm unipc; do
  "$BIN" generate --model "$WORK/m" --prompt "a red circle" --images 2 --steps 3 --sampler $s --out "$WORK/s-$s" --quiet 2> "$WORK/s-$s.log" \
    && [ "$(ls "$WORK/s-$s"/img-*.png | wc -l)" = 2 ] && ok "sampler $s" || bad "sampler $s: $(tail -1 "$WORK/s-$s.log")"
done

# dataset + fidelity: the ground truth scores 1.0; random-model images score low
"$BIN" data --out "$WORK/real" --count 40 --seed 5 2>/dev/null && [ "$(ls "$WORK"/real/real-*.png | wc -l)" = 40 ] \
  && ok "data: 40 images" || bad "data command"
f=$("$BIN" eval fidelity --images "$WORK/real" 2>&1)
echo "$f" | grep -q '"colour":1.0' && echo "$f" | grep -q '"position":1.0' && ok "eval fidelity on ground truth: $f" || bad "eval fidelity: $f"
"$BIN" generate --model "$WORK/m" --prompt "a small red circle at the top left on a black background" \
  --steps 2 --out "$WORK/gen-fid" --quiet 2>/dev/null
g=$("$BIN" eval fidelity --images "$WORK/gen-fid" 2>&1) && ok "eval fidelity on generated images: $g" || bad "eval fidelity generated: $g"

# training: a few steps of every module, checkpoint + resume, and the result loads and generates at 2x size
T="$WORK/trained"
for m in vae text sr; do
  "$BIN" train $m --model "$T" --steps 3 --batch 4 --save-every 2 2> "$WORK/train-$m.log" || bad "train $m: $(tail -1 "$WORK/train-$m.log")"
done
"$BIN" train unet --model "$T" --steps 2 --batch 4 --save-every 1 2> "$WORK/train-unet.log" || bad "train unet: $(tail -1 "$WORK/train-unet.log")"
"$BIN" train unet --model "$T" --steps 4 --batch 4 --resume 2> "$WORK/train-resume.log" \
  && grep -q "step 4/4" "$WORK/train-resume.log" && ! grep -q "step 1/4" "$WORK/train-resume.log" \
  && ok "train: every module, resumed from the checkpoint at step 2" || bad "train resume: $(tail -2 "$WORK/train-resume.log")"
if "$BIN" generate --model "$T" --prompt "a small red circle at the top left on a black background" --steps 3 \
     --out "$WORK/trained-out" --quiet 2> "$WORK/trained-gen.log"; then
  grep -q '"width":64' "$WORK/trained-out/images.jsonl" && ok "trained model generates 32 px, super-resolved to 64 px" \
    || bad "super-resolution: $(cat "$WORK/trained-out/images.jsonl")"
  "$BIN" eval clip-score --images "$WORK/trained-out" --model "$T" > "$WORK/cs.json" && grep -q clip_score "$WORK/cs.json" \
    && ok "eval clip-score: $(cat "$WORK/cs.json")" || bad "eval clip-score"
else
  bad "generate with the trained model: $(tail -2 "$WORK/trained-gen.log")"
fi
"$BIN" data --out "$WORK/real-b" --count 40 --seed 6 2>/dev/null
"$BIN" eval fid --real "$WORK/real" --generated "$WORK/real-b" --model "$T" > "$WORK/fid.json" && grep -q '"fid"' "$WORK/fid.json" \
  && ok "eval fid: $(cat "$WORK/fid.json")" || bad "eval fid: $(cat "$WORK/fid.json")"

expect_error() {  # name expected-text args...
  local name=$1 want=$2; shift 2
  "$BIN" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then bad "$name: exit 0"
  elif [ $rc -ge 128 ]; then bad "$name: crashed (rc $rc)"
  elif grep -qF -- "$want" "$WORK/$name.log"; then ok "$name: rc $rc, '$want'"
  else bad "$name: message lacks '$want': $(head -2 "$WORK/$name.log")"; fi
}
G=(generate --prompt x --steps 2 --out "$WORK/err")
expect_error no-model "no-such-dir: model folder not found" "${G[@]}" --model "$WORK/no-such-dir"
expect_error memory "needs about" generate --model "$WORK/m" --prompt x --steps 1 --width 8192 --height 8192 --out "$WORK/err"
grep -q "activations .* GB, but about .* GB of memory is available to it" "$WORK/memory.log" && ok "memory estimate: the numbers and the way out" \
  || bad "memory estimate message: $(cat "$WORK/memory.log")"
touch "$WORK/a-file"
expect_error out-is-file "a-file: cannot create folder" generate --model "$WORK/m" --prompt x --steps 2 --out "$WORK/a-file"
[ ! -e "$WORK/a-file/images.jsonl" ] || bad "out-is-file: wrote into it"
expect_error width "width: 18 is not a positive multiple of 4" "${G[@]}" --model "$WORK/m" --width 18
expect_error sampler "unknown sampler 'deis'" "${G[@]}" --model "$WORK/m" --sampler deis
expect_error option "unknown option --stepz" "${G[@]}" --model "$WORK/m" --stepz 3
expect_error steps-value "--steps expects an integer, got 'ten'" "${G[@]}" --model "$WORK/m" --steps ten
expect_error steps-range "steps: must be in [1, 1000]" "${G[@]}" --model "$WORK/m" --steps 5000
expect_error prompts-file "missing.txt: prompts file not found" generate --model "$WORK/m" --prompts "$WORK/missing.txt"
expect_error no-prompt "give --prompt TEXT or --prompts FILE" generate --model "$WORK/m"
expect_error command "unknown command 'paint'" paint
cp -r "$WORK/m" "$WORK/m-trunc"
truncate -s 100000 "$WORK/m-trunc/unet/diffusion_pytorch_model.safetensors"
expect_error truncated "unet/diffusion_pytorch_model.safetensors: tensor" "${G[@]}" --model "$WORK/m-trunc"
cp -r "$WORK/m" "$WORK/m-cfg"
sed -i 's/"CrossAttnDownBlock2D"/"AttnDownBlock2D"/' "$WORK/m-cfg/unet/config.json"
expect_error block-type "unsupported block type 'AttnDownBlock2D'" "${G[@]}" --model "$WORK/m-cfg"
# config values that crashed (SIGFPE), broke the forward pass or made silent black images are refused at load,
# naming the file and key (#14)
cfg_fault() {  # name component/config.json sed-expression expected-text
  rm -rf "$WORK/m-$1"; cp -r "$WORK/m" "$WORK/m-$1"; sed -i "$3" "$WORK/m-$1/$2"
  expect_error "cfg-$1" "$4" "${G[@]}" --model "$WORK/m-$1"
}
cfg_fault unet-groups unet/config.json 's/"norm_num_groups": *[0-9]*/"norm_num_groups": 0/' "unet/config.json: key 'norm_num_groups': must be at least 1"
cfg_fault vae-groups vae/config.json 's/"norm_num_groups": *[0-9]*/"norm_num_groups": 0/' "vae/config.json: key 'norm_num_groups': must be at least 1"
cfg_fault unet-layers unet/config.json 's/"layers_per_block": *[0-9]*/"layers_per_block": -1/' "key 'layers_per_block': must be at least 1"
cfg_fault unet-eps unet/config.json 's/"norm_eps": *[0-9.e-]*/"norm_eps": -0.5/' "key 'norm_eps': must be a finite number > 0"
cfg_fault vae-scale vae/config.json 's/"scaling_factor": *[0-9.e-]*/"scaling_factor": 0/' "key 'scaling_factor': must be a finite number > 0"
cfg_fault beta scheduler/scheduler_config.json 's/"beta_start": *[0-9.e-]*/"beta_start": -0.001/' "key 'beta_start': must be a finite number > 0"
printf 'a red circle\nok line\nbad \xc3\x28 byte\n' > "$WORK/bad-utf8.txt"
expect_error utf8-file "bad-utf8.txt:3: invalid UTF-8 at byte 4" generate --model "$WORK/m" --prompts "$WORK/bad-utf8.txt" --out "$WORK/err"
expect_error utf8-arg "--prompt #1: invalid UTF-8 at byte 1" generate --model "$WORK/m" --prompt "$(printf 'x\xff')" --out "$WORK/err"
"$BIN" generate --model "$WORK/m" --prompt "café ☕ 🚀 naïve" --steps 1 --out "$WORK/utf8ok" --quiet 2> "$WORK/utf8ok.log" \
  && [ -f "$WORK/utf8ok/img-00000-seed0.png" ] && ok "valid multi-byte UTF-8 prompt generates" || bad "valid UTF-8: $(tail -1 "$WORK/utf8ok.log")"
expect_error prompts-dir "is a folder; --prompts takes a file" generate --model "$WORK/m" --prompts "$WORK" --out "$WORK/err"
expect_error prompts-empty "/dev/null: no prompts" generate --model "$WORK/m" --prompts /dev/null --out "$WORK/err"
cfg_fault vae-latents vae/config.json 's/"latent_channels": *[0-9]*/"latent_channels": 3/' "vae/config.json latent_channels 3 disagree"
expect_error threads "--threads must be in [1," "${G[@]}" --model "$WORK/m" --threads 100000
expect_error eval-metric "unknown metric 'fud'" eval fud --images "$WORK/real"
expect_error eval-missing "images.jsonl: file not found" eval fidelity --images "$WORK/nothing"
echo '{"prompt": "a red elephant at the top on a black background", "file": "x.png"}' > "$WORK/bad.jsonl"; mkdir -p "$WORK/badeval"; mv "$WORK/bad.jsonl" "$WORK/badeval/images.jsonl"
expect_error eval-caption "unknown word 'elephant'" eval fidelity --images "$WORK/badeval"
# a prompt longer than CLIP reads: a warning naming the line (as diffusers warns), the image is still made
printf 'a red circle\n%s\n' "$(printf 'a big blue square and %.0s' $(seq 1 20))" > "$WORK/long.txt"
if "$BIN" generate --model "$WORK/m" --prompts "$WORK/long.txt" --steps 2 --out "$WORK/long" --quiet 2> "$WORK/long.log"; then
  grep -q "warning: $WORK/long.txt:2: the prompt has [0-9]* tokens; CLIP reads 77" "$WORK/long.log" \
    && ! grep -q "long.txt:1:" "$WORK/long.log" && ok "long prompt: truncation warning names the line" \
    || bad "long prompt warning: $(cat "$WORK/long.log")"
else
  bad "long prompt run failed: $(tail -2 "$WORK/long.log")"
fi

# every command: -h prints help made from its option list (rc 0); an unknown option is an error naming it
"$BIN" --version | grep -q "^diffpipe [0-9]*\.[0-9]*\.[0-9]*" && ok "--version" || bad "--version"
for c in generate bench init-model data "train vae" "eval fid" "eval fidelity" "eval clip-score" "eval features" "eval reconstruct"; do
  out=$($BIN $c -h 2>&1); rc=$?
  { [ $rc = 0 ] && echo "$out" | head -1 | grep -q "^usage: .*diffpipe" && echo "$out" | grep -q -- "-h, --help"; } \
    || bad "'$c -h': rc $rc, $(echo "$out" | head -1)"
  out=$($BIN $c --no-such-option 1 2>&1); rc=$?
  { [ $rc = 1 ] && echo "$out" | grep -q "unknown option --no-such-option"; } || bad "'$c --no-such-option': rc $rc: $out"
done
ok "-h and unknown options on every subcommand"
"$BIN" generate --model "$WORK/m" --prompt x --steps many > "$WORK/steps.log" 2>&1
[ $? = 1 ] && grep -q "generate: --steps expects an integer, got 'many'" "$WORK/steps.log" && ok "malformed number named" \
  || bad "malformed number: $(cat "$WORK/steps.log")"

# init-model --preset tiny-xl writes an SDXL folder that loads and generates; an unknown preset is named
if "$BIN" init-model --out "$WORK/xl" --preset tiny-xl --seed 2 2> "$WORK/xl.log" &&
   "$BIN" generate --model "$WORK/xl" --prompt "a cat" --steps 3 --quiet --out "$WORK/xlo" 2>> "$WORK/xl.log" &&
   [ -f "$WORK/xlo/img-00000-seed0.png" ] && grep -q StableDiffusionXLPipeline "$WORK/xl/model_index.json"; then
  ok "init-model --preset tiny-xl: an SDXL folder that generates"
else bad "tiny-xl preset: $(tail -2 "$WORK/xl.log")"; fi
"$BIN" init-model --out "$WORK/bad-preset" --preset sd9 > "$WORK/preset.log" 2>&1
[ $? = 1 ] && grep -q "unknown preset 'sd9'" "$WORK/preset.log" && ok "unknown preset named" \
  || bad "unknown preset: $(cat "$WORK/preset.log")"

echo "$passed passed, $fails failed"
[ $fails = 0 ]
