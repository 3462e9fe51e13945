// A target that runs as another user: uids 1000/1001/1002 (real/effective/saved), gids
// 1001/1002/1003, groups 1001 and 1002, and a few capabilities (permitted NET_BIND_SERVICE +
// CHOWN, effective NET_BIND_SERVICE, inheritable + ambient CHOWN, SYS_ADMIN dropped from the
// bounding set), in two threads. It prints "ready pid=P tids=A,B" and, on SIGUSR1, checks
// from inside every thread that all of this is still so, prints "verified ok" or
// "verify FAILED: why" and exits 0 or 1.
#include <grp.h>
#include <linux/capability.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <string>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

struct Caps {
  uint64_t eff, prm, inh;
};

Caps get_caps() {
  __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct d[2] = {};
  syscall(SYS_capget, &h, d);
  auto join = [](uint32_t lo, uint32_t hi) { return uint64_t{lo} | uint64_t{hi} << 32; };
  return {join(d[0].effective, d[1].effective), join(d[0].permitted, d[1].permitted),
          join(d[0].inheritable, d[1].inheritable)};
}

constexpr uint64_t bit(int cap) {
  return uint64_t{1} << cap;
}

// The checks use raw syscalls: they report this thread's own credentials.
std::string check_thread() {
  uid_t r, e, s;
  gid_t gr, ge, gs;
  syscall(SYS_getresuid, &r, &e, &s);
  if (r != 1000 || e != 1001 || s != 1002)
    return "uids " + std::to_string(r) + "/" + std::to_string(e) + "/" + std::to_string(s);
  syscall(SYS_getresgid, &gr, &ge, &gs);
  if (gr != 1001 || ge != 1002 || gs != 1003) return "gids";
  if (syscall(SYS_setfsuid, -1) != 1001) return "fsuid";
  gid_t groups[8];
  long n = syscall(SYS_getgroups, 8, groups);
  if (n != 2 || groups[0] != 1001 || groups[1] != 1002) return "groups";
  Caps c = get_caps();
  if (c.prm != (bit(CAP_NET_BIND_SERVICE) | bit(CAP_CHOWN))) return "permitted caps";
  if (c.eff != bit(CAP_NET_BIND_SERVICE)) return "effective caps";
  if (c.inh != bit(CAP_CHOWN)) return "inheritable caps";
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_CHOWN, 0, 0) != 1) return "ambient caps";
  if (prctl(PR_CAPBSET_READ, CAP_SYS_ADMIN) != 0) return "bounding set";
  if (prctl(PR_CAPBSET_READ, CAP_CHOWN) != 1) return "bounding set (chown)";
  return "";
}

std::atomic<int> g_phase{0};
std::string g_thread_verdict;
std::atomic<pid_t> g_tid{0};

void* worker(void*) {
  // SIGUSR1 is for the main thread, which waits for it: taken here, it would leave the
  // main thread waiting for ever.
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, nullptr);
  g_tid = static_cast<pid_t>(syscall(SYS_gettid));
  while (g_phase.load() == 0) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
  }
  g_thread_verdict = check_thread();
  g_phase = 2;
  return nullptr;
}

}  // namespace

int main() {
  signal(SIGUSR1, on_usr1);
  gid_t groups[] = {1001, 1002};
  // glibc applies these to every thread of the process.
  if (setgroups(2, groups) != 0 || prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN) != 0 ||
      prctl(PR_SET_KEEPCAPS, 1) != 0 || setresgid(1001, 1002, 1003) != 0 ||
      setresuid(1000, 1001, 1002) != 0) {
    std::perror("creds_target: set-up");
    return 3;
  }
  // Capabilities are per thread; the worker, created afterwards, inherits these.
  auto set_caps = [] {
    __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct d[2] = {};
    d[0].permitted = static_cast<uint32_t>(bit(CAP_NET_BIND_SERVICE) | bit(CAP_CHOWN));
    d[0].effective = static_cast<uint32_t>(bit(CAP_NET_BIND_SERVICE));
    d[0].inheritable = static_cast<uint32_t>(bit(CAP_CHOWN));
    return syscall(SYS_capset, &h, d) == 0 &&
           prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_CHOWN, 0, 0) == 0;
  };
  if (!set_caps()) {
    std::perror("creds_target: capabilities");
    return 3;
  }
  pthread_t t;
  pthread_create(&t, nullptr, worker, nullptr);
  while (g_tid == 0) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
  }
  std::printf("ready pid=%d tids=%d,%d\n", getpid(), getpid(), g_tid.load());
  std::fflush(stdout);
  // Not pause(): a SIGUSR1 landing between the check and pause() would be slept through (the
  // classic lost wake-up; a restore widens the window: the pause() it hands back to the kernel
  // is restarted right after a handler that runs first).
  while (!g_verify) {
    timespec ts{0, 5000000};
    nanosleep(&ts, nullptr);
  }
  std::string why = check_thread();
  g_phase = 1;
  pthread_join(t, nullptr);
  if (why.empty() && !g_thread_verdict.empty()) why = "second thread: " + g_thread_verdict;
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
