#!/usr/bin/env python3
"""Idle drain of a lazy restore, lazycr against CRIU 4.2's lazy-pages daemon (issue 14,
"Background fill and faults"), side by side in one run.

For each size, one image of `state_target --mib N --pattern semi` per variant: lazycr's default
compression, lazycr `--compress none` (raw frames), and CRIU (each dumped from a fresh target: the
pattern is the same every time). Then, runs times, in an order that rotates from run to run,
each image is restored lazily and left idle until its page server is done:
lazycr's `restore --lazy` or CRIU's `lazy-pages --daemon` + `restore --lazy-pages`
(bench/lazy_drain.py). Drain time: from the first command's start to the server's (daemon's)
exit; GB/s = N MiB / drain time; the server's (daemon's) CPU time, threads included, from
its rusage once it exited (the steadier figure on a busy machine). For
lazycr, also its stats' "time until nothing owed" (from the restore's start).
`--base DIR --tools base,base-none,...` adds the lazycr of another build (e.g. main's);
`--extra NAME=DIR --tools NAME,...` more of them.
The restored process is killed after each run. Images go to --dir (default /dev/shm: the
page cache, no disk).

Usage: bench/drain_compare.py --build BUILD_DIR [--runs 3] [--sizes 512,2048] [--dir /dev/shm]
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
import criu_compare  # noqa: E402  (find_or_build_criu, start_target, criu_version)
import lazy_drain  # noqa: E402  (dump_cmd, drain, kill_wait, reap_all, subreaper)


def log(msg):
    print(msg, flush=True)


EXTRA = {}  # --extra NAME=DIR: tool NAME (and NAME-none) is the lazycr of build DIR


def lazycr_of(tool, build, base):
    name = tool[:-len("-none")] if tool.endswith("-none") else tool
    if name in EXTRA:
        return os.path.join(EXTRA[name], "tools", "lazycr")
    return os.path.join(base if tool.startswith("base") else build, "tools", "lazycr")


def dump(tool, build, base, criu, mib, img, scratch):
    os.makedirs(img)
    # The target's stdout is a file in its own directory, which must stay as dumped.
    tdir = os.path.join(scratch, "target-" + tool)
    os.makedirs(tdir)
    target = criu_compare.start_target(build, "semi", mib, tdir)
    lazycr = None if tool == "criu" else lazycr_of(tool, build, base)
    cmd = lazy_drain.dump_cmd(lazycr, criu, target.pid, img, tdir,
                              ["--compress", "none"] if tool.endswith("-none") else [])
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    lazy_drain.kill_wait(target.pid)
    if r.returncode != 0:
        raise RuntimeError("%s dump failed: %s" % (tool, r.stderr.decode()[-400:]))


def restore(tool, build, base, criu, img, work):
    """(drain s from the first command, server's own drain s, server CPU s, bytes the server
    decompressed; each None when not known)."""
    lazycr = None if tool == "criu" else lazycr_of(tool, build, base)
    wall, root, s, cpu = lazy_drain.drain(lazycr, criu, img, work)
    lazy_drain.kill_wait(root)
    lazy_drain.reap_all()
    own = dec = None
    if s is not None:
        dec = s.get("bytes_decompressed")
        ns = s.get("time_until_nothing_owed_ns", s.get("server", {}).get(
            "time_until_nothing_owed_ns", -1))
        own = ns / 1e9 if ns and ns > 0 else None
    return wall, own, cpu, dec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(criu_compare.REPO, "build"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="512,2048")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--tools", default="lazycr,lazycr-none,criu",
                    help="of lazycr, lazycr-none, base, base-none (lazycr of --base), criu")
    ap.add_argument("--base", help="another build directory to compare with (tools base*)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                    help="tool NAME (and NAME-none) is the lazycr of build DIR")
    a = ap.parse_args()
    for e in a.extra:
        name, _, d = e.partition("=")
        EXTRA[name] = d
    lazy_drain.subreaper()
    tools = a.tools.split(",")
    criu, why = criu_compare.find_or_build_criu() if "criu" in tools else (None, None)
    if "criu" in tools and criu is None:
        log("SKIP criu: %s; measuring lazycr alone" % why)
        tools.remove("criu")
    log(lazy_drain.header(criu, criu_compare.criu_version))
    rows = []
    for mib in [int(s) for s in a.sizes.split(",") if s]:
        scratch = tempfile.mkdtemp(prefix="lazycr-drain-cmp-", dir=a.dir)
        try:
            for t in tools:
                dump(t, a.build, a.base, criu, mib, os.path.join(scratch, "img-" + t), scratch)
            res = {t: [] for t in tools}
            work = os.path.join(scratch, "work")
            os.makedirs(work)
            for run in range(a.runs):
                order = tools[run % len(tools):] + tools[:run % len(tools)]
                for t in order:
                    wall, own, cpu, dec = restore(t, a.build, a.base, criu,
                                             os.path.join(scratch, "img-" + t), work)
                    res[t].append((wall, own, cpu))
                    log("  %d MiB run %d %s: drain %.0f ms (%.2f GB/s)%s%s" % (
                        mib, run, t, wall * 1e3, mib * 2**20 / wall / 1e9,
                        "" if own is None else ", nothing owed at %.0f ms" % (own * 1e3),
                        "" if cpu is None else ", server CPU %.0f ms" % (cpu * 1e3)) +
                        ("" if dec is None else ", decompressed %d MiB" % (dec // 2**20)))
            rows.append((mib, res))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log("\n| MiB | tool | drain ms min / med | GB/s max / med | restore start to nothing owed "
        "(stats) ms min / med | server CPU ms min / med | ratio to CRIU (time, med) | "
        "ratio to CRIU (server CPU, med) |")
    log("|---:|---|---:|---:|---:|---:|---:|---:|")
    med = statistics.median
    for mib, res in rows:
        crmed = med([r[0] for r in res["criu"]]) if res.get("criu") else None
        crcpus = [r[2] for r in res.get("criu", []) if r[2] is not None]
        crcpu = med(crcpus) if crcpus else None
        for t in tools:
            walls = [r[0] for r in res[t]]
            owns = [r[1] for r in res[t] if r[1] is not None]
            cpus = [r[2] for r in res[t] if r[2] is not None]
            gb = lambda s: mib * 2**20 / s / 1e9  # noqa: E731
            pair = lambda v: "%.0f / %.0f" % (min(v) * 1e3, med(v) * 1e3) if v else "-"  # noqa
            ratio = "%.2f" % (med(walls) / crmed) if crmed else "-"
            cratio = "%.2f" % (med(cpus) / crcpu) if crcpu and cpus else "-"
            log("| %d | %s | %.0f / %.0f | %.2f / %.2f | %s | %s | %s | %s |" % (
                mib, t, min(walls) * 1e3, med(walls) * 1e3, gb(min(walls)), gb(med(walls)),
                pair(owns), pair(cpus), ratio, cratio))

if __name__ == "__main__":
    main()
