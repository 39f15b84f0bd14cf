#!/usr/bin/env bash
# Data-parallel aq-train over Gloo on the CPU, ranks started as torchrun
# would start them (RANK, WORLD_SIZE, ... in the environment):
# two ranks at batch B equal one process at 2B; QSyncBatchNorm on two ranks
# equals BatchNorm over the union batch; rank 0 alone writes; a SIGTERM to
# one rank stops both after the same step with one checkpoint, and --resume
# continues bit-exactly, adaptive state included (and on another number of
# ranks); evaluation is
# sharded with every image counted once; a bad environment fails at once;
# scripts/dist-train through torchrun; aq-eval shares its work the same way.
#   aq_dist.sh AQ_TRAIN CKPT_DIFF DIST_TRAIN AQ_EVAL
set -u
TRAIN=$1
DIFF=$2
DIST_TRAIN=$3
EVAL=$4
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; [ -n "${AQ_DEBUG:-}" ] && tail -n 3 "$tmp"/*.err >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; [ -n "${AQ_KEEP:-}" ] && echo "kept $tmp" >&2 || rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1
# Below Linux's ephemeral ports (32768 up), which the ranks' own connections take.
port=$((20000 + ($$ * 7 + RANDOM) % 12000))

# ranks NAME N ARGS...: N ranks of $PROG (aq-train) in the background, their output in
# $tmp/NAME.<rank>.{out,err}, their pids in $pids.
ranks() {
  local name=$1 n=$2
  shift 2
  port=$((port + 1))
  pids=()
  for ((r = 0; r < n; r++)); do
    RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "${PROG:-$TRAIN}" "$@" >"$tmp/$name.$r.out" 2>"$tmp/$name.$r.err" &
    pids+=($!)
  done
}
# wait_ranks: every rank's exit status, space-separated, in $rcs.
wait_ranks() {
  rcs=""
  for p in "${pids[@]}"; do wait "$p"; rcs="$rcs $?"; done
  rcs=${rcs# }
}
close() { awk -v a="$1" -v t="$2" 'BEGIN { exit !(a + 0 <= t + 0) }'; }

syn0=(--dataset synthetic --arch preact_resnet20 --image-size 8 --num-classes 4 --device cpu --seed 3 -j 0
     --lr-schedule constant --lr 0.01)
syn=("${syn0[@]}" --val-batches 1)

# --- two ranks at B = one process at 2B -----------------------------------------------
"$TRAIN" "${syn[@]}" -c fanin -b 8 --max-steps 3 --workspace "$tmp/one" >"$tmp/one.out" 2>"$tmp/one.err"; rc=$?
# BatchNorm synchronised (uncompressed: --ca=False), or each rank would
# normalise by its own half-batch's statistics.
ranks two 2 "${syn[@]}" -c qsyncbn --ca=False -b 4 --max-steps 3 --workspace "$tmp/two"
wait_ranks
check "two ranks train: exit 0 on both" '[ $rc -eq 0 ] && [ "$rcs" = "0 0" ]'
d=$("$DIFF" --buffers "$tmp/one/checkpoint.h5" "$tmp/two/checkpoint.h5")
check "two ranks at batch 4 = one at batch 8: parameters and running statistics to float tolerance (max diff $d)" \
  'close "$d" 2e-5'
check "rank 0 prints the TSV, rank 1 nothing" \
  '[ $(wc -l <"$tmp/two.0.out") -eq 2 ] && [ ! -s "$tmp/two.1.out" ] && [ ! -s "$tmp/two.1.err" ]'
v1=$(tail -1 "$tmp/one.out" | cut -f6,7,8); v2=$(tail -1 "$tmp/two.0.out" | cut -f6,7,8)
check "sharded validation: the same figures as one process ($v1 / $v2)" \
  '[ "$(echo "$v1" | cut -f2,3)" = "$(echo "$v2" | cut -f2,3)" ] && close "$(echo "$v1 $v2" | awk "{d = \$1 - \$4; print d < 0 ? -d : d}")" 2e-4'
check "only rank 0's files in the workspace" \
  '[ "$(ls -A "$tmp/two" | sort | tr "\n" " ")" = ".aq-train.lock checkpoint.h5 metrics.tsv " ] && [ $(wc -l <"$tmp/two/metrics.tsv") -eq 2 ]'
check "the log names the ranks" 'grep -q "rank 0 of 2 (local rank 0, from torchrun)" "$tmp/two.0.err"'

# --- QSyncBatchNorm on two ranks = BatchNorm over the union batch ---------------------
q=(--cabits=8 --ibits=8 --rounding nearest)
"$TRAIN" "${syn[@]}" -c quantize "${q[@]}" -b 8 --max-steps 2 --workspace "$tmp/qbn" >/dev/null 2>"$tmp/qbn.err"; rc=$?
ranks qsync 2 "${syn[@]}" -c qsyncbn "${q[@]}" -b 4 --max-steps 2 --workspace "$tmp/qsync"
wait_ranks
d=$("$DIFF" --buffers "$tmp/qbn/checkpoint.h5" "$tmp/qsync/checkpoint.h5")
check "QSyncBN on two ranks = QBN at twice the batch: parameters and running statistics (max diff $d)" \
  '[ $rc -eq 0 ] && [ "$rcs" = "0 0" ] && close "$d" 5e-4'
"$TRAIN" "${syn[@]}" -c qsyncbn "${q[@]}" -b 8 --max-steps 2 --workspace "$tmp/qsync1" >/dev/null 2>"$tmp/qsync1.err"
d=$("$DIFF" --buffers "$tmp/qbn/checkpoint.h5" "$tmp/qsync1/checkpoint.h5")
check "QSyncBN in one process is QBN (max diff $d)" '[ "$d" = 0 ]'

# --- SIGTERM to one rank: both stop after the same step, one checkpoint, exact resume ---
# At L3: the ranks share their adaptive statistics and budgets, so rank 0's
# checkpoint holds every rank's state and the resumed run continues exactly.
ranks sig 2 "${syn[@]}" -c quantize -b 4 --max-steps 100000 --log-interval 1 --workspace "$tmp/sig"
for _ in $(seq 1 600); do grep -q " step 2/" "$tmp/sig.0.err" 2>/dev/null && break; sleep 0.1; done
kill -TERM "${pids[1]}"
wait_ranks
step=$(grep -o "stopped by signal 15 at epoch 1, batch [0-9]*" "$tmp/sig.0.err" | grep -o "[0-9]*$")
check "SIGTERM to rank 1: both exit 143, rank 0 wrote the checkpoint" \
  '[ "$rcs" = "143 143" ] && [ -n "$step" ] && [ -s "$tmp/sig/checkpoint.h5" ] && ! ls "$tmp/sig" | grep -q tmp'
end=$((step + 2))
ranks ref 2 "${syn[@]}" -c quantize -b 4 --max-steps "$end" --workspace "$tmp/ref"
wait_ranks
ranks res 2 "${syn[@]}" -c quantize -b 4 --max-steps "$end" --workspace "$tmp/sig" --resume auto
wait_ranks
d=$("$DIFF" --adaptive "$tmp/ref/checkpoint.h5" "$tmp/sig/checkpoint.h5")
check "resumed on two ranks: bit-exact with the run never stopped, adaptive state included (step $step to $end, max diff $d)" \
  '[ "$rcs" = "0 0" ] && [ "$d" = 0 ]'
check "the ranks' adaptive states agree at every checkpoint" \
  '! grep -q "differs between the ranks" "$tmp"/sig.0.err "$tmp"/ref.0.err "$tmp"/res.0.err'
cp -r "$tmp/sig" "$tmp/sig3"
ranks three 3 "${syn[@]}" -c quantize -b 4 --max-steps $((end + 2)) --workspace "$tmp/sig3" --resume auto
wait_ranks
check "resumed on three ranks: continues (not bit-exact, said so)" \
  '[ "$rcs" = "0 0 0" ] && grep -q "written by 2 rank(s), this run has 3" "$tmp/three.0.err"'

# --- evaluation sharded over three ranks: every test image counted once --------------
"$TRAIN" "${syn0[@]}" -b 7 --evaluate --resume "$tmp/one/checkpoint.h5" >"$tmp/ev1.out" 2>"$tmp/ev1.err"; rc=$?
ranks ev 3 "${syn0[@]}" -b 3 --evaluate --resume "$tmp/one/checkpoint.h5"
wait_ranks
e1=$(tail -1 "$tmp/ev1.out"); e3=$(tail -1 "$tmp/ev.0.out")
check "evaluation on three ranks: the same totals as one process ($e1 / $e3)" \
  '[ $rc -eq 0 ] && [ "$rcs" = "0 0 0" ] && [ "$(echo "$e1" | cut -f2-)" = "$(echo "$e3" | cut -f2-)" ] && [ ! -s "$tmp/ev.1.out" ]'

# --- aq-eval on three ranks: the same figures as one process, printed once ------------
ev=(--device cpu -j 0 -b 3)
"$EVAL" "${ev[@]}" "$tmp/one/checkpoint.h5" >"$tmp/aqe1.out" 2>"$tmp/aqe1.err"; rc=$?
PROG=$EVAL ranks aqe 3 "${ev[@]}" "$tmp/one/checkpoint.h5" "$tmp/missing.h5"
wait_ranks
check "aq-eval on three ranks: rank 0 prints the one-process figures ($(tail -1 "$tmp/aqe1.out") / $(tail -1 "$tmp/aqe.0.out"))" \
  '[ $rc -eq 0 ] && [ "$rcs" = "1 1 1" ] && diff -q "$tmp/aqe1.out" "$tmp/aqe.0.out" >/dev/null && [ ! -s "$tmp/aqe.1.out" ] && [ ! -s "$tmp/aqe.2.out" ]'
check "aq-eval on three ranks: a file none can read is one error line on each, the others still evaluated" \
  '[ $(grep -c "missing.h5" "$tmp/aqe.1.err") -eq 1 ] && [ $(wc -l <"$tmp/aqe.0.out") -eq 2 ]'

# --- a bad environment: one line, non-zero, never a hang ------------------------------
env RANK=0 WORLD_SIZE=2 MASTER_PORT=1 "$TRAIN" "${syn[@]}" --workspace "$tmp/x" >/dev/null 2>"$tmp/bad.err"; rc=$?
check "no MASTER_ADDR: exit 1, one line" '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/bad.err") -eq 1 ] && grep -q "^aq-train: MASTER_ADDR is not set" "$tmp/bad.err"'
env RANK=2 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=1 "$TRAIN" "${syn[@]}" --workspace "$tmp/x" >/dev/null 2>"$tmp/bad.err"; rc=$?
check "RANK >= WORLD_SIZE: exit 1, one line" '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/bad.err") -eq 1 ] && grep -q "not below the world size 2" "$tmp/bad.err"'
start=$SECONDS
env RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=9 "$TRAIN" "${syn[@]}" --dist-timeout 2 --workspace "$tmp/x" \
  >/dev/null 2>"$tmp/bad.err"; rc=$?
check "unreachable master: exit 1 within the timeout, one line" \
  '[ $rc -eq 1 ] && [ $((SECONDS - start)) -lt 30 ] && [ $(grep -c "^aq-train: rendezvous at 127.0.0.1:9" "$tmp/bad.err") -eq 1 ]'

# --- scripts/dist-train through torchrun ----------------------------------------------
if python3 -c 'import torch.distributed.run' 2>/dev/null || command -v torchrun >/dev/null; then
  AQ_BUILD=$(dirname "$(dirname "$TRAIN")") MASTER_PORT=$((port + 1)) "$DIST_TRAIN" 1 0 127.0.0.1 2 preact_resnet20 "-c fanin" \
    "$tmp/dt" "$tmp" --dataset synthetic "${syn[@]:4}" --max-steps 2 -b 2 >"$tmp/dt.out" 2>"$tmp/dt.err"; rc=$?
  cp "$tmp/dt.err" "$tmp/dt-train.err"
  check "dist-train 1 0 127.0.0.1 2 ...: trains through torchrun, one TSV, one checkpoint" \
    '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/dt.out") -eq 2 ] && [ -s "$tmp/dt/checkpoint.h5" ]'
else
  echo "SKIP: no torchrun (the torch wheel's python3 is not on PATH)" >&2
fi
"$DIST_TRAIN" 1 1 127.0.0.1 2 resnet18 "-c fanin" >/dev/null 2>"$tmp/dt.err"; rc=$?
check "dist-train with too few arguments: usage, exit 2" '[ $rc -eq 2 ] && grep -q "usage: dist-train NODES" "$tmp/dt.err"'
exit $fail
