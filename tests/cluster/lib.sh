# Shared by the cluster shell tests (sourced): MPI as root, pass/fail counters, PNG comparison, the prompts file.
# Needs WORK set; creates it afresh.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN="mpirun --oversubscribe"
rm -rf "$WORK"; mkdir -p "$WORK"
fails=0; passed=0
ok()   { echo "ok: $*"; passed=$((passed+1)); }
bad()  { echo "FAIL: $*"; fails=$((fails+1)); }
same_pngs() {  # same_pngs DIR_A DIR_B: every image of A has a byte-identical twin in B
  local n=0 s=0
  for f in "$1"/img-*.png; do n=$((n+1)); cmp -s "$f" "$2/$(basename "$f")" && s=$((s+1)); done
  [ $n -gt 0 ] && [ $s = $n ]
}
same_pixels() {  # same_pixels A.png B.png: the same decoded pixel rows (the PNG text chunks may differ)
  python3 - "$1" "$2" <<'PY'
import sys, zlib, struct
def pixels(f):
    d = open(f, "rb").read(); i = 8; idat = b""
    while i < len(d):
        n, t = struct.unpack(">I4s", d[i:i + 8]); i += 8
        if t == b"IDAT": idat += d[i:i + n]
        i += n + 4
    return zlib.decompress(idat)
sys.exit(0 if pixels(sys.argv[1]) == pixels(sys.argv[2]) else 1)
PY
}
printf 'a photo of a cat\na red circle above a blue square\nthree small triangles\n' > "$WORK/prompts.txt"
