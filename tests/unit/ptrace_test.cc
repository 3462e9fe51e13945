// TracedThread against real forked children (no mocks). Children are synchronised over pipes;
// where a child must be inside a blocking syscall we poll /proc/PID/syscall until it is.
#include "common/ptrace.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "common/proc.h"
#include "common/signals.h"

namespace lazycr {
namespace {

constexpr uint64_t sigbit(int sig) {
  return 1ull << (sig - 1);
}
constexpr long kErestartSys = -512;
constexpr long kErestartRestartBlock = -516;

bool is_error(long r) {
  return r < 0 && r > -4096;
}

void write_all(int fd, const void* buf, size_t len) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ::_exit(90);
    p += n;
    len -= static_cast<size_t>(n);
  }
}

// Reads exactly len bytes; false on EOF (the child died) or error.
bool read_all(int fd, void* buf, size_t len) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

// A forked child with a command pipe (parent -> child) and a report pipe (child -> parent).
// The destructor kills (through a pidfd, immune to PID reuse) and reaps it, even when the test
// failed half way. Declare it before any TracedThread of the child, so that the thread
// detaches first.
struct Kid {
  pid_t pid = -1;
  UniqueFd pidfd;
  UniqueFd cmd;  // parent writes
  UniqueFd rep;  // parent reads

  Kid() = default;
  Kid(const Kid&) = delete;
  Kid& operator=(const Kid&) = delete;
  ~Kid() { kill_and_reap(); }

  // Runs body(cmd_read_fd, report_write_fd) in a new child, which then _exits(0).
  void start(const std::function<void(int, int)>& body) {
    int c[2], r[2];
    ASSERT_EQ(::pipe2(c, O_CLOEXEC), 0);
    ASSERT_EQ(::pipe2(r, O_CLOEXEC), 0);
    pid_t p = ::fork();
    ASSERT_GE(p, 0) << std::strerror(errno);
    if (p == 0) {
      ::close(c[1]);
      ::close(r[0]);
      body(c[0], r[1]);
      ::_exit(0);
    }
    pid = p;
    ::close(c[0]);
    ::close(r[1]);
    cmd.reset(c[1]);
    rep.reset(r[0]);
    pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, p, 0)));
    ASSERT_TRUE(pidfd.valid()) << std::strerror(errno);
  }

  void kill_and_reap() {
    if (pid <= 0) return;
    if (pidfd.valid()) send_signal_pidfd(pidfd.get(), SIGKILL);
    int status;
    while (::waitpid(pid, &status, __WALL) < 0 && errno == EINTR) {
    }
    pid = -1;
    pidfd.reset();
  }

  void send(char c) { ASSERT_EQ(::write(cmd.get(), &c, 1), 1); }
  template <typename T>
  bool recv(T& out) {
    return read_all(rep.get(), &out, sizeof out);
  }
};

// Child bodies ---------------------------------------------------------------------------

// Reports one byte, then spins without system calls.
void busy_body(int, int rep) {
  char c = 'R';
  write_all(rep, &c, 1);
  volatile uint64_t n = 0;
  for (;;) n = n + 1;
}

// Reports 'R', then answers each command byte b with b + 1 (a read() failing with EINTR
// answers '!'), blocked in read(2) in between.
void echo_body(int cmd, int rep) {
  char r = 'R';
  write_all(rep, &r, 1);
  for (;;) {
    char b;
    ssize_t n = ::read(cmd, &b, 1);
    if (n == 1) {
      b = static_cast<char>(b + 1);
      write_all(rep, &b, 1);
    } else if (n < 0 && errno == EINTR) {
      b = '!';
      write_all(rep, &b, 1);
    } else {
      ::_exit(n == 0 ? 0 : 91);
    }
  }
}

volatile sig_atomic_t g_handled = 0;
void count_handler(int) {
  g_handled = g_handled + 1;
}

void install_counter(int sig, bool restart) {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = count_handler;
  sa.sa_flags = restart ? SA_RESTART : 0;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(sig, &sa, nullptr) != 0) ::_exit(92);
}

struct SleepReport {
  int ret;
  int err;
  long rem_sec;
  int handled;
};

// Sleeps an hour in nanosleep; SIGUSR1 (no SA_RESTART) can cut it short. Reports the outcome.
void sleeper_body(int, int rep) {
  install_counter(SIGUSR1, false);
  char c = 'R';
  write_all(rep, &c, 1);
  struct timespec req = {3600, 0}, rem = {0, 0};
  int r = ::nanosleep(&req, &rem);
  SleepReport s{r, errno, rem.tv_sec, g_handled};
  write_all(rep, &s, sizeof s);
  for (;;) ::pause();
}

