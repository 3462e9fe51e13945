#!/usr/bin/env python3
"""Real servers (node http, redis-server) dumped and restored: time to the first correct answer
after the restore command starts, eager and lazy, against an uninterrupted server's reply
latency; dump time and restore time of each (bench/RESULTS.md, "Servers").

Run by hand as root:  bench/servers_bench.py BUILD_DIR [--runs N]
Ports 21900-21901 (--port-base moves them). Goal of issue 12: a lazily restored server answers within 20 ms of the
restore command's start.
"""
import argparse
import ctypes
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

NODE_PORT, REDIS_PORT = 21900, 21901
REDIS_KEYS = 20000

NODE_SCRIPT = r"""
const http = require('http');
let ticks = 0, hits = 0;
const big = new Map();
for (let i = 0; i < 200000; i++) big.set('k' + i, {i, s: 'value-' + i});
setInterval(() => { ticks++; }, 5);
http.createServer((req, res) => {
  hits++;
  res.end(`hits=${hits} key=${big.get('k4321').s}\n`);
}).listen(+process.argv[2], '127.0.0.1', () => console.log('listening'));
"""


def ask(port, request, done):
    """Connects, sends, reads until done(reply) or close; None if nobody listens."""
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.sendall(request)
    got = b""
    while not done(got):
        b = s.recv(65536)
        if not b:
            break
        got += b
    s.close()
    return got


def node_ok(port):
    r = ask(port, b"GET / HTTP/1.0\r\n\r\n", lambda r: False)
    return r is not None and b"key=value-4321" in r


def redis_ok(port):
    r = ask(port, b"GET key:4321\r\n", lambda r: r.endswith(b"\r\n") and r.count(b"\r\n") >= 2)
    return r == b"$10\r\nvalue-4321\r\n"


def start_node(work):
    script = os.path.join(work, "server.js")
    with open(script, "w") as f:
        f.write(NODE_SCRIPT)
    p = subprocess.Popen(["node", script, str(NODE_PORT)], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, pass_fds=())
    assert p.stdout.readline().strip() == b"listening"
    return p


def start_redis(work):
    p = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--unixsocket", "", "--dir", work],
                         stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    while ask(REDIS_PORT, b"PING\r\n", lambda r: r.endswith(b"\r\n")) != b"+PONG\r\n":
        time.sleep(0.01)
    sets = b"".join(b"SET key:%d value-%d\r\n" % (i, i) for i in range(REDIS_KEYS))
    r = ask(REDIS_PORT, sets, lambda r: len(r) >= 5 * REDIS_KEYS)
    assert r == b"+OK\r\n" * REDIS_KEYS
    return p


def latency_ms(ok, port, n=50):
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert ok(port)
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def wait_no_close_wait(port, timeout=2.0):
    """Waits until no connection of the server on `port` is in CLOSE_WAIT (a client gone whose
    close the server has not handled yet): the dump refuses such a connection by name."""
    local = ":%04X" % port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            rows = [l.split() for l in f.readlines()[1:]]
        if not any(r[1].endswith(local) and r[3] == "08" for r in rows):
            return
        time.sleep(0.002)


def run(lazycr, args):
    """Runs lazycr to its end: (wall ms, CPU ms of lazycr itself, user + system)."""
    t0 = time.perf_counter()
    # stderr to a file: a pipe would wait for every process that inherited it (a page server).
    with tempfile.TemporaryFile() as errf:
        p = subprocess.Popen([lazycr] + args, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=errf)
        _, status, ru = os.wait4(p.pid, 0)
        errf.seek(0)
        err = errf.read().decode()
    run.last_err = err
    wall = (time.perf_counter() - t0) * 1e3
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"lazycr {' '.join(args)} exited with {p.returncode}: {err}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1e3


