#!/usr/bin/env python3
"""Working-set prefetch (issue 14): time from the lazy restore command's start to the first
result of a server that touches a fixed 10% of its heap per request, plain lazy restore
against lazy restore of the same image with a recorded working set (--record-working-set
once, then pushed first), alternating in one run (bench/RESULTS.md, "Working-set prefetch").

Targets: python3 with a 1 GiB heap (a dict of 256 Ki bytes objects of 4000 bytes), and node
with a big object graph (bench/servers_bench.py drives node the same way). Each waits on a
TCP socket; a request makes it read a fixed 10% of its heap (blocks of neighbouring
objects, visited in a scattered order) and answer a checksum, which is checked against the
original's answer before the dump.

Run by hand as root:  bench/working_set_bench.py BUILD_DIR [--runs N] [--port-base P]
Ports 24200-24201 (--port-base moves them). Goal: with the working set, at most 0.5x the
plain lazy restore's time to the first result.
"""
import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PY_SCRIPT = r"""
import socket, sys
N = 256 * 1024                      # objects of 4000 bytes: ~1 GiB
heap = {}
for i in range(N):
    heap[i] = (b"%09d:" % i) * 400  # 4000 bytes, compressible like text
# A fixed 10%: blocks of 64 neighbouring objects (~256 KiB), one block in ten, in a
# scattered order.
blocks = [b for b in range(N // 64) if b % 10 == 3]
order = [blocks[(k * 7919) % len(blocks)] for k in range(len(blocks))]
def work():
    s = 0
    for b in order:
        for i in range(b * 64, b * 64 + 64):
            s += heap[i].count(b"7")
    return s
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(8)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    c.recv(16)
    c.sendall(b"%d\n" % work())
    c.close()
"""

NODE_SCRIPT = r"""
const net = require('net');
const N = 2000000;                  // objects with a ~150-byte string each
const big = [];
for (let i = 0; i < N; i++) big.push({i, s: ('v' + i + '-').repeat(15)});
const order = [];
const blocks = [];
for (let b = 0; b < N / 1000; b++) if (b % 10 === 3) blocks.push(b);
for (let k = 0; k < blocks.length; k++) order.push(blocks[(k * 7919) % blocks.length]);
function work() {
  let s = 0;
  for (const b of order)
    for (let i = b * 1000; i < b * 1000 + 1000; i++) s += big[i].s.charCodeAt(3) + big[i].i;
  return s;
}
net.createServer((c) => {
  c.once('data', () => { c.end(`${work()}\n`); });
}).listen(+process.argv[2], '127.0.0.1', () => console.log('listening'));
"""


def ask(port):
    """The server's answer to one request; None while nobody listens."""
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    try:
        s.sendall(b"go\n")
        got = b""
        while not got.endswith(b"\n"):
            b = s.recv(4096)
            if not b:
                break
            got += b
        return got
    except OSError:
        return None
    finally:
        s.close()


def start(kind, work, port):
    script = os.path.join(work, "server." + ("py" if kind == "python" else "js"))
    with open(script, "w") as f:
        f.write(PY_SCRIPT if kind == "python" else NODE_SCRIPT)
    argv = ["python3", script, str(port)] if kind == "python" else \
        ["node", "--max-old-space-size=4096", script, str(port)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert p.stdout.readline().strip() == b"listening"
    return p


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def restore(lazycr, img, work, port, extra, want):
    """One foreground lazy restore: ms from its start to the first (checked) answer, and the
    page server's stats."""
    stats = os.path.join(work, "stats.json")
    pidfile = os.path.join(work, "pid")
    for f in (stats, pidfile):
        if os.path.exists(f):
            os.unlink(f)
    argv = [lazycr, "restore", "--lazy", "-D", img, "--shell-job", "--pidfile", pidfile,
            "--stats", stats] + extra
    with open(os.path.join(work, "restore.log"), "ab") as log:
        t0 = time.perf_counter()
        r = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=log)
        while True:
            got = ask(port)
            if got is not None:
                break
            if r.poll() is not None:
                raise SystemExit(f"the restore ended with {r.returncode} (see {work}/restore.log)")
            time.sleep(0.0002)
        ms = (time.perf_counter() - t0) * 1e3
    if got != want:
        raise SystemExit(f"wrong answer after the restore: {got!r}, want {want!r}")
    return r, pidfile, stats, ms


def finish(r, pidfile, stats):
    with open(pidfile) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    r.wait()
    with open(stats) as f:
        return json.load(f)


