// Descriptor kinds of objects/fd_kinds.h and the device and O_PATH descriptors event-driven
// programs hold, each verified from inside after a restore. `--kinds a,b,...` picks the
// families (default all); `--workdir DIR` is where inotify and O_PATH find their files.
//   eventfd:  a non-blocking counter at 12, a blocking EFD_SEMAPHORE at 3, one at 2^40;
//   shared:   an eventfd inherited by a child (one description): the parent writes, the child
//             reads what was written;
//   timerfd:  a relative one-shot (1000 s, MONOTONIC), a periodic one (1 ms), an absolute one
//             (REALTIME, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET) and a one-shot that fired
//             before the dump and was not read (its tick must come back);
//   signalfd: SIGUSR2 and SIGWINCH, non-blocking, SIGUSR2 blocked;
//   inotify:  watches 1 (DIR/a, IN_MODIFY) and 3 (DIR, IN_CREATE) (2 was removed);
//   pidfd:    a PIDFD_NONBLOCK pidfd of a child;
//   opath:    DIR/a opened O_PATH;
//   inotify-unread, pidfd-outside: what the dump refuses (prints "refused fd=N" first);
//   devices:  /dev/null (O_WRONLY|O_APPEND), /dev/zero, /dev/urandom (O_NONBLOCK), /dev/random,
//             /dev/full, and /dev/null again O_PATH.
// Prints "ready pid=P" and, on SIGUSR1, checks each; prints "verified ok" or
// "verify FAILED: why" and exits 0 or 1.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

void wait_for_verify() {
  // A flag and nanosleep, not pause(): a SIGUSR1 between the check and pause() is lost.
  while (!g_verify) {
    timespec ts{0, 5000000};
    nanosleep(&ts, nullptr);
  }
}

std::string g_why;
void check(bool ok, const std::string& what) {
  if (!ok && g_why.empty()) g_why = what;
}

std::string fdinfo(int fd, const std::string& key) {
  std::ifstream in("/proc/self/fdinfo/" + std::to_string(fd));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) {
      std::string v = line.substr(key.size() + 1);
      size_t at = v.find_first_not_of(" \t");
      return at == std::string::npos ? "" : v.substr(at);
    }
  return "(none)";
}

int64_t ns(const timespec& t) {
  return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec;
}
int64_t now_ns(clockid_t c) {
  timespec t;
  clock_gettime(c, &t);
  return ns(t);
}
bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}
int flags_of(int fd) {
  return fcntl(fd, F_GETFL);
}

struct Eventfds {
  int counter, sem, big;
  void setup() {
    counter = eventfd(5, EFD_NONBLOCK);
    uint64_t seven = 7;
    (void)!write(counter, &seven, 8);
    sem = eventfd(3, EFD_SEMAPHORE);
    big = eventfd(0, EFD_NONBLOCK);
    uint64_t b = uint64_t{1} << 40;
    (void)!write(big, &b, 8);
  }
  void verify() {
    check(flags_of(counter) & O_NONBLOCK, "eventfd counter lost O_NONBLOCK");
    check(!(flags_of(sem) & O_NONBLOCK), "eventfd semaphore became non-blocking");
    uint64_t v = 0;
    check(read(counter, &v, 8) == 8 && v == 12,
          "eventfd counter: read " + std::to_string(v) + ", want 12");
    check(read(counter, &v, 8) < 0 && errno == EAGAIN, "eventfd counter: not empty after a read");
    for (int i = 0; i < 3; i++) {
      v = 0;
      check(readable(sem) && read(sem, &v, 8) == 8 && v == 1,
            "eventfd semaphore: read " + std::to_string(i + 1) + " gave " + std::to_string(v));
    }
    check(!readable(sem), "eventfd semaphore: readable after three reads");
    check(read(big, &v, 8) == 8 && v == uint64_t{1} << 40,
          "eventfd 2^40: read " + std::to_string(v));
  }
};

