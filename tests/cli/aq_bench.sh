#!/usr/bin/env bash
# CLI behaviour of aq-bench: help, usage errors, exit codes, TSV output.
set -u
BENCH=$1
MAN=${2:-}
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

"$BENCH" --help >"$tmp/out" 2>"$tmp/err"; rc=$?
check "--help exits 0" '[ $rc -eq 0 ]'
check "--help on stdout" 'grep -q "Usage: aq-bench" "$tmp/out" && [ ! -s "$tmp/err" ]'
"$BENCH" kernels --help >"$tmp/out"; check "kernels --help lists --sizes" 'grep -q -- "--sizes" "$tmp/out"'

"$BENCH" kernels --no-such-flag >"$tmp/out" 2>"$tmp/err"; rc=$?
check "unknown flag exits 2" '[ $rc -eq 2 ]'
check "unknown flag: message and hint on stderr" 'grep -q "^aq-bench: " "$tmp/err" && grep -q "Try .aq-bench --help." "$tmp/err" && [ ! -s "$tmp/out" ]'
"$BENCH" >/dev/null 2>"$tmp/err"; rc=$?
check "no subcommand exits 2" '[ $rc -eq 2 ]'
"$BENCH" kernels --sizes 12Q >/dev/null 2>"$tmp/err"; rc=$?
check "bad size exits 2" '[ $rc -eq 2 ] && grep -q "bad size unit" "$tmp/err"'
"$BENCH" kernels --device cpu --sizes 64K,0 >"$tmp/out" 2>"$tmp/err"; rc=$?
check "a bad second size: exit 2, one line, nothing measured or printed" '[ $rc -eq 2 ] && grep -q "size must be positive" "$tmp/err" && [ ! -s "$tmp/out" ]'
"$BENCH" kernels --device cpu --sizes 64K --dtypes fp32,fp64 >"$tmp/out" 2>"$tmp/err"; rc=$?
check "a bad second dtype: exit 2, nothing on stdout" '[ $rc -eq 2 ] && grep -q "unknown dtype" "$tmp/err" && [ ! -s "$tmp/out" ]'
"$BENCH" memory --device cpu --arch preact_resnet20 --image-size 8 -b 2 --layers 3 >"$tmp/out" 2>"$tmp/err"; rc=$?
check "--layers on a ResNet: exit 2, nothing measured" '[ $rc -eq 2 ] && grep -q "are for transformers" "$tmp/err" && [ ! -s "$tmp/out" ]'
for sub in step memory; do
  "$BENCH" $sub --device cpu --arch vit_tiny --image-size 30 >"$tmp/out" 2>"$tmp/err"; rc=$?
  check "$sub: a ViT image size its patch does not divide: exit 2, no header on stdout" \
    '[ $rc -eq 2 ] && grep -q "^aq-bench: vit: image size 30x30 is not a multiple of the patch size 4" "$tmp/err" && [ ! -s "$tmp/out" ]'
done
"$BENCH" step --device cpu --arch gpt_small --context 8 -b 2 --pool mean >"$tmp/out" 2>"$tmp/err"; rc=$?
check "--pool on gpt_small: exit 2" '[ $rc -eq 2 ] && grep -q "pool is for the ViTs" "$tmp/err" && [ ! -s "$tmp/out" ]'
"$BENCH" kernels --bits 9 >/dev/null 2>"$tmp/err"; rc=$?
check "bits 9 exits 2" '[ $rc -eq 2 ]'
"$BENCH" kernels --dtypes fp64 --sizes 64K >/dev/null 2>"$tmp/err"; rc=$?
check "unknown dtype exits 2" '[ $rc -eq 2 ] && grep -q "unknown dtype" "$tmp/err"'
"$BENCH" kernels --device tpu --sizes 64K >/dev/null 2>"$tmp/err"; rc=$?
check "unknown device exits 2" '[ $rc -eq 2 ]'
"$BENCH" kernels --group-size 100 --sizes 64K >/dev/null 2>"$tmp/err"; rc=$?
check "bad group size exits 2" '[ $rc -eq 2 ] && grep -q "group size" "$tmp/err"'

