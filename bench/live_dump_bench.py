#!/usr/bin/env python3
"""Live dumps against frozen copies (`lazycr dump --leave-running` with and without
--frozen-copy): frozen time and total time at 64 MiB, 512 MiB and 2 GiB of an idle process
(tests/targets/incr_target: distinct patterned pages, waits for signals), and with --redis of
an idle redis-server holding about 10 MiB (127.0.0.1:25800). Dumps of the same process
alternate live / frozen-copy (and, with --before, the two builds), so that all see the same
load; min and median of --runs each (bench/RESULTS.md, "Live dumps").

Run by hand as root:  bench/live_dump_bench.py BUILD_DIR [--runs N] [--sizes 64,512,2048]
                          [--before OTHER_BUILD_DIR] [--redis]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REDIS_PORT, REDIS_KEYS = 25800, 10000  # 100-byte values: about 10 MiB RSS


def dump(lazycr, pid, d, *extra):
    shutil.rmtree(d, ignore_errors=True)
    r = subprocess.run([lazycr, "dump", "-t", str(pid), "-D", d, "--leave-running", *extra],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dump failed: {r.stderr}")
    m = re.search(r"frozen ([0-9.]+) ms, total ([0-9.]+) ms", r.stderr)
    return float(m.group(1)), float(m.group(2))


def start_redis(work):
    """An idle redis-server holding REDIS_KEYS keys (its client gone: no CLOSE_WAIT left)."""
    p = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--unixsocket", "", "--dir", work],
                         stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    sets = b"".join(b"SET key:%d %s\r\n" % (i, b"v" * 100) for i in range(REDIS_KEYS))
    for _ in range(500):
        try:
            s = socket.create_connection(("127.0.0.1", REDIS_PORT))
            break
        except OSError:
            time.sleep(0.01)
    s.sendall(sets)
    got = b""
    while len(got) < 5 * REDIS_KEYS:
        got += s.recv(65536)
    s.close()
    assert got == b"+OK\r\n" * REDIS_KEYS
    time.sleep(0.2)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="64,512,2048")
    ap.add_argument("--dir", default="/tmp/live/bench")
    ap.add_argument("--before", help="another build, its dumps alternating with BUILD's")
    ap.add_argument("--redis", action="store_true", help="first an idle 10 MiB redis-server")
    a = ap.parse_args()
    builds = {"": os.path.join(a.build, "tools", "lazycr")}
    if a.before:
        builds = {"before ": os.path.join(a.before, "tools", "lazycr"),
                  "after ": builds[""]}
    target = os.path.join(a.build, "tests", "targets", "incr_target")
    os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=a.dir)
    print("| MiB | mode | frozen ms min / median | total ms min / median |")
    print("|---|---|---|---|")
    try:
        sizes = (["redis"] if a.redis else []) + [int(s) for s in a.sizes.split(",") if s]
        for mib in sizes:
            if mib == "redis":
                p = start_redis(work)
            else:
                p = subprocess.Popen([target, str(mib), "0"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                if mib == "redis":
                    with open(f"/proc/{p.pid}/status") as f:
                        rss = [l for l in f if l.startswith("VmRSS:")][0].split()[1]
                    mib = f"redis ({int(rss) // 1024} MiB RSS)"
                else:
                    assert p.stdout.readline().startswith("ready ")
                modes = [b + m for b in builds for m in ("live", "frozen-copy")]
                res = {m: [] for m in modes}
                for run in range(a.runs):
                    order = modes if run % 2 == 0 else modes[::-1]
                    for mode in order:
                        b = mode[:mode.find(" ") + 1] if " " in mode else ""
                        extra = ["--frozen-copy"] if mode.endswith("frozen-copy") else []
                        res[mode].append(dump(builds[b], p.pid, os.path.join(work, "img"), *extra))
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
