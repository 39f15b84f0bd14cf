#!/usr/bin/env bash
# Exact and L3 runs of one aq-train command for several seeds, all side by
# side on one device, then one table: the accuracy comparisons of
# docs/transformers.md with more than one seed per row.
#   scripts/accuracy-seeds.sh BUILD_DIR OUT_DIR SEEDS aq-train arguments...
# e.g. scripts/accuracy-seeds.sh build results/vit 1,2,3 DATA --arch vit_tiny --epochs 20
# SEEDS is a comma-separated list.  Each run's workspace is
# OUT_DIR/seedS-exact or OUT_DIR/seedS-l3, its TSV and log beside it; if
# any of them exists already, nothing runs (exit 2).
# L3 is aq-train's default level; extra arguments go to both runs, so
# `--attention-bits 0` compares L3 with 2-bit attention.  The table (TSV on
# stdout): seed, row, the last epoch's val_top1 (or val_loss for text),
# the gap to exact, the last epoch's train_loss.
set -uo pipefail
[ $# -ge 4 ] || { echo "usage: $0 BUILD_DIR OUT_DIR SEEDS aq-train arguments..." >&2; exit 2; }
T=$1/tools/aq-train
OUT=$2
IFS=, read -r -a seeds <<<"$3"
shift 3
[ -x "$T" ] || { echo "$0: no aq-train in $T" >&2; exit 2; }
for s in "${seeds[@]}"; do
  for row in exact l3; do
    for f in "$OUT/seed$s-$row" "$OUT/seed$s-$row.tsv" "$OUT/seed$s-$row.log"; do
      [ -e "$f" ] && { echo "$0: $f exists; choose another OUT_DIR" >&2; exit 2; }
    done
  done
done
mkdir -p "$OUT"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; exit 130' INT TERM
for s in "${seeds[@]}"; do
  for row in exact l3; do
    extra=()
    [ $row = exact ] && extra=(--ca False)
    "$T" "$@" --seed "$s" "${extra[@]}" --workspace "$OUT/seed$s-$row" \
      >"$OUT/seed$s-$row.tsv" 2>"$OUT/seed$s-$row.log" &
    pids+=($!)
  done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
# The last line's value of a column named in the header (NA if absent).
last() {  # file, column name
  awk -F'\t' -v want="$2" 'NR == 1 { for (i = 1; i <= NF; ++i) if ($i == want) c = i; next }
                            { v = c ? $c : "NA" } END { print (v == "" ? "NA" : v) }' "$1"
}
metric=val_top1
head -n 1 "$OUT/seed${seeds[0]}-exact.tsv" 2>/dev/null | grep -qw val_top1 || metric=val_loss
printf 'seed\trow\t%s\tgap\ttrain_loss\n' "$metric"
for s in "${seeds[@]}"; do
  e=$(last "$OUT/seed$s-exact.tsv" "$metric")
  for row in exact l3; do
    f=$OUT/seed$s-$row.tsv
    v=$(last "$f" "$metric")
    gap=-
    [ $row = exact ] ||
      gap=$(awk -v a="$v" -v b="$e" 'BEGIN { if (a == "NA" || b == "NA") print "NA"; else printf "%+.2f\n", a - b }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$s" "$row" "$v" "$gap" "$(last "$f" train_loss)"
  done
done
[ $status = 0 ] || echo "$0: a run failed; its log is in $OUT" >&2
exit $status
