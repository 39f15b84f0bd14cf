#!/usr/bin/env bash
# The library example trains: the loss falls, and the layers keep far fewer
# bytes than the fp32 activations would take.
set -u
out=$("$1" 30 2>/dev/null) || { echo "FAIL: example exited $?" >&2; exit 1; }
first=$(echo "$out" | awk -F'\t' 'NR==2 {print $2}')
last=$(echo "$out" | awk -F'\t' 'END {print $2}')
saved=$(echo "$out" | awk -F'\t' 'END {print $3}')
# fp32 activations kept by the exact model: conv input, bn input, relu
# output, pool input, linear input.
exact=$(( 4 * 64 * (784 + 3 * 16 * 784 + 16 * 196) ))
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.7 * a) }' || { echo "FAIL: loss $first -> $last" >&2; exit 1; }
[ "$saved" -gt 0 ] && [ $((exact / saved)) -ge 8 ] || { echo "FAIL: saved $saved of $exact bytes" >&2; exit 1; }