// Polls /proc/PID/syscall until the child is blocked in one of `nrs`; returns the one seen.
long wait_in_syscall(pid_t pid, std::initializer_list<long> nrs) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  std::string last;
  while (std::chrono::steady_clock::now() < deadline) {
    last = proc::read_file("/proc/" + std::to_string(pid) + "/syscall");
    long nr = -2;
    if (std::sscanf(last.c_str(), "%ld", &nr) == 1) {
      if (std::find(nrs.begin(), nrs.end(), nr) != nrs.end()) return nr;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ADD_FAILURE() << "pid " << pid << " never blocked in the expected syscall; last: " << last;
  return -1;
}

// Polls /proc/PID/stat until the state letter is `state` (e.g. 't': ptrace-stopped).
bool wait_state(pid_t pid, char state) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (proc::read_stat(pid).state == state) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

bool same_regs(const Regs& a, const Regs& b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

bool has_mapping(pid_t pid, uint64_t addr) {
  auto maps = proc::parse_maps(proc::read_file("/proc/" + std::to_string(pid) + "/maps"));
  return std::any_of(maps.begin(), maps.end(),
                     [&](const proc::MapsEntry& m) { return m.start <= addr && addr < m.end; });
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Starts `body`, waits for its 'R', seizes and stops it.
void start_and_stop(Kid& kid, const std::function<void(int, int)>& body, TracedThread& t) {
  ASSERT_NO_FATAL_FAILURE(kid.start(body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  ASSERT_EQ(c, 'R');
  t = TracedThread::seize(kid.pid);
  t.interrupt_and_wait();
}

// Tests -----------------------------------------------------------------------------------

TEST(Ptrace, SeizeInterruptGetRegs) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  EXPECT_EQ(t.tid(), kid.pid);
  EXPECT_TRUE(t.attached());
  EXPECT_EQ(proc::read_status(kid.pid).tracer_pid, ::getpid());
  Regs r = t.get_regs();
  auto maps = proc::parse_maps(proc::read_file("/proc/" + std::to_string(kid.pid) + "/maps"));
  auto in = [&](uint64_t a) {
    return std::find_if(maps.begin(), maps.end(),
                        [&](const proc::MapsEntry& m) { return m.start <= a && a < m.end; });
  };
  auto code = in(r.rip);
  ASSERT_NE(code, maps.end()) << std::hex << r.rip;
  EXPECT_TRUE(code->exec);
  auto stack = in(r.rsp);
  ASSERT_NE(stack, maps.end()) << std::hex << r.rsp;
  EXPECT_TRUE(stack->write);
  // Either in the loop (orig_rax -1) or just leaving the write() that reported 'R' (then
  // rax holds its result, not a restart code).
  if (static_cast<long>(r.orig_rax) != -1) {
    EXPECT_EQ(r.orig_rax, static_cast<uint64_t>(SYS_write));
    EXPECT_EQ(r.rax, 1u);
  }
  EXPECT_NE(r.fs_base, 0u);

  t.detach();
  EXPECT_FALSE(t.attached());
  EXPECT_EQ(proc::read_status(kid.pid).tracer_pid, 0);
}

TEST(Ptrace, SetRegsRoundTrip) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  Regs orig = t.get_regs();
  t.set_regs(orig);
  EXPECT_TRUE(same_regs(t.get_regs(), orig));
  Regs changed = orig;
  changed.r15 = 0x1122334455667788ull;
  changed.r14 = 0x99aabbccddeeff00ull;
  t.set_regs(changed);
  Regs back = t.get_regs();
  EXPECT_EQ(back.r15, changed.r15);
  EXPECT_EQ(back.r14, changed.r14);
  EXPECT_TRUE(same_regs(back, changed));
  t.set_regs(orig);
  EXPECT_TRUE(same_regs(t.get_regs(), orig));
}

TEST(Ptrace, XstateRoundTrip) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  std::vector<uint8_t> x = t.get_xstate();
  EXPECT_GT(x.size(), 512u);  // legacy area + header at least
  t.set_xstate(x);
  EXPECT_EQ(t.get_xstate(), x);
  // xmm15 lives at byte 160 + 15 * 16 of the legacy area.
  std::vector<uint8_t> y = x;
  for (int i = 0; i < 16; ++i) y[160 + 15 * 16 + i] = static_cast<uint8_t>(0xa0 + i);
  t.set_xstate(y);
  std::vector<uint8_t> back = t.get_xstate();
  ASSERT_EQ(back.size(), y.size());
  EXPECT_EQ(0, std::memcmp(back.data() + 400, y.data() + 400, 16));
  t.set_xstate(x);
  EXPECT_EQ(t.get_xstate(), x);
  // A blob of the wrong size is refused with the tid in the message.
  std::string err = error_of([&] { t.set_xstate(std::vector<uint8_t>(100)); });
  EXPECT_NE(err.find(std::to_string(kid.pid)), std::string::npos) << err;
}

TEST(Ptrace, SigmaskRoundTrip) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(
      kid,
      [](int c, int r) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGUSR1);
        sigprocmask(SIG_BLOCK, &s, nullptr);
        busy_body(c, r);
      },
      t));
  uint64_t orig = t.get_sigmask();
  EXPECT_EQ(orig, sigbit(SIGUSR1));
  EXPECT_EQ(proc::read_status(kid.pid).sig_blk, orig);
  t.set_sigmask(orig | sigbit(SIGUSR2) | sigbit(SIGRTMIN + 3));
  EXPECT_EQ(t.get_sigmask(), orig | sigbit(SIGUSR2) | sigbit(SIGRTMIN + 3));
  // SIGKILL and SIGSTOP cannot be blocked: the kernel drops them.
  t.set_sigmask(~0ull);
  EXPECT_EQ(t.get_sigmask(), ~(sigbit(SIGKILL) | sigbit(SIGSTOP)));
  t.set_sigmask(orig);
  EXPECT_EQ(t.get_sigmask(), orig);
}