def bench(lazycr, kind, port, runs, root):
    work = tempfile.mkdtemp(prefix=f"ws-bench-{kind}-", dir=root)
    p = start(kind, work, port)
    try:
        want = ask(port)  # the uninterrupted answer (touches the 10% once before the dump)
        time.sleep(0.5)  # the server closes its end of that connection
        rss = rss_mib(p.pid)
        img = os.path.join(work, "img")
        t = time.perf_counter()
        subprocess.run([lazycr, "dump", "-t", str(p.pid), "-D", img], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        dump_ms = (time.perf_counter() - t) * 1e3
        p.wait()
        ws_file = os.path.join(img, "working-set.lzw")
        # Record once: the client asks as soon as the restore starts, as below.
        r, pidfile, stats, rec_ms = restore(lazycr, img, work, port, ["--record-working-set"], want)
        for _ in range(3000):
            if os.path.exists(ws_file):
                break
            time.sleep(0.01)
        rec_stats = finish(r, pidfile, stats)
        if not os.path.exists(ws_file):
            raise SystemExit("no working set recorded")
        out = subprocess.run([lazycr, "show", img, "--json"], check=True,
                             capture_output=True, text=True).stdout
        ws = json.loads(out)["working_set"]
        ws_pages = ws["pages"]
        # The record pages (working-set-<pid>.lzp) written beside the record: their size.
        rp_bytes = sum((q.get("record_pages") or {}).get("bytes", 0) for q in ws["processes"])
        rows = {"plain": [], "ws": []}
        for i in range(runs):
            for mode in (("plain", "ws") if i % 2 == 0 else ("ws", "plain")):
                if mode == "plain":
                    os.rename(ws_file, os.path.join(work, "ws.off"))  # out of the image: the MAC covers it
                try:
                    r, pidfile, stats, ms = restore(lazycr, img, work, port, [], want)
                    s = finish(r, pidfile, stats)
                finally:
                    if mode == "plain":
                        os.rename(os.path.join(work, "ws.off"), ws_file)
                rows[mode].append(dict(ms=ms, faults=s["faults"],
                                       ws_pages=s["working_set"]["pages_prefetched"],
                                       ws_faults=s["working_set"]["faults"],
                                       ws_done=s["working_set"]["done_ns"] / 1e6))
                print(f"  {kind} run {i + 1} {mode}: {ms:.0f} ms, faults {s['faults']}, "
                      f"working-set pages pushed {s['working_set']['pages_prefetched']} "
                      f"(faults on them {s['working_set']['faults']}, pushed "
                      f"{s['working_set']['done_ns'] / 1e6:.0f} ms into the server's run), "
                      f"{s['bytes_decompressed'] >> 20} MiB decompressed", flush=True)
        shutil.rmtree(work, ignore_errors=True)  # kept on failure, for its restore.log
        return dict(rss=rss, dump=dump_ms, rec_ms=rec_ms, rec_faults=rec_stats["faults"],
                    ws_pages=ws_pages, rp_bytes=rp_bytes, rows=rows)
    except BaseException:
        if p.poll() is None:
            p.kill()
        raise


def main():
    # Detached page servers and restored processes end up here: reap them.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--port-base", type=int, default=24200)
    ap.add_argument("--targets", default="python,node")
    ap.add_argument("--dir", default="/tmp/wset", help="where images go")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    lazycr = os.path.join(a.build, "tools", "lazycr")
    results = []
    for k, kind in enumerate(a.targets.split(",")):
        results.append((kind, bench(lazycr, kind, a.port_base + k, a.runs, a.dir)))
    print("\n| target | RSS MiB | working set pages | plain lazy: first result ms, median (min) "
          "| faults | with working set: first result ms, median (min) | faults (on its pages) "
          "| ratio of medians (min..max per pair) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, b in results:
        pl, ws = b["rows"]["plain"], b["rows"]["ws"]
        mp = statistics.median(r["ms"] for r in pl)
        mw = statistics.median(r["ms"] for r in ws)
        pairs = [w["ms"] / p["ms"] for p, w in zip(pl, ws)]
        print(f"| {kind} | {b['rss']} | {b['ws_pages']} | {mp:.0f} ({min(r['ms'] for r in pl):.0f}) "
              f"| {statistics.median(r['faults'] for r in pl):.0f} "
              f"| {mw:.0f} ({min(r['ms'] for r in ws):.0f}) "
              f"| {statistics.median(r['faults'] for r in ws):.0f} "
              f"({statistics.median(r['ws_faults'] for r in ws):.0f}) "
              f"| {mw / mp:.2f} ({min(pairs):.2f}..{max(pairs):.2f}) |")
    for kind, b in results:
        print(f"{kind}: dump {b['dump']:.0f} ms; recording restore: first result "
              f"{b['rec_ms']:.0f} ms, {b['rec_faults']} faults; record pages "
              f"{b['rp_bytes'] / 2**20:.1f} MiB; pushed after (median) "
              f"{statistics.median(r['ws_done'] for r in b['rows']['ws']):.0f} ms of the "
              f"server's run")


if __name__ == "__main__":
    sys.exit(main())
