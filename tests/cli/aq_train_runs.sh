#!/usr/bin/env bash
# aq-train for real runs: an ImageNet-style folder of every image kind
# (tests/fixtures/images) with a bad file skipped or failing, --check-data;
# a workspace's checkpoint never overwritten, --resume auto, metrics.tsv
# across resumes, --checkpoint-interval, SIGUSR1; log lines for batch jobs and
# the terminal's progress bar.
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
run=(--dataset imagenet --arch resnet18 --image-size 16 --device cpu --seed 2 --val-batches 1 -c fanin --lr 0.01 "$img")
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

# --- logs: timestamped lines in a batch job, a bar that fits the terminal ------------
"$TRAIN" "${run[@]}" -b 3 --epochs 2 --log-interval 2 --workspace "$tmp/l1" >/dev/null 2>"$tmp/err"; rc=$?
line='^aq: info: [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z step [0-9]+/10 epoch [12]/2 batch [0-9]+/5 loss [0-9.]+ acc [0-9.]+% lr [0-9.e-]+ [0-9.]+ img/s data wait [0-9]+% ETA [0-9dhms?]+$'
check "--log-interval 2: lines at steps 2, 4, 6, 8, 10 with time, loss, accuracy, lr, img/s, data wait, ETA" \
  '[ $rc -eq 0 ] && [ $(grep -cE "$line" "$tmp/err") -eq 5 ] && [ "$(grep -oE "step [0-9]+/" "$tmp/err" | xargs)" = "step 2/ step 4/ step 6/ step 8/ step 10/" ]'
"$TRAIN" "${run[@]}" -b 3 --epochs 21 --workspace "$tmp/l2" >/dev/null 2>"$tmp/err"; rc=$?
check "stderr not a terminal: a line every 100 steps by default" \
  '[ $rc -eq 0 ] && [ "$(grep -oE "step [0-9]+/[0-9]+" "$tmp/err" | xargs)" = "step 100/105" ]'
if command -v script >/dev/null && command -v stty >/dev/null; then
  script -qec "stty cols 50; $TRAIN ${run[*]} -b 3 --epochs 2 --workspace $tmp/l3" /dev/null >"$tmp/tty" 2>&1
  # Each redraw of the bar, escape sequences removed.
  tr '\r' '\n' <"$tmp/tty" | grep -E "ETA|validating" | sed 's/\x1b\[K//g' >"$tmp/bars"
  check "terminal bar: ETA and validation shown" 'grep -q "ETA [0-9]" "$tmp/bars" && grep -q "^validating 2/2 .* 1/1" "$tmp/bars"'
  check "terminal bar: fits 50 columns" '[ "$(awk "length > 49" "$tmp/bars" | wc -l)" -eq 0 ]'
  esc=$(printf '\033')
  check "terminal bar: each redraw clears the rest of the line" \
    '[ "$(tr "\\r" "\\n" <"$tmp/tty" | grep "ETA" | grep -cv "$esc\\[K\$")" -eq 0 ] && [ -s "$tmp/bars" ]'
  check "terminal: no log lines by default" '! grep -qE "step [0-9]+/" "$tmp/tty"'
else
  echo "SKIP: terminal bar (no script(1) or stty)" >&2
fi

# --- speed settings (on by default on CUDA only; on the CPU they can be asked for) ---
"$TRAIN" "${run[@]}" -b 5 --epochs 1 --log-interval 1 --channels-last True --cudnn-benchmark False --workspace "$tmp/cl" >/dev/null 2>"$tmp/cl.err"; rc=$?
"$TRAIN" "${run[@]}" -b 5 --epochs 1 --log-interval 1 --channels-last False --workspace "$tmp/nc" >/dev/null 2>"$tmp/nc.err"
a=$(grep -o "step 1/3 .* loss [^ ]*" "$tmp/cl.err" | awk '{print $NF}'); b=$(grep -o "step 1/3 .* loss [^ ]*" "$tmp/nc.err" | awk '{print $NF}')
check "--channels-last True: the first step's loss as in the default layout ($a, $b)" '[ $rc -eq 0 ] && [ -n "$a" ] && [ "$a" = "$b" ]'
"$TRAIN" "${run[@]}" --channels-last sometimes >/dev/null 2>"$tmp/err"; rc=$?
check "--channels-last sometimes: exit 2" '[ $rc -eq 2 ]'

# --- scripts/accuracy-seeds.sh: exact and L3 pairs of several seeds, one table -------
seeds=$(dirname "$0")/../../scripts/accuracy-seeds.sh
syn=(--dataset synthetic --arch preact_resnet20 --image-size 8 --num-classes 4 --device cpu -j 0 -b 2 --max-steps 2
     --val-batches 1 -q)
"$seeds" "$(dirname "$(dirname "$TRAIN")")" "$tmp/acc" 1,2 "${syn[@]}" >"$tmp/acc.tsv" 2>"$tmp/err"; rc=$?
check "accuracy-seeds.sh: a row per seed and level, the gap to exact on L3's" \
  '[ $rc -eq 0 ] && [ "$(cut -f1,2 "$tmp/acc.tsv" | tr "\t\n" ", ")" = "seed,row 1,exact 1,l3 2,exact 2,l3 " ] &&
   [ "$(awk -F"\t" "NR > 1 && \$2 == \"exact\" {print \$4}" "$tmp/acc.tsv" | sort -u)" = "-" ] &&
   awk -F"\t" "NR > 1 && \$2 == \"l3\" && \$4 !~ /^[+-][0-9]/ {bad = 1} END {exit bad}" "$tmp/acc.tsv"'
"$seeds" "$(dirname "$(dirname "$TRAIN")")" "$tmp/acc" 1 "${syn[@]}" >/dev/null 2>"$tmp/err"; rc=$?
check "accuracy-seeds.sh: an existing run refused (exit 2), nothing overwritten" \
  '[ $rc -eq 2 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && [ $(wc -l <"$tmp/acc/seed1-exact.tsv") -eq 2 ]'
exit $fail
