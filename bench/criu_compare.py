#!/usr/bin/env python3
"""lazycr dump against CRIU 4.2's, side by side (issue 14, "Dump").

For each target (state_target with N MiB of a pattern; realistic memory: a python3 heap holding
a large dict of strings, a node heap with a big object graph, redis-server with a million keys;
for redis the "MiB" column holds its number of keys), each images directory (tmpfs, and a disk file system where images stay in the page
cache) and each run, starts a fresh target, dumps it with lazycr and with CRIU (the order
alternates from run to run) and records:
  - dump wall time (the dump command's, start to exit);
  - dump CPU time: the dump command's user + system time plus what the target spent during
    the dump (CRIU's parasite runs inside the target; lazycr reads from outside);
  - image size (all files of the images directory; CRIU's log is kept out of it).
Prints min and median per tool, and lazycr/CRIU ratios of the medians (and of the mins).
With --compress A,B (e.g. lz4,zstd:-3) each run dumps with lazycr once per choice (as
`--compress A`, ...) and with CRIU, the order rotating from run to run, and prints a ratio row
per choice against the CRIU dumps of the same runs.

CRIU: uses `criu` 4.x from PATH or /usr/local/sbin/criu; when missing, builds it once from
shared/anchors/criu-4.2.tar.gz as shared/anchors/README.md says, and when that is impossible
prints "SKIP criu: <why>" and measures lazycr alone.

Usage: bench/criu_compare.py --build BUILD_DIR [--runs 3] [--sizes 512,2048]
       [--patterns semi] [--python-mib 512] [--node-mib 512] [--redis-keys 1000000]
       [--dirs /dev/shm,/tmp] [--compress lz4,zstd:-3]
       [--base OTHER_BUILD_DIR] [-- extra lazycr dump args]
Root only (both tools ptrace and CRIU needs CAP_SYS_ADMIN). A benchmark, not a test.
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")

PYTHON_TARGET = r"""
import os, random, sys, threading, time
mib = int(sys.argv[1]); ready = sys.argv[2]
random.seed(7)
words = ["".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9)))
         for _ in range(20000)]
d = {}
i = 0
target = mib << 20
size = 0
while size < target:
    v = " ".join(random.choices(words, k=random.randint(3, 14)))
    d["user:%d:%s" % (i, words[i % len(words)])] = v
    size += len(v) + 120  # the str objects, the key and the dict slot
    i += 1
ev = threading.Event()
t = threading.Thread(target=ev.wait, daemon=True)
t.start()
with open(ready, "w") as f:
    f.write("ready %d\n" % len(d))
while True:
    time.sleep(3600)
