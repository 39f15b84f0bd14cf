#!/usr/bin/env python3
"""Counts test results of the last `meson test` run in one or more build
folders (the main build and the sanitizer build of scripts/test.sh).

GoogleTest binaries count per test case (from their JUnit XML); every other
test counts as one.  Prints 'N passed, N failed, N skipped' over all of them
and exits 1 if anything failed or nothing ran.  Before that line it names
each failure (a test case, or a test and the FAIL lines of its output, else
its last lines), since
CI keeps only the tail of the output."""
import json
import os
import sys
import xml.etree.ElementTree as ET

builds = sys.argv[1:] or ["build"]
passed = failed = skipped = 0
runs = []
failures = []
for build in builds:
    try:
        runs += [json.loads(line) for line in open(os.path.join(build, "meson-logs", "testlog.json")) if line.strip()]
    except OSError:
        failed += 1  # a build folder given whose tests never ran
        print(f"{build}: no test log", file=sys.stderr)
for run in runs:
    name = run["name"].split(":")[-1].strip()
    xml = next((a.split("xml:", 1)[1] for a in run.get("command", []) if a.startswith("--gtest_output=xml:")), None)
    cases = []
    if xml and os.path.exists(xml):
        try:
            cases = ET.parse(xml).getroot().iter("testcase")
        except ET.ParseError:
            cases = []
    counted = False
    for case in cases:
        counted = True
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            failures.append(f"{name}: {case.get('classname')}.{case.get('name')}")
        elif case.get("result") == "skipped" or case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    if not counted or run["result"] not in ("OK", "SKIP", "EXPECTEDFAIL"):
        # A binary that crashed or timed out counts as one failure on top.
        if run["result"] == "SKIP":
            skipped += 1
        elif run["result"] in ("OK", "EXPECTEDFAIL"):
            passed += 1
        else:
            failed += 1
            lines = run.get("stdout", "").splitlines()
            said = [l for l in lines if l.startswith("FAIL")] or lines[-8:]
            failures.append(f"{name}: {run['result']} after {run.get('duration', 0):.0f} s"
                            + "".join(f"\n  {l}" for l in said[:10]))
for f in failures:
    print("failed:", f)
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed or passed == 0 else 0)
