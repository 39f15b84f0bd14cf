#!/usr/bin/env bash
# aq-train and aq-eval from the shell: usage errors, a short real training on
# Fashion-MNIST (2-bit and exact, same seed), resume after --max-steps and
# after SIGTERM, ActNN's CIFAR-10/100 command lines on generated CIFAR-format
# files, and aq-eval on good, piped and broken checkpoints.
#   aq_train.sh AQ_TRAIN AQ_EVAL AQ_VARIANCE AQ_CALIBRATE [their four man pages]
set -u
TRAIN=$1
EVAL=$2
VAR=$3
CAL=$4
MAN_TRAIN=${5:-}
MAN_EVAL=${6:-}
MAN_VAR=${7:-}
MAN_CAL=${8:-}
FMNIST=${AQ_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
col() { awk -F'\t' -v c="$1" 'NR==1{for(i=1;i<=NF;i++) if($i==c) k=i; next} {print $k}' "$2" | tail -1; }

# --- usage ---------------------------------------------------------------------
"$TRAIN" --help >"$tmp/out" 2>"$tmp/err"; rc=$?
check "--help exits 0 on stdout" '[ $rc -eq 0 ] && grep -q "Usage: aq-train" "$tmp/out" && [ ! -s "$tmp/err" ]'
"$TRAIN" --no-such-flag >"$tmp/out" 2>"$tmp/err"; rc=$?
check "unknown flag exits 2" '[ $rc -eq 2 ] && grep -q "^aq-train: " "$tmp/err" && [ ! -s "$tmp/out" ]'
"$TRAIN" --cabits=9 >/dev/null 2>"$tmp/err"; rc=$?
check "--cabits=9 exits 2" '[ $rc -eq 2 ] && grep -q "cabits" "$tmp/err"'
"$TRAIN" --epochs -1 >/dev/null 2>"$tmp/err"; rc=$?
check "--epochs -1: exit 2, a readable message" '[ $rc -eq 2 ] && grep -qx "aq-train: --epochs: must be positive, not -1" "$tmp/err"'
"$TRAIN" --lr=-0.5 >/dev/null 2>"$tmp/err"; rc=$?
check "--lr=-0.5: exit 2" '[ $rc -eq 2 ] && grep -q "^aq-train: --lr: must be zero or more, not -0.5" "$tmp/err"'
for bad in "--lr inf" "--lr nan" "--label-smoothing nan" "--label-smoothing inf" "--warmup inf" "--milestones 5,nan"; do
  "$TRAIN" $bad >/dev/null 2>"$tmp/err"; rc=$?
  check "$bad: exit 2" '[ $rc -eq 2 ] && grep -q "^aq-train: --" "$tmp/err"'
done
"$TRAIN" --threads 100000 >/dev/null 2>"$tmp/err"; rc=$?
check "--threads 100000: exit 2, no threads made" '[ $rc -eq 2 ] && grep -qx "aq-train: --threads: must be at most 1024, not 100000" "$tmp/err"'
"$TRAIN" --workers 20000 >/dev/null 2>"$tmp/err"; rc=$?
check "--workers 20000: exit 2" '[ $rc -eq 2 ] && grep -qx "aq-train: --workers: must be at most 1024, not 20000" "$tmp/err"'
"$EVAL" -j 20000 x.h5 >/dev/null 2>"$tmp/err"; rc=$?
check "aq-eval -j 20000: exit 2" '[ $rc -eq 2 ] && grep -q "at most 1024" "$tmp/err"'
"$TRAIN" --arch resnet19 --workspace "$tmp/w0" "$FMNIST" >/dev/null 2>"$tmp/err"; rc=$?
check "unknown arch exits 2" '[ $rc -eq 2 ] && grep -q "unknown architecture" "$tmp/err"'
"$TRAIN" --training-only >/dev/null 2>"$tmp/err"; rc=$?
check "--training-only without --evaluate: exit 2" '[ $rc -eq 2 ] && grep -q "goes with --evaluate" "$tmp/err"'
"$TRAIN" --workspace "$tmp/w0" "$tmp/nowhere" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "missing dataset: exit 1, names the files and the package" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "train-images-idx3-ubyte" "$tmp/err" && grep -q "dataset-fashion-mnist" "$tmp/err"'
"$EVAL" --help >"$tmp/out"; check "aq-eval --help" 'grep -q "Usage: aq-eval" "$tmp/out"'
"$EVAL" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-eval without files exits 2" '[ $rc -eq 2 ]'

for pair in "$TRAIN:$MAN_TRAIN" "$EVAL:$MAN_EVAL" "$VAR:$MAN_VAR" "$CAL:$MAN_CAL"; do
  tool=${pair%%:*}; man=${pair#*:}
  [ -n "$man" ] || continue
  opts_help=$("$tool" --help | grep -oE -- '--[a-z][a-z0-9-]+' | sort -u)
  opts_man=$(grep -oE -- '\\-\\-[a-z][a-z0-9\\-]+' "$man" | sed 's/\\//g' | sort -u)
  check "$(basename "$man"): same options as --help" '[ "$opts_help" = "$opts_man" ]'
  [ "$opts_help" = "$opts_man" ] || diff <(echo "$opts_help") <(echo "$opts_man") >&2
done

if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  echo "SKIP: no Fashion-MNIST in $FMNIST (Debian package dataset-fashion-mnist)" >&2
  exit $fail
fi

# --- a short real training: defaults (Fashion-MNIST, preact_resnet20, 2-bit L3) --
common=(--seed 7 --epochs 1 -b 64 --val-batches 8 --lr-schedule constant --lr 0.05 -q "$FMNIST")
"$TRAIN" "${common[@]}" --max-steps 60 --workspace "$tmp/q" >"$tmp/q1.tsv" 2>"$tmp/err"; rc=$?
check "2-bit: first 60 steps exit 0" '[ $rc -eq 0 ] && [ -s "$tmp/q/checkpoint.h5" ]'
cat "$tmp/err" >&2
"$TRAIN" "${common[@]}" --max-steps 120 --resume "$tmp/q/checkpoint.h5" --workspace "$tmp/q" >"$tmp/q2.tsv" 2>"$tmp/err"; rc=$?
check "2-bit: resumed to 120 steps" '[ $rc -eq 0 ] && [ "$(col step "$tmp/q2.tsv")" = 120 ]'
cat "$tmp/err" >&2
check "TSV header" 'head -1 "$tmp/q1.tsv" | grep -qx "epoch	step	lr	train_loss	train_acc	val_loss	val_top1	val_top5	img_per_s	act_mb	peak_mb"'
l1=$(col train_loss "$tmp/q1.tsv"); l2=$(col train_loss "$tmp/q2.tsv")
top_q=$(col val_top1 "$tmp/q2.tsv"); act_q=$(col act_mb "$tmp/q2.tsv")
echo "2-bit: mean train loss over 60 steps $l1, over 120 $l2; val top-1 $top_q%; activations $act_q MB" >&2
check "2-bit: the loss falls" 'awk -v a="$l1" -v b="$l2" "BEGIN{exit !(b < a && a < 2.31)}"'
check "2-bit: accuracy far above chance (10%)" 'awk -v t="$top_q" "BEGIN{exit !(t > 55)}"'

"$TRAIN" "${common[@]}" --max-steps 120 -c fanin --workspace "$tmp/e" >"$tmp/e.tsv" 2>"$tmp/err"; rc=$?
check "exact: 120 steps exit 0" '[ $rc -eq 0 ]'
top_e=$(col val_top1 "$tmp/e.tsv"); act_e=$(col act_mb "$tmp/e.tsv")
echo "exact: val top-1 $top_e%; activations $act_e MB" >&2
check "exact vs 2-bit: accuracy within 10 points after 120 steps" \
  'awk -v a="$top_e" -v b="$top_q" "BEGIN{d=a-b; if(d<0)d=-d; exit !(d < 10)}"'
check "exact vs 2-bit: activation memory >= 6x" 'awk -v a="$act_e" -v b="$act_q" "BEGIN{exit !(a > 6*b)}"'

# --- resume is exact: 20 + 20 steps give the uninterrupted 40-step model ------------
# On the CPU: resumption is exact there (GPU kernels need not be deterministic).
small=(--seed 3 --epochs 2 -b 32 --val-batches 2 -q --device cpu "$FMNIST")
"$TRAIN" "${small[@]}" --max-steps 40 --workspace "$tmp/r1" >/dev/null 2>&1
"$TRAIN" "${small[@]}" --max-steps 20 --workspace "$tmp/r2" >/dev/null 2>&1
"$TRAIN" "${small[@]}" --max-steps 40 --resume "$tmp/r2/checkpoint.h5" --workspace "$tmp/r2" >/dev/null 2>&1
"$EVAL" --device cpu --data "$FMNIST" --max-batches 4 -q "$tmp/r1/checkpoint.h5" | tail -1 | cut -f2- >"$tmp/r1.eval"
"$EVAL" --device cpu --data "$FMNIST" --max-batches 4 -q "$tmp/r2/checkpoint.h5" | tail -1 | cut -f2- >"$tmp/r2.eval"
check "resumed run equals the uninterrupted one" '[ -s "$tmp/r1.eval" ] && cmp -s "$tmp/r1.eval" "$tmp/r2.eval"'

# --- SIGTERM: finish the step, checkpoint, exit 143; then resume ---------------------
# Killed after its first step (a run stopped before any step writes no checkpoint).
"$TRAIN" --seed 3 --epochs 2 -b 32 --val-batches 2 --device cpu --log-interval 1 --workspace "$tmp/s" "$FMNIST" \
  >"$tmp/s.tsv" 2>"$tmp/s.err" &
pid=$!
for _ in $(seq 1 1200); do grep -q " step 1/" "$tmp/s.err" 2>/dev/null && break; sleep 0.1; done
kill -TERM $pid; wait $pid; rc=$?
check "SIGTERM: exit 143 with a checkpoint" '[ $rc -eq 143 ] && [ -s "$tmp/s/checkpoint.h5" ] && grep -q "continue with --resume" "$tmp/s.err"'
"$TRAIN" "${small[@]}" --max-steps 45 --resume "$tmp/s/checkpoint.h5" --workspace "$tmp/s" >"$tmp/s2.tsv" 2>&1; rc=$?
check "SIGTERM: resumed" '[ $rc -eq 0 ] && [ "$(col step "$tmp/s2.tsv")" = 45 ]'

# --- --resume continues the checkpoint's run, not the command line's defaults ---------
# (batch size, quantization, schedule and learning rate all non-default here)
own=(--seed 5 --epochs 2 -b 16 --lr 0.05 --lr-schedule cosine --cabits=3 --label-smoothing 0.1)
base=(--val-batches 2 -q --device cpu "$FMNIST")
"$TRAIN" "${own[@]}" "${base[@]}" --max-steps 12 --workspace "$tmp/o1" >/dev/null 2>&1
"$TRAIN" "${own[@]}" "${base[@]}" --max-steps 6 --workspace "$tmp/o2" >/dev/null 2>&1
cp "$tmp/o2/checkpoint.h5" "$tmp/o2.keep"
"$TRAIN" "${base[@]}" -b 64 --max-steps 12 --resume "$tmp/o2/checkpoint.h5" --workspace "$tmp/o2" >/dev/null 2>"$tmp/err"; rc=$?
check "resume with another --batch-size: exit 2, one line naming both values and the file" \
  '[ $rc -eq 2 ] && head -1 "$tmp/err" | grep -q "^aq-train: --batch-size 64 conflicts with .*o2/checkpoint.h5, whose run has 16" && cmp -s "$tmp/o2.keep" "$tmp/o2/checkpoint.h5"'
"$TRAIN" "${base[@]}" --cabits=2 --max-steps 12 --resume "$tmp/o2/checkpoint.h5" --workspace "$tmp/o2" >/dev/null 2>"$tmp/err"; rc=$?
check "resume with other quantization flags: exit 2" '[ $rc -eq 2 ] && grep -q "quantization flags" "$tmp/err"'
"$TRAIN" "${base[@]}" --max-steps 12 --resume "$tmp/o2/checkpoint.h5" --workspace "$tmp/o2" >/dev/null 2>&1; rc=$?
"$EVAL" --device cpu --data "$FMNIST" --max-batches 4 -q "$tmp/o1/checkpoint.h5" | tail -1 | cut -f2- >"$tmp/o1.eval"
"$EVAL" --device cpu --data "$FMNIST" --max-batches 4 -q "$tmp/o2/checkpoint.h5" | tail -1 | cut -f2- >"$tmp/o2.eval"
check "resume without the flags: the checkpoint's settings, the uninterrupted result" \
  '[ $rc -eq 0 ] && [ -s "$tmp/o1.eval" ] && cmp -s "$tmp/o1.eval" "$tmp/o2.eval"'
"$TRAIN" "${base[@]}" --epochs 3 --max-steps 13 --resume "$tmp/o2/checkpoint.h5" --workspace "$tmp/o2" -v >/dev/null 2>"$tmp/err"; rc=$?
check "resume with another --epochs: runs, says so" '[ $rc -eq 0 ] && grep -q "epochs in .* now ends after epoch 3" "$tmp/err"'

# --- aq-eval: files, stdin, broken and foreign files --------------------------------
"$EVAL" --data "$FMNIST" --max-batches 2 -q "$tmp/q/checkpoint.h5" "$tmp/e/checkpoint.h5" >"$tmp/ev.tsv"; rc=$?
check "aq-eval: two files, header + 2 rows" '[ $rc -eq 0 ] && head -1 "$tmp/ev.tsv" | grep -qx "file	loss	top1	top5	images" && [ $(wc -l <"$tmp/ev.tsv") -eq 3 ]'
"$EVAL" --data "$FMNIST" --max-batches 2 -q --evaluate --resume "$tmp/q/checkpoint.h5" "$tmp/e/checkpoint.h5" >"$tmp/evr.tsv"; rc=$?
check "aq-eval --evaluate --resume A B (ActNN's spelling): A first, then B" \
  '[ $rc -eq 0 ] && [ "$(cut -f2- "$tmp/evr.tsv")" = "$(cut -f2- "$tmp/ev.tsv")" ] && sed -n 2p "$tmp/evr.tsv" | grep -q "q/checkpoint.h5"'
"$EVAL" --data "$FMNIST" --max-batches 2 -q - <"$tmp/q/checkpoint.h5" >"$tmp/ev2.tsv"; rc=$?
check "aq-eval: checkpoint on stdin" '[ $rc -eq 0 ] && [ "$(tail -1 "$tmp/ev2.tsv" | cut -f2-)" = "$(sed -n 2p "$tmp/ev.tsv" | cut -f2-)" ]'
head -c 20000 "$tmp/q/checkpoint.h5" >"$tmp/trunc.h5"
echo "not a checkpoint" >"$tmp/text.h5"
cp "$tmp/q/checkpoint.h5" "$tmp/keep.h5"
"$EVAL" --data "$FMNIST" --max-batches 1 -q "$tmp/trunc.h5" "$tmp/text.h5" "$tmp/keep.h5" "$tmp/missing.h5" >"$tmp/ev3.tsv" 2>"$tmp/err"; rc=$?
check "aq-eval: broken files exit 1, one line each, the good one still evaluated" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 3 ] && grep -q "trunc.h5" "$tmp/err" && grep -q "text.h5: not an HDF5 file" "$tmp/err" && grep -q "missing.h5" "$tmp/err" && grep -q "keep.h5" "$tmp/ev3.tsv"'
check "aq-eval wrote nothing next to the checkpoints (the run's own metrics.tsv and lock aside)" '[ -z "$(ls -A "$tmp/q" | grep -v -e "^checkpoint.h5$" -e "^metrics.tsv$" -e "^.aq-train.lock$")" ]'
"$TRAIN" "${common[@]}" --arch preact_resnet32 --resume "$tmp/q/checkpoint.h5" --workspace "$tmp/q" >/dev/null 2>"$tmp/err"; rc=$?
check "resume with another --arch: exit 1, names both" '[ $rc -eq 1 ] && grep -q "preact_resnet20" "$tmp/err" && grep -q "preact_resnet32" "$tmp/err"'
check "... and the checkpoint is untouched" 'cmp -s "$tmp/q/checkpoint.h5" "$tmp/keep.h5"'
: >"$tmp/file"
"$TRAIN" "${common[@]}" --max-steps 1 --workspace "$tmp/file" >/dev/null 2>"$tmp/err"; rc=$?
check "workspace that is a file: exit 1" '[ $rc -eq 1 ] && grep -q "not a folder" "$tmp/err"'
"$TRAIN" --seed 7 --epochs 1 -b 64 --max-steps 1 "$FMNIST" --workspace "$tmp/file/ws" >/dev/null 2>"$tmp/err"; rc=$?
check "workspace under a file: exit 1 before the dataset is read (one line)" '[ $rc -eq 1 ] && grep -q "file is not a folder" "$tmp/err" && [ $(wc -l <"$tmp/err") -eq 1 ]'

# --- aq-variance: ActNN's table on the 120-step checkpoint, clear-cut parts -------
cat >"$tmp/configs.txt" <<'EOF'
# ActNN's CIFAR-10 configurations, then exact, then uniform 4 and 8 bits per group
-c quantize --ca=True --cabits=4 --ibits=4 --pergroup=False --perlayer=False
-c quantize --ca=True --cabits=2 --ibits=2 --pergroup=False --perlayer=False
-c quantize --ca=True --cabits=2 --ibits=2 --pergroup=True --perlayer=False
-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=False
-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=False --usegradient=False
-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True
-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True --usegradient=False
-c fanin
-c quantize --cabits=4 --ibits=4 --perlayer=False
-c quantize --cabits=8 --ibits=8 --perlayer=False
EOF
"$VAR" --device cpu --resume "$tmp/q/checkpoint.h5" --configs "$tmp/configs.txt" -K 3 -S 3 -b 64 -q -o "$tmp/var.h5" "$FMNIST" >"$tmp/var.tsv"; rc=$?
awk -F'\t' '$2 == "total"' "$tmp/var.tsv" >"$tmp/var.total"
cat "$tmp/var.total" >&2
t() { sed -n "${1}p" "$tmp/var.total" | cut -f3; }
b() { sed -n "${1}p" "$tmp/var.total" | cut -f4; }
check "aq-variance: 10 configurations, HDF5 written" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/var.total") -eq 10 ] && [ -s "$tmp/var.h5" ]'
check "exact configuration: zero variance" '[ "$(t 8)" = 0 ] && [ "$(b 8)" = 0 ]'
check "2-bit: no-pergroup >> pergroup" 'awk -v a="$(t 2)" -v b="$(t 3)" "BEGIN{exit !(a > 5*b)}"'
check "2-bit pergroup > per-sample > per-sample+per-layer" 'awk -v a="$(t 3)" -v b="$(t 4)" -v c="$(t 6)" "BEGIN{exit !(a > b && b > c)}"'
check "usegradient=True below False" 'awk -v a="$(t 4)" -v b="$(t 5)" -v c="$(t 6)" -v d="$(t 7)" "BEGIN{exit !(a < b && c < d)}"'
check "2 -> 4 -> 8 bits: variance falls about as (2^b-1)^-2 (x25, x289)" \
  'awk -v a="$(t 3)" -v b="$(t 9)" -v c="$(t 10)" "BEGIN{r=a/b; s=b/c; exit !(r > 10 && r < 60 && s > 100 && s < 800)}"'
check "Bias/Var near 0.5 for S=3" 'awk -v v="$(t 3)" -v b="$(b 3)" "BEGIN{r=b/v; exit !(r > 0.35 && r < 0.65)}"'

# --- aq-calibrate, and aq-train starting from its file ----------------------------------
"$CAL" --device cpu --resume "$tmp/q/checkpoint.h5" -K 2 -b 64 -q -o "$tmp/cal.h5" "$FMNIST" >"$tmp/cal.tsv"; rc=$?
check "aq-calibrate: per-layer table and file" '[ $rc -eq 0 ] && head -1 "$tmp/cal.tsv" | grep -qx "layer	elements	sensitivity	bits	budget	shares" && [ $(wc -l <"$tmp/cal.tsv") -gt 20 ] && [ -s "$tmp/cal.h5" ]'
# (over the layers that store their own copy; budgets are printed to 3
# decimals: allow their rounding)
check "aq-calibrate: conv budgets average at most cabits" \
  '[ -n "$(awk -F"\t" "NR>1 && \$1 !~ /bn/ && \$6 == \"-\" {w+=\$2*\$5; n+=\$2} END{if (w/n <= 2.0005) print 1}" "$tmp/cal.tsv")" ]'
cp "$tmp/cal.h5" "$tmp/cal.keep"
"$CAL" --device cpu --resume "$tmp/q/checkpoint.h5" -K 2 -b 64 -q -o "$tmp/cal.h5" "$FMNIST" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-calibrate -o an existing file: exit 2, the file kept" \
  '[ $rc -eq 2 ] && grep -q "cal.h5 exists: replace it with --force" "$tmp/err" && cmp -s "$tmp/cal.h5" "$tmp/cal.keep"'
"$VAR" --device cpu --resume "$tmp/q/checkpoint.h5" -K 1 -q -o "$tmp/cal.h5" "$FMNIST" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-variance -o an existing file: exit 2, the file kept" '[ $rc -eq 2 ] && cmp -s "$tmp/cal.h5" "$tmp/cal.keep"'
"$CAL" --device cpu --resume "$tmp/q/checkpoint.h5" -K 2 -b 64 -q -o "$tmp/cal.h5" --force "$FMNIST" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-calibrate -o an existing file --force: replaced" '[ $rc -eq 0 ] && [ -s "$tmp/cal.h5" ] && [ "$tmp/cal.h5" -nt "$tmp/cal.keep" ]'
"$CAL" --cabits=2 --ibits=2 -q "$FMNIST" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-calibrate of a uniform configuration: exit 2" '[ $rc -eq 2 ] && grep -q "adaptive" "$tmp/err"'
"$TRAIN" "${common[@]}" --max-steps 2 --calibration "$tmp/cal.h5" --workspace "$tmp/cw" -v >/dev/null 2>"$tmp/err"; rc=$?
check "aq-train --calibration starts from the file" '[ $rc -eq 0 ] && grep -q "per-layer budgets from" "$tmp/err"'
"$TRAIN" "${common[@]}" --max-steps 2 --calibration "$tmp/q/checkpoint.h5" --workspace "$tmp/cw2" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-train --calibration with a checkpoint: exit 1" '[ $rc -eq 1 ] && grep -q "not a calibration file" "$tmp/err"'

# --- ImageNet-style model on synthetic data, bf16 autocast, level L4 -------------------
"$TRAIN" --dataset synthetic --arch resnet18 --image-size 32 --num-classes 10 -b 8 --max-steps 2 --val-batches 1 \
  --amp bf16 --level L4 --workspace "$tmp/syn" >"$tmp/syn.tsv" 2>"$tmp/err"; rc=$?
cat "$tmp/err" >&2
check "synthetic resnet18, bf16, L4: runs" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/syn.tsv") -eq 2 ]'
"$EVAL" -q "$tmp/syn/checkpoint.h5" >"$tmp/syn.eval"; rc=$?
check "aq-eval on the synthetic checkpoint" '[ $rc -eq 0 ] && [ "$(tail -1 "$tmp/syn.eval" | cut -f5)" = 1000 ]'

# --- ActNN's CIFAR command lines, on generated CIFAR-format files -----------------
python3 - "$tmp" <<'EOF'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(0)
def records(n, classes, fine):
    out = bytearray()
    for _ in range(n):
        c = rnd.randrange(classes)
        out += bytes([c % 20, c]) if fine else bytes([c])
        out += bytes(rnd.randrange(256) for _ in range(3072))
    return bytes(out)
d = os.path.join(root, "cifar10", "cifar-10-batches-bin"); os.makedirs(d)
for i in range(1, 6):
    open(os.path.join(d, "data_batch_%d.bin" % i), "wb").write(records(8, 10, False))
open(os.path.join(d, "test_batch.bin"), "wb").write(records(8, 10, False))
d = os.path.join(root, "cifar100", "cifar-100-binary"); os.makedirs(d)
open(os.path.join(d, "train.bin"), "wb").write(records(40, 100, True))
open(os.path.join(d, "test.bin"), "wb").write(records(8, 100, True))
EOF
data10="--dataset cifar10 --arch preact_resnet56 --epochs 200 --num-classes 10 -j 0 --weight-decay 1e-4 --batch-size 128 --label-smoothing 0"
data100="--dataset cifar10 --arch preact_resnet56 --epochs 200 --num-classes 100 -j 0 --weight-decay 1e-4 --batch-size 128 --label-smoothing 0"
quant="-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True --usegradient=False"
# ActNN's lines, unchanged, with --max-steps appended to keep the test short.
"$TRAIN" $data10 $quant --workspace "$tmp/c10" --gather-checkpoints "$tmp/cifar10" --max-steps 2 -q >"$tmp/c10.tsv" 2>"$tmp/err"; rc=$?
check "ActNN's CIFAR-10 line runs" '[ $rc -eq 0 ] && [ -s "$tmp/c10/checkpoint-1.h5" ] && [ -s "$tmp/c10/checkpoint-2.h5" ] && [ $(wc -l <"$tmp/c10.tsv") -eq 3 ]'
cat "$tmp/err" >&2
"$TRAIN" $data100 $quant --workspace "$tmp/c100" --gather-checkpoints "$tmp/cifar100" --max-steps 1 -q >"$tmp/c100.tsv" 2>"$tmp/err"; rc=$?
check "ActNN's CIFAR-100 line runs (--dataset cifar10 --num-classes 100)" '[ $rc -eq 0 ] && [ -s "$tmp/c100/checkpoint-1.h5" ]'
cat "$tmp/err" >&2
"$EVAL" --data "$tmp/cifar10" -q "$tmp"/c10/checkpoint-*.h5 >"$tmp/c10e.tsv"; rc=$?
check "aq-eval on every gathered checkpoint" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/c10e.tsv") -eq 3 ] && [ "$(tail -1 "$tmp/c10e.tsv" | cut -f5)" = 8 ]'
test10="$data10 $quant --workspace $tmp/tmp --evaluate --training-only --resume $tmp/c10/checkpoint-2.h5 --resume2 $tmp/c10/checkpoint-2.h5"
"$VAR" $test10 "$tmp/cifar10" -q >"$tmp/v10.tsv" 2>"$tmp/err"; rc=$?
check "ActNN's testing line with aq-variance" '[ $rc -eq 0 ] && grep -q "	total	" "$tmp/v10.tsv" && [ ! -e "$tmp/tmp" ]'
cat "$tmp/err" >&2
"$TRAIN" $test10 "$tmp/cifar10" -q >"$tmp/t10.tsv" 2>"$tmp/err"; rc=$?
check "... and with aq-train --evaluate --training-only" '[ $rc -eq 0 ] && grep -q "	total	" "$tmp/t10.tsv"'
cat "$tmp/err" >&2
"$EVAL" --data "$tmp/cifar10" --dataset cifar10 -q "$tmp/c100/checkpoint-1.h5" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-eval: 100-class model on 10-class data is refused" '[ $rc -eq 1 ] && grep -q "classes" "$tmp/err"'
# --- --milestones keeps to its one argument; stale temporary files are removed ----------
mkdir -p "$tmp/ms"
: >"$tmp/ms/.checkpoint.h5.tmp-999999999-0123abcd"   # no such process
: >"$tmp/ms/.checkpoint.h5.tmp-$$-0123abcd"          # this shell: alive
"$TRAIN" --dataset cifar10 --lr-schedule step --milestones 5,3 -b 8 --max-steps 1 --val-batches 1 -q \
  --workspace "$tmp/ms" "$tmp/cifar10" >/dev/null 2>"$tmp/err"; rc=$?
check "--milestones 5,3 DATA: the folder stays the data folder" '[ $rc -eq 0 ] && [ -s "$tmp/ms/checkpoint.h5" ]'
check "a dead process's temporary file is removed, a live one's kept" \
  '[ ! -e "$tmp/ms/.checkpoint.h5.tmp-999999999-0123abcd" ] && [ -e "$tmp/ms/.checkpoint.h5.tmp-$$-0123abcd" ]'

# --- a stop signal during evaluation: prompt, with the last step's checkpoint -------
# (a test split of 20000 images takes seconds to evaluate on the CPU)
mkdir -p "$tmp/bigtest"
python3 - "$tmp/bigtest" <<'EOF'
import os, struct, sys
def split(prefix, n):
    d = os.path.join(sys.argv[1], prefix)
    open(d + "-images-idx3-ubyte", "wb").write(struct.pack(">IIII", 0x803, n, 28, 28) + os.urandom(n * 784))
    open(d + "-labels-idx1-ubyte", "wb").write(struct.pack(">II", 0x801, n) + bytes(b % 10 for b in os.urandom(n)))
split("train", 32)
split("t10k", 20000)
EOF
# Its evaluation of 20000 images takes about 35 s; the signal comes a second
# after the second (last) step.
"$TRAIN" --threads 1 --seed 1 --epochs 1 -b 16 --device cpu --log-interval 1 --workspace "$tmp/sigeval" "$tmp/bigtest" \
  >/dev/null 2>"$tmp/err" &
pid=$!
for _ in $(seq 1 1200); do grep -q " step 2/" "$tmp/err" 2>/dev/null && break; sleep 0.1; done
sleep 1
t0=$(date +%s%N); kill -TERM $pid; wait $pid; rc=$?; t1=$(date +%s%N)
check "SIGTERM during evaluation: exit 143 within 10 s ($(( (t1 - t0) / 1000000 )) ms), checkpoint of step 2" \
  '[ $rc -eq 143 ] && [ $(( (t1 - t0) / 1000000 )) -lt 10000 ] && grep -q "stopped by signal 15 at epoch 1, batch 2" "$tmp/err" && [ -s "$tmp/sigeval/checkpoint.h5" ]'
"$TRAIN" --threads 1 --val-batches 2 --device cpu -q --resume "$tmp/sigeval/checkpoint.h5" --workspace "$tmp/sigeval" "$tmp/bigtest" >"$tmp/sigeval.tsv" 2>&1; rc=$?
check "... and the resumed run evaluates and ends the epoch" '[ $rc -eq 0 ] && [ "$(col step "$tmp/sigeval.tsv")" = 2 ]'

# --- one writer per workspace: a second run is refused; a dead holder blocks nothing ---
"$TRAIN" --dataset cifar10 --epochs 1000 -b 8 --val-batches 1 -q --workspace "$tmp/lock" "$tmp/cifar10" >/dev/null 2>&1 &
holder=$!
for _ in $(seq 1 150); do [ -s "$tmp/lock/.aq-train.lock" ] && break; sleep 0.2; done
"$TRAIN" --dataset cifar10 --epochs 1 -b 8 -q --workspace "$tmp/lock" "$tmp/cifar10" >/dev/null 2>"$tmp/err"; rc=$?
check "second run on a workspace: exit 1 naming the holder's PID" \
  '[ $rc -eq 1 ] && grep -q "is in use by another aq-train (PID $holder," "$tmp/err" && [ $(wc -l <"$tmp/err") -eq 1 ]'
kill -KILL $holder; wait $holder 2>/dev/null
"$TRAIN" --dataset cifar10 --epochs 1 -b 8 --val-batches 1 -q --overwrite --workspace "$tmp/lock" "$tmp/cifar10" >/dev/null 2>"$tmp/err"; rc=$?
check "the lock file of a killed run blocks nothing" '[ $rc -eq 0 ] && [ -e "$tmp/lock/.aq-train.lock" ]'

# --- standard output closed or full: the checkpoint is kept, exit 1 -----------------
"$TRAIN" --dataset cifar10 --epochs 2 -b 16 --val-batches 1 -q --workspace "$tmp/pipe" "$tmp/cifar10" 2>"$tmp/err" | head -1 >/dev/null
rc=${PIPESTATUS[0]}
check "aq-train | head -1: exit 1 after writing the epoch's checkpoint, says so" \
  '[ $rc -eq 1 ] && [ -s "$tmp/pipe/checkpoint.h5" ] && grep -q "standard output: Broken pipe (the checkpoint of epoch 1 is written" "$tmp/err" && [ $(wc -l <"$tmp/err") -eq 1 ]'
"$EVAL" --data "$tmp/cifar10" -q "$tmp/pipe/checkpoint.h5" >/dev/full 2>"$tmp/err"; rc=$?
check "aq-eval > /dev/full: exit 1, one line" '[ $rc -eq 1 ] && grep -qx "aq-eval: cannot write to standard output: No space left on device" "$tmp/err"'
"$TRAIN" --dataset cifar10 --epochs 1 -b 16 -q --workspace "$tmp/full" "$tmp/cifar10" >/dev/full 2>"$tmp/err"; rc=$?
check "aq-train > /dev/full: exit 1 before training" '[ $rc -eq 1 ] && grep -q "No space left on device" "$tmp/err" && [ ! -e "$tmp/full/checkpoint.h5" ]'
"$TRAIN" --dataset cifar10 --epochs 1 -b 16 --max-steps 1 --val-batches 1 -q --workspace "$tmp/full" "$tmp/cifar10" >/dev/null 2>"$tmp/err"; rc=$?
check "a run that failed before its first step blocks no other (its metrics.tsv has no rows)" '[ $rc -eq 0 ] && [ -s "$tmp/full/checkpoint.h5" ]'
exit $fail
