"""Shared by drain_compare.py and lazy_tree_compare.py (issue 14): one lazy restore, lazycr's or
CRIU 4.2's, left idle until its page server is done.

  - lazycr: `lazycr --log-file W/server.log restore --lazy -D IMG -d --server-pidfile F
    --pidfile P --stats S`; the drain ends when the server process exits (nothing owed);
  - CRIU: `criu lazy-pages -D IMG -W W --daemon --pidfile F`, then `criu restore -D IMG -W W
    -d --lazy-pages --pidfile P`; the drain ends when the daemon exits.

Drain time: from the first command's start to that exit. Root only; the caller makes itself a
child subreaper (subreaper()) so that the daemons' exits can be waited for and reaped.
"""
import ctypes
import json
import os
import select
import signal
import subprocess
import time

PR_SET_CHILD_SUBREAPER = 36


def header(criu, criu_version):
    """The first line of a comparison's output: when, the CPUs, the load, which CRIU."""
    return "# %s, %d CPUs, load %s, criu %s" % (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.cpu_count(),
        " ".join(open("/proc/loadavg").read().split()[:3]),
        (criu + " " + criu_version(criu)) if criu else "skipped")


def subreaper():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


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


def dump_cmd(lazycr, criu, pid, img, work, extra=()):
    """The dump command of tree `pid` into img: CRIU's when lazycr is None."""
    if lazycr is None:
        return [criu, "dump", "-t", str(pid), "-D", img, "-W", work, "-o", "dump.log"]
    return [lazycr, "dump", "-t", str(pid), "-D", img] + list(extra)


def drain(lazycr, criu, img, work):
    """Restores img lazily (CRIU's restore when lazycr is None), waits for its page server's
    exit; returns (drain s, the restored root's pid, lazycr's stats as a dict or None, the
    server's CPU time in s, its threads and reaped children included, or None when it was not
    ours to reap). The restored processes are left running: the caller kills them. `work` is
    emptied first."""
    for f in os.listdir(work):
        os.unlink(os.path.join(work, f))
    srv_pidfile = os.path.join(work, "server.pid")
    pidfile = os.path.join(work, "pid")
    stats = os.path.join(work, "stats.json")
    t0 = time.monotonic()
    if lazycr is None:
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
        raise RuntimeError("%s restore failed (%d): %s" % (
            "criu" if lazycr is None else lazycr, r.returncode, why))
    deadline = time.monotonic() + 300
    server = read_pid(srv_pidfile, deadline)
    t1 = wait_exit(server, deadline)
    cpu = None
    try:  # reparented to us (subreaper) once the restore command exited: its rusage
        _, _, ru = os.wait4(server, 0)
        cpu = ru.ru_utime + ru.ru_stime
    except ChildProcessError:
        pass
    root = read_pid(pidfile, deadline)
    s = None
    if lazycr is not None:
        with open(stats) as f:
            s = json.load(f)
    return t1 - t0, root, s, cpu
