#!/usr/bin/env python3
"""Device kernels of an aq-bench trace, per step, by name and by the operator
that launched them; with a second trace, the difference (where a level's
extra launches and time go against exact's).

    scripts/trace-kernels.py [--steps N] [--by op|kernel] [--top K] TRACE [BASE]

TRACE and BASE are Chrome trace JSON files from `aq-bench step --trace DIR`
(DIR/LEVEL.json); N is the --profile-steps they cover (default 3, aq-bench's
default).  --by op names each kernel by the innermost aq scope and LibTorch
operator around its launch (eager traces; a replayed graph has none), --by
kernel by the kernel's own name.  Prints TSV: calls and microseconds per
step, and with BASE their differences, largest first.
"""
import argparse
import bisect
import collections
import json
import re
import sys

DEVICE = ("kernel", "gpu_memset", "gpu_memcpy")


def short(name):
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*", "", name)  # the argument list
    return name[:120]


def load(path, by):
    try:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"trace-kernels.py: {path}: not a Chrome trace ({e})")
    spans = [e for e in events if e.get("ph") == "X"]
    device = [e for e in spans if e.get("cat") in DEVICE]
    calls, us = collections.Counter(), collections.Counter()
    if by == "op":
        launch = {e["args"].get("correlation"): e for e in spans if e.get("cat") == "cuda_runtime" and "args" in e}
        ops = collections.defaultdict(list)  # per thread, sorted by start
        for e in spans:
            if e.get("cat") in ("cpu_op", "user_annotation"):
                ops[e["tid"]].append(e)
        starts = {}
        for tid, lst in ops.items():
            lst.sort(key=lambda e: e["ts"])
            starts[tid] = [e["ts"] for e in lst]
    for e in device:
        key = short(e["name"])
        if by == "op":
            r = launch.get(e.get("args", {}).get("correlation"))
            scope = "-"
            if r is not None and r["tid"] in ops:
                lst = ops[r["tid"]]
                enclosing = [o for o in lst[: bisect.bisect_right(starts[r["tid"]], r["ts"])]
                             if o["ts"] + o["dur"] >= r["ts"] + r["dur"]]
                aq = [o["name"] for o in enclosing if o["name"].startswith("aq::")]
                aten = [o["name"] for o in enclosing if o["name"].startswith("aten::")]
                scope = " > ".join(([aq[-1]] if aq else []) + ([aten[-1]] if aten else [])) or "-"
            key = f"{scope} | {key[:60]}"
        calls[key] += 1
        us[key] += e.get("dur", 0)
    return calls, us


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("base", nargs="?")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--by", choices=("op", "kernel"), default="kernel")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    if a.steps < 1:
        sys.exit("trace-kernels.py: --steps must be at least 1")
    calls, us = load(a.trace, a.by)
    if a.base:
        bcalls, bus = load(a.base, a.by)
        keys = set(calls) | set(bcalls)
        rows = [(us[k] - bus[k], calls[k] - bcalls[k], k) for k in keys]
        print("us_per_step_more\tcalls_per_step_more\tname")
    else:
        rows = [(us[k], calls[k], k) for k in calls]
        print("us_per_step\tcalls_per_step\tname")
    rows.sort(key=lambda r: (-abs(r[0]), r[2]))
    for t, c, k in rows[: a.top]:
        print(f"{t / a.steps:.1f}\t{c / a.steps:g}\t{k}")
    total_t, total_c = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"{total_t / a.steps:.1f}\t{total_c / a.steps:g}\tall")


if __name__ == "__main__":
    main()
