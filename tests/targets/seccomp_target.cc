// Seccomp state a restore must give back. The main thread installs filter A with prctl
// (getppid fails with errno 42; mmap with MAP_SHARED fails with EPERM, so a dump that maps a
// shared scratch page inside it would fail) and then starts three threads, which inherit A:
// T adds filter B of its own with SECCOMP_FILTER_FLAG_LOG (getpgrp fails with 43), U has only
// A. It prints "ready pid=P tids=M,T,U". With --strict instead (strict mode excludes filters):
// no filter, one thread V in strict mode waiting in read(), "ready pid=P tids=M,V". On
// SIGUSR1 every thread checks its calls fail exactly as before and /proc shows its mode and
// filter count; then T ends and the main thread adds filter C with SECCOMP_FILTER_FLAG_TSYNC,
// which the kernel accepts only if U's filters are still shared with the main thread's (as
// when U was created after A); U must then see C. Prints "verified ok" or "verify FAILED: why",
// exits 0 or 1.
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

constexpr unsigned kNr = offsetof(seccomp_data, nr);
constexpr unsigned kArg3 = offsetof(seccomp_data, args) + 3 * sizeof(uint64_t);

// Filter A: getppid -> errno 42, mmap with MAP_SHARED -> EPERM, else allow.
sock_filter g_a[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, kNr),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 42),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 3),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, kArg3),
    BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, MAP_SHARED, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};
// A filter failing one call with an errno, else allowing.
#define DENY_ONE(nr, err)                                                                   \
  {                                                                                         \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, kNr), BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1), \
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err)),                               \
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)                                        \
  }
sock_filter g_b[] = DENY_ONE(SYS_getpgrp, 43);
sock_filter g_c[] = DENY_ONE(SYS_getsid, 44);

long install(sock_filter* f, unsigned short n, unsigned flags) {
  sock_fprog prog{n, f};
  return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

// errno of a failing raw call, 0 if it succeeded.
int fails_with(long r) {
  return r == -1 ? errno : 0;
}

std::string status_of(pid_t tid, const std::string& key) {
  std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0)
      return line.substr(line.find_first_not_of(" \t", key.size() + 1));
  return "?";
}

// What every filtered thread checks of itself; `own` = it has filter B.
std::string check_self(bool own, int filters) {
  pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  if (int e = fails_with(syscall(SYS_getppid)); e != 42)
    return "getppid in " + std::to_string(tid) + " gave errno " + std::to_string(e);
  if (int e = fails_with(syscall(SYS_getpgrp)); e != (own ? 43 : 0))
    return "getpgrp in " + std::to_string(tid) + " gave errno " + std::to_string(e);
  void* m = mmap(nullptr, 4096, PROT_READ, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m != MAP_FAILED || errno != EPERM)
    return "shared mmap in " + std::to_string(tid) + " was not refused with EPERM";
  if (status_of(tid, "Seccomp") != "2" ||
      status_of(tid, "Seccomp_filters") != std::to_string(filters))
    return "thread " + std::to_string(tid) + " status shows Seccomp " + status_of(tid, "Seccomp") +
           " with " + status_of(tid, "Seccomp_filters") + " filters";
  return "";
}

std::atomic<int> g_phase{0};  // 1: check; 2: T done; 3: C installed, U checks it
std::string g_t_verdict = "?", g_u_verdict = "?", g_u_after_c = "?";
std::atomic<pid_t> g_t{0}, g_u{0}, g_v{0};
std::atomic<bool> g_u_checked{false};
int g_strict_in[2], g_strict_out[2];

