#!/usr/bin/env python3
"""Idle drain of a lazy restore, lazycr against CRIU 4.2's lazy-pages daemon (issue 14,
"Background fill and faults"), side by side in one run.

For each size, one image of `state_target --mib N --pattern semi` per variant: lazycr's default
(zstd), lazycr `--compress none` (raw frames), and CRIU (each dumped from a fresh target: the
pattern is the same every time). Then, runs times, in an order that rotates from run to run,
each image is restored lazily and left idle until its page server is done:
  - lazycr: `lazycr restore --lazy -D IMG -d --server-pidfile F --stats S`; the drain ends
    when the server process exits (nothing owed any more);
  - CRIU: `criu lazy-pages -D IMG --daemon --pidfile F` then `criu restore -D IMG -d
    --lazy-pages`; the drain ends when the daemon exits.
Drain time: from the first command's start to that exit; GB/s = N MiB / drain time. For
lazycr, also its stats' "time until nothing owed" (from the restore's start).
`--base DIR --tools base,base-none,...` adds the lazycr of another build (e.g. main's).
The restored process is killed after each run. Images go to --dir (default /dev/shm: the
page cache, no disk).

Usage: bench/drain_compare.py --build BUILD_DIR [--runs 3] [--sizes 512,2048] [--dir /dev/shm]
Root only. A benchmark, not a test.
"""
import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import criu_compare  # noqa: E402  (find_or_build_criu, start_target, criu_version)

PR_SET_CHILD_SUBREAPER = 36


def log(msg):
    print(msg, flush=True)


def kill_wait(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return
        except ChildProcessError:  # not ours: wait until it is gone
            if not os.path.exists("/proc/%d" % pid):
                return
        time.sleep(0.005)


def reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def read_pid(path, deadline):
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                t = f.read().strip()
            if t:
                return int(t)
        except (OSError, ValueError):
            pass
        time.sleep(0.0005)
    raise RuntimeError("no pid in %s" % path)


def wait_exit(pid, deadline):
    """Waits until pid exits (pidfd: a zombie child counts as exited); returns that time."""
    fd = os.pidfd_open(pid)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        while time.monotonic() < deadline:
            if p.poll(100):
                return time.monotonic()
        raise RuntimeError("pid %d did not exit in time" % pid)
    finally:
        os.close(fd)


def lazycr_of(tool, build, base):
    return os.path.join(base if tool.startswith("base") else build, "tools", "lazycr")


def dump(tool, build, base, criu, mib, img, scratch):
    os.makedirs(img)
    # The target's stdout is a file in its own directory, which must stay as dumped.
    tdir = os.path.join(scratch, "target-" + tool)
    os.makedirs(tdir)
    target = criu_compare.start_target(build, "semi", mib, tdir)
    lazycr = lazycr_of(tool, build, base)
    if tool == "criu":
        cmd = [criu, "dump", "-t", str(target.pid), "-D", img, "-W", tdir, "-o", "dump.log"]
    else:
        cmd = [lazycr, "dump", "-t", str(target.pid), "-D", img]
        if tool.endswith("-none"):
            cmd += ["--compress", "none"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    kill_wait(target.pid)
    if r.returncode != 0:
        raise RuntimeError("%s dump failed: %s" % (tool, r.stderr.decode()[-400:]))


def restore(tool, build, base, criu, img, work):
    """(drain s from the first command, server's own drain s or None)."""
    for f in os.listdir(work):
        os.unlink(os.path.join(work, f))
    lazycr = lazycr_of(tool, build, base)
    srv_pidfile = os.path.join(work, "server.pid")
    pidfile = os.path.join(work, "pid")
    stats = os.path.join(work, "stats.json")
    t0 = time.monotonic()
    if tool == "criu":
        subprocess.run([criu, "lazy-pages", "-D", img, "-W", work, "-o", "lp.log", "--daemon",
                        "--pidfile", srv_pidfile], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cmd = [criu, "restore", "-D", img, "-W", work, "-o", "restore.log", "-d", "--lazy-pages",
               "--pidfile", pidfile]
    else:
        cmd = [lazycr, "--log-file", os.path.join(work, "server.log"), "restore", "--lazy", "-D",
               img, "-d", "--server-pidfile", srv_pidfile, "--pidfile", pidfile, "--stats", stats]
    with open(os.path.join(work, "restore.err"), "wb") as err:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    if r.returncode != 0:
        with open(os.path.join(work, "restore.err"), errors="replace") as f:
            why = f.read()[-600:]
        raise RuntimeError("%s restore failed (%d): %s" % (tool, r.returncode, why))
    deadline = time.monotonic() + 300
    server = read_pid(srv_pidfile, deadline)
    t1 = wait_exit(server, deadline)
    kill_wait(read_pid(pidfile, deadline))
    reap_all()
    own = None
    if tool != "criu":
        with open(stats) as f:
            s = json.load(f)
        ns = s.get("time_until_nothing_owed_ns", s.get("server", {}).get(
            "time_until_nothing_owed_ns", -1))
        own = ns / 1e9 if ns and ns > 0 else None
    return t1 - t0, own


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(criu_compare.REPO, "build"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="512,2048")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--tools", default="lazycr,lazycr-none,criu",
                    help="of lazycr, lazycr-none, base, base-none (lazycr of --base), criu")
    ap.add_argument("--base", help="another build directory to compare with (tools base*)")
    a = ap.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tools = a.tools.split(",")
    criu, why = criu_compare.find_or_build_criu() if "criu" in tools else (None, None)
    if "criu" in tools and criu is None:
        log("SKIP criu: %s; measuring lazycr alone" % why)
        tools.remove("criu")
    log("# %s, %d CPUs, load %s, criu %s" % (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.cpu_count(),
        " ".join(open("/proc/loadavg").read().split()[:3]),
        (criu + " " + criu_compare.criu_version(criu)) if criu else "skipped"))
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
                    wall, own = restore(t, a.build, a.base, criu, os.path.join(scratch, "img-" + t), work)
                    res[t].append((wall, own))
                    log("  %d MiB run %d %s: drain %.0f ms (%.2f GB/s)%s" % (
                        mib, run, t, wall * 1e3, mib * 2**20 / wall / 1e9,
                        "" if own is None else ", nothing owed at %.0f ms" % (own * 1e3)))
            rows.append((mib, res))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log("\n| MiB | tool | drain ms min / med | GB/s max / med | restore start to nothing owed "
        "(stats) ms min / med | "
        "ratio to CRIU (time, med) |")
    log("|---:|---|---:|---:|---:|---:|")
    for mib, res in rows:
        crmed = statistics.median([w for w, _ in res["criu"]]) if res.get("criu") else None
        for t in tools:
            walls = [w for w, _ in res[t]]
            owns = [o for _, o in res[t] if o is not None]
            gb = lambda s: mib * 2**20 / s / 1e9  # noqa: E731
            own = ("%.0f / %.0f" % (min(owns) * 1e3, statistics.median(owns) * 1e3)) if owns \
                else "-"
            ratio = "%.2f" % (statistics.median(walls) / crmed) if crmed else "-"
            log("| %d | %s | %.0f / %.0f | %.2f / %.2f | %s | %s |" % (
                mib, t, min(walls) * 1e3, statistics.median(walls) * 1e3, gb(min(walls)),
                gb(statistics.median(walls)), own, ratio))


if __name__ == "__main__":
    main()
