#!/usr/bin/env bash
# aq-train's options for transformers from the shell: --dataset text's bad
# folders and --check-data, the optimizer options' usage errors, a short
# AdamW run with warm-up, cosine and clipping, and its resume refusing
# another optimizer; a transformer's shape options and their resume; a ViT's
# pooling; aq-variance and aq-calibrate on transformers, fresh or from those
# checkpoints.  (A text training run needs a token architecture.)
#   aq_train_text.sh AQ_TRAIN
set -u
TRAIN=$1
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; [ -n "${AQ_DEBUG:-}" ] && cat "$tmp/err" >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# --- --dataset text: bad folders, one line each --------------------------------------
mkdir -p "$tmp/empty" "$tmp/corpus/sub"
"$TRAIN" --dataset text --arch gpt_small --workspace "$tmp/w0" "$tmp/missing" >/dev/null 2>"$tmp/err"; rc=$?
check "missing folder: exit 1, one line" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "^aq-train: text: .*missing: no such folder" "$tmp/err"'
"$TRAIN" --dataset text --arch gpt_small --workspace "$tmp/w0" "$tmp/empty" >/dev/null 2>"$tmp/err"; rc=$?
check "empty folder: exit 1, one line" '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "no files in it" "$tmp/err"'
for i in 1 2 3 4 5 6; do printf 'line %d of a small text corpus for aq-train\n' $(seq 1 40) >"$tmp/corpus/sub/f$i.txt"; done
"$TRAIN" --dataset text --context 64 --check-data "$tmp/corpus" >"$tmp/check.tsv" 2>"$tmp/err"; rc=$?
bytes=$(cat "$tmp/corpus"/sub/*.txt | wc -c)
val=$((bytes / 10))
check "--check-data: the windows of both splits" \
  '[ $rc -eq 0 ] && printf "split\timages\tbad\ntrain\t%d\t0\ntest\t%d\t0\n" $(((bytes - val - 1) / 64)) $(((val - 1) / 64)) | cmp -s - "$tmp/check.tsv"'
"$TRAIN" --dataset text --context 100000 --check-data "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "a corpus shorter than a window: exit 1, one line" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "less than one window of 100001" "$tmp/err"'
"$TRAIN" --dataset text --arch preact_resnet20 --workspace "$tmp/w0" "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "an image model on text: exit 2" '[ $rc -eq 2 ] && grep -q "needs a token model" "$tmp/err"'
"$TRAIN" --dataset text --context 0 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "--context 0: exit 2" '[ $rc -eq 2 ] && grep -q "context" "$tmp/err"'

# --- optimizer options: usage errors --------------------------------------------------
for bad in "--optimizer adam" "--betas 0.9" "--betas 0.9,1" "--betas nan,0.9" "--eps 0" "--clip-grad-norm -1" \
           "--warmup-steps -2" "--warmup 1 --warmup-steps 5"; do
  # shellcheck disable=SC2086
  "$TRAIN" $bad --workspace "$tmp/w1" >/dev/null 2>"$tmp/err"; rc=$?
  check "$bad: exit 2, with the hint" '[ $rc -eq 2 ] && grep -q "Try .aq-train --help." "$tmp/err"'
done

# --- AdamW, warm-up, cosine, clipping: a run, its checkpoint, its resume -------------
run=(--dataset synthetic --arch preact_resnet20 --image-size 8 --num-classes 4 -b 4 --device cpu --seed 3
     --val-batches 1 --epochs 1 --workspace "$tmp/a" -q)
"$TRAIN" "${run[@]}" --optimizer adamw --lr 1e-3 --wd 0.05 --betas 0.8,0.99 --eps 1e-7 --warmup-steps 2 \
  --lr-schedule cosine --clip-grad-norm 1 --max-steps 3 >"$tmp/a.tsv" 2>"$tmp/err"; rc=$?
check "AdamW run: exit 0, the image TSV" \
  '[ $rc -eq 0 ] && head -1 "$tmp/a.tsv" | grep -qx "epoch	step	lr	train_loss	train_acc	val_loss	val_top1	val_top5	img_per_s	act_mb	peak_mb"'
check "AdamW run: step 3 at the peak lr (the cosine's first step after 2 warm-up steps)" \
  '[ "$(tail -1 "$tmp/a.tsv" | cut -f2-3)" = "3	0.001" ]'
"$TRAIN" "${run[@]}" --resume auto --optimizer sgd --max-steps 4 >/dev/null 2>"$tmp/err"; rc=$?
check "resume with another optimizer: exit 2, naming it" '[ $rc -eq 2 ] && grep -q "^aq-train: --optimizer sgd-nesterov conflicts with .*adamw" "$tmp/err"'
"$TRAIN" "${run[@]}" --resume auto --max-steps 4 >"$tmp/b.tsv" 2>"$tmp/err"; rc=$?
check "resume of the AdamW run: exit 0, step 4" '[ $rc -eq 0 ] && [ "$(tail -1 "$tmp/b.tsv" | cut -f2)" = 4 ]'

# --- a transformer's shape from the command line, kept by its checkpoint -------------
gpt=(--dataset text --arch gpt_small --context 16 -b 4 --device cpu --seed 3 --val-batches 1 -q)
"$TRAIN" "${gpt[@]}" --workspace "$tmp/g" --layers 2 --width 32 --heads 4 --dropout 0.1 --max-steps 2 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "gpt_small --layers 2 --width 32 --heads 4 --dropout 0.1: trains" '[ $rc -eq 0 ]'
"$TRAIN" "${gpt[@]}" --workspace "$tmp/g" --resume auto --max-steps 3 "$tmp/corpus" >"$tmp/g.tsv" 2>"$tmp/err"; rc=$?
check "its resume without the shape options: the same model, step 3" '[ $rc -eq 0 ] && [ "$(tail -1 "$tmp/g.tsv" | cut -f2)" = 3 ]'
"$(dirname "$TRAIN")/aq-eval" --device cpu --data "$tmp/corpus" "$tmp/g/checkpoint.h5" >"$tmp/ge.tsv" 2>"$tmp/err"; rc=$?
check "aq-eval rebuilds it (4 heads, as recorded)" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/ge.tsv") -eq 2 ]'
"$TRAIN" "${gpt[@]}" --workspace "$tmp/g" --resume auto --width 64 --max-steps 4 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "resume with another --width: exit 2, naming it" '[ $rc -eq 2 ] && grep -q "^aq-train: --width 64 conflicts with" "$tmp/err"'
"$TRAIN" "${gpt[@]}" --workspace "$tmp/g" --resume auto --dropout 0.2 --max-steps 4 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "resume with another --dropout: exit 2, naming both (the checkpoint keeps 0.1)" \
  '[ $rc -eq 2 ] && grep -q "^aq-train: --dropout 0.2 conflicts with .*whose run has 0.1" "$tmp/err"'
cp -r "$tmp/corpus" "$tmp/corpus2"
printf 'one more file, %d\n' $(seq 1 40) >"$tmp/corpus2/g.txt"
"$TRAIN" "${gpt[@]}" --workspace "$tmp/g" --resume auto --max-steps 4 "$tmp/corpus2" >/dev/null 2>"$tmp/err"; rc=$?
check "resume on a corpus with another file: exit 1, one line naming both sizes" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "g/checkpoint.h5: its run trained on [0-9]* samples, the training split here has [0-9]*" "$tmp/err"'
"$TRAIN" --dataset synthetic --arch preact_resnet20 --image-size 8 --device cpu --workspace "$tmp/r" --layers 3 >/dev/null 2>"$tmp/err"; rc=$?
check "--layers on a ResNet: exit 2" '[ $rc -eq 2 ] && grep -q "are for transformers" "$tmp/err"'
"$TRAIN" "${gpt[@]}" --workspace "$tmp/h" --width 30 --heads 4 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "a width the heads do not divide: exit 2" '[ $rc -eq 2 ] && grep -q "not a multiple of its 4 heads" "$tmp/err"'

# --- a ViT classifying the mean of its patch tokens: --pool mean ---------------------
vit=(--dataset synthetic --arch vit_tiny --image-size 8 --num-classes 4 -b 4 --device cpu --seed 3 --val-batches 1
     --layers 1 --width 32 --heads 2 -q)
"$TRAIN" "${vit[@]}" --workspace "$tmp/v" --pool mean --max-steps 2 >/dev/null 2>"$tmp/err"; rc=$?
check "vit_tiny --pool mean: trains" '[ $rc -eq 0 ]'
"$TRAIN" "${vit[@]}" --workspace "$tmp/v" --resume auto --max-steps 3 >"$tmp/v.tsv" 2>"$tmp/err"; rc=$?
check "its resume without --pool: the same model, step 3" '[ $rc -eq 0 ] && [ "$(tail -1 "$tmp/v.tsv" | cut -f2)" = 3 ]'
"$TRAIN" "${vit[@]}" --workspace "$tmp/v" --resume auto --pool cls --max-steps 4 >/dev/null 2>"$tmp/err"; rc=$?
check "resume with --pool cls: exit 2, naming it" '[ $rc -eq 2 ] && grep -q "^aq-train: --pool cls conflicts with" "$tmp/err"'
"$TRAIN" "${vit[@]}" --workspace "$tmp/v" --resume auto --attention-bits 0 --max-steps 4 >/dev/null 2>"$tmp/err"; rc=$?
check "resume with other attention bits: exit 2, naming them" \
  '[ $rc -eq 2 ] && grep -q "^aq-train: quantization flags .*--attention-bits 0 conflicts with" "$tmp/err"'
"$(dirname "$TRAIN")/aq-eval" --device cpu --dataset synthetic "$tmp/v/checkpoint.h5" >"$tmp/ve.tsv" 2>"$tmp/err"; rc=$?
check "aq-eval rebuilds it (no class token)" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/ve.tsv") -eq 2 ]'
"$TRAIN" "${vit[@]}" --workspace "$tmp/v2" --pool max >/dev/null 2>"$tmp/err"; rc=$?
check "--pool max: exit 2" '[ $rc -eq 2 ] && grep -q "pool" "$tmp/err"'
"$TRAIN" "${gpt[@]}" --workspace "$tmp/v3" --pool mean "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "--pool on gpt_small: exit 2" '[ $rc -eq 2 ] && grep -q "^aq-train: --pool is for the ViTs" "$tmp/err"'

# --- L3's budget on transformers: 3 bits unless --cabits is given -----------------------
tiny=(--dataset text --arch gpt_small --context 16 --layers 1 --width 32 --heads 4 -b 4 --device cpu --seed 3 --val-batches 1)
"$TRAIN" "${tiny[@]}" --workspace "$tmp/b3" --max-steps 1 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "gpt_small at L3: a budget of 3 bits" '[ $rc -eq 0 ] && grep -q -- "--cabits=3 --ibits=8" "$tmp/err"'
"$TRAIN" "${tiny[@]}" --workspace "$tmp/b3" --resume auto --level L3 --max-steps 2 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "its resume with --level L3: the same budget, no conflict" '[ $rc -eq 0 ] && grep -q -- "--cabits=3 --ibits=8" "$tmp/err"'
"$TRAIN" "${tiny[@]}" --workspace "$tmp/b2" --cabits 2 --max-steps 1 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "gpt_small --cabits 2: 2 bits" '[ $rc -eq 0 ] && grep -q -- "--cabits=2 --ibits=8" "$tmp/err"'
"$TRAIN" "${tiny[@]}" --workspace "$tmp/b2" --resume auto --max-steps 2 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "its resume without flags keeps its 2 bits" '[ $rc -eq 0 ] && grep -q -- "--cabits=2 --ibits=8" "$tmp/err"'
"$TRAIN" "${tiny[@]}" --workspace "$tmp/b2" --resume auto --level L3 --max-steps 3 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "... and with --level L3 but no --cabits, as a run stored at 2 bits before 3 were the default" \
  '[ $rc -eq 0 ] && grep -q -- "--cabits=2 --ibits=8" "$tmp/err"'
"$TRAIN" "${tiny[@]}" --workspace "$tmp/b2" --resume auto --cabits 3 --max-steps 4 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "... but --cabits 3 conflicts with it: exit 2" '[ $rc -eq 2 ] && grep -q "^aq-train: quantization flags .*--cabits=3.* conflicts with" "$tmp/err"'
"$TRAIN" "${tiny[@]}" --workspace "$tmp/be" --ca False --max-steps 1 "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "gpt_small --ca False: nothing compressed, the budget left as it was" '[ $rc -eq 0 ] && grep -q -- "--ca=False --cabits=2 " "$tmp/err"'

# --- aq-variance and aq-calibrate on transformers --------------------------------------
VAR=$(dirname "$TRAIN")/aq-variance CAL=$(dirname "$TRAIN")/aq-calibrate
small=(--dataset text --arch gpt_small --context 16 --layers 2 --width 32 --heads 4 -b 2 -K 2 --device cpu --seed 1)
"$VAR" "${small[@]}" -S 2 "$tmp/corpus" >"$tmp/var.tsv" 2>"$tmp/err"; rc=$?
check "aq-variance on a fresh gpt_small of 2 blocks, 32 wide: both blocks' layers and the total" \
  '[ $rc -eq 0 ] && grep -q "	blocks.1.fc2.weight	" "$tmp/var.tsv" && ! grep -q "	blocks.2\." "$tmp/var.tsv" && [ $(grep -c "	total	" "$tmp/var.tsv") -eq 1 ]'
check "aq-variance on it: L3 at the transformers' 3 bits" '[ $(grep -c -- "--cabits=3 --ibits=8 .*	total	" "$tmp/var.tsv") -eq 1 ]'
"$CAL" "${small[@]}" "$tmp/corpus" >"$tmp/cal.tsv" 2>"$tmp/err"; rc=$?
check "aq-calibrate on it: a row for each block's GELU" '[ $rc -eq 0 ] && [ $(grep -c "^blocks.[01].gelu	2048	" "$tmp/cal.tsv") -eq 2 ]'
"$VAR" --resume "$tmp/g/checkpoint.h5" -b 2 -K 1 -S 2 --device cpu "$tmp/corpus" >"$tmp/var2.tsv" 2>"$tmp/err"; rc=$?
check "aq-variance --resume of the 2-block run: its model, without the shape options, at 3 bits" \
  '[ $rc -eq 0 ] && grep -q "	blocks.1.fc2.weight	" "$tmp/var2.tsv" && grep -q -- "--cabits=3 .*	total	" "$tmp/var2.tsv"'
"$VAR" --resume "$tmp/g/checkpoint.h5" --width 64 -b 2 -K 1 --device cpu "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-variance --resume with another --width: exit 2, naming both" \
  '[ $rc -eq 2 ] && grep -q "^aq-variance: --width 64 conflicts with .*g/checkpoint.h5, whose model has 32" "$tmp/err"'
"$CAL" --resume "$tmp/v/checkpoint.h5" --pool cls -b 2 -K 1 --device cpu >/dev/null 2>"$tmp/err"; rc=$?
check "aq-calibrate --resume of the mean-pooled ViT with --pool cls: exit 2" \
  '[ $rc -eq 2 ] && grep -q "^aq-calibrate: --pool cls conflicts with .*whose model has mean" "$tmp/err"'
"$VAR" --resume "$tmp/v/checkpoint.h5" --dataset text -b 2 -K 1 --device cpu "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-variance --resume of the ViT with --dataset text: exit 2, one line naming both" \
  '[ $rc -eq 2 ] && head -1 "$tmp/err" | grep -q "^aq-variance: --dataset text conflicts with .*v/checkpoint.h5, trained on synthetic: a checkpoint is measured as it was trained"'
"$CAL" --resume "$tmp/g/checkpoint.h5" --arch vit_tiny -b 2 -K 1 --device cpu "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-calibrate --resume of the GPT with --arch vit_tiny: exit 2, naming both" \
  '[ $rc -eq 2 ] && grep -q "^aq-calibrate: --arch vit_tiny conflicts with .*g/checkpoint.h5, a gpt_small:" "$tmp/err"'
"$VAR" --dataset text --arch preact_resnet20 -b 2 -K 1 --device cpu "$tmp/corpus" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-variance: an image model on text: exit 2, one line and the hint" \
  '[ $rc -eq 2 ] && head -1 "$tmp/err" | grep -q "^aq-variance: --arch preact_resnet20 takes images; --dataset text needs a token model"'

exit $fail