struct Timerfds {
  int rel, per, abs, fired;
  int64_t abs_expiry;
  void setup() {
    rel = timerfd_create(CLOCK_MONOTONIC, 0);
    itimerspec t{};
    t.it_value.tv_sec = 1000;
    timerfd_settime(rel, 0, &t, nullptr);
    per = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    t = {};
    t.it_value.tv_nsec = 1000000;
    t.it_interval.tv_nsec = 1000000;
    timerfd_settime(per, 0, &t, nullptr);
    abs = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    abs_expiry = now_ns(CLOCK_REALTIME) + int64_t{1000} * 1000000000;
    t = {};
    t.it_value.tv_sec = abs_expiry / 1000000000;
    t.it_value.tv_nsec = abs_expiry % 1000000000;
    timerfd_settime(abs, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &t, nullptr);
    fired = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK);
    t = {};
    t.it_value.tv_nsec = 1;
    timerfd_settime(fired, 0, &t, nullptr);
    pollfd p{fired, POLLIN, 0};
    poll(&p, 1, -1);  // fired: one tick not read
  }
  void verify() {
    itimerspec t{};
    check(timerfd_gettime(rel, &t) == 0 && ns(t.it_value) > 0 &&
              ns(t.it_value) <= int64_t{1000} * 1000000000 && ns(t.it_interval) == 0,
          "relative timerfd: " + std::to_string(ns(t.it_value)) + " ns left");
    check(fdinfo(rel, "clockid") == "1", "relative timerfd: clockid " + fdinfo(rel, "clockid"));
    check(!(flags_of(rel) & O_NONBLOCK), "relative timerfd became non-blocking");
    check(timerfd_gettime(per, &t) == 0 && ns(t.it_interval) == 1000000,
          "periodic timerfd: interval " + std::to_string(ns(t.it_interval)));
    check(flags_of(per) & O_NONBLOCK, "periodic timerfd lost O_NONBLOCK");
    pollfd p{per, POLLIN, 0};
    poll(&p, 1, -1);  // a periodic timer keeps firing
    uint64_t ticks = 0;
    check(read(per, &ticks, 8) == 8 && ticks >= 1, "periodic timerfd: no tick");
    const int64_t before = now_ns(CLOCK_REALTIME);
    check(timerfd_gettime(abs, &t) == 0, "absolute timerfd: timerfd_gettime");
    const int64_t after = now_ns(CLOCK_REALTIME);
    // The absolute expiry is kept (to the precision the dump measured it with).
    const int64_t lo = before + ns(t.it_value), hi = after + ns(t.it_value);
    check(lo <= abs_expiry + 1000000000 && hi >= abs_expiry - 1000000000,
          "absolute timerfd: expiry moved by " + std::to_string(lo - abs_expiry) + " ns");
    check(fdinfo(abs, "settime flags") == "03",
          "absolute timerfd: settime flags " + fdinfo(abs, "settime flags"));
    check(fdinfo(abs, "clockid") == "0", "absolute timerfd: clockid " + fdinfo(abs, "clockid"));
    ticks = 0;
    check(read(fired, &ticks, 8) == 8 && ticks == 1,
          "fired timerfd: its unread tick is gone (read " + std::to_string(ticks) + ")");
    check(fdinfo(fired, "clockid") == "7", "fired timerfd: clockid " + fdinfo(fired, "clockid"));
  }
};