"$BENCH" kernels --device cpu --sizes 64K,128K --dtypes fp32,fp16 --bits 2,4 --reps 1 -q >"$tmp/out" 2>"$tmp/err"; rc=$?
check "small run exits 0" '[ $rc -eq 0 ]'
check "header line" 'head -1 "$tmp/out" | grep -q "^device	dtype	input_bytes	bits	op	median_ms	GB_per_s	copy_GB_per_s	ratio_to_copy	packed_bytes$"'
check "16 data rows" '[ $(tail -n +2 "$tmp/out" | wc -l) -eq 16 ]'
check "rows have 10 fields" '[ -z "$(awk -F"\t" "NF != 10" "$tmp/out")" ]'
# 64 KiB of fp32 at 2 bits: 256 samples x 64 elements: 256*64*2/8 bytes of
# codes + 2 bf16 bounds per sample.
check "packed size of 64K fp32 at 2 bits" 'awk -F"\t" "\$2==\"fp32\" && \$3==65536 && \$4==2 && \$5==\"compress\" {print \$10}" "$tmp/out" | grep -qx 5120'
check "positive throughput" '[ -z "$(awk -F"\t" "NR > 1 && !(\$7 > 0 && \$8 > 0)" "$tmp/out")" ]'
check "-q keeps stderr empty" '[ ! -s "$tmp/err" ]'
"$BENCH" memory --device cpu --arch preact_resnet20 --channels 1 --classes 10 --image-size 28 -b 16 --levels L2,L3 -q \
  --ops "$tmp/ops" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "memory: exits 0, header and 3 rows" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/out") -eq 4 ] && head -1 "$tmp/out" | grep -q "^device	arch	batch	image	amp	level	act_MB	peak_MB"'
check "memory: L3 holds >= 8x less than exact" '[ -n "$(awk -F"\t" "\$6==\"L3\" && \$10 >= 8" "$tmp/out")" ]'
check "memory: L2 between exact and L3" '[ -n "$(awk -F"\t" "\$6==\"L2\" && \$10 > 3" "$tmp/out")" ]'
# --ops: forward then backward operations of each model; the largest of an
# L3 step's peaks is the step's peak_MB.
check "memory --ops: header, both passes, aq's nodes by name" 'head -1 "$tmp/ops" | grep -q "^level	seq	pass	op	before_MB	peak_MB	after_MB$" && grep -q "^L3	[0-9]*	forward	aq::compress	" "$tmp/ops" && grep -q "^L3	[0-9]*	backward	aq::ConvFn	" "$tmp/ops"'
check "memory --ops: the L3 step's peak is its largest operation's" '[ "$(awk -F"\t" "\$1==\"L3\" && \$6 > m {m = \$6} END {printf \"%.1f\", m}" "$tmp/ops")" = "$(awk -F"\t" "\$6==\"L3\" {printf \"%.1f\", \$8}" "$tmp/out")" ]'
cat "$tmp/out" >&2
# --cabits, as aq-train's: L3's budget at 4 bits keeps more than at its own 2,
# L2 at 2 (a budget from its 4 initial bits) less than at its 4.
"$BENCH" memory --device cpu --arch preact_resnet20 --channels 1 --classes 10 --image-size 28 -b 16 --levels L2,L3 -q \
  --cabits 4 >"$tmp/out4" 2>"$tmp/err"; rc=$?
"$BENCH" memory --device cpu --arch preact_resnet20 --channels 1 --classes 10 --image-size 28 -b 16 --levels L2 -q \
  --cabits 2 >"$tmp/out2" 2>>"$tmp/err"; rc2=$?
act() { awk -F"\t" -v l="$2" '$6 == l {print $7}' "$1"; }
check "memory --cabits: exits 0, same rows" '[ $rc -eq 0 ] && [ $rc2 -eq 0 ] && [ $(wc -l <"$tmp/out4") -eq 4 ]'
check "memory --cabits 4: L3 keeps more than at 2 bits, L2 as at its own 4" 'awk -v a="$(act "$tmp/out4" L3)" -v b="$(act "$tmp/out" L3)" "BEGIN {exit !(a > 1.5 * b)}" && [ "$(act "$tmp/out4" L2)" = "$(act "$tmp/out" L2)" ]'
check "memory --cabits 2: L2 keeps less than at its own 4" 'awk -v a="$(act "$tmp/out2" L2)" -v b="$(act "$tmp/out" L2)" "BEGIN {exit !(a < 0.75 * b)}"'
"$BENCH" memory --device cpu --arch preact_resnet20 --cabits 9 >"$tmp/out4" 2>"$tmp/err"; rc=$?
check "memory --cabits 9: exit 2, one line, nothing measured" '[ $rc -eq 2 ] && grep -q -- "--cabits" "$tmp/err" && [ ! -s "$tmp/out4" ]'
"$BENCH" memory --device cpu --arch preact_resnet20 --levels L2 --cabits 6 >"$tmp/out4" 2>"$tmp/err"; rc=$?
check "memory --levels L2 --cabits 6 (above its initial 4): exit 2, nothing measured" \
  '[ $rc -eq 2 ] && grep -q -- "--ibits (4) must be at least --cabits (6)" "$tmp/err" && [ ! -s "$tmp/out4" ]'
