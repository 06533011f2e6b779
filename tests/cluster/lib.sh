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
printf 'a photo of a cat\na red circle above a blue square\nthree small triangles\n' > "$WORK/prompts.txt"