TEST(Ptrace, RseqIsGlibcRegistration) {
  if (__rseq_size == 0) GTEST_SKIP() << "glibc did not register rseq (tunable off?)";
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  abi::ptrace_rseq_configuration c = t.get_rseq();
  EXPECT_NE(c.rseq_abi_pointer, 0u);
  EXPECT_GE(c.rseq_abi_size, 20u);
  EXPECT_EQ(c.signature, 0x53053053u);
  // glibc puts the area at a fixed offset from the thread pointer.
  Regs r = t.get_regs();
  EXPECT_EQ(c.rseq_abi_pointer, r.fs_base + static_cast<uint64_t>(__rseq_offset));
}

TEST(Ptrace, InjectGetpidSingleStep) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  uint64_t insn = find_vdso_syscall_insn(kid.pid);
  uint8_t bytes[2];
  remote_read(kid.pid, insn, bytes, 2);
  EXPECT_EQ(bytes[0], 0x0f);
  EXPECT_EQ(bytes[1], 0x05);

  Regs before = t.get_regs();
  uint64_t mask = t.get_sigmask();
  EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_getpid), kid.pid);
  EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_gettid), kid.pid);
  EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_getppid), ::getpid());
  EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_close, 987654), -EBADF);
  EXPECT_EQ(t.injected_syscalls(), 4u);
  EXPECT_TRUE(same_regs(before, t.get_regs()));
  EXPECT_EQ(mask, t.get_sigmask());
}

TEST(Ptrace, InjectMmapMunmap) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  uint64_t insn = find_vdso_syscall_insn(kid.pid);
  Regs before = t.get_regs();
  std::vector<uint8_t> xstate = t.get_xstate();

  long addr = t.syscall(insn, InjectMode::kSingleStep, SYS_mmap, 0, 4096, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0);
  ASSERT_FALSE(is_error(addr)) << addr;
  ASSERT_EQ(addr % 4096, 0);
  EXPECT_TRUE(has_mapping(kid.pid, addr));
  // The scratch page works for remote I/O.
  char pattern[4096];
  for (size_t i = 0; i < sizeof pattern; ++i) pattern[i] = static_cast<char>(i * 7);
  remote_write(kid.pid, addr, pattern, sizeof pattern);
  char back[4096] = {};
  remote_read(kid.pid, addr, back, sizeof back);
  EXPECT_EQ(0, std::memcmp(pattern, back, sizeof back));

  EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_munmap, addr, 4096), 0);
  EXPECT_FALSE(has_mapping(kid.pid, addr));
  std::string err = error_of([&] { remote_read(kid.pid, addr, back, 16); });
  EXPECT_NE(err.find(std::to_string(kid.pid)), std::string::npos) << err;
  EXPECT_NE(err.find("0x" + (std::ostringstream() << std::hex << addr).str()), std::string::npos)
      << err;

  EXPECT_TRUE(same_regs(before, t.get_regs()));
  EXPECT_EQ(xstate, t.get_xstate());
}