void wait_phase(int p) {
  while (g_phase.load() < p) {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
}

void* thread_t(void*) {
  g_t = static_cast<pid_t>(syscall(SYS_gettid));
  if (install(g_b, sizeof g_b / sizeof g_b[0], SECCOMP_FILTER_FLAG_LOG) != 0) {
    perror("seccomp B");
    _exit(2);
  }
  wait_phase(1);
  g_t_verdict = check_self(true, 2);
  return nullptr;
}

void* thread_u(void*) {
  g_u = static_cast<pid_t>(syscall(SYS_gettid));
  wait_phase(1);
  g_u_verdict = check_self(false, 1);
  g_u_checked = true;
  wait_phase(3);
  g_u_after_c = fails_with(syscall(SYS_getsid, 0)) == 44 ? "" : "U does not see the TSYNC filter";
  return nullptr;
}

// Strict mode: only read, write, _exit and sigreturn from here on.
void* thread_v(void*) {
  g_v = static_cast<pid_t>(syscall(SYS_gettid));
  prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
  char c;
  if (read(g_strict_in[0], &c, 1) == 1) {
    c = 'V';
    (void)!write(g_strict_out[1], &c, 1);
  }
  syscall(SYS_exit, 0);
  return nullptr;
}

}  // namespace

// --strict: V stays in strict mode across the restore and still answers through its pipes.
int strict_main() {
  sigset_t usr1, old;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, &old);
  pthread_t v;
  pthread_create(&v, nullptr, thread_v, nullptr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  while (g_v == 0 || status_of(g_v, "Seccomp") != "1") {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
  std::printf("ready pid=%d tids=%d,%d\n", getpid(), getpid(), g_v.load());
  std::fflush(stdout);
  // Not pause(): a SIGUSR1 landing between the check and pause() would be slept through (the
  // classic lost wake-up; a restore widens the window: the pause() it hands back to the kernel
  // is restarted right after a handler that runs first).
  while (!g_verify) {
    timespec ts{0, 5000000};
    nanosleep(&ts, nullptr);
  }
  std::string why;
  if (status_of(g_v, "Seccomp") != "1")
    why = "strict thread shows Seccomp " + status_of(g_v, "Seccomp");
  if (status_of(getpid(), "Seccomp") != "0") why = "the main thread is in seccomp mode";
  char c = 'x';
  if (why.empty() &&
      (write(g_strict_in[1], &c, 1) != 1 || read(g_strict_out[0], &c, 1) != 1 || c != 'V'))
    why = "the strict thread did not answer";
  pthread_join(v, nullptr);
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}

int main(int argc, char** argv) {
  signal(SIGUSR1, on_usr1);
  if (pipe(g_strict_in) != 0 || pipe(g_strict_out) != 0) return 2;
  if (argc > 1 && std::string(argv[1]) == "--strict") return strict_main();
  prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  sock_fprog a{sizeof g_a / sizeof g_a[0], g_a};
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &a) != 0) {
    perror("prctl A");
    return 2;
  }
  // SIGUSR1 is for the main thread (waiting for it): the threads start with it blocked.
  sigset_t usr1, old;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, &old);
  pthread_t t, u;
  pthread_create(&t, nullptr, thread_t, nullptr);
  pthread_create(&u, nullptr, thread_u, nullptr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  while (g_t == 0 || g_u == 0 || status_of(g_t, "Seccomp_filters") != "2") {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
  std::printf("ready pid=%d tids=%d,%d,%d\n", getpid(), getpid(), g_t.load(), g_u.load());
  std::fflush(stdout);
  // Not pause(): a SIGUSR1 landing between the check and pause() would be slept through (the
  // classic lost wake-up; a restore widens the window: the pause() it hands back to the kernel
  // is restarted right after a handler that runs first).
  while (!g_verify) {
    timespec ts{0, 5000000};
    nanosleep(&ts, nullptr);
  }

  std::string why = check_self(false, 1);
  g_phase = 1;
  pthread_join(t, nullptr);
  if (why.empty()) why = g_t_verdict;
  // T's tid is cleared (join returns) a little before the kernel is done with it: TSYNC would
  // still meet its filters. And U must have checked itself before filter C exists.
  while (!g_u_checked || status_of(g_t, "Seccomp") != "?") {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
  if (why.empty()) {
    long r = install(g_c, sizeof g_c / sizeof g_c[0], SECCOMP_FILTER_FLAG_TSYNC);
    if (r != 0)
      why = "TSYNC filter refused by thread " + std::to_string(r) + " (U is " +
            std::to_string(g_u) + "): its filters are not shared with the main thread's";
  }
  g_phase = 3;
  pthread_join(u, nullptr);
  if (why.empty()) why = g_u_verdict;
  if (why.empty()) why = g_u_after_c;
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
