#!/usr/bin/env bash
# aq-train for real runs: an ImageNet-style folder of every image kind
# (tests/fixtures/images) with a bad file skipped or failing, --check-data;
# a workspace's checkpoint never overwritten, --resume auto, metrics.tsv
# across resumes, --checkpoint-interval, SIGUSR1.
#   aq_train_runs.sh AQ_TRAIN FIXTURES
set -u
TRAIN=$1
FIX=$2
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; [ -n "${AQ_DEBUG:-}" ] && cat "$tmp/err" >&2; fail=1; fi; }
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

# --- resume that is safe to requeue --------------------------------------------------
run=(--dataset imagenet --arch resnet18 --image-size 16 --device cpu --seed 2 --val-batches 1 "$img")
ws="$tmp/ws"
"$TRAIN" "${run[@]}" -b 5 --epochs 1 --workspace "$ws" >/dev/null 2>&1; rc=$?
check "fresh run: checkpoint and metrics.tsv (header, one row)" \
  '[ $rc -eq 0 ] && [ -s "$ws/checkpoint.h5" ] && [ $(wc -l <"$ws/metrics.tsv") -eq 2 ] && head -1 "$ws/metrics.tsv" | grep -q "^epoch	step	lr"'
cp "$ws/checkpoint.h5" "$tmp/keep.h5"
"$TRAIN" "${run[@]}" -b 5 --epochs 2 --workspace "$ws" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "fresh run over a checkpoint: refused, exit 2, nothing touched" \
  '[ $rc -eq 2 ] && grep -q "^aq-train: .*checkpoint.h5 exists: .*--resume auto.*--overwrite" "$tmp/err" && cmp -s "$ws/checkpoint.h5" "$tmp/keep.h5" && [ ! -s "$tmp/out" ]'
"$TRAIN" "${run[@]}" -b 5 --epochs 2 --resume auto --workspace "$ws" >"$tmp/auto.tsv" 2>/dev/null; rc=$?
check "--resume auto continues the workspace's checkpoint" '[ $rc -eq 0 ] && [ "$(tail -1 "$tmp/auto.tsv" | cut -f1,2)" = "2	6" ]'
check "metrics.tsv: header once, one row per epoch across the resume" \
  '[ $(wc -l <"$ws/metrics.tsv") -eq 3 ] && [ $(grep -c "^epoch" "$ws/metrics.tsv") -eq 1 ] && [ "$(tail -1 "$ws/metrics.tsv")" = "$(tail -1 "$tmp/auto.tsv")" ]'
"$TRAIN" "${run[@]}" -b 5 --epochs 2 --resume auto --workspace "$ws" >/dev/null 2>&1; rc=$?
check "--resume auto of a finished run: nothing to do, exit 0" '[ $rc -eq 0 ] && [ $(wc -l <"$ws/metrics.tsv") -eq 3 ]'
"$TRAIN" "${run[@]}" -b 5 --epochs 1 --resume auto --workspace "$tmp/new" >/dev/null 2>&1; rc=$?
check "--resume auto without a checkpoint starts" '[ $rc -eq 0 ] && [ -s "$tmp/new/checkpoint.h5" ]'
"$TRAIN" "${run[@]}" -b 5 --epochs 1 --overwrite --workspace "$ws" >/dev/null 2>&1; rc=$?
check "--overwrite replaces the checkpoint and metrics" '[ $rc -eq 0 ] && [ $(wc -l <"$ws/metrics.tsv") -eq 2 ] && ! cmp -s "$ws/checkpoint.h5" "$tmp/keep.h5"'
"$TRAIN" "${run[@]}" -b 1 --epochs 1 --checkpoint-interval 4 -v --workspace "$tmp/ci" >/dev/null 2>"$tmp/err"; rc=$?
check "--checkpoint-interval 4: checkpoints at steps 4, 8, 12 of 15" \
  '[ $rc -eq 0 ] && [ "$(grep -o "checkpoint at step [0-9]*" "$tmp/err" | tr -dc "0-9 \n" | xargs)" = "4 8 12" ]'
"$TRAIN" "${run[@]}" -b 5 --checkpoint-interval -1 >/dev/null 2>"$tmp/err"; rc=$?
check "--checkpoint-interval -1: exit 2" '[ $rc -eq 2 ]'
"$TRAIN" "${run[@]}" -b 1 --epochs 1000 --checkpoint-interval 3 --workspace "$tmp/u" >/dev/null 2>"$tmp/err" &
pid=$!
for _ in $(seq 1 300); do [ -s "$tmp/u/checkpoint.h5" ] && break; sleep 0.1; done
kill -USR1 $pid; wait $pid; rc=$?
check "SIGUSR1 (SLURM --signal): checkpoint, exit 138" '[ $rc -eq 138 ] && grep -q "stopped by signal 10" "$tmp/err"'
exit $fail