TEST(Ptrace, InjectTrapAfterTrampoline) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, busy_body, t));
  uint64_t vdso = find_vdso_syscall_insn(kid.pid);
  Regs before = t.get_regs();
  long page = t.syscall(vdso, InjectMode::kSingleStep, SYS_mmap, 0, 4096, PROT_READ | PROT_EXEC,
                        MAP_PRIVATE | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0);
  ASSERT_FALSE(is_error(page)) << page;
  const uint8_t tramp[3] = {0x0f, 0x05, 0xcc};  // syscall; int3
  // process_vm_writev honours the page's protection; /proc/PID/mem does not.
  std::string err = error_of([&] { remote_write(kid.pid, page, tramp, sizeof tramp); });
  EXPECT_NE(err.find("process_vm_writev pid " + std::to_string(kid.pid)), std::string::npos) << err;
  remote_poke(kid.pid, page, tramp, sizeof tramp);
  uint8_t back[3];
  remote_read(kid.pid, page, back, 3);
  EXPECT_EQ(0, std::memcmp(back, tramp, 3));

  EXPECT_EQ(t.syscall(page, InjectMode::kTrapAfter, SYS_getpid), kid.pid);
  EXPECT_EQ(t.syscall(page, InjectMode::kTrapAfter, SYS_getppid), ::getpid());
  // The trampoline cannot unmap itself in kTrapAfter mode (the int3 is gone when the call
  // returns: SIGSEGV), but single-stepping its `syscall` traps at the syscall exit, before
  // the next instruction is fetched.
  EXPECT_EQ(t.syscall(page, InjectMode::kSingleStep, SYS_munmap, page, 4096), 0);
  EXPECT_FALSE(has_mapping(kid.pid, page));
  EXPECT_TRUE(same_regs(before, t.get_regs()));

  // A `syscall` with nothing behind it: the fault is reported, the thread is put back.
  err = error_of([&] { t.syscall(page, InjectMode::kTrapAfter, SYS_getpid); });
  EXPECT_NE(err.find("SIGSEGV"), std::string::npos) << err;
  EXPECT_NE(err.find(std::to_string(kid.pid)), std::string::npos) << err;
  EXPECT_TRUE(same_regs(before, t.get_regs()));
  EXPECT_EQ(t.syscall(vdso, InjectMode::kSingleStep, SYS_getpid), kid.pid);
}

TEST(Ptrace, InjectIntoPipeReadThenReadRestarts) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_read}), SYS_read);
  {
    TracedThread t = TracedThread::seize(kid.pid);
    t.interrupt_and_wait();
    Regs before = t.get_regs();
    EXPECT_EQ(static_cast<long>(before.orig_rax), SYS_read);
    EXPECT_EQ(static_cast<long>(before.rax), kErestartSys);
    uint64_t insn = find_vdso_syscall_insn(kid.pid);
    EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_getpid), kid.pid);
    long addr = t.syscall(insn, InjectMode::kSingleStep, SYS_mmap, 0, 8192, PROT_READ,
                          MAP_PRIVATE | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0);
    ASSERT_FALSE(is_error(addr)) << addr;
    EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_munmap, addr, 8192), 0);
    EXPECT_TRUE(same_regs(before, t.get_regs()));
    t.detach();
  }
  // The kernel restarts the interrupted read: the child answers as if nothing happened.
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_read}), SYS_read);
  kid.send('a');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 'b');
}

TEST(Ptrace, FixupRewindsPipeRead) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_read}), SYS_read);
  {
    TracedThread t = TracedThread::seize(kid.pid);
    t.interrupt_and_wait();
    Regs r = t.get_regs();
    Regs orig = r;
    ASSERT_TRUE(fixup_interrupted_syscall(r));
    EXPECT_EQ(r.rip, orig.rip - 2);
    EXPECT_EQ(r.rax, static_cast<uint64_t>(SYS_read));
    EXPECT_EQ(static_cast<long>(r.orig_rax), -1);
    uint8_t insn[2];
    remote_read(kid.pid, r.rip, insn, 2);
    EXPECT_EQ(insn[0], 0x0f);
    EXPECT_EQ(insn[1], 0x05);
    EXPECT_FALSE(fixup_interrupted_syscall(r));  // idempotent
    t.set_regs(r);
    t.detach();
  }
  // The child re-issues read() from the rewound instruction.
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_read}), SYS_read);
  kid.send('x');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 'y');
}

