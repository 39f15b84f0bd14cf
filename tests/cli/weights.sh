#!/usr/bin/env bash
# Weights in and out against Python's safetensors package and torchvision:
# a torchvision ResNet-18 state dict written by Python starts an aq-train run
# (--init-from, --reset-head for 10 classes); aq-export writes the run's
# checkpoint; Python loads it into torchvision's resnet18 (strict) and finds
# every parameter bit for bit as it wrote it (the run trains at lr 0), the
# buffers one BatchNorm update on, and the metadata that rebuilds the model.
# Then the refusals and one-line errors of both tools.
#   weights.sh AQ_TRAIN AQ_EXPORT TORCH_DIR [aq-export.1]
# Skips (77) when no python3 with torch, safetensors and torchvision is found
# (scripts/setup.sh installs them beside the torch that aq builds against).
set -u
TRAIN=$1
EXPORT=$2
TORCH_DIR=$3
MAN=${4:-}
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; [ -n "${AQ_DEBUG:-}" ] && cat "$tmp/err" >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

PY=
for py in "${AQ_PYTHON:-}" "$TORCH_DIR/../../../../bin/python3" python3; do
  [ -n "$py" ] && "$py" -c 'import torch, safetensors.torch, torchvision' 2>/dev/null && { PY=$py; break; }
done
if [ -z "$PY" ]; then
  echo "SKIP: no python3 with torch, safetensors and torchvision (scripts/setup.sh installs them)" >&2
  exit 77
fi

# --- Python -> aq-train --init-from -> aq-export -> Python -----------------------------
"$PY" - "$tmp/ref.safetensors" <<'EOF' 2>"$tmp/err" || { echo "FAIL: Python cannot write the reference" >&2; cat "$tmp/err" >&2; exit 1; }
import sys, torch, torchvision, safetensors.torch as st
torch.manual_seed(0)
m = torchvision.models.resnet18()  # 1000 classes, as torchvision's pretrained weights
with torch.no_grad():  # every tensor set, buffers included, so that a missed copy shows
    for k, t in m.state_dict().items():
        if "running_var" in k: t.copy_(torch.rand_like(t) + 0.5)
        elif t.is_floating_point(): t.copy_(torch.randn_like(t) * 0.05)
        else: t.fill_(1234)
st.save_file(m.state_dict(), sys.argv[1])
EOF
run=(--dataset synthetic --num-classes 10 --image-size 32 --arch resnet18 -b 4 --epochs 1 --max-steps 1
     --lr 0 --momentum 0 --weight-decay 0 --val-batches 1 --device cpu --seed 1 -q)
"$TRAIN" "${run[@]}" --init-from "$tmp/ref.safetensors" --reset-head --workspace "$tmp/ws" >/dev/null 2>"$tmp/err"; rc=$?
check "aq-train --init-from a torchvision file --reset-head: exit 0, a checkpoint" '[ $rc -eq 0 ] && [ -s "$tmp/ws/checkpoint.h5" ]'
"$EXPORT" "$tmp/ws/checkpoint.h5" -o "$tmp/out.safetensors" 2>"$tmp/err"; rc=$?
check "aq-export: exit 0, nothing on stderr" '[ $rc -eq 0 ] && [ -s "$tmp/out.safetensors" ] && [ ! -s "$tmp/err" ]'
"$PY" - "$tmp/ref.safetensors" "$tmp/out.safetensors" <<'EOF' 2>"$tmp/err"; rc=$?
import json, sys, torch, torchvision, safetensors.torch as st
from safetensors import safe_open
ref, out = st.load_file(sys.argv[1]), st.load_file(sys.argv[2])
m = torchvision.models.resnet18(num_classes=10)
m.load_state_dict(out)  # strict: the same names, shapes and dtypes as torchvision's
bits = lambda t: t.contiguous().flatten().view(torch.uint8)
problems = []
for k, t in ref.items():
    o = out[k]
    if k.startswith("fc."):
        if o.shape[0] != 10: problems.append(f"{k}: shape {tuple(o.shape)}")
    elif k.endswith("num_batches_tracked"):
        if o.item() != t.item() + 1: problems.append(f"{k}: {o.item()}, not {t.item() + 1}")
    elif "running_" in k:
        if o.dtype != t.dtype or o.shape != t.shape or not torch.isfinite(o).all() or torch.equal(o, t):
            problems.append(f"{k}: not one BatchNorm update on")
    elif o.dtype != t.dtype or not torch.equal(bits(o), bits(t)):
        problems.append(f"{k}: not bit for bit the file's")
meta = safe_open(sys.argv[2], "pt").metadata()
want = {"format": "pt", "arch": "resnet18", "num_classes": "10", "in_channels": "3", "image_size": "32",
        "dataset": "synthetic", "step": "1"}
for k, v in want.items():
    if meta.get(k) != v: problems.append(f"metadata {k}: {meta.get(k)!r}, not {v!r}")
for k in ("mean", "std"):
    if len(json.loads(meta.get(k, "null") or "[]")) != 3: problems.append(f"metadata {k}: {meta.get(k)!r}")
