#!/usr/bin/env bash
# aq-train for real runs: an ImageNet-style folder of every image kind
# (tests/fixtures/images) with a bad file skipped or failing, --check-data.
#   aq_train_runs.sh AQ_TRAIN FIXTURES
set -u
TRAIN=$1
FIX=$2
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# --- images decoded by content; a bad one skipped and counted, or failing ----------
img="$tmp/imagenet"
for split in train val; do
  for cls in a b; do
    mkdir -p "$img/$split/$cls"
    for f in rgb.jpg gray.jpg cmyk.jpg ycck.jpg png-named.JPEG gray.png rgba.png; do cp "$FIX/$f" "$img/$split/$cls/$cls-$f"; done
  done
done
cp "$FIX/truncated.jpg" "$img/train/b/truncated.jpg"
inet=(--dataset imagenet --arch resnet18 --image-size 16 -b 5 --device cpu --seed 1 --epochs 1 --val-batches 1 "$img")
"$TRAIN" "${inet[@]}" --check-data >"$tmp/check.tsv" 2>"$tmp/err"; rc=$?
check "--check-data: both splits, the bad file named, exit 0" \
  '[ $rc -eq 0 ] && printf "split\timages\tbad\ntrain\t15\t1\ntest\t14\t0\n" | cmp -s - "$tmp/check.tsv" && grep -q "truncated.jpg" "$tmp/err"'
"$TRAIN" "${inet[@]}" --check-data --bad-images fail >/dev/null 2>"$tmp/err"; rc=$?
check "--check-data --bad-images fail: exit 1" '[ $rc -eq 1 ] && grep -q "1 image(s) cannot be read" "$tmp/err"'
"$TRAIN" "${inet[@]}" --workspace "$tmp/i1" >"$tmp/i1.tsv" 2>"$tmp/err"; rc=$?
check "every image kind trains; the bad one skipped with a warning and counted in the epoch's log" \
  '[ $rc -eq 0 ] && [ $(grep -c "skipped: .*truncated.jpg" "$tmp/err") -eq 1 ] && grep -q "bad images skipped 1 train, 0 val" "$tmp/err"'
"$TRAIN" "${inet[@]}" -q --bad-images fail --workspace "$tmp/i2" >/dev/null 2>"$tmp/err"; rc=$?
check "--bad-images fail: exit 1, one line naming the file" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "^aq-train: .*truncated.jpg" "$tmp/err"'
"$TRAIN" "${inet[@]}" --bad-images maybe >/dev/null 2>"$tmp/err"; rc=$?
check "--bad-images maybe: exit 2" '[ $rc -eq 2 ] && grep -q "bad-images" "$tmp/err"'
exit $fail
