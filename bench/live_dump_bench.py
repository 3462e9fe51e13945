#!/usr/bin/env python3
"""Live dumps against frozen copies (`lazycr dump --leave-running` with and without
--frozen-copy): frozen time and total time at 64 MiB, 512 MiB and 2 GiB of an idle process
(tests/targets/incr_target: distinct patterned pages, waits for signals), and with --redis of
an idle redis-server holding about 10 MiB (127.0.0.1:25800). Dumps of the same process
alternate live / frozen-copy (and, with --before, the two builds), so that all see the same
load; min and median of --runs each (bench/RESULTS.md, "Live dumps").

With --writer MB_PER_S the target is bench/paced_writer instead, writing whole pages of its
memory at that rate (one batch a millisecond; a missed tick is not made up) and logging every
tick: besides the dump's own frozen and total time, the table gives what the target saw: its
longest gap between two ticks (its frozen time, whoever froze it), and its write rate and cost
(microseconds of writing per page) in the second before the dump and during the background copy
(from the end of that gap to the end of the dump: the live dump's copy-on-write faults show
there). With --criu, CRIU's `criu dump --leave-running` joins the rotation (its frozen time is
the target's longest gap), and CRIU's answer to pre-dump on this kernel is printed once.

Run by hand as root:  bench/live_dump_bench.py BUILD_DIR [--runs N] [--sizes 64,512,2048]
                          [--before OTHER_BUILD_DIR] [--redis] [--writer 100] [--criu]
                          [--thp]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

CRIU = "/usr/local/sbin/criu"
MAGIC = 0x70616365645f7772
SLOTS = 1 << 20
REDIS_PORT, REDIS_KEYS = 25800, 10000  # 100-byte values: about 10 MiB RSS


def dump(lazycr, pid, d, *extra):
    shutil.rmtree(d, ignore_errors=True)
    r = subprocess.run([lazycr, "dump", "-t", str(pid), "-D", d, "--leave-running", *extra],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dump failed: {r.stderr}")
    m = re.search(r"frozen ([0-9.]+) ms, total ([0-9.]+) ms", r.stderr)
    return float(m.group(1)), float(m.group(2))


def criu_dump(pid, d, work):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    os.makedirs(work, exist_ok=True)
    t0 = time.monotonic()
    r = subprocess.run([CRIU, "dump", "-t", str(pid), "-D", d, "-W", work, "-o", "dump.log",
                        "--leave-running"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True)
    total = (time.monotonic() - t0) * 1000
    if r.returncode != 0:
        tail = open(os.path.join(work, "dump.log")).read()[-2000:]
        sys.exit(f"criu dump failed: {r.stderr}\n{tail}")
    return None, total


def criu_refusals(pid, work):
    """CRIU's own words on incremental dumps here: its memory tracking check and a pre-dump."""
    out = []
    r = subprocess.run([CRIU, "check", "--feature", "mem_dirty_track"], capture_output=True,
                       text=True)
    lines = (r.stdout + r.stderr).strip().splitlines()
    out.append(f"`criu check --feature mem_dirty_track` (exit {r.returncode}): "
               f"{lines[-1] if lines else ''}")
    d = os.path.join(work, "predump")
    os.makedirs(d, exist_ok=True)
    r = subprocess.run([CRIU, "pre-dump", "-t", str(pid), "-D", d, "-W", d, "-o", "pre.log"],
                       capture_output=True, text=True)
    # The last error is the one that stopped it (an earlier rlimit complaint is harmless).
    errs = [ln for ln in open(os.path.join(d, "pre.log")).read().splitlines() if "Error" in ln]
    out.append(f"`criu pre-dump -t PID` (exit {r.returncode}): "
               f"{errs[-1] if errs else (r.stderr.strip() or 'no error')}")
    shutil.rmtree(d, ignore_errors=True)
    return out


class WriterLog:
    """The tick log of a paced_writer (see bench/paced_writer.c)."""

    def __init__(self, path):
        self.path = path

    def ready(self):
        try:
            with open(self.path, "rb") as f:
                h = f.read(32)
        except OSError:
            return False
        return len(h) == 32 and struct.unpack("<4Q", h)[0] == MAGIC

    def records(self, last=100_000):
        """The last `last` ticks (at most), oldest first."""
        with open(self.path, "rb") as f:
            ticks = struct.unpack("<4Q", f.read(32))[1]
            out = []
            for t in range(max(0, ticks - min(last, SLOTS - 1)), ticks):
                if not out or t % SLOTS == 0:
                    f.seek(24 * (1 + t % SLOTS))
                out.append(struct.unpack("<3Q", f.read(24)))
        return out


