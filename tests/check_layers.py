#!/usr/bin/env python3
"""Fails when an #include points up the layers of docs/architecture.md.

Every source and header of kernels/, libaq/ and tools/ belongs to a layer
(by its folder, or for a public header by its name); it may include only
headers of its own layer or a lower one.  A header this table does not
know fails too, so a new one gets a layer when it is added.

Usage: check_layers.py [REPOSITORY]   (default: the folder above this file)"""
import os
import re
import sys

LAYERS = ["kernels", "base", "engine", "ops", "modules", "adaptive", "models", "train", "cli", "tools"]
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK["data"] = RANK["base"]  # datasets need nothing of aq's but the logger
RANK["dist"] = RANK["base"]  # process groups need nothing of aq's but the logger

# Public headers (libaq/include/aq/NAME.h) by layer.
PUBLIC = {
    "base": ["log", "logging", "memory", "config", "checkpoint", "safetensors"],
    "data": ["data"],
    "dist": ["dist"],
    "engine": ["compress", "allocate"],
    "ops": ["layer_state", "functional", "sample_bits", "recompute"],
    "modules": ["modules"],
    "adaptive": ["adaptive"],
    "models": ["models"],
    "train": ["step", "optim", "loss", "evaluate", "train", "variance", "calibrate", "bench", "weights"],
    "cli": ["cli"],
}
HEADER_LAYER = {f"aq/{h}.h": layer for layer, hs in PUBLIC.items() for h in hs}
HEADER_LAYER["aq_config.h"] = "kernels"  # the build's configuration: below everything


def layer_of(rel):
    """The layer of a file by its path in the repository, or None."""
    parts = rel.split("/")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] == "tools":
        return "tools"
    if parts[:3] == ["libaq", "include", "aq"]:
        return HEADER_LAYER.get("aq/" + parts[3])
    if parts[:2] == ["libaq", "src"] and len(parts) > 3:
        return parts[2] if parts[2] in RANK else None
    return None


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    include = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
    problems = []
    checked = 0
    for top in ("kernels", "libaq", "tools"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for f in sorted(files):
                if not f.endswith((".h", ".cuh", ".cpp", ".cu")):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)
                mine = layer_of(rel)
                if mine is None:
                    problems.append(f"{rel}: in no layer (give its folder or header one in {__file__})")
                    continue
                checked += 1
                for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
                    m = include.match(line)
                    if not m:
                        continue
                    name = m.group(1)
                    local = os.path.join(dirpath, name)
                    if os.path.exists(local):  # beside the file: an internal header of its layer
                        theirs = layer_of(os.path.relpath(local, root))
                    elif name in HEADER_LAYER:
                        theirs = HEADER_LAYER[name]
                    elif os.path.exists(os.path.join(root, "kernels", name)):
                        theirs = "kernels"
                    else:
                        problems.append(f"{rel}:{n}: includes \"{name}\", which has no layer")
                        continue
                    if theirs is None:
                        problems.append(f"{rel}:{n}: includes \"{name}\", which has no layer")
                    elif RANK[theirs] > RANK[mine]:
                        problems.append(f"{rel}:{n}: {mine} includes \"{name}\" of {theirs}, a higher layer")
    for p in problems:
        print(p)
    print(f"check_layers: {checked} files, {len(problems)} problems")
    return 1 if problems or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
