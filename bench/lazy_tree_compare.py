#!/usr/bin/env python3
"""Lazy restore of a process tree, lazycr against CRIU 4.2 (issue 14, "Lazy trees"), side by
side in one run.

The tree: a python3 root fills --mib MiB (default 256) of private memory (each page half random,
half zero: it compresses about 2x) and forks --children children (default 2), which inherit it
copy-on-write; each child then rewrites 1/64 of it (its own pages). One image per tool, each
dumped from a fresh tree (`lazycr dump`; `criu dump`). Then, --runs times, in an order that
rotates from run to run, each image is restored lazily and left idle until its page server is
done (bench/lazy_drain.py: lazycr's `restore --lazy`, CRIU's `lazy-pages --daemon` + `restore
--lazy-pages`; the drain ends when the server, or the daemon, exits).
Per run: drain time (first command's start to that exit), the tree's PSS after the drain (sum
of /proc/PID/smaps_rollup Pss over its processes, against the original tree's before its
dump) and, for lazycr, the bytes the page server decompressed (its stats) and the pages
lazycr wrote before the first instruction. `--base DIR` adds the lazycr of another build
(tool "base", e.g. main's).
Images go to --dir (default /dev/shm: the page cache, no disk).

Usage: bench/lazy_tree_compare.py --build BUILD_DIR [--runs 3] [--mib 256] [--children 2]
Root only. A benchmark, not a test.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import criu_compare  # noqa: E402  (find_or_build_criu, criu_version)
import lazy_drain  # noqa: E402  (dump_cmd, drain, kill_wait, reap_all, subreaper)

TREE = r"""
import mmap, os, sys, time
mib, children, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
P = 4096
pages = mib * 256
buf = mmap.mmap(-1, pages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rnd = os.urandom(pages * P // 2)
half = bytes(P // 2)
buf[:] = b''.join(rnd[i * 2048:(i + 1) * 2048] + half for i in range(pages))
del rnd
pids = []
for c in range(children):
    pid = os.fork()
    if pid == 0:
        own = pages // 64
        for i in range(c * own, (c + 1) * own):
            buf[i * P:i * P + 8] = b'child%03d' % c
        while True:
            time.sleep(1)
    pids.append(pid)
time.sleep(0.5)
with open(ready + '.tmp', 'w') as f:
    f.write('ready %d %s\n' % (os.getpid(), ' '.join(map(str, pids))))
os.rename(ready + '.tmp', ready)
while True:
    time.sleep(1)
"""


def log(msg):
    print(msg, flush=True)


def pss_kb(pids):
    total = 0
    for p in pids:
        with open("/proc/%d/smaps_rollup" % p) as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def start_tree(mib, children, tdir):
    ready = os.path.join(tdir, "ready")
    p = subprocess.Popen(["python3", "-c", TREE, str(mib), str(children), ready],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if os.path.exists(ready):
            pids = [int(x) for x in open(ready).read().split()[1:]]
            return p, pids
        if p.poll() is not None:
            raise RuntimeError("tree exited with %s" % p.returncode)
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("tree did not get ready")


def lazycr_of(tool, build, base):
    return os.path.join(base if tool == "base" else build, "tools", "lazycr")


def dump(tool, a, criu, img, scratch):
    """The original tree's PSS (kB) before its dump."""
    os.makedirs(img)
    tdir = os.path.join(scratch, "tree-" + tool)
    os.makedirs(tdir)
    tree, pids = start_tree(a.mib, a.children, tdir)
    pss = pss_kb(pids)
    lazycr = None if tool == "criu" else lazycr_of(tool, a.build, a.base)
    cmd = lazy_drain.dump_cmd(lazycr, criu, pids[0], img, tdir)
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    for p in reversed(pids):
        lazy_drain.kill_wait(p)
    tree.wait()
    if r.returncode != 0:
        raise RuntimeError("%s dump failed: %s" % (tool, r.stderr.decode()[-400:]))
    return pss, pids


def restore(tool, a, criu, img, work, pids):
    """(drain s, PSS kB after the drain, server bytes decompressed, eager pages, first
    instruction s; the last three None for CRIU)."""
    lazycr = None if tool == "criu" else lazycr_of(tool, a.build, a.base)
    wall, _, s, _ = lazy_drain.drain(lazycr, criu, img, work)
    pss = pss_kb(pids)
    for p in reversed(pids):
        lazy_drain.kill_wait(p)
    lazy_drain.reap_all()
    dec = eager = first = None
    if s is not None:
        dec = s.get("bytes_decompressed")
        eager = s.get("restore", {}).get("eager_pages")
        first = s.get("time_to_first_instruction_ns", 0) / 1e9
    return wall, pss, dec, eager, first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(criu_compare.REPO, "build"))
    ap.add_argument("--base", help="another build directory to compare with (tool base)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    a = ap.parse_args()
    lazy_drain.subreaper()
    tools = ["lazycr"] + (["base"] if a.base else []) + ["criu"]
    criu, why = criu_compare.find_or_build_criu()
    if criu is None:
        log("SKIP criu: %s; measuring lazycr alone" % why)
        tools.remove("criu")
    log("# %s, %d CPUs, load %s, criu %s; tree of 1 + %d processes, %d MiB inherited" % (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.cpu_count(),
        " ".join(open("/proc/loadavg").read().split()[:3]),
        (criu + " " + criu_compare.criu_version(criu)) if criu else "skipped", a.children,
        a.mib))
    scratch = tempfile.mkdtemp(prefix="lazycr-tree-cmp-", dir=a.dir)
    try:
        orig, pids = {}, {}
        for t in tools:
            orig[t], pids[t] = dump(t, a, criu, os.path.join(scratch, "img-" + t), scratch)
        work = os.path.join(scratch, "work")
        os.makedirs(work)
        res = {t: [] for t in tools}
        for run in range(a.runs):
            order = tools[run % len(tools):] + tools[:run % len(tools)]
            for t in order:
                r = restore(t, a, criu, os.path.join(scratch, "img-" + t), work, pids[t])
                res[t].append(r)
                log("  run %d %s: drain %.0f ms, PSS after %d MiB (original %d MiB)%s" % (
                    run, t, r[0] * 1e3, r[1] // 1024, orig[t] // 1024,
                    "" if r[2] is None else ", first instruction %.0f ms, decompressed %d MiB, "
                    "%s pages written before it" % (r[4] * 1e3, r[2] // 2**20, r[3])))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    crmed = statistics.median([r[0] for r in res["criu"]]) if "criu" in res else None
    log("\n| tool | drain ms min / med | drain ratio to CRIU (med) | PSS after / original "
        "(med) | MiB decompressed by the server (med) | first instruction ms (med) |")
    log("|---|---:|---:|---:|---:|---:|")
    for t in tools:
        d = [r[0] for r in res[t]]
        pss = statistics.median([r[1] for r in res[t]]) / orig[t]
        decs = [r[2] for r in res[t] if r[2] is not None]
        firsts = [r[4] for r in res[t] if r[4] is not None]
        log("| %s | %.0f / %.0f | %s | %.2f | %s | %s |" % (
            t, min(d) * 1e3, statistics.median(d) * 1e3,
            "%.2f" % (statistics.median(d) / crmed) if crmed else "-", pss,
            "%.0f" % (statistics.median(decs) / 2**20) if decs else "-",
            "%.0f" % (statistics.median(firsts) * 1e3) if firsts else "-"))


if __name__ == "__main__":
    main()