def window_stats(recs, t_start, t_end):
    """(longest gap ms, MB/s before, us/page before, MB/s during copy, us/page during copy)."""
    before = [r for r in recs if t_start - 1_000_000_000 <= r[0] < t_start]
    during = [r for r in recs if (before and r[0] >= before[-1][0]) and r[0] <= t_end]
    after = [r for r in recs if r[0] > t_end][:1]  # the first tick after a thaw at the end
    seq = during + after

    def rate(a, b):
        dt, dp, db = b[0] - a[0], b[1] - a[1], b[2] - a[2]
        if dt < 20_000_000 or dp == 0:
            return None, None
        return dp * 4096 / (dt / 1e9) / 1e6, db / dp / 1000

    gap, at = 0, 0
    for i in range(1, len(seq)):
        if seq[i][0] - seq[i - 1][0] > gap:
            gap, at = seq[i][0] - seq[i - 1][0], i
    mb_before, us_before = rate(before[0], before[-1]) if len(before) > 1 else (None, None)
    copy = [r for r in seq[at:] if r[0] <= t_end]
    mb_copy, us_copy = rate(copy[0], copy[-1]) if len(copy) > 1 else (None, None)
    return gap / 1e6, mb_before, us_before, mb_copy, us_copy


def med(xs, fmt):
    xs = [x for x in xs if x is not None]
    return (fmt % statistics.median(xs)) if xs else "-"


def writer_bench(a, lazycr, work):
    writer = os.path.join(a.build, "bench", "paced_writer")
    modes = ["live", "frozen-copy"] + (["criu"] if a.criu else [])
    print("| MiB | mode | dump's frozen ms min / median | target's longest gap ms min / median "
          "| total ms min / median | MB/s before / during the copy (median) | us per page "
          "written before / during the copy (median) |")
    print("|---|---|---|---|---|---|---|")
    refusals = []
    for mib in [int(s) for s in a.sizes.split(",")]:
        log = WriterLog(os.path.join(work, "ticks"))
        p = subprocess.Popen([writer, str(mib), str(a.writer), log.path],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        try:
            while not log.ready():
                if p.poll() is not None:
                    sys.exit(f"paced_writer exited with {p.returncode}")
                time.sleep(0.05)
            time.sleep(1.5)
            if a.criu and not refusals:
                refusals = criu_refusals(p.pid, work)
                time.sleep(1.2)
            res = {m: [] for m in modes}
            for run in range(a.runs):
                k = run % len(modes)
                for mode in modes[k:] + modes[:k]:
                    time.sleep(1.2)  # the second before the dump, undisturbed
                    img = os.path.join(work, "img")
                    t0 = time.monotonic_ns()
                    if mode == "criu":
                        frozen, total = criu_dump(p.pid, img, os.path.join(work, "criu-work"))
                    else:
                        extra = ["--frozen-copy"] if mode == "frozen-copy" else []
                        frozen, total = dump(lazycr, p.pid, img, *extra)
                    t1 = time.monotonic_ns()
                    time.sleep(0.3)  # the first ticks after the dump
                    res[mode].append((frozen, total) + window_stats(log.records(), t0, t1))
                    shutil.rmtree(img, ignore_errors=True)
            for mode in modes:
                xs = res[mode]
                fr = [x[0] for x in xs if x[0] is not None]
                gap = [x[2] for x in xs]
                tt = [x[1] for x in xs]
                frozen = f"{min(fr):.1f} / {statistics.median(fr):.1f}" if fr else "-"
                print(f"| {mib} | {mode} | {frozen} | {min(gap):.1f} / {statistics.median(gap):.1f}"
                      f" | {min(tt):.0f} / {statistics.median(tt):.0f} | "
                      f"{med([x[3] for x in xs], '%.0f')} / {med([x[5] for x in xs], '%.0f')} | "
                      f"{med([x[4] for x in xs], '%.2f')} / {med([x[6] for x in xs], '%.2f')} |",
                      flush=True)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
    for line in refusals:
        print(f"- CRIU: {line}")


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


def idle_bench(a, lazycr, work):
    builds = {"": lazycr}
    if a.before:
        builds = {"before ": os.path.join(a.before, "tools", "lazycr"),
                  "after ": builds[""]}
    target = os.path.join(a.build, "tests", "targets", "incr_target")
    print("| MiB | mode | frozen ms min / median | total ms min / median |")
    print("|---|---|---|---|")
    sizes = (["redis"] if a.redis else []) + [int(s) for s in a.sizes.split(",") if s]
    for mib in sizes:
        if mib == "redis":
            p = start_redis(work)
        else:
            env = dict(os.environ, INCR_TARGET_THP="1") if a.thp else None
            p = subprocess.Popen([target, str(mib), "0"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env=env)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="64,512,2048")
    ap.add_argument("--dir", default="/tmp/live/bench")
    ap.add_argument("--writer", type=float, default=0,
                    help="MB/s the target writes during the dumps (bench/paced_writer)")
    ap.add_argument("--criu", action="store_true", help=f"with --writer: {CRIU} too")
    ap.add_argument("--before", help="another build, its dumps alternating with BUILD's")
    ap.add_argument("--redis", action="store_true", help="first an idle 10 MiB redis-server")
    ap.add_argument("--thp", action="store_true",
                    help="the idle target's memory madvise(MADV_HUGEPAGE)d (2 MiB folios)")
    a = ap.parse_args()
    lazycr = os.path.join(a.build, "tools", "lazycr")
    os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=a.dir)
    try:
        if a.writer > 0:
            writer_bench(a, lazycr, work)
        else:
            idle_bench(a, lazycr, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