struct Signalfd {
  int fd;
  void setup() {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    sigaddset(&s, SIGWINCH);
    sigprocmask(SIG_BLOCK, &s, nullptr);
    fd = signalfd(-1, &s, SFD_NONBLOCK);
  }
  void verify() {
    check(flags_of(fd) & O_NONBLOCK, "signalfd lost O_NONBLOCK");
    check(fdinfo(fd, "sigmask") == "0000000008000800",
          "signalfd: sigmask " + fdinfo(fd, "sigmask"));
    kill(getpid(), SIGUSR2);
    signalfd_siginfo si{};
    check(read(fd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2,
          "signalfd: SIGUSR2 not read through it");
  }
};

struct Inotify {
  int fd, wd_a, wd_dir;
  std::string dir;
  void setup() {
    fd = inotify_init1(IN_NONBLOCK);
    close(open((dir + "/a").c_str(), O_WRONLY | O_CREAT, 0644));
    close(open((dir + "/b").c_str(), O_WRONLY | O_CREAT, 0644));
    wd_a = inotify_add_watch(fd, (dir + "/a").c_str(), IN_MODIFY);
    int gone = inotify_add_watch(fd, (dir + "/b").c_str(), IN_MODIFY);
    inotify_rm_watch(fd, gone);
    wd_dir = inotify_add_watch(fd, dir.c_str(), IN_CREATE);
    char buf[4096];
    while (read(fd, buf, sizeof buf) > 0) {  // the IN_IGNORED of the removed watch
    }
  }
  void verify() {
    check(wd_a == 1 && wd_dir == 3,
          "inotify: setup gave wds " + std::to_string(wd_a) + ", " + std::to_string(wd_dir));
    check(flags_of(fd) & O_NONBLOCK, "inotify lost O_NONBLOCK");
    check(!readable(fd), "inotify: events queued after the restore");
    int w = open((dir + "/a").c_str(), O_WRONLY);
    (void)!write(w, "x", 1);
    close(w);
    close(open((dir + "/new").c_str(), O_WRONLY | O_CREAT, 0644));
    alignas(inotify_event) char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    std::set<std::string> got;
    for (ssize_t off = 0; n > 0 && off < n;) {
      auto* e = reinterpret_cast<inotify_event*>(buf + off);
      got.insert(std::to_string(e->wd) + ":" + std::to_string(e->mask) + ":" +
                 (e->len ? e->name : ""));
      off += static_cast<ssize_t>(sizeof(inotify_event) + e->len);
    }
    const std::string want_a = std::to_string(wd_a) + ":" + std::to_string(IN_MODIFY) + ":";
    const std::string want_dir = std::to_string(wd_dir) + ":" + std::to_string(IN_CREATE) + ":new";
    check(
        got.count(want_a) && got.count(want_dir),
        "inotify: events " + std::to_string(got.size()) + " without " + want_a + " or " + want_dir);
    // The next watch gets the number after the last one, as in the original.
    int next = inotify_add_watch(fd, (dir + "/b").c_str(), IN_MODIFY);
    check(next == 4, "inotify: a new watch got wd " + std::to_string(next) + ", want 4");
  }
};

struct Pidfd {
  int fd = -1;
  pid_t child = 0;
  void verify() {
    check(flags_of(fd) & O_NONBLOCK, "pidfd lost PIDFD_NONBLOCK");
    check(fdinfo(fd, "Pid") == std::to_string(child), "pidfd: Pid " + fdinfo(fd, "Pid"));
    check(syscall(SYS_pidfd_send_signal, fd, 0, nullptr, 0) == 0, "pidfd: pidfd_send_signal 0");
    check(!readable(fd), "pidfd: readable while the child lives");
  }
};

struct Opath {
  int fd;
  struct stat st;
  void setup(const std::string& dir) {
    close(open((dir + "/a").c_str(), O_WRONLY | O_CREAT, 0644));
    fd = open((dir + "/a").c_str(), O_PATH);
    fstat(fd, &st);
  }
  void verify() {
    struct stat now;
    check(fstat(fd, &now) == 0 && now.st_ino == st.st_ino && now.st_dev == st.st_dev,
          "O_PATH: fstat is not the file");
    char c;
    check(read(fd, &c, 1) < 0 && errno == EBADF, "O_PATH: read did not fail with EBADF");
    check(flags_of(fd) & O_PATH, "O_PATH: flags lost O_PATH");
  }
};

struct Devices {
  int null, zero, urandom, random, full, path_null;
  int fl[5];
  void setup() {
    null = open("/dev/null", O_WRONLY | O_APPEND);
    zero = open("/dev/zero", O_RDONLY);
    urandom = open("/dev/urandom", O_RDONLY | O_NONBLOCK);
    random = open("/dev/random", O_RDONLY);
    full = open("/dev/full", O_WRONLY);
    path_null = open("/dev/null", O_PATH);
    int fds[5] = {null, zero, urandom, random, full};
    for (int i = 0; i < 5; i++) fl[i] = flags_of(fds[i]);
  }
  void verify() {
    int fds[5] = {null, zero, urandom, random, full};
    const char* names[5] = {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full"};
    for (int i = 0; i < 5; i++)
      check((flags_of(fds[i]) & ~O_LARGEFILE) == (fl[i] & ~O_LARGEFILE),
            std::string(names[i]) + ": flags " + std::to_string(flags_of(fds[i])) + ", were " +
                std::to_string(fl[i]));
    char buf[64];
    std::memset(buf, 1, sizeof buf);
    check(read(zero, buf, sizeof buf) == sizeof buf && buf[0] == 0 && buf[63] == 0,
          "/dev/zero: read");
    check(read(urandom, buf, 16) == 16, "/dev/urandom: read");
    check(read(random, buf, 16) == 16, "/dev/random: read");
    check(write(null, buf, 8) == 8, "/dev/null: write");
    check(write(full, buf, 8) < 0 && errno == ENOSPC, "/dev/full: write did not fail ENOSPC");
    struct stat st;
    check(fstat(path_null, &st) == 0 && S_ISCHR(st.st_mode) && (flags_of(path_null) & O_PATH),
          "/dev/null O_PATH: not an O_PATH descriptor of the device");
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string dir = ".", kinds = "eventfd,shared,timerfd,signalfd,inotify,pidfd,opath,devices";
  for (int i = 1; i + 1 < argc; i++) {
    if (std::string(argv[i]) == "--workdir") dir = argv[i + 1];
    if (std::string(argv[i]) == "--kinds") kinds = argv[i + 1];
  }
  auto has = [&](const char* k) {
    return ("," + kinds + ",").find(std::string(",") + k + ",") != std::string::npos;
  };
  signal(SIGUSR1, on_usr1);

  Eventfds e{};
  Timerfds t{};
  Signalfd s{};
  Inotify in{};
  in.dir = dir;
  Pidfd pf{};
  Opath op{};
  Devices dev{};
  if (has("eventfd")) e.setup();
  if (has("timerfd")) t.setup();
  if (has("signalfd")) s.setup();
  if (has("inotify")) in.setup();
  if (has("opath")) op.setup(dir);
  if (has("devices")) dev.setup();

  // What the dump must refuse: events queued unread, a pidfd of a process outside the tree.
  if (has("inotify-unread")) {
    int fd = inotify_init1(0);
    inotify_add_watch(fd, dir.c_str(), IN_CREATE);
    close(open((dir + "/c").c_str(), O_WRONLY | O_CREAT, 0644));
    std::printf("refused fd=%d\n", fd);
  }
  if (has("pidfd-outside"))
    std::printf("refused fd=%d\n", static_cast<int>(syscall(SYS_pidfd_open, getppid(), 0)));

  pid_t child = 0;
  int shared = -1;
  if (has("shared") || has("pidfd")) {
    shared = eventfd(0, 0);
    child = fork();
    if (child == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // a test that fails before the dump leaves no orphan
      if (getppid() == 1) _exit(1);
      wait_for_verify();
      uint64_t v = 0;
      // One description: what the parent wrote is here.
      _exit(readable(shared) && read(shared, &v, 8) == 8 && v == 42 ? 0 : 1);
    }
    if (has("pidfd")) {
      pf.fd = static_cast<int>(syscall(SYS_pidfd_open, child, O_NONBLOCK));
      pf.child = child;
    }
  }

  std::printf("ready pid=%d child=%d\n", getpid(), child);
  std::fflush(stdout);
  wait_for_verify();

  if (has("eventfd")) e.verify();
  if (has("timerfd")) t.verify();
  if (has("signalfd")) s.verify();
  if (has("inotify")) in.verify();
  if (has("pidfd")) pf.verify();
  if (has("opath")) op.verify();
  if (has("devices")) dev.verify();
  if (child > 0) {
    uint64_t v = 42;
    (void)!write(shared, &v, 8);
    kill(child, SIGUSR1);
    int st = 0;
    waitpid(child, &st, 0);
    check(WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "shared eventfd: the child did not read what the parent wrote (status " +
              std::to_string(st) + ")");
    if (has("pidfd")) check(readable(pf.fd), "pidfd: not readable once the child exited");
  }
  if (g_why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", g_why.c_str());
  return 1;
}