def record_working_set(lazycr, img, work, ok, port):
    """One lazy restore with --record-working-set answering once; the record is in the image
    once that restore ends (1 s without a fault) and later lazy restores push it first."""
    pidfile = os.path.join(work, "ws.pid")
    r = subprocess.Popen([lazycr, "restore", "-D", img, "--shell-job", "--lazy",
                          "--record-working-set", "--pidfile", pidfile],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    while not ok(port):
        if r.poll() is not None:
            raise SystemExit(f"recording the working set: the restore ended with {r.returncode}")
        time.sleep(0.001)
    record = os.path.join(img, "working-set.lzw")
    deadline = time.monotonic() + 15
    while not os.path.exists(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(pidfile) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    r.wait()
    reap_all()
    if not os.path.exists(record):
        raise SystemExit("recording the working set: no record after 15 s")
    wait_no_close_wait(port)


def one(lazycr, name, start, ok, port, lazy, working_set=False):
    work = tempfile.mkdtemp(prefix="servers-bench-")
    try:
        p = start(work)
        base = latency_ms(ok, port)
        img = os.path.join(work, "img")
        wait_no_close_wait(port)
        dump_ms, _ = run(lazycr, ["dump", "-t", str(p.pid), "-D", img])
        p.wait()
        if working_set:
            record_working_set(lazycr, img, work, ok, port)
        argv = [lazycr, "restore", "-D", img, "--shell-job", "--pidfile",
                os.path.join(work, "pid")]
        if lazy:
            argv += ["--lazy", "--stats", os.path.join(work, "stats.json")]
        t0 = time.perf_counter()
        r = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        while not ok(port):
            if r.poll() is not None:
                raise SystemExit(f"{name}: the restore ended with {r.returncode}")
            time.sleep(0.0002)
        first_ms = (time.perf_counter() - t0) * 1e3
        after = latency_ms(ok, port, 20)
        with open(os.path.join(work, "pid")) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGKILL)
        r.wait()
        # Restore time alone: the same image restored detached (-d returns once it runs).
        argv_d = [a for a in argv if a not in ("--stats",)]
        if lazy:
            argv_d = argv_d[:argv_d.index("--lazy") + 1]
        restore_ms, restore_cpu = run(lazycr, ["-v"] + argv_d[1:] + ["-d"])
        # lazycr's own account (restore -v): "validate N us", "memory N us", "N us" of
        # injected syscalls, "first instruction after N us".
        m = re.search(r"validate (\d+) us, memory (\d+) us.*round trips, (\d+) us; first "
                      r"instruction after (\d+) us", run.last_err)
        parts = [int(x) / 1e3 for x in m.groups()] if m else [0, 0, 0, 0]
        with open(os.path.join(work, "pid")) as f:
            pid = int(f.read())
        while not ok(port):
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        reap_all()
        return dict(base=base, dump=dump_ms, first=first_ms, after=after, restore=restore_ms,
                    cpu=restore_cpu, validate=parts[0], memory=parts[1], inject=parts[2],
                    first_insn=parts[3])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reap_all():
    """Reaps every child (restored processes and page servers re-parented to this subreaper)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main():
    global NODE_PORT, REDIS_PORT
    # PID 1 of this machine does not reap orphans: detached restores end up here.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--port-base", type=int, default=NODE_PORT,
                    help="node listens here, redis on the next port")
    ap.add_argument("--lazy-only", action="store_true", help="skip the eager restores")
    ap.add_argument("--working-set", action="store_true",
                    help="also lazy restores pushing a recorded working set first")
    a = ap.parse_args()
    NODE_PORT, REDIS_PORT = a.port_base, a.port_base + 1
    lazycr = os.path.join(a.build, "tools", "lazycr")
    print("| server | mode | uninterrupted reply ms | dump ms | restore ms (lazycr CPU ms) "
          "| first answer ms | reply after ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    breakdown = []
    for name, start, ok, port in (("node", start_node, node_ok, NODE_PORT),
                                  ("redis", start_redis, redis_ok, REDIS_PORT)):
        modes = [] if a.lazy_only else [("eager", False, False)]
        modes.append(("lazy", True, False))
        if a.working_set:
            modes.append(("lazy + working set", True, True))
        # Runs alternate between the modes: each sees the same load.
        by_mode = {m[0]: [] for m in modes}
        for _ in range(a.runs):
            for mode, lazy, ws in modes:
                by_mode[mode].append(one(lazycr, name, start, ok, port, lazy, ws))
        for mode, lazy, ws in modes:
            rows = by_mode[mode]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            mn = {k: min(r[k] for r in rows) for k in rows[0]}
            print(f"| {name} | {mode} | {med['base']:.2f} | "
                  f"{med['dump']:.0f} | {med['restore']:.1f} (min {mn['restore']:.1f}; CPU {med['cpu']:.1f}) | "
                  f"{med['first']:.1f} (min {mn['first']:.1f}) | {med['after']:.2f} |",
                  flush=True)
            breakdown.append(f"| {name} | {mode} | {med['first_insn']:.1f} | "
                             f"{med['validate']:.1f} | {med['memory']:.1f} | {med['inject']:.1f} |")
    print("\n| server | mode | first instruction ms | validate ms | memory ms | injected calls ms |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(breakdown))


if __name__ == "__main__":
    sys.exit(main())