# On transformers L3's default budget is 3 bits; --cabits 2 is ActNN's.
g=(memory --device cpu --arch gpt_small --context 32 --layers 1 --width 256 --heads 4 -b 2 --amp bf16 --levels L3 -q)
"$BENCH" "${g[@]}" >"$tmp/g3" 2>"$tmp/err"; rc=$?
"$BENCH" "${g[@]}" --cabits 2 >"$tmp/g2" 2>>"$tmp/err"; rc2=$?
"$BENCH" "${g[@]}" --cabits 3 >"$tmp/g3b" 2>>"$tmp/err"; rc3=$?
saved() { awk -F"\t" '$6 == "L3" {print $9}' "$1"; }
check "memory, gpt_small: L3 keeps more at its own budget than at --cabits 2, as much as at --cabits 3" \
  '[ $rc -eq 0 ] && [ $rc2 -eq 0 ] && [ $rc3 -eq 0 ] && awk -v a="$(saved "$tmp/g3")" -v b="$(saved "$tmp/g2")" "BEGIN {exit !(a > 1.15 * b)}" && [ "$(saved "$tmp/g3")" = "$(saved "$tmp/g3b")" ]'
"$BENCH" memory --arch nope --device cpu >/dev/null 2>"$tmp/err"; rc=$?
check "memory: unknown arch exits 2" '[ $rc -eq 2 ] && grep -q "unknown architecture" "$tmp/err"'
"$BENCH" step --device cpu --arch preact_resnet20 --channels 1 --classes 10 --image-size 28 -b 16 --levels L3 --steps 2 --warmup 1 -q \
  --profile "$tmp/prof" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "step -q: nothing on stderr (not even the profiler library's)" '[ ! -s "$tmp/err" ]'
check "step: exits 0, header and 2 rows" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/out") -eq 3 ] && head -1 "$tmp/out" | grep -q "^device	arch	batch	image	amp	level	median_ms	img_per_s"'
check "step: exact ratio 1, L3 holds >= 8x less" '[ -n "$(awk -F"\t" "\$6==\"exact\" && \$11==1.000" "$tmp/out")" ] && [ -n "$(awk -F"\t" "\$6==\"L3\" && \$12 >= 8 && \$8 > 0" "$tmp/out")" ]'
# The profiled breakdown: the exact model spends nothing in aq scopes, L3
# spends device time compressing and allocating, and the file has the rows.
check "step: breakdown columns (exact: no aq time; L3: compress and allocation > 0)" \
  '[ "$(head -1 "$tmp/out" | cut -f14-19)" = "syncs_per_step	device_busy	compress_ms	decompress_ms	alloc_ms	alloc_share" ] &&
   [ -n "$(awk -F"\t" "\$6==\"exact\" && \$16==0 && \$18==0 && \$15 > 0" "$tmp/out")" ] &&
   [ -n "$(awk -F"\t" "\$6==\"L3\" && \$16 > 0 && \$18 > 0 && \$19 > 0 && \$19 < 1" "$tmp/out")" ]'
check "step --profile: scope, host and kernel rows per level" \
  'head -1 "$tmp/prof" | grep -qx "level	kind	name	calls_per_step	ms_per_step	share_of_step" &&
   grep -q "^L3	scope	aq::compress	" "$tmp/prof" && grep -q "^L3	scope	aq::allocate	" "$tmp/prof" &&
   grep -q "^exact	all	device	" "$tmp/prof" && grep -q "^L3	kernel	" "$tmp/prof"'
cat "$tmp/out" >&2
# ckpt: the exact model with every block recomputed in backward, measured
# like the levels; it keeps only each block's input for backward.
"$BENCH" step --device cpu --arch vit_tiny --channels 1 --classes 10 --image-size 28 -b 8 --levels ckpt,L3 --steps 1 --warmup 1 \
  --profile-steps 0 -q >"$tmp/out" 2>"$tmp/err"; rc=$?