TEST(Ptrace, InjectIntoNanosleepThenSleepRestarts) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(sleeper_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  long nr = wait_in_syscall(kid.pid, {SYS_clock_nanosleep, SYS_nanosleep});
  ASSERT_GE(nr, 0);
  {
    TracedThread t = TracedThread::seize(kid.pid);
    t.interrupt_and_wait();
    Regs before = t.get_regs();
    EXPECT_EQ(static_cast<long>(before.orig_rax), nr);
    EXPECT_EQ(static_cast<long>(before.rax), kErestartRestartBlock);
    uint64_t insn = find_vdso_syscall_insn(kid.pid);
    EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_getpid), kid.pid);
    long addr = t.syscall(insn, InjectMode::kSingleStep, SYS_mmap, 0, 4096, PROT_READ,
                          MAP_PRIVATE | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0);
    ASSERT_FALSE(is_error(addr)) << addr;
    EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_munmap, addr, 4096), 0);
    EXPECT_TRUE(same_regs(before, t.get_regs()));
    t.detach();
  }
  // Live, the kernel's restart_block is intact: the sleep goes on through restart_syscall.
  ASSERT_GE(wait_in_syscall(kid.pid, {SYS_restart_syscall}), 0);
  ASSERT_TRUE(send_signal(kid.pid, SIGUSR1));
  SleepReport s;
  ASSERT_TRUE(kid.recv(s));
  EXPECT_EQ(s.ret, -1);
  EXPECT_EQ(s.err, EINTR);
  EXPECT_EQ(s.handled, 1);     // it was our SIGUSR1 that ended it, nothing before
  EXPECT_GT(s.rem_sec, 3000);  // and most of the hour was still ahead
}

// A restored thread has no restart_block: the fix-up re-issues the sleep itself, which goes on
// until something real (our SIGUSR1) ends it. (It used to return an EINTR of its own.)
TEST(Ptrace, FixupRestartsNanosleep) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(sleeper_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  long nr = wait_in_syscall(kid.pid, {SYS_clock_nanosleep, SYS_nanosleep});
  ASSERT_GE(nr, 0);
  {
    TracedThread t = TracedThread::seize(kid.pid);
    t.interrupt_and_wait();
    Regs r = t.get_regs();
    Regs orig = r;
    ASSERT_TRUE(fixup_interrupted_syscall(r));
    EXPECT_EQ(r.rip, orig.rip - 2);  // rewound to the syscall instruction
    EXPECT_EQ(static_cast<long>(r.rax), nr);
    EXPECT_EQ(static_cast<long>(r.orig_rax), -1);
    t.set_regs(r);
    t.detach();
  }
  // In the call again, not in restart_syscall: the registers alone carry it.
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_clock_nanosleep, SYS_nanosleep}), nr);
  ASSERT_TRUE(send_signal(kid.pid, SIGUSR1));
  SleepReport s;
  ASSERT_TRUE(kid.recv(s));
  EXPECT_EQ(s.ret, -1);
  EXPECT_EQ(s.err, EINTR);
  EXPECT_EQ(s.handled, 1);  // our SIGUSR1 ended it, nothing before
  EXPECT_GT(s.rem_sec, 3000);
}

// Polls a pipe for an hour, all signals blocked (as script(1) does with its signalfd), and
// reports poll's result and errno.
void poller_body(int cmd, int rep) {
  sigset_t all;
  sigfillset(&all);
  ::sigprocmask(SIG_BLOCK, &all, nullptr);
  char c = 'R';
  write_all(rep, &c, 1);
  struct pollfd p = {cmd, POLLIN, 0};
  int r[2] = {::poll(&p, 1, 3600 * 1000), errno};
  write_all(rep, r, sizeof r);
  for (;;) ::pause();
}

// poll with a timeout is interrupted with -ERESTART_RESTARTBLOCK; after the fix-up it waits
// again and returns what woke it, never an EINTR the program could not have had.
TEST(Ptrace, FixupRestartsPollWithATimeout) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(poller_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_poll}), SYS_poll);
  {
    TracedThread t = TracedThread::seize(kid.pid);
    t.interrupt_and_wait();
    Regs r = t.get_regs();
    EXPECT_EQ(static_cast<long>(r.rax), kErestartRestartBlock);
    ASSERT_TRUE(fixup_interrupted_syscall(r));
    t.set_regs(r);
    t.detach();
  }
  ASSERT_EQ(wait_in_syscall(kid.pid, {SYS_poll}), SYS_poll);
  kid.send('x');
  int got[2] = {0, 0};
  ASSERT_TRUE(kid.recv(got));
  EXPECT_EQ(got[0], 1) << "errno " << got[1];
}