"""


# A node heap with a big object graph: objects holding strings and small arrays, linked to each
# other, about `mib` MiB of JS heap (node's own heap layout and hidden classes: realistic).
NODE_TARGET = r"""
const fs = require('fs');
const [mibArg, ready] = process.argv.slice(-2);  // (-e: no script path in argv)
const mib = +mibArg;
const words = [];
let seed = 7;
const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
for (let i = 0; i < 20000; i++) {
  let w = '';
  for (let k = 2 + rnd(8); k > 0; k--) w += String.fromCharCode(97 + rnd(26));
  words.push(w);
}
const nodes = [];
const n = Math.floor(mib * 1048576 / 260);
for (let i = 0; i < n; i++) {
  const o = {id: i, name: words[rnd(words.length)] + ' ' + words[rnd(words.length)] + ' ' + i,
             tags: [rnd(1000), rnd(1000), rnd(1000)], next: null, score: rnd(1e6) / 7};
  if (i > 0) o.next = nodes[rnd(i)];
  nodes.push(o);
}
fs.writeFileSync(ready, 'ready ' + nodes.length + '\n');
setInterval(() => {}, 3600e3);
"""

REDIS_PORT = 26090  # bench/criu_compare.py's redis target (the lead's range)


def log(msg):
    print(msg, flush=True)


def criu_version(path):
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split()[1]
    return None


def find_or_build_criu():
    """Path of a CRIU 4.x, or (None, why)."""
    for c in [shutil.which("criu"), "/usr/local/sbin/criu"]:
        if c and os.access(c, os.X_OK):
            v = criu_version(c)
            if v and v.split(".")[0].isdigit() and int(v.split(".")[0]) >= 4:
                return c, None
    anchors = None
    for base in [os.environ.get("LAZYCR_ANCHORS", ""), os.path.join(REPO, "..", "shared", "anchors"),
                 os.path.join(REPO, "..", "..", "shared", "anchors"), "/work/shared/anchors"]:
        if base and os.path.exists(os.path.join(base, "criu-4.2.tar.gz")):
            anchors = base
            break
    if anchors is None:
        return None, "no criu 4.x installed and no shared/anchors/criu-4.2.tar.gz to build it from"
    log("building CRIU 4.2 from %s (once; about a minute on 2 cores)" % anchors)
    pkgs = ("libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler "
            "python3-protobuf libcap-dev libnl-3-dev libnet1-dev libbsd-dev pkg-config "
            "libgnutls28-dev libnftables-dev libaio-dev uuid-dev libdrm-dev").split()
    steps = [["apt-get", "install", "-y", "--no-install-recommends"] + pkgs,
             ["tar", "-xzf", os.path.join(anchors, "criu-4.2.tar.gz"), "-C", "/tmp"],
             ["nice", "-n", "10", "make", "-C", "/tmp/criu-4.2", "-j2", "criu"],
             ["install", "-m", "0755", "/tmp/criu-4.2/criu/criu", "/usr/local/sbin/criu"]]
    for s in steps:
        r = subprocess.run(s, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            return None, "building CRIU failed at `%s`: %s" % (" ".join(s[:3]), r.stderr.strip()[-300:])
    return "/usr/local/sbin/criu", None


def proc_cpu(pid):
    """utime + stime of the whole process (all threads), seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def dir_bytes(d):
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def start_redis(keys, scratch):
    """redis-server holding `keys` keys of a few words each (SET pipelined in batches); its
    loading connection is closed before it is returned (a dump sees the listener only)."""
    import socket
    p = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", scratch],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", REDIS_PORT))
            break
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise RuntimeError("redis-server did not start (port %d taken?)" % REDIS_PORT)
            time.sleep(0.02)
    import random
    rnd = random.Random(7)
    words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(20000)]
    batch = 10000
    for first in range(0, keys, batch):
        cmds = []
        for i in range(first, min(keys, first + batch)):
            k = b"user:%d" % i
            v = " ".join(rnd.choices(words, k=rnd.randint(3, 14))).encode()
            cmds.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(k), k, len(v), v))
        c.sendall(b"".join(cmds))
        want, got = len(cmds) * 5, 0
        while got < want:
            b = c.recv(1 << 20)
            if not b:
                raise RuntimeError("redis-server closed the loading connection")
            got += len(b)
    c.close()
    time.sleep(0.3)  # the server handles the close before a dump sees the connection
    return p


def start_target(build, kind, mib, scratch):
    """kind: a state_target pattern, "python" / "node" (a heap of about `mib` MiB) or "redis"
    (`mib` is then the number of keys)."""
    ready = os.path.join(scratch, "ready")
    if os.path.exists(ready):
        os.unlink(ready)
    if kind == "redis":
        return start_redis(mib, scratch)
    if kind == "node":
        args = ["node", "--max-old-space-size=8192", "-e", NODE_TARGET, str(mib), ready]
        out = open(os.devnull, "w")
    elif kind == "python":
        args = ["python3", "-c", PYTHON_TARGET, str(mib), ready]
        out = open(os.devnull, "w")
    else:
        args = [os.path.join(build, "tests", "targets", "state_target"), "--mib", str(mib),
                "--pattern", kind, "--workdir", scratch]
        out = open(ready, "w")
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    out.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if os.path.exists(ready) and open(ready).read().startswith("ready"):
            time.sleep(0.2)  # let the last page writes and the threads settle
            return p
        if p.poll() is not None:
            raise RuntimeError("target %s %d exited with %s" % (kind, mib, p.returncode))
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("target %s %d did not get ready" % (kind, mib))


