# Shared by dist-train and dist-test: the seed's positional arguments, the
# aq tools (AQ_BUILD, else the build folder beside this script, else PATH),
# and torchrun (TORCHRUN, else on PATH, else the torch wheel's module).

dist_args() {
  local me=$1
  shift
  if [ $# -lt 8 ]; then
    echo "$me: usage: $me NODES NODE_RANK MASTER_ADDR PROCS_PER_NODE ARCH \"QUANTIZE CONFIG\" WORKSPACE DATA [OPTIONS]" >&2
    exit 2
  fi
  local n
  for n in "$1" "$2" "$4"; do
    case $n in '' | *[!0-9]*) echo "$me: NODES, NODE_RANK and PROCS_PER_NODE must be numbers, not '$n'" >&2; exit 2 ;; esac
  done
  if [ "$1" -lt 1 ] || [ "$4" -lt 1 ] || [ "$2" -ge "$1" ]; then
    echo "$me: node rank $2 of $1 nodes, $4 processes per node: needs 0 <= NODE_RANK < NODES and PROCS_PER_NODE >= 1" >&2
    exit 2
  fi
  launch=(--nnodes "$1" --node-rank "$2" --master-addr "$3" --master-port "${MASTER_PORT:-29500}"
          --nproc-per-node "$4")
  torchrun=()
  if [ -n "${TORCHRUN:-}" ]; then
    read -r -a torchrun <<<"$TORCHRUN"
  elif command -v torchrun >/dev/null; then
    torchrun=(torchrun)
  else
    local py
    for py in python3 "${AQ_VENV:-$HOME/.local/share/aq/venv}/bin/python3"; do
      if "$py" -c 'import torch.distributed.run' 2>/dev/null; then torchrun=("$py" -m torch.distributed.run); break; fi
    done
  fi
}

aq_tool() {
  local b=${AQ_BUILD:-$here/../build}
  if [ -x "$b/tools/$1" ]; then echo "$b/tools/$1"; else command -v "$1" || echo "$1"; fi
}

need_torchrun() {
  if [ ${#torchrun[@]} -eq 0 ]; then
    echo "$1: torchrun not found: install the torch wheel (scripts/setup.sh) or set TORCHRUN" >&2
    exit 2
  fi
}