check "step --levels ckpt,L3: exits 0, exact, ckpt and L3 rows" '[ $rc -eq 0 ] && [ "$(cut -f6 "$tmp/out" | tr "\n" " ")" = "level exact ckpt L3 " ]'
check "step: ckpt holds >= 4x less than exact" '[ -n "$(awk -F"\t" "\$6==\"ckpt\" && \$12 >= 4 && \$11 > 0" "$tmp/out")" ]'
cat "$tmp/out" >&2
"$BENCH" memory --device cpu --arch preact_resnet20 --levels L3,ckpt2 >"$tmp/out" 2>"$tmp/err"; rc=$?
check "memory --levels with an unknown level: exit 2, naming ckpt among the levels" '[ $rc -eq 2 ] && grep -q "ckpt2" "$tmp/err" && grep -q "or ckpt" "$tmp/err" && [ ! -s "$tmp/out" ]'
"$BENCH" max-batch --device cpu --arch preact_resnet20 --channels 1 --classes 10 --image-size 28 --levels L3 --limit-mb 48 --start 8 --steps 1 --resolution 4 -q >"$tmp/out" 2>"$tmp/err"; rc=$?
check "max-batch: exits 0, exact and L3" '[ $rc -eq 0 ] && [ $(wc -l <"$tmp/out") -eq 3 ] && head -1 "$tmp/out" | grep -qx "device	arch	image	amp	level	max_batch	ratio	trials"'
check "max-batch: L3 fits over 2x the exact batch in the same memory" '[ -n "$(awk -F"\t" "\$5==\"L3\" && \$7 >= 2" "$tmp/out")" ]'
cat "$tmp/out" >&2
"$BENCH" max-batch --device cpu --arch preact_resnet20 >/dev/null 2>"$tmp/err"; rc=$?
check "max-batch on the CPU without --limit-mb: exit 2" '[ $rc -eq 2 ] && grep -q "limit-mb" "$tmp/err"'
"$BENCH" max-batch --device cpu --arch preact_resnet20 --limit-mb 48 --steps 0 >/dev/null 2>"$tmp/err"; rc=$?
check "max-batch --steps 0: exit 2, one line naming --steps" '[ $rc -eq 2 ] && grep -q -- "--steps" "$tmp/err"'
"$BENCH" max-batch --device cpu --arch preact_resnet20 --limit-mb 48 --resolution 0 >/dev/null 2>"$tmp/err"; rc=$?
check "max-batch --resolution 0: exit 2, one line naming --resolution" '[ $rc -eq 2 ] && [ $(wc -l <"$tmp/err") -le 2 ] && grep -q -- "--resolution" "$tmp/err"'
# The man page documents exactly the options --help shows.
if [ -n "$MAN" ]; then
  opts_help=$({ "$BENCH" --help; "$BENCH" kernels --help; "$BENCH" memory --help; "$BENCH" step --help; "$BENCH" max-batch --help; } | grep -oE -- '--[a-z][a-z0-9-]+' | sort -u)
  opts_man=$(grep -oE -- '\\-\\-[a-z][a-z0-9\\-]+' "$MAN" | sed 's/\\//g' | sort -u)
  check "man page and --help list the same options" '[ "$opts_help" = "$opts_man" ]'
  [ "$opts_help" = "$opts_man" ] || diff <(echo "$opts_help") <(echo "$opts_man") >&2
fi

# scripts/trace-kernels.py on a trace of two steps: a level's kernels against
# exact's, by name and by the scope and operator that launched them.
tk=$(dirname "$0")/../../scripts/trace-kernels.py
op() { printf '{"ph":"X","cat":"cpu_op","name":"%s","tid":1,"ts":%s,"dur":%s}' "$@"; }
rt() { printf '{"ph":"X","cat":"cuda_runtime","name":"cudaLaunchKernel","tid":1,"ts":%s,"dur":1,"args":{"correlation":%s}}' "$@"; }
k() { printf '{"ph":"X","cat":"kernel","name":"%s(float*)","tid":7,"ts":%s,"dur":%s,"args":{"correlation":%s}}' "$@"; }
{
  echo '{"traceEvents":['
  for s in 0 100; do
    echo "$(op aq::compress $s 40),$(op aten::sum $((s + 5)) 5),$(rt $((s + 6)) $((s + 1))),$(k red $((s + 50)) 4 $((s + 1))),"
    echo "$(rt $((s + 30)) $((s + 2))),$(k gemm $((s + 60)) 10 $((s + 2))),"
  done
  echo '{"ph":"i","name":"marker","ts":0}]}'
} >"$tmp/l3.json"
printf '{"traceEvents":[%s,%s]}\n' "$(k gemm 60 10 2)" "$(k gemm 160 10 4)" >"$tmp/exact.json"
python3 "$tk" --steps 2 "$tmp/l3.json" "$tmp/exact.json" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "trace-kernels.py: against a base, the extra kernel per step and nothing for the shared one" \
  '[ $rc -eq 0 ] && [ "$(sed -n 2p "$tmp/out")" = "$(printf "4.0\t1\tred")" ] &&
   [ "$(sed -n 3p "$tmp/out")" = "$(printf "0.0\t0\tgemm")" ] && [ "$(tail -n 1 "$tmp/out")" = "$(printf "4.0\t1\tall")" ]'
python3 "$tk" --steps 2 --by op "$tmp/l3.json" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "trace-kernels.py --by op: the aq scope and operator of each launch" \
  '[ $rc -eq 0 ] && grep -qx "$(printf "10.0\t1\taq::compress | gemm")" "$tmp/out" &&
   grep -qx "$(printf "4.0\t1\taq::compress > aten::sum | red")" "$tmp/out"'
python3 "$tk" "$tmp/none.json" >"$tmp/out" 2>"$tmp/err"; rc=$?
check "trace-kernels.py: a missing trace is one error line, exit 1" '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ]'
exit $fail