def run_dump(tool, cmd, target, imgdir):
    """(wall s, cpu s, image bytes) or raises."""
    t_cpu0 = proc_cpu(target.pid)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, close_fds=True)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    # The target was killed by the dump: its rusage is its whole life; less what it had spent.
    # (os.kill, not Popen.kill: that would reap it first and lose its rusage.)
    try:
        os.kill(target.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, _, tru = os.wait4(target.pid, 0)
    target.returncode = 0
    if p.returncode != 0:
        raise RuntimeError("%s dump failed (%d): %s" % (tool, p.returncode, err.decode()[-400:]))
    t_cpu = tru.ru_utime + tru.ru_stime - t_cpu0
    return wall, ru.ru_utime + ru.ru_stime + max(0.0, t_cpu), dir_bytes(imgdir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="512,2048", help="state_target MiB, comma separated")
    ap.add_argument("--patterns", default="semi", help="state_target patterns (semi,random,text)")
    ap.add_argument("--python-mib", type=int, default=512, help="python dict target, 0: none")
    ap.add_argument("--node-mib", type=int, default=0,
                    help="node object-graph target of about this heap size, 0: none")
    ap.add_argument("--redis-keys", type=int, default=0,
                    help="redis-server holding this many keys, 0: none")
    ap.add_argument("--dirs", default="/dev/shm,/tmp", help="where images go")
    ap.add_argument("--no-criu", action="store_true")
    ap.add_argument("--compress", default="",
                    help="lazycr --compress choices to compare, comma separated (default: "
                         "lazycr's default only)")
    ap.add_argument("--base", help="another build directory whose lazycr dumps in the same "
                    "runs, rotating with the others (tool 'base', e.g. main's build)")
    ap.add_argument("extra", nargs="*", help="extra lazycr dump arguments (after --)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("criu_compare.py: run as root")
    lazycr = os.path.join(a.build, "tools", "lazycr")
    if not os.access(lazycr, os.X_OK):
        sys.exit("criu_compare.py: no %s (build the lazycr and state_target targets)" % lazycr)
    criu = None
    if not a.no_criu:
        criu, why = find_or_build_criu()
        if criu is None:
            log("SKIP criu: %s; measuring lazycr alone" % why)
    load = open("/proc/loadavg").read().split()[:3]
    log("# %s, %s, %d CPUs, load %s, lazycr %s, criu %s, extra args %s" % (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.uname().release, os.cpu_count(),
        " ".join(load), lazycr, (criu + " " + criu_version(criu)) if criu else "skipped",
        " ".join(a.extra) or "none"))

    targets = [(p, int(m)) for p in a.patterns.split(",") if p for m in a.sizes.split(",") if m]
    if a.python_mib > 0:
        targets.append(("python", a.python_mib))
    if a.node_mib > 0:
        targets.append(("node", a.node_mib))
    if a.redis_keys > 0:
        targets.append(("redis", a.redis_keys))
    choices = [c for c in a.compress.split(",") if c]
    lz_tools = ["lazycr:" + c for c in choices] if choices else ["lazycr"]
    if a.base:
        lz_tools += ["base:" + c for c in choices] if choices else ["base"]
    tools = lz_tools + ["criu"]
    rows = []
    for d in [x for x in a.dirs.split(",") if x]:
        scratch = tempfile.mkdtemp(prefix="lazycr-criu-cmp-", dir=d)
        try:
            for kind, mib in targets:
                res = {t: [] for t in tools}
                for run in range(a.runs):
                    # Rotate (and, with two tools, alternate) who goes first.
                    k = run % len(tools)
                    order = tools[k:] + tools[:k]
                    for tool in order:
                        if tool == "criu" and not criu:
                            continue
                        img = os.path.join(scratch, "img-" + tool.replace(":", "_"))
                        shutil.rmtree(img, ignore_errors=True)
                        target = start_target(a.build, kind, mib, scratch)
                        if tool.startswith("lazycr") or tool.startswith("base"):
                            binary = lazycr if tool.startswith("lazycr") else os.path.join(
                                a.base, "tools", "lazycr")
                            cmd = [binary, "dump", "-t", str(target.pid), "-D", img] + a.extra
                            if ":" in tool:
                                cmd += ["--compress", tool.split(":", 1)[1]]
                        else:
                            os.makedirs(img)
                            work = os.path.join(scratch, "criu-work")
                            os.makedirs(work, exist_ok=True)
                            cmd = [criu, "dump", "-t", str(target.pid), "-D", img, "-W", work,
                                   "-o", "dump.log"]
                        try:
                            res[tool].append(run_dump(tool, cmd, target, img))
                        finally:
                            if target.returncode is None:
                                target.kill()
                                target.wait()
                        shutil.rmtree(img, ignore_errors=True)
                for t in lz_tools:
                    sub = {"lazycr": res[t], "criu": res["criu"]}
                    rows.append((d, kind, mib, t, sub))
                    print_row(d, kind, mib, t, sub)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log("")
    log("| images | target | MiB | lazycr | lazycr wall ms min/med | CRIU wall ms min/med | wall ratio "
        "min/med | lazycr CPU ms med | CRIU CPU ms med | CPU ratio med | lazycr MiB | CRIU MiB | "
        "size ratio |")
    log("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, kind, mib, name, res in rows:
        log(table_row(d, kind, mib, name, res))


def stats(samples, k):
    v = [s[k] for s in samples]
    return min(v), statistics.median(v)


def print_row(d, kind, mib, name, res):
    for tool in ("lazycr", "criu"):
        if not res[tool]:
            continue
        label = name if tool == "lazycr" else tool
        wmin, wmed = stats(res[tool], 0)
        cmin, cmed = stats(res[tool], 1)
        log("%-9s %-7s %5d %-14s wall ms min %7.0f med %7.0f  cpu ms min %7.0f med %7.0f  "
            "image MiB %8.1f" % (d, kind, mib, label, wmin * 1e3, wmed * 1e3, cmin * 1e3,
                                 cmed * 1e3, res[tool][-1][2] / 2**20))
    if res["lazycr"] and res["criu"]:
        lw = stats(res["lazycr"], 0)
        cw = stats(res["criu"], 0)
        lc = stats(res["lazycr"], 1)
        cc = stats(res["criu"], 1)
        log("%-9s %-7s %5d %-14s ratio wall min %.2f med %.2f  cpu min %.2f med %.2f  size "
            "%.3f" % (d, kind, mib, name, lw[0] / cw[0], lw[1] / cw[1], lc[0] / cc[0], lc[1] / cc[1],
            res["lazycr"][-1][2] / res["criu"][-1][2]))


def table_row(d, kind, mib, name, res):
    def f(tool, k, i, scale=1e3):
        return "%.0f" % (stats(res[tool], k)[i] * scale) if res[tool] else "-"
    lz, cr = res["lazycr"], res["criu"]
    ratio = lambda k, i: ("%.2f" % (stats(lz, k)[i] / stats(cr, k)[i])) if lz and cr else "-"
    size = lambda r: "%.1f" % (r[-1][2] / 2**20) if r else "-"
    sratio = "%.3f" % (lz[-1][2] / cr[-1][2]) if lz and cr else "-"
    return "| %s | %s | %d | %s | %s / %s | %s / %s | %s / %s | %s | %s | %s | %s | %s | %s |" % (
        d, kind, mib, name, f("lazycr", 0, 0), f("lazycr", 0, 1), f("criu", 0, 0), f("criu", 0, 1),
        ratio(0, 0), ratio(0, 1), f("lazycr", 1, 1), f("criu", 1, 1), ratio(1, 1), size(lz),
        size(cr), sratio)


if __name__ == "__main__":
    main()