TEST(Ptrace, FixupLeavesOtherRegsAlone) {
  Regs r;
  std::memset(&r, 0, sizeof r);
  r.orig_rax = static_cast<uint64_t>(-1);
  r.rax = static_cast<uint64_t>(kErestartSys);  // not in a syscall: leave it
  EXPECT_FALSE(fixup_interrupted_syscall(r));
  r.orig_rax = SYS_read;
  r.rax = static_cast<uint64_t>(-EAGAIN);  // finished syscall
  EXPECT_FALSE(fixup_interrupted_syscall(r));
  for (long code : {-512L, -513L, -514L}) {
    r.orig_rax = SYS_wait4;
    r.rax = static_cast<uint64_t>(code);
    r.rip = 0x1002;
    EXPECT_TRUE(fixup_interrupted_syscall(r));
    EXPECT_EQ(r.rip, 0x1000u);
    EXPECT_EQ(r.rax, static_cast<uint64_t>(SYS_wait4));
  }
}

TEST(Ptrace, PeekSiginfoSeesQueuedSignals) {
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(kid.start([](int c, int r) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigaddset(&s, SIGUSR2);
    sigaddset(&s, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &s, nullptr);
    echo_body(c, r);
  }));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  ASSERT_TRUE(send_signal(kid.pid, SIGUSR1));                  // process-wide queue
  ASSERT_TRUE(send_thread_signal(kid.pid, kid.pid, SIGUSR2));  // the thread's own queue
  constexpr int kRt = 40;                                      // more than one batch
  for (int i = 0; i < kRt; ++i) ASSERT_TRUE(send_signal(kid.pid, SIGRTMIN));
  t = TracedThread::seize(kid.pid);
  t.interrupt_and_wait();

  std::vector<siginfo_t> shared = t.peek_siginfo(true);
  ASSERT_EQ(shared.size(), 1u + kRt);
  EXPECT_EQ(shared[0].si_signo, SIGUSR1);
  EXPECT_EQ(shared[0].si_code, SI_USER);
  EXPECT_EQ(shared[0].si_pid, ::getpid());
  for (int i = 1; i <= kRt; ++i) EXPECT_EQ(shared[i].si_signo, SIGRTMIN) << i;

  std::vector<siginfo_t> own = t.peek_siginfo(false);
  ASSERT_EQ(own.size(), 1u);
  EXPECT_EQ(own[0].si_signo, SIGUSR2);
  EXPECT_EQ(own[0].si_code, SI_TKILL);

  proc::Status st = proc::read_status(kid.pid);
  EXPECT_EQ(st.shd_pnd, sigbit(SIGUSR1) | sigbit(SIGRTMIN));
  EXPECT_EQ(st.sig_pnd, sigbit(SIGUSR2));
}

TEST(Ptrace, SignalMetWhileInterruptingIsNotLost) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start([](int cmd, int rep) {
    install_counter(SIGUSR2, true);
    char r = 'R';
    write_all(rep, &r, 1);
    for (;;) {
      char b;
      ssize_t n = ::read(cmd, &b, 1);
      if (n <= 0) ::_exit(n == 0 ? 0 : 93);
      char count = static_cast<char>(g_handled);
      write_all(rep, &count, 1);
    }
  }));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  {
    TracedThread t = TracedThread::seize(kid.pid);
    ASSERT_TRUE(send_signal(kid.pid, SIGUSR2));
    // The traced child stops in a signal-delivery-stop for SIGUSR2 before we interrupt it.
    ASSERT_TRUE(wait_state(kid.pid, 't'));
    t.interrupt_and_wait();
    Regs r = t.get_regs();
    EXPECT_NE(r.rip, 0u);
    t.detach();
  }
  kid.send('?');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 1);  // delivered exactly once
}

TEST(Ptrace, PendingSigstopSurvivesInjection) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  {
    TracedThread t = TracedThread::seize(kid.pid);
    t.interrupt_and_wait();
    // SIGSTOP cannot be blocked: the injected call meets it first.
    ASSERT_TRUE(send_signal(kid.pid, SIGSTOP));
    uint64_t insn = find_vdso_syscall_insn(kid.pid);
    Regs before = t.get_regs();
    EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_getpid), kid.pid);
    EXPECT_TRUE(same_regs(before, t.get_regs()));
    // It is pending again (re-sent), not delivered into our registers, not lost.
    EXPECT_TRUE(proc::read_status(kid.pid).shd_pnd & sigbit(SIGSTOP));
    t.detach();
  }
  ASSERT_TRUE(wait_state(kid.pid, 'T'));  // the stop happens once we are gone
  ASSERT_TRUE(send_signal(kid.pid, SIGCONT));
  kid.send('m');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 'n');
}

