#!/usr/bin/env python3
"""Every issue-14 figure, lazycr against CRIU 4.2, in one run (bench/RESULTS.md).

Runs, one after the other, each with the same --runs (min and median of alternating runs):
  1. dump wall time, CPU time and image size: state_target (synthetic, 512 MiB and 2 GiB) and
     realistic memory: a python3 dict of strings, a node object graph, redis with a million
     keys (bench/criu_compare.py);
  2. eager and lazy restore, to running and to verified (bench/criu_restore_compare.py);
  3. idle drain of a lazy restore (bench/drain_compare.py);
  4. lazy restore of a process tree: drain and PSS after it (bench/lazy_tree_compare.py);
  5. working-set restore: no CRIU counterpart, so against a plain lazy restore of the same
     image (bench/working_set_bench.py).
Each part's own output goes to the terminal as it runs; its tables are printed again at the
end, together. A part that fails is reported by name and the others still run (exit status 1).
CRIU: `criu` 4.x from PATH or /usr/local/sbin/criu, built once from shared/anchors/ when
missing (bench/criu_compare.py says how); without it each part measures lazycr alone.

Usage: bench/criu_all.py [--build BUILD_DIR] [--runs 3] [--quick] [--dir /dev/shm]
  --quick: small sizes (64 MiB targets, 100,000 redis keys), to check the script itself.
Root only. Takes about 15-25 minutes on 2 cores with the default sizes. A benchmark, not a test.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parts(build, runs, quick, d):
    sizes = "64" if quick else "512,2048"
    mib = "64" if quick else "512"
    py = [sys.executable]
    r = ["--runs", str(runs)]
    return [
        ("Dump (wall, CPU, image size)",
         py + [os.path.join(HERE, "criu_compare.py"), "--build", build, *r, "--sizes", sizes,
               "--python-mib", mib, "--node-mib", mib, "--redis-keys",
               "100000" if quick else "1000000", "--dirs", d]),
        ("Eager and lazy restore, to running and to verified",
         py + [os.path.join(HERE, "criu_restore_compare.py"), "--build", build, *r, "--sizes",
               sizes, "--dir", d]),
        ("Idle drain after a lazy restore",
         py + [os.path.join(HERE, "drain_compare.py"), "--build", build, *r, "--tools",
               "lazycr,criu", "--sizes", sizes, "--dir", d]),
        ("Lazy restore of a process tree (drain, PSS after it)",
         py + [os.path.join(HERE, "lazy_tree_compare.py"), "--build", build, *r, "--dir", d]
         + (["--mib", "64"] if quick else [])),
        ("Working-set restore against a plain lazy restore (CRIU has none)",
         py + [os.path.join(HERE, "working_set_bench.py"), build, *r]),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--dir", default="/dev/shm", help="where images go")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("criu_all.py: run as root")
    if not os.access(os.path.join(a.build, "tools", "lazycr"), os.X_OK):
        sys.exit("criu_all.py: no lazycr in %s (build it first)" % a.build)
    tables, failed = [], []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for title, cmd in parts(os.path.abspath(a.build), a.runs, a.quick, a.dir):
        print("\n## %s\n$ %s" % (title, " ".join(cmd)), flush=True)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        table = []
        for line in p.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith("|") or line.startswith("SKIP"):
                table.append(line.rstrip("\n"))
        if p.wait() != 0:
            failed.append(title)
            table.append("(failed: exit status %d)" % p.returncode)
        tables.append((title, table))
    print("\n# All parts, %s to %s, %d CPUs, load now %s" % (
        started, time.strftime("%H:%M UTC", time.gmtime()), os.cpu_count(),
        " ".join(open("/proc/loadavg").read().split()[:3])))
    for title, table in tables:
        print("\n### %s\n" % title)
        print("\n".join(table))
    if failed:
        sys.exit("criu_all.py: failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
