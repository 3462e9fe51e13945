#!/usr/bin/env python3
"""Step times of a lazy restore's path to the first instruction (`lazycr -vv restore`), two
builds alternating on one image, min and median over N runs each (issue 12's 20 ms goal).

Run by hand as root:  bench/first_insn_steps.py IMAGE_DIR LAZYCR_A LAZYCR_B [--runs N]
The image is restored with --lazy --pidns -d and killed (its PID namespace's reaper) each time.
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time

STEPS = [("validate image", r"validate for image \S+: (\d+) us"),
         ("validate pid", r"validate for pid \d+: (\d+) us"),
         ("MAC", r"MAC checked in (\d+) us"),
         ("create", r"create for pid \d+: (\d+) us"),
         ("map-areas", r"map-areas for pid \d+: (\d+) us"),
         ("first instruction", r"first instruction after (\d+) us")]


def one(lazycr, img, work):
    pidfile = os.path.join(work, "pid")
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        r = subprocess.run([lazycr, "-vv", "restore", "-D", img, "--lazy", "--pidns", "-d",
                            "--pidfile", pidfile], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=err)
        wall = (time.perf_counter() - t0) * 1e3
        err.seek(0)
        text = err.read().decode()
    if r.returncode != 0:
        raise SystemExit(f"{lazycr}: exit {r.returncode}: {text}")
    with open(pidfile) as f:
        pid = int(f.read())
    with open(f"/proc/{pid}/stat") as f:
        reaper = int(f.read().rsplit(")", 1)[1].split()[2])
    os.kill(reaper, signal.SIGKILL)
    row = {"wall": wall}
    for name, pat in STEPS:
        m = re.search(pat, text)
        row[name] = int(m.group(1)) / 1e3 if m else float("nan")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="first-insn-")
    rows = {a.a: [], a.b: []}
    for _ in range(a.runs):
        for build in (a.a, a.b):
            rows[build].append(one(build, a.image, work))
            time.sleep(0.05)
    names = [n for n, _ in STEPS] + ["wall"]
    print("| build | " + " | ".join(f"{n} ms min / median" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for build, rs in rows.items():
        cells = [f"{min(r[n] for r in rs):.2f} / {statistics.median(r[n] for r in rs):.2f}"
                 for n in names]
        print(f"| {build} | " + " | ".join(cells) + " |")
    la = os.getloadavg()
    print(f"\n{a.runs} runs each, alternating; load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}")


if __name__ == "__main__":
    main()
