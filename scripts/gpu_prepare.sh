#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for one call of scripts/gpu_check.sh on the GPU machine, which has no network:
#   .gpu/deps.tar.xz   headers and libraries its image lacks (ICU, libpng, zlib headers, nlohmann-json, GoogleTest, toml++, CLI11),
#                      unpacked from this Debian machine's packages
#   .gpu/golden.tar.xz the reference folder (../shared/golden/tiny-sd), compressed
#   .gpu/wheels/       diffusers' wheel for the side-by-side benchmark (its dependencies are on the machine)
# Then: run (device tool) with carry [".gpu"] and command "bash scripts/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
G=.gpu
mkdir -p "$G/debs" "$G/wheels"
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
if [ ! -f "$G/deps.tar.xz" ]; then
  (cd "$G/debs" && apt-get download libicu-dev libicu72 icu-devtools libpng-dev libpng16-16 zlib1g-dev \
      nlohmann-json3-dev libgtest-dev libgmock-dev libtomlplusplus-dev libtomlplusplus3 libcli11-dev >/dev/null)
  rm -rf "$G/deps" && mkdir -p "$G/deps"
  for d in "$G"/debs/*.deb; do dpkg -x "$d" "$G/deps-root"; done
  mv "$G/deps-root/usr/"* "$G/deps/" && rm -rf "$G/deps-root"
  find "$G/deps" -name '*.a' ! -name 'libgtest*' ! -name 'libgmock*' -delete; rm -rf "$G/deps/share/doc" "$G/deps/share/man" "$G/deps/bin" "$G/deps/sbin"
  tar -C "$G" -cJf "$G/deps.tar.xz" deps && rm -rf "$G/deps" "$G/debs"
fi
GOLDEN=${DIFFPIPE_GOLDEN:-../shared/golden/tiny-sd}
# the reference folder travels compressed (its tokenizer is 5 MB of text); gpu_check.sh unpacks it
rm -rf "$G/golden"
# with the small references scripts/test.sh made under build/golden (T5, DDPM; < 1 MB), when present. The SDXL
# (29 MB) and DeepFloyd IF (21 MB) ones are random weights that do not compress: with the tracked tree (~33 MB) and
# the rest of .gpu (~31 MB) they would pass the device tool's 64 MiB carry limit, so they stay here.
EXTRA=""; for r in tiny-t5 tiny-ddpm; do [ -f "build/golden/$r/golden.json" ] && EXTRA="$EXTRA $r"; done
[ -d "$GOLDEN" ] && tar -cJf "$G/golden.tar.xz" -C "$(dirname "$GOLDEN")" "$(basename "$GOLDEN")" \
  ${EXTRA:+-C "$PWD/build/golden" $EXTRA}
ls "$G"/wheels/diffusers-*.whl >/dev/null 2>&1 || python3 -m pip download --quiet --no-deps "diffusers==0.42.1" -d "$G/wheels"
rm -rf "$G/debs"
du -sh "$G"  # the device tool carries at most 64 MiB, this and the tracked tree together
echo "tracked tree: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
