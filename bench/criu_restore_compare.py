#!/usr/bin/env python3
"""Eager and lazy restore, lazycr against CRIU 4.2, to running and to verified (issue 14).

For each size, `state_target --mib N --pattern semi` is dumped once by lazycr (its default
compression) and once by CRIU, each from a fresh target started with a --verify-file that
already exists: a restored target checks every byte of its memory, its threads, files and
signals at once, prints "verified ok" and exits. Then, `--runs` times, in an order rotating
from run to run, each image is restored:
  - lazycr eager: `lazycr restore -D IMG -d`;  lazy: `lazycr restore --lazy -D IMG -d`
  - CRIU eager: `criu restore -D IMG -d`;  lazy: `criu lazy-pages -D IMG --daemon` then
    `criu restore -D IMG -d --lazy-pages`
"running": from the first command's start until the restore command has returned (the tree
runs); "verified": until the target printed "verified ok" and exited (every page read: for a
lazy restore, every page served). Prints min / median per tool and lazycr/CRIU ratios of the
medians, mode by mode.

Usage: bench/criu_restore_compare.py --build BUILD_DIR [--runs 3] [--sizes 512,2048]
       [--dir /dev/shm]
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
import criu_compare  # noqa: E402  (find_or_build_criu, criu_version, REPO)
import lazy_drain  # noqa: E402  (kill_wait, reap_all, read_pid, wait_exit, subreaper)

TOOLS = ("lazycr", "lazycr-lazy", "criu", "criu-lazy")


def log(msg):
    print(msg, flush=True)


def start_target(build, mib, tdir):
    """A state_target whose verify file exists: once restored it verifies and exits."""
    verify = os.path.join(tdir, "verify")  # made after the dump (dump()): not by the original
    out_path = os.path.join(tdir, "out")
    out = open(out_path, "w")
    p = subprocess.Popen([os.path.join(build, "tests", "targets", "state_target"), "--mib",
                          str(mib), "--pattern", "semi", "--workdir", tdir, "--verify-file",
                          verify], stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    out.close()
    deadline = time.monotonic() + 300
    while not open(out_path).read().startswith("ready"):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("state_target %d MiB did not get ready" % mib)
        time.sleep(0.05)
    time.sleep(0.2)
    return p


def dump(tool, build, criu, mib, img, tdir):
    os.makedirs(img)
    os.makedirs(tdir)
    target = start_target(build, mib, tdir)
    if tool.startswith("criu"):
        cmd = [criu, "dump", "-t", str(target.pid), "-D", img, "-W", tdir, "-o", "dump.log"]
    else:
        cmd = [os.path.join(build, "tools", "lazycr"), "dump", "-t", str(target.pid), "-D", img]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    lazy_drain.kill_wait(target.pid)
    if r.returncode != 0:
        raise RuntimeError("%s dump failed: %s" % (tool, r.stderr.decode()[-400:]))
    # From now on a restored target verifies at once.
    open(os.path.join(tdir, "verify"), "w").close()
    return os.path.getsize(os.path.join(tdir, "out"))


def restore(tool, build, criu, img, tdir, work, out_size):
    """(running s, verified s) from the first command's start. The target's stdout file is
    cut back to its size at the dump afterwards (a restore may check it; the next restored
    target writes at the same offset)."""
    for f in os.listdir(work):
        os.unlink(os.path.join(work, f))
    out_path = os.path.join(tdir, "out")
    pidfile = os.path.join(work, "pid")
    err = open(os.path.join(work, "restore.err"), "wb")
    t0 = time.monotonic()
    if tool == "criu-lazy":
        subprocess.run([criu, "lazy-pages", "-D", img, "-W", work, "-o", "lp.log", "--daemon",
                        "--pidfile", os.path.join(work, "lp.pid")], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    if tool.startswith("criu"):
        cmd = [criu, "restore", "-D", img, "-W", work, "-o", "restore.log", "-d", "--pidfile",
               pidfile] + (["--lazy-pages"] if tool == "criu-lazy" else [])
    else:
        cmd = [os.path.join(build, "tools", "lazycr"), "--log-file",
               os.path.join(work, "server.log"), "restore", "-D", img, "-d", "--pidfile",
               pidfile] + (["--lazy"] if tool == "lazycr-lazy" else [])
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    t_run = time.monotonic()
    err.close()
    if r.returncode != 0:
        with open(os.path.join(work, "restore.err"), errors="replace") as f:
            raise RuntimeError("%s restore failed (%d): %s" % (tool, r.returncode, f.read()[-600:]))
    deadline = time.monotonic() + 300
    pid = lazy_drain.read_pid(pidfile, deadline)
    t_ver = lazy_drain.wait_exit(pid, deadline)
    lazy_drain.reap_all()
    with open(out_path) as f:
        said = f.read()[out_size:]
    os.truncate(out_path, out_size)
    if "verified ok" not in said:
        raise RuntimeError("%s: the restored target said %r" % (tool, said[-300:]))
    return t_run - t0, t_ver - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(criu_compare.REPO, "build"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="512,2048")
    ap.add_argument("--dir", default="/dev/shm")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("criu_restore_compare.py: run as root")
    lazy_drain.subreaper()
    criu, why = criu_compare.find_or_build_criu()
    tools = list(TOOLS)
    if criu is None:
        log("SKIP criu: %s; measuring lazycr alone" % why)
        tools = [t for t in tools if not t.startswith("criu")]
    log(lazy_drain.header(criu, criu_compare.criu_version))
    rows = []
    for mib in [int(s) for s in a.sizes.split(",") if s]:
        scratch = tempfile.mkdtemp(prefix="lazycr-restore-cmp-", dir=a.dir)
        try:
            # One image per dumping tool; the eager and lazy restores of a tool share it.
            out_size = {}
            for t in ("lazycr", "criu") if criu else ("lazycr",):
                out_size[t] = dump(t, a.build, criu, mib, os.path.join(scratch, "img-" + t),
                                   os.path.join(scratch, "target-" + t))
            work = os.path.join(scratch, "work")
            os.makedirs(work)
            res = {t: [] for t in tools}
            for run in range(a.runs):
                order = tools[run % len(tools):] + tools[:run % len(tools)]
                for t in order:
                    owner = "criu" if t.startswith("criu") else "lazycr"
                    running, verified = restore(
                        t, a.build, criu, os.path.join(scratch, "img-" + owner),
                        os.path.join(scratch, "target-" + owner), work, out_size[owner])
                    res[t].append((running, verified))
                    log("  %d MiB run %d %s: running after %.1f ms, verified after %.1f ms" % (
                        mib, run, t, running * 1e3, verified * 1e3))
            rows.append((mib, res))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log("\n| MiB | mode | lazycr running ms min / med | CRIU running ms min / med | ratio (med) "
        "| lazycr verified ms min / med | CRIU verified ms min / med | ratio (med) |")
    log("|---:|---|---:|---:|---:|---:|---:|---:|")
    for mib, res in rows:
        for mode, lz, cr in (("eager", "lazycr", "criu"), ("lazy", "lazycr-lazy", "criu-lazy")):
            def mm(tool, k):
                v = [x[k] for x in res.get(tool, [])]
                return (min(v) * 1e3, statistics.median(v) * 1e3) if v else None

            def cell(m):
                return "%.1f / %.1f" % m if m else "-"

            def ratio(k):
                a_, b_ = mm(lz, k), mm(cr, k)
                return "%.2f" % (a_[1] / b_[1]) if a_ and b_ else "-"
            log("| %d | %s | %s | %s | %s | %s | %s | %s |" % (
                mib, mode, cell(mm(lz, 0)), cell(mm(cr, 0)), ratio(0), cell(mm(lz, 1)),
                cell(mm(cr, 1)), ratio(1)))


if __name__ == "__main__":
    main()