TEST(Ptrace, InjectedForkReportsNewTask) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  {
    TracedThread t = TracedThread::seize(kid.pid, PTRACE_O_TRACEFORK);
    t.interrupt_and_wait();
    uint64_t insn = find_vdso_syscall_insn(kid.pid);
    Regs before = t.get_regs();
    long gpid = t.syscall(insn, InjectMode::kSingleStep, SYS_fork);
    ASSERT_GT(gpid, 0);
    EXPECT_EQ(t.take_new_tasks(), std::vector<pid_t>{static_cast<pid_t>(gpid)});
    EXPECT_TRUE(t.take_new_tasks().empty());
    {
      TracedThread g = TracedThread::adopt(static_cast<pid_t>(gpid));
      ASSERT_TRUE(send_signal(static_cast<pid_t>(gpid), SIGKILL));
      StopInfo s;
      for (int i = 0; i < 10 && (s = g.wait_stop()).kind != StopKind::kExited; ++i) {
      }
      EXPECT_EQ(s.kind, StopKind::kExited);
      EXPECT_TRUE(WIFSIGNALED(s.exit_status));
      EXPECT_FALSE(g.attached());
    }
    // Its parent reaps it (injected wait4), so no zombie is left to a PID 1 that never reaps.
    EXPECT_EQ(t.syscall(insn, InjectMode::kSingleStep, SYS_wait4, gpid, 0, WNOHANG | __WALL, 0),
              gpid);
    EXPECT_TRUE(same_regs(before, t.get_regs()));
  }
  kid.send('a');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 'b');
}

TEST(Ptrace, InterruptReportsExit) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  TracedThread t = TracedThread::seize(kid.pid);
  ASSERT_TRUE(send_signal(kid.pid, SIGKILL));
  std::string err = error_of([&] { t.interrupt_and_wait(); });
  EXPECT_NE(err.find("tid " + std::to_string(kid.pid)), std::string::npos) << err;
  EXPECT_NE(err.find("exited"), std::string::npos) << err;
  EXPECT_FALSE(t.attached());
}

TEST(Ptrace, DetachRunningThread) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  TracedThread t = TracedThread::seize(kid.pid);
  EXPECT_EQ(proc::read_status(kid.pid).tracer_pid, ::getpid());
  t.detach();  // never stopped: detach must interrupt first
  EXPECT_FALSE(t.attached());
  EXPECT_EQ(proc::read_status(kid.pid).tracer_pid, 0);
  kid.send('a');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 'b');
  // A moved-from object owns nothing; the destructor of the moved-to one detaches.
  {
    TracedThread a = TracedThread::seize(kid.pid);
    TracedThread b = std::move(a);
    EXPECT_FALSE(a.attached());  // NOLINT(bugprone-use-after-move)
    EXPECT_TRUE(b.attached());
  }
  EXPECT_EQ(proc::read_status(kid.pid).tracer_pid, 0);
  kid.send('c');
  ASSERT_TRUE(kid.recv(c));
  EXPECT_EQ(c, 'd');
}

// Three threads that report their tids, then wait for the parent.
void threads_body(int cmd, int rep) {
  static std::atomic<pid_t> extra[2];
  std::thread a([] {
    extra[0] = static_cast<pid_t>(::syscall(SYS_gettid));
    for (;;) ::pause();
  });
  std::thread b([] {
    extra[1] = static_cast<pid_t>(::syscall(SYS_gettid));
    for (;;) ::pause();
  });
  while (extra[0] == 0 || extra[1] == 0) ::usleep(1000);
  pid_t tids[3] = {static_cast<pid_t>(::syscall(SYS_gettid)), extra[0], extra[1]};
  write_all(rep, tids, sizeof tids);
  char c;
  while (::read(cmd, &c, 1) != 0) {
  }
  ::_exit(0);
}

// A killed leader is reported only after its other (traced, zombie) threads are reaped by
// their tracer: detaching the leader first must not wait for it.
TEST(Ptrace, DetachOfAKilledThreadedProcessDoesNotBlock) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(threads_body));
  pid_t tids[3];
  ASSERT_TRUE(kid.recv(tids));
  std::vector<TracedThread> ts;
  for (pid_t tid : tids) {
    ts.push_back(TracedThread::seize(tid));
    ts.back().interrupt_and_wait();
  }
  ASSERT_TRUE(send_signal_pidfd(kid.pidfd.get(), SIGKILL));
  for (auto& t : ts) {
    t.detach();  // leader first
    EXPECT_FALSE(t.attached());
  }
  ts.clear();
  kid.kill_and_reap();  // the whole process is gone and reaped
  EXPECT_FALSE(proc::exists(tids[0]));
}

