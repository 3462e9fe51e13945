#!/usr/bin/env python3
"""Incremental dumps (`lazycr dump --parent`): image size and dump time when 0.1%, 1% and 10%
of a 512 MiB process were rewritten since its parent image, against a full dump of the same
state (bench/RESULTS.md, "Incremental dumps"). Each run: start tests/targets/incr_target, take
the parent (a full dump with --hash-pages, --leave-running), rewrite the fraction, then dump the
same state twice, alternating the order between runs: full, and --parent (compared by the
parent's page digests). A third dump compares with a parent written without digests (content
read back), at 1% only. With --tracked, a fourth parent is dumped with --track right after the
first (write tracking armed: checkpoint/write_tracking.h) and a "tracked" dump of the same state
names it as parent: it reads only the pages written since, where "incr" reads and hashes them
all; "tracked" and "incr" alternate too.

With --criu, CRIU 4.2 (/usr/local/sbin/criu) dumps the same state too ("criu": `criu dump
--leave-running`, a full image: it cannot dump incrementally on this kernel, which has no
soft-dirty bits; its own refusal, `criu check --feature mem_dirty_track` and a pre-dump, is
printed once).

Run by hand as root:  bench/incremental_bench.py BUILD_DIR [--runs N] [--mib M] [--tracked]
                          [--criu]
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
import time

from live_dump_bench import criu_dump, criu_refusals


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def dump(lazycr, pid, d, *extra):
    t0 = time.perf_counter()
    r = subprocess.run([lazycr, "dump", "-t", str(pid), "-D", d, "--leave-running", *extra],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"dump failed: {r.stderr}")
    m = re.search(r"(\d+) stored, (\d+) zero", r.stderr)
    return dt, dir_bytes(d), int(m.group(1))


def one_run(lazycr, target, mib, permille, order, work, extra_nohash, tracked=False):
    # Its own session with CRIU in the rotation: CRIU dumps a shell's job only with --shell-job.
    p = subprocess.Popen([target, str(mib), str(permille)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session="criu" in order)
    try:
        assert p.stdout.readline().startswith("ready ")
        parent = os.path.join(work, "parent")
        dump(lazycr, p.pid, parent, "--hash-pages")
        tparent = os.path.join(work, "tparent")
        if tracked:
            dump(lazycr, p.pid, tparent, "--hash-pages", "--track")
        plain = os.path.join(work, "plain")
        if extra_nohash:
            dump(lazycr, p.pid, plain)
        os.kill(p.pid, signal.SIGUSR2)
        line = p.stdout.readline()
        assert line.startswith("round "), line
        out = {}
        for kind in order:
            d = os.path.join(work, kind)
            if kind == "full":
                out[kind] = dump(lazycr, p.pid, d)
            elif kind == "criu":
                t0 = time.perf_counter()
                criu_dump(p.pid, d, os.path.join(work, "criu-work"))
                out[kind] = (time.perf_counter() - t0, dir_bytes(d), 0)
            elif kind == "tracked":
                out[kind] = dump(lazycr, p.pid, d, "--parent", tparent)
            else:
                out[kind] = dump(lazycr, p.pid, d, "--parent", parent)
        if extra_nohash:
            out["incr-nodigest"] = dump(lazycr, p.pid, os.path.join(work, "nd"), "--parent",
                                        plain)
        return out
    finally:
        p.kill()
        p.wait()
        for f in os.listdir(work):
            shutil.rmtree(os.path.join(work, f), ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--tracked", action="store_true")
    ap.add_argument("--criu", action="store_true")
    a = ap.parse_args()
    lazycr = os.path.join(a.build, "tools", "lazycr")
    target = os.path.join(a.build, "tests", "targets", "incr_target")
    work = tempfile.mkdtemp(prefix="incr-bench-", dir="/tmp/incr" if os.path.isdir("/tmp/incr") else None)
    print(f"machine: {os.uname().nodename} {os.uname().release}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    try:
        if a.criu:
            p = subprocess.Popen([target, "8", "0"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
            try:
                assert p.stdout.readline().startswith("ready ")
                for line in criu_refusals(p.pid, work):
                    print(f"CRIU: {line}")
            finally:
                p.kill()
                p.wait()
        for permille in (1, 10, 100):
            res = {}
            for i in range(a.runs):
                order = ["full", "incr"] if i % 2 == 0 else ["incr", "full"]
                if a.tracked:
                    order = order + ["tracked"] if i % 2 == 0 else ["tracked"] + order
                if a.criu:
                    order = ["criu"] + order if i % 2 == 0 else order + ["criu"]
                r = one_run(lazycr, target, a.mib, permille, order, work,
                            permille == 10 and not a.tracked, a.tracked)
                for k, v in r.items():
                    res.setdefault(k, []).append(v)
            print(f"\n{permille / 10:g}% of {a.mib} MiB rewritten ({a.runs} runs):")
            for k, v in res.items():
                t = [x[0] for x in v]
                b = [x[1] for x in v]
                s = [x[2] for x in v]
                print(f"  {k:14s} dump time min {min(t)*1e3:7.0f} ms  median "
                      f"{statistics.median(t)*1e3:7.0f} ms;  image min {min(b)/2**20:8.2f} MiB "
                      f"median {statistics.median(b)/2**20:8.2f} MiB;  stored pages median "
                      f"{statistics.median(s):.0f}")
            ft = statistics.median(x[0] for x in res["full"])
            fb = statistics.median(x[1] for x in res["full"])
            it = statistics.median(x[0] for x in res["incr"])
            ib = statistics.median(x[1] for x in res["incr"])
            print(f"  incremental / full: time {it / ft:.2f}x, size {ib / fb:.4f}x")
            if a.tracked:
                tt = statistics.median(x[0] for x in res["tracked"])
                tb = statistics.median(x[1] for x in res["tracked"])
                print(f"  tracked / incremental: time {tt / it:.2f}x, size {tb / ib:.4f}x; "
                      f"tracked / full: time {tt / ft:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