m.eval()
if m(torch.randn(2, 3, 32, 32)).shape != (2, 10): problems.append("torchvision's forward")
print("\n".join(problems), file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
check "Python: torchvision loads the export strictly; parameters bit for bit, buffers one update on, metadata" '[ $rc -eq 0 ]'
[ $rc -eq 0 ] || cat "$tmp/err" >&2

# Standard input and output: the same bytes.
"$EXPORT" - -o - <"$tmp/ws/checkpoint.h5" >"$tmp/stdout.safetensors" 2>"$tmp/err"; rc=$?
check "aq-export - -o -: the file's bytes" '[ $rc -eq 0 ] && cmp -s "$tmp/stdout.safetensors" "$tmp/out.safetensors"'

# --- refusals and one-line errors ----------------------------------------------------
cp "$tmp/out.safetensors" "$tmp/keep"
"$EXPORT" "$tmp/ws/checkpoint.h5" -o "$tmp/out.safetensors" 2>"$tmp/err"; rc=$?
check "aq-export over an existing file: exit 2, one line naming --force, file untouched" \
  '[ $rc -eq 2 ] && grep -q "^aq-export: .*exists: replace it with --force" "$tmp/err" && cmp -s "$tmp/keep" "$tmp/out.safetensors"'
printf 'junk' >"$tmp/out.safetensors"
"$EXPORT" "$tmp/ws/checkpoint.h5" -o "$tmp/out.safetensors" --force 2>"$tmp/err"; rc=$?
check "aq-export --force replaces it" '[ $rc -eq 0 ] && cmp -s "$tmp/keep" "$tmp/out.safetensors"'
check "no temporary file left" '[ $(ls -A "$tmp" | grep -c tmp-) -eq 0 ]'
head -c 3000 "$tmp/ws/checkpoint.h5" >"$tmp/trunc.h5"
"$EXPORT" "$tmp/trunc.h5" -o "$tmp/x.safetensors" 2>"$tmp/err"; rc=$?
check "aq-export of a truncated checkpoint: exit 1, one line, no file" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "^aq-export: .*trunc.h5" "$tmp/err" && [ ! -e "$tmp/x.safetensors" ]'
"$EXPORT" "$tmp/ws/checkpoint.h5" 2>"$tmp/err"; rc=$?
check "aq-export without -o: exit 2" '[ $rc -eq 2 ]'

"$TRAIN" "${run[@]}" --init-from "$tmp/ref.safetensors" --workspace "$tmp/ws2" >/dev/null 2>"$tmp/err"; rc=$?
check "--init-from 1000 classes into 10 without --reset-head: exit 1, one line naming the classifier and --reset-head" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "fc\.[a-z]*. has shape \[1000.*--reset-head" "$tmp/err"'
head -c 100000 "$tmp/ref.safetensors" >"$tmp/trunc.safetensors"
"$TRAIN" "${run[@]}" --init-from "$tmp/trunc.safetensors" --reset-head --workspace "$tmp/ws3" >/dev/null 2>"$tmp/err"; rc=$?
check "--init-from a truncated safetensors file: exit 1, one line" \
  '[ $rc -eq 1 ] && [ $(wc -l <"$tmp/err") -eq 1 ] && grep -q "^aq-train: .*trunc.safetensors: .*truncated" "$tmp/err"'
"$TRAIN" "${run[@]}" --init-from "$tmp/out.safetensors" --resume "$tmp/ws/checkpoint.h5" --workspace "$tmp/ws" >/dev/null 2>"$tmp/err"; rc=$?
check "--init-from with --resume FILE: exit 2" '[ $rc -eq 2 ] && grep -q "init-from" "$tmp/err"'
"$TRAIN" "${run[@]}" --reset-head --workspace "$tmp/ws4" >/dev/null 2>"$tmp/err"; rc=$?
check "--reset-head alone: exit 2" '[ $rc -eq 2 ] && grep -q "reset-head goes with --init-from" "$tmp/err"'
# An aq checkpoint works as a starting point too; with --resume auto it is
# used only when the workspace has nothing to continue.
"$TRAIN" "${run[@]}" --init-from "$tmp/ws/checkpoint.h5" --resume auto --workspace "$tmp/ws5" >/dev/null 2>"$tmp/err"; rc=$?
check "--init-from an aq checkpoint with --resume auto: exit 0" '[ $rc -eq 0 ] && [ -s "$tmp/ws5/checkpoint.h5" ]'

if [ -n "$MAN" ]; then
  opts_help=$("$EXPORT" --help | grep -oE -- '--[a-z][a-z0-9-]+' | sort -u)
  opts_man=$(grep -oE -- '\\-\\-[a-z][a-z0-9\\-]+' "$MAN" | sed 's/\\//g' | sort -u)
  check "aq-export.1: same options as --help" '[ "$opts_help" = "$opts_man" ]'
  [ "$opts_help" = "$opts_man" ] || diff <(echo "$opts_help") <(echo "$opts_man") >&2
fi
exit $fail