TEST(Ptrace, SeizeNonexistentPid) {
  pid_t gone = ::fork();
  ASSERT_GE(gone, 0);
  if (gone == 0) ::_exit(0);
  int status;
  ASSERT_EQ(::waitpid(gone, &status, 0), gone);
  if (proc::exists(gone)) GTEST_SKIP() << "pid " << gone << " was reused";
  try {
    TracedThread::seize(gone);
    FAIL() << "seized a pid that does not exist";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("tid " + std::to_string(gone)), std::string::npos) << msg;
    EXPECT_NE(msg.find("no such process"), std::string::npos) << msg;
    EXPECT_EQ(e.sys_errno(), ESRCH);
  }
  EXPECT_THROW(TracedThread::seize(0), Error);
  EXPECT_THROW(TracedThread::seize(-1), Error);
}

TEST(Ptrace, SeizeAlreadyTracedNamesTracer) {
  Kid kid;
  ASSERT_NO_FATAL_FAILURE(kid.start(echo_body));
  char c = 0;
  ASSERT_TRUE(kid.recv(c));
  TracedThread t = TracedThread::seize(kid.pid);
  try {
    TracedThread::seize(kid.pid);
    FAIL() << "seized twice";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("tid " + std::to_string(kid.pid)), std::string::npos) << msg;
    EXPECT_NE(msg.find("already traced by pid " + std::to_string(::getpid())), std::string::npos)
        << msg;
    EXPECT_EQ(e.sys_errno(), EPERM);
  }
  // Our own thread cannot be traced: permission, not "already traced".
  std::string err = error_of([] { TracedThread::seize(::getpid()); });
  EXPECT_NE(err.find("permission"), std::string::npos) << err;
}

TEST(Ptrace, VdsoOfMissingProcess) {
  std::string err = error_of([] { find_vdso_syscall_insn(999999999); });
  EXPECT_NE(err.find("999999999"), std::string::npos) << err;
}

// Not a correctness test: prints the cost of one injected syscall (DESIGN.md section 4).
TEST(Ptrace, InjectionTiming) {
  cpu_set_t saved;
  ASSERT_EQ(::sched_getaffinity(0, sizeof saved, &saved), 0);
  std::vector<int> cpus;
  for (int i = 0; i < CPU_SETSIZE; ++i) {
    if (CPU_ISSET(i, &saved)) cpus.push_back(i);
  }
  auto pin = [](pid_t pid, int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    return ::sched_setaffinity(pid, sizeof s, &s) == 0;
  };
  Kid kid;
  TracedThread t;
  ASSERT_NO_FATAL_FAILURE(start_and_stop(kid, echo_body, t));
  uint64_t vdso = find_vdso_syscall_insn(kid.pid);
  long page = t.syscall(vdso, InjectMode::kSingleStep, SYS_mmap, 0, 4096, PROT_READ | PROT_EXEC,
                        MAP_PRIVATE | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0);
  ASSERT_FALSE(is_error(page));
  const uint8_t tramp[3] = {0x0f, 0x05, 0xcc};
  remote_poke(kid.pid, page, tramp, sizeof tramp);

  constexpr int kCalls = 2000;
  auto measure = [&](uint64_t insn, InjectMode mode) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kCalls; ++i) {
      if (t.syscall(insn, mode, SYS_getpid) != kid.pid) ADD_FAILURE() << "wrong getpid";
    }
    auto dt = std::chrono::steady_clock::now() - t0;
    return std::chrono::duration<double, std::micro>(dt).count() / kCalls;
  };
  struct Setup {
    const char* name;
    int mine, theirs;
  };
  std::vector<Setup> setups;
  if (!cpus.empty()) setups.push_back({"same CPU", cpus[0], cpus[0]});
  if (cpus.size() > 1) setups.push_back({"across CPUs", cpus[0], cpus[1]});
  for (const auto& s : setups) {
    ASSERT_TRUE(pin(0, s.mine));
    ASSERT_TRUE(pin(kid.pid, s.theirs));
    measure(vdso, InjectMode::kSingleStep);  // warm up
    double step = measure(vdso, InjectMode::kSingleStep);
    double trap = measure(page, InjectMode::kTrapAfter);
    std::printf("[ timing ] injected getpid, %s: kSingleStep %.1f us, kTrapAfter %.1f us\n", s.name,
                step, trap);
  }
  ASSERT_EQ(::sched_setaffinity(0, sizeof saved, &saved), 0);
  EXPECT_EQ(t.syscall(page, InjectMode::kSingleStep, SYS_munmap, page, 4096), 0);
}

}  // namespace
}  // namespace lazycr
