#!/usr/bin/env python3
"""Live dumps against frozen copies (`lazycr dump --leave-running` with and without
--frozen-copy): frozen time and total time at 64 MiB, 512 MiB and 2 GiB of an idle process
(tests/targets/incr_target: distinct patterned pages, waits for signals). Dumps of the same
process alternate live / frozen-copy, so that both see the same load; min and median of
--runs each (bench/RESULTS.md, "Live dumps").

Run by hand as root:  bench/live_dump_bench.py BUILD_DIR [--runs N] [--sizes 64,512,2048]
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile


def dump(lazycr, pid, d, *extra):
    shutil.rmtree(d, ignore_errors=True)
    r = subprocess.run([lazycr, "dump", "-t", str(pid), "-D", d, "--leave-running", *extra],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dump failed: {r.stderr}")
    m = re.search(r"frozen ([0-9.]+) ms, total ([0-9.]+) ms", r.stderr)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="64,512,2048")
    ap.add_argument("--dir", default="/tmp/live/bench")
    a = ap.parse_args()
    lazycr = os.path.join(a.build, "tools", "lazycr")
    target = os.path.join(a.build, "tests", "targets", "incr_target")
    os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=a.dir)
    print("| MiB | mode | frozen ms min / median | total ms min / median |")
    print("|---|---|---|---|")
    try:
        for mib in [int(s) for s in a.sizes.split(",")]:
            p = subprocess.Popen([target, str(mib), "0"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                assert p.stdout.readline().startswith("ready ")
                res = {"live": [], "frozen-copy": []}
                for run in range(a.runs):
                    order = ["live", "frozen-copy"] if run % 2 == 0 else ["frozen-copy", "live"]
                    for mode in order:
                        extra = ["--frozen-copy"] if mode == "frozen-copy" else []
                        res[mode].append(dump(lazycr, p.pid, os.path.join(work, "img"), *extra))
                for mode, xs in res.items():
                    fr = [x[0] for x in xs]
                    tt = [x[1] for x in xs]
                    print(f"| {mib} | {mode} | {min(fr):.1f} / {statistics.median(fr):.1f} | "
                          f"{min(tt):.0f} / {statistics.median(tt):.0f} |", flush=True)
            finally:
                p.send_signal(signal.SIGKILL)
                p.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
