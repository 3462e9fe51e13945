// Kernel feature probes (CRIU's kerndat): every answer comes from asking the kernel, never from
// its version number. Probes that could disturb this process (soft-dirty clearing, vdso
// remapping, ptrace) run in throwaway forked children that only make raw system calls, so they
// are safe in a multi-threaded caller. Probe failures are answers ("missing", with the errno in
// `notes`), never exceptions.
//
// This file calls ptrace(2) directly although common/ptrace.h is meant to be the only user: a
// probe must see the raw errno of each request, and must not depend on the code it vets.
#include <cpuid.h>
#include <elf.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/kcmp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/error.h"
#include "common/fd.h"
#include "common/kernel_features.h"
#include "common/linux_abi.h"
#include "common/netns.h"
#include "common/signals.h"

namespace lazycr {
namespace {

constexpr size_t kPage = 4096;

std::string hex(uint64_t v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

// "EEXIST" (the name, which is what people grep for in kernel sources and man pages).
std::string errno_name(int err) {
  const char* name = strerrorname_np(err);
  return name ? std::string(name) : cat("errno ", err);
}

std::string err_text(int err) {
  return cat(errno_name(err), " (", std::strerror(err), ")");
}

// Exits a forked probe child without running atexit handlers or flushing parent buffers.
[[noreturn]] void child_exit(int code) {
  ::syscall(SYS_exit_group, code);
  __builtin_unreachable();
}

// fork() for a probe child that must die with lazycr: killed lazycr (SIGKILL, Ctrl-C) would
// otherwise leave it behind, stopped forever by its own SIGSTOP or blocked, holding lazycr's
// descriptors (the image's page store, the caller's stdout and stderr: a `$(lazycr ...)`
// caller would wait forever). The death signal is the forking thread's: every probe reaps its
// child before it returns.
pid_t probe_fork() {
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (::syscall(SYS_getppid) != parent) child_exit(1);  // lazycr died before the prctl
  return 0;
}

// Tests only (LAZYCR_FAULT_INJECT=kill-during-probe): lazycr dies at the worst moment of the
// probes, while a probe child is stopped.
void fault_point(const char* name) {
  const char* want = ::getenv("LAZYCR_FAULT_INJECT");
  if (want != nullptr && std::strcmp(want, name) == 0) ::syscall(SYS_kill, ::getpid(), SIGKILL);
}

// Reaps a child we forked; pid > 0 only. Returns the wait status, or -1 if it cannot be reaped.
int reap(pid_t pid) {
  if (pid <= 0) return -1;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, __WALL);
    if (r == pid && (WIFEXITED(status) || WIFSIGNALED(status))) return status;
    if (r < 0 && errno != EINTR) return -1;
  }
}

void kill_and_reap(pid_t pid) {
  if (pid <= 0) return;
  send_signal(pid, SIGKILL);
  reap(pid);
}

long raw_ptrace(long request, pid_t pid, uint64_t addr, uint64_t data) {
  return ::syscall(SYS_ptrace, request, pid, addr, data);
}

// A forked child blocked in read(2) on a pipe until it is killed (or until we die: it holds no
// write end, so it reads EOF then and exits). `fd_in_child` is an fd number open in the child,
// for pidfd_getfd.
class WaitingChild {
 public:
  WaitingChild() {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) {
      error_ = errno;
      return;
    }
    UniqueFd read_end(p[0]);
    write_end_.reset(p[1]);
    pid_ = probe_fork();
    if (pid_ < 0) {
      error_ = errno;
      return;
    }
    if (pid_ == 0) {
      ::syscall(SYS_close, p[1]);
      char c;
      while (::syscall(SYS_read, p[0], &c, 1) < 0 && errno == EINTR) {
      }
      child_exit(0);
    }
    fd_in_child_ = p[0];
  }
  ~WaitingChild() { kill_and_reap(pid_); }
  WaitingChild(const WaitingChild&) = delete;
  WaitingChild& operator=(const WaitingChild&) = delete;

  pid_t pid() const { return pid_; }
  int error() const { return error_; }
  int fd_in_child() const { return fd_in_child_; }

 private:
  pid_t pid_ = -1;
  int error_ = 0;
  int fd_in_child_ = -1;
  UniqueFd write_end_;
};

// --- userfaultfd -----------------------------------------------------------------------------

// UFFDIO_API with features = 0 succeeds on any uffd kernel and reports every feature offered.
bool uffd_api(int fd, uint64_t& features, uint64_t& ioctls, std::string& note) {
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) {
    note = cat("UFFDIO_API: ", err_text(errno));
    return false;
  }
  features = api.features;
  ioctls = api.ioctls;
  return true;
}

void probe_userfaultfd(KernelFeatures& f) {
  // Never UFFD_USER_MODE_ONLY: with it, kernel-mode accesses to lazy pages (write(2) from a
  // lazy buffer) fail with EFAULT instead of faulting in.
  UniqueFd fd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  if (!fd) {
    int err = errno;
    f.notes["userfaultfd.syscall"] = cat("userfaultfd(2): ", err_text(err));
  } else {
    std::string note;
    if (uffd_api(fd.get(), f.uffd_features, f.uffd_ioctls, note)) {
      f.userfaultfd_syscall = true;
      f.notes["userfaultfd.syscall"] =
          cat("features ", hex(f.uffd_features), ", ioctls ", hex(f.uffd_ioctls));
    } else {
      f.notes["userfaultfd.syscall"] = note;
    }
  }

  UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (!dev) {
    f.notes["userfaultfd.dev"] = cat("open /dev/userfaultfd: ", err_text(errno));
    return;
  }
  UniqueFd ufd(::ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK));
  if (!ufd) {
    f.notes["userfaultfd.dev"] = cat("USERFAULTFD_IOC_NEW: ", err_text(errno));
    return;
  }
  uint64_t features = 0, ioctls = 0;
  std::string note;
  if (!uffd_api(ufd.get(), features, ioctls, note)) {
    f.notes["userfaultfd.dev"] = note;
    return;
  }
  f.dev_userfaultfd = true;
  f.notes["userfaultfd.dev"] = cat("USERFAULTFD_IOC_NEW works, features ", hex(features));
  if (!f.userfaultfd_syscall) {
    f.uffd_features = features;
    f.uffd_ioctls = ioctls;
  }
}

void probe_unprivileged_sysctl(KernelFeatures& f) {
  std::ifstream in("/proc/sys/vm/unprivileged_userfaultfd");
  int value = -1;
  if (in >> value) f.unprivileged_userfaultfd = value;

  __user_cap_header_struct header{};
  header.version = _LINUX_CAPABILITY_VERSION_3;
  header.pid = 0;
  __user_cap_data_struct data[2]{};
  if (::syscall(SYS_capget, &header, data) == 0) {
    f.cap_sys_ptrace =
        (data[CAP_TO_INDEX(CAP_SYS_PTRACE)].effective & CAP_TO_MASK(CAP_SYS_PTRACE)) != 0;
  }
}

// --- ptrace, pidfd ---------------------------------------------------------------------------

// pidfd_getfd on another process, as the restorer does to pull a uffd out of a target.
void probe_pidfd_getfd(KernelFeatures& f, const WaitingChild& child) {
  const pid_t pid = child.pid();
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) {
    f.notes["pidfd.getfd"] = cat("pidfd_open(child ", pid, "): ", err_text(errno));
    return;
  }
  UniqueFd pulled(
      static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), child.fd_in_child(), 0)));
  if (pulled) {
    f.pidfd_getfd = true;
    f.notes["pidfd.getfd"] = cat("pulled fd ", child.fd_in_child(), " out of a child");
  } else {
    f.notes["pidfd.getfd"] =
        cat("pidfd_getfd(child ", pid, ", fd ", child.fd_in_child(), "): ", err_text(errno));
  }
}

void probe_ptrace_and_pidfd(KernelFeatures& f) {
  {
    UniqueFd self(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
    if (self) {
      f.pidfd_open = true;
      f.notes["pidfd.open"] = "pidfd_open(getpid()) gives a pidfd";
    } else {
      f.notes["pidfd.open"] = cat("pidfd_open(getpid()): ", err_text(errno));
    }
  }

  WaitingChild child;
  if (child.pid() < 0) {
    std::string why = cat("cannot start a probe child: ", err_text(child.error()));
    f.notes["ptrace.seize"] = why;
    f.notes["ptrace.rseq_config"] = why;
    f.notes["ptrace.suspend_seccomp"] = why;
    f.notes["ptrace.seccomp_filter"] = why;
    f.notes["pidfd.getfd"] = why;
    return;
  }
  const pid_t pid = child.pid();

  probe_pidfd_getfd(f, child);

  if (raw_ptrace(PTRACE_SEIZE, pid, 0, 0) != 0) {
    f.notes["ptrace.seize"] = cat("PTRACE_SEIZE child ", pid, ": ", err_text(errno));
    f.notes["ptrace.rseq_config"] = "not probed: PTRACE_SEIZE failed";
    return;
  }
  if (raw_ptrace(PTRACE_INTERRUPT, pid, 0, 0) != 0) {
    f.notes["ptrace.seize"] = cat("PTRACE_INTERRUPT child ", pid, ": ", err_text(errno));
    return;
  }
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid, &status, __WALL);
  } while (r < 0 && errno == EINTR);
  if (r != pid || !WIFSTOPPED(status)) {
    f.notes["ptrace.seize"] =
        cat("child ", pid, " did not stop after PTRACE_INTERRUPT (wait status ", hex(status), ")");
    return;
  }
  f.ptrace_seize = true;
  f.notes["ptrace.seize"] = "seized a child, PTRACE_INTERRUPT stopped it";

  abi::ptrace_rseq_configuration conf{};
  long n = raw_ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, sizeof(conf),
                      reinterpret_cast<uint64_t>(&conf));
  if (n > 0) {
    f.ptrace_get_rseq = true;
    f.notes["ptrace.rseq_config"] =
        conf.rseq_abi_pointer ? cat(n, " bytes; child's rseq at ", hex(conf.rseq_abi_pointer),
                                    ", size ", conf.rseq_abi_size)
                              : cat(n, " bytes; the child has no rseq registered");
  } else {
    f.notes["ptrace.rseq_config"] = cat("PTRACE_GET_RSEQ_CONFIGURATION: ", err_text(errno));
  }

  // Seccomp filters of a tracee: the child has none, so a kernel that knows the requests says
  // EINVAL (not in filter mode); EIO means it does not know them.
  if (raw_ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_SUSPEND_SECCOMP) == 0) {
    f.ptrace_suspend_seccomp = true;
    f.notes["ptrace.suspend_seccomp"] = "PTRACE_SETOPTIONS accepted PTRACE_O_SUSPEND_SECCOMP";
  } else {
    f.notes["ptrace.suspend_seccomp"] =
        cat("PTRACE_O_SUSPEND_SECCOMP: ", err_text(errno),
            " (needs CAP_SYS_ADMIN and lazycr itself without seccomp)");
  }
  {
    long g = raw_ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, 0);
    int gerr = errno;
    abi::seccomp_metadata md{0, 0};
    long m =
        raw_ptrace(PTRACE_GET_SECCOMP_METADATA, pid, sizeof md, reinterpret_cast<uint64_t>(&md));
    int merr = errno;
    f.ptrace_seccomp_filter = (g >= 0 || gerr == EINVAL || gerr == ENOENT) &&
                              (m >= 0 || merr == EINVAL || merr == ENOENT);
    f.notes["ptrace.seccomp_filter"] =
        cat("PTRACE_SECCOMP_GET_FILTER: ", g >= 0 ? std::string("ok") : err_text(gerr),
            ", PTRACE_GET_SECCOMP_METADATA: ", m >= 0 ? std::string("ok") : err_text(merr),
            " (EINVAL: known, the probe child has no filter)");
  }

  // The real NT_X86_XSTATE size, as dump and restore will see it.
  std::vector<uint8_t> xstate(64 * 1024);
  iovec iov{xstate.data(), xstate.size()};
  if (raw_ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, reinterpret_cast<uint64_t>(&iov)) == 0) {
    f.xstate_regset_size = static_cast<uint32_t>(iov.iov_len);
  }
  // ~WaitingChild kills (through send_signal) and reaps it.
}

// --- clone3 set_tid ----------------------------------------------------------------------------

// clone3 with set_tid = our own pid. Our pid is in use, so a kernel that honours set_tid and
// lets us use it answers EEXIST from alloc_pid, after it has parsed the field, checked its
// bounds and our CAP_CHECKPOINT_RESTORE. Other answers: ENOSYS (no clone3), E2BIG (clone3 that
// predates set_tid: our 88-byte struct has unknown non-zero fields), EPERM (known, not allowed),
// EINVAL (set_tid rejected). Nothing is created unless the kernel misbehaves; if a child does
// appear, it exits at once and is reaped.
void probe_clone3_set_tid(KernelFeatures& f) {
  pid_t want = ::getpid();
  abi::clone_args args{};
  args.exit_signal = SIGCHLD;
  args.set_tid = reinterpret_cast<uint64_t>(&want);
  args.set_tid_size = 1;
  long r = ::syscall(SYS_clone3, &args, abi::kCloneArgsSizeVer2);
  if (r == 0) child_exit(0);
  if (r > 0) {
    reap(static_cast<pid_t>(r));
    f.notes["clone3.set_tid"] =
        cat("clone3 created pid ", r, " although pid ", want, " is in use: set_tid ignored?");
    return;
  }
  int err = errno;
  if (err == EEXIST) {
    f.clone3_set_tid = true;
    f.notes["clone3.set_tid"] =
        cat("EEXIST for set_tid = own pid ", want, " (the exact pid was tried)");
    return;
  }
  const char* meaning = err == ENOSYS  ? "no clone3"
                        : err == E2BIG ? "clone3 without set_tid"
                        : err == EPERM ? "set_tid needs CAP_CHECKPOINT_RESTORE"
                                       : "set_tid rejected";
  f.notes["clone3.set_tid"] = cat(err_text(err), ": ", meaning);
}

// --- prctl(PR_SET_MM_MAP) ---------------------------------------------------------------------

void probe_pr_set_mm_map(KernelFeatures& f) {
  unsigned int size = 0;
  if (::prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, &size, 0, 0) == 0 && size > 0) {
    f.pr_set_mm_map = true;
    f.mm_map_size = size;
    f.notes["prctl.set_mm_map"] =
        cat("PR_SET_MM_MAP_SIZE: struct prctl_mm_map is ", size, " bytes");
  } else {
    f.notes["prctl.set_mm_map"] =
        cat("PR_SET_MM_MAP_SIZE: ", err_text(errno), " (CONFIG_CHECKPOINT_RESTORE off?)");
  }
}

// --- arch_prctl(ARCH_MAP_VDSO_64) --------------------------------------------------------------

struct Range {
  uint64_t start, end;
};

// The vdso and its data pages ([vdso], [vvar], [vvar_vclock]) of this process.
std::vector<Range> vdso_ranges(const std::string& maps_path) {
  std::vector<Range> out;
  std::ifstream in(maps_path);
  std::string line;
  while (std::getline(in, line)) {
    auto bracket = line.rfind('[');
    if (bracket == std::string::npos) continue;
    std::string name = line.substr(bracket);
    if (name != "[vdso]" && name != "[vvar]" && name != "[vvar_vclock]") continue;
    Range r{};
    char dash;
    std::istringstream fields(line);
    fields >> std::hex >> r.start >> dash >> r.end;
    if (fields && dash == '-' && r.end > r.start) out.push_back(r);
  }
  return out;
}

// The kernel answers an unknown arch_prctl code with EINVAL. A known ARCH_MAP_VDSO_64 first
// checks that no vdso (or vvar) is mapped and answers EEXIST if one is, with no side effect;
// else it maps one (the address is a hint) and returns the vdso image size. So in a child:
// (1) with our vdso in place, expect EEXIST (or a size if we had none); (2) unmap the vdso and
// its data pages, ask again at their old address and expect a size, as the restore path does
// (DESIGN.md section 5 step 5). The child then stops so that we can read where it landed.
void probe_arch_map_vdso(KernelFeatures& f) {
  std::vector<Range> ranges = vdso_ranges("/proc/self/maps");
  uint64_t hint = 0;
  for (const auto& r : ranges) hint = hint == 0 || r.start < hint ? r.start : hint;

  struct Result {
    long first_ret, first_errno, second_ret, second_errno;
  };
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    f.notes["arch_prctl.map_vdso"] = cat("pipe: ", err_text(errno));
    return;
  }
  UniqueFd rd(p[0]), wr(p[1]);
  pid_t pid = probe_fork();
  if (pid < 0) {
    f.notes["arch_prctl.map_vdso"] = cat("fork: ", err_text(errno));
    return;
  }
  if (pid == 0) {
    Result res{-1, 0, -1, 0};
    // Success is any non-negative answer: the kernel returns the vdso image size, not 0.
    res.first_ret = ::syscall(SYS_arch_prctl, ARCH_MAP_VDSO_64, hint);
    res.first_errno = res.first_ret >= 0 ? 0 : errno;
    if (res.first_ret < 0 && res.first_errno == EEXIST) {
      for (const auto& r : ranges) ::syscall(SYS_munmap, r.start, r.end - r.start);
      res.second_ret = ::syscall(SYS_arch_prctl, ARCH_MAP_VDSO_64, hint);
      res.second_errno = res.second_ret >= 0 ? 0 : errno;
    }
    ::syscall(SYS_write, p[1], &res, sizeof(res));
    ::syscall(SYS_kill, ::syscall(SYS_getpid), SIGSTOP);
    child_exit(0);
  }
  wr.reset();
  Result res{};
  ssize_t n;
  do {
    n = ::read(rd.get(), &res, sizeof(res));
  } while (n < 0 && errno == EINTR);
  std::string where;
  bool reaped = false;
  if (n == sizeof(res) && res.second_ret >= 0) {
    int status = 0;
    pid_t r;
    do {
      r = ::waitpid(pid, &status, WUNTRACED);
    } while (r < 0 && errno == EINTR);
    if (r == pid && WIFSTOPPED(status)) {
      fault_point("kill-during-probe");
      for (const auto& range : vdso_ranges(cat("/proc/", pid, "/maps"))) {
        if (range.start == hint) where = cat("at ", hex(hint));
      }
    } else if (r == pid) {
      reaped = true;  // it died: never signal a pid we have already reaped
    }
  }
  if (!reaped) kill_and_reap(pid);

  std::string& note = f.notes["arch_prctl.map_vdso"];
  if (n != sizeof(res)) {
    note = "probe child died before answering";
  } else if (res.first_ret >= 0) {
    f.arch_map_vdso = true;
    note = "known: mapped a vdso in a child that had none";
  } else if (res.first_errno == EINVAL) {
    note = "EINVAL: unknown code (CONFIG_CHECKPOINT_RESTORE off?)";
  } else if (res.first_errno != EEXIST) {
    note = cat("unexpected answer ", err_text(static_cast<int>(res.first_errno)));
  } else if (res.second_ret >= 0) {
    f.arch_map_vdso = true;
    note = cat("EEXIST while mapped; after munmap, maps one ", where.empty() ? "elsewhere" : where,
               ", returns ", res.second_ret);
  } else {
    note = cat("known (EEXIST) but mapping a new vdso failed: ",
               err_text(static_cast<int>(res.second_errno)));
  }
}

// --- pagemap ---------------------------------------------------------------------------------

void probe_pagemap_scan(KernelFeatures& f) {
  constexpr size_t kPages = 16;
  void* mem =
      ::mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    f.notes["pagemap.scan"] = cat("mmap: ", err_text(errno));
    return;
  }
  auto* base = static_cast<char*>(mem);
  ::madvise(mem, kPages * kPage, MADV_NOHUGEPAGE);  // no multi-size THP filling the area
  for (size_t i : {0, 1, 2, 5}) base[i * kPage] = 1;
  const uint64_t start = reinterpret_cast<uint64_t>(base);

  UniqueFd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!fd) {
    f.notes["pagemap.scan"] = cat("open /proc/self/pagemap: ", err_text(errno));
  } else {
    abi::page_region regions[kPages]{};
    abi::pm_scan_arg arg{};
    arg.size = sizeof(arg);
    arg.start = start;
    arg.end = start + kPages * kPage;
    arg.vec = reinterpret_cast<uint64_t>(regions);
    arg.vec_len = kPages;
    arg.category_mask = PAGE_IS_PRESENT;
    arg.return_mask = PAGE_IS_PRESENT;
    int n = ::ioctl(fd.get(), PAGEMAP_SCAN, &arg);
    if (n < 0) {
      f.notes["pagemap.scan"] = cat("PAGEMAP_SCAN: ", err_text(errno));
    } else if (n == 2 && regions[0].start == start && regions[0].end == start + 3 * kPage &&
               regions[1].start == start + 5 * kPage && regions[1].end == start + 6 * kPage) {
      f.pagemap_scan = true;
      f.notes["pagemap.scan"] = "found exactly the 2 present runs of a test area";
    } else {
      f.notes["pagemap.scan"] =
          cat("PAGEMAP_SCAN answered ", n, " regions, not the 2 present runs of a test area");
    }
  }
  ::munmap(mem, kPages * kPage);
}

// In a child (clearing soft-dirty bits is process-wide): map and write a page, write "4" to
// /proc/self/clear_refs, expect bit 55 clear, write the page again, expect bit 55 set. Without
// CONFIG_MEM_SOFT_DIRTY the kernel accepts the "4" but the bit is never set.
// --- memfd ------------------------------------------------------------------------------------

// Ghost files (restore/ghost_files.h): a memfd comes back by memfd_create with its seals.
void probe_memfd_seals(KernelFeatures& f) {
  UniqueFd fd(::memfd_create("lazycr-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) {
    f.notes["memfd.seals"] = cat("memfd_create: ", err_text(errno));
    return;
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0) {
    f.notes["memfd.seals"] = cat("F_ADD_SEALS: ", err_text(errno));
    return;
  }
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  f.memfd_seals = seals == (F_SEAL_GROW | F_SEAL_SHRINK);
  if (!f.memfd_seals) f.notes["memfd.seals"] = cat("F_GET_SEALS answered ", seals);
}

// IPv4/IPv6 sockets (objects/inet_socket.h).
void probe_inet(KernelFeatures& f) {
  UniqueFd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  int zero = 0;
  f.udp_peek_off = udp && ::setsockopt(udp.get(), SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof zero) == 0;
  if (!f.udp_peek_off) f.notes["socket.udp_peek_off"] = cat("unsupported: ", err_text(errno));
  UniqueFd r4(::socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW));
  int e4 = errno;
  UniqueFd r6(::socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW));
  int e6 = errno;
  f.raw_hdrincl = r4 && r6;
  if (!f.raw_hdrincl)
    f.notes["socket.raw_hdrincl"] =
        cat(r4 ? "" : cat("IPv4: ", err_text(e4), " "), r6 ? "" : cat("IPv6: ", err_text(e6)));
  // Established TCP connections (objects/tcp_connection.h): repair mode on a fresh socket.
  UniqueFd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int on = TCP_REPAIR_ON;
  f.tcp_repair = tcp && ::setsockopt(tcp.get(), IPPROTO_TCP, TCP_REPAIR, &on, sizeof on) == 0;
  if (!f.tcp_repair) f.notes["socket.tcp_repair"] = cat("TCP_REPAIR: ", err_text(errno));
  try {
    UniqueFd ns = make_network_namespace();
    f.netns = true;
  } catch (const Error& e) {
    f.notes["netns.new"] = e.what();
  }
}

void probe_soft_dirty(KernelFeatures& f) {
  pid_t pid = probe_fork();
  if (pid < 0) {
    f.notes["pagemap.soft_dirty"] = cat("unknown: fork: ", err_text(errno));
    return;
  }
  if (pid == 0) {
    long addr =
        ::syscall(SYS_mmap, 0, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (addr == -1) child_exit(10);
    volatile char* page = reinterpret_cast<volatile char*>(addr);
    page[0] = 1;
    long clear = ::syscall(SYS_openat, AT_FDCWD, "/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (clear < 0) child_exit(11);
    if (::syscall(SYS_write, clear, "4", 1) != 1) child_exit(12);
    long pm = ::syscall(SYS_openat, AT_FDCWD, "/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) child_exit(13);
    uint64_t entry = 0;
    const long off = addr / static_cast<long>(kPage) * 8;
    if (::syscall(SYS_pread64, pm, &entry, 8, off) != 8) child_exit(13);
    const bool after_clear = entry & abi::kPmSoftDirty;
    page[0] = 2;
    if (::syscall(SYS_pread64, pm, &entry, 8, off) != 8) child_exit(13);
    const bool after_write = entry & abi::kPmSoftDirty;
    if (!after_write) child_exit(1);
    child_exit(after_clear ? 2 : 0);
  }
  int status = reap(pid);
  int code = status >= 0 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::string& note = f.notes["pagemap.soft_dirty"];
  switch (code) {
    case 0:
      f.soft_dirty = true;
      note = "bit 55 cleared by clear_refs 4 and set again by a write";
      break;
    case 1:
      note = "bit 55 never set after a write (CONFIG_MEM_SOFT_DIRTY off)";
      break;
    case 2:
      note = "bit 55 not cleared by clear_refs 4";
      break;
    default:
      note = cat("unknown: probe child failed (", code < 0 ? "killed" : cat("code ", code), ")");
  }
}

// --- POSIX timer ids ----------------------------------------------------------------------

// PR_TIMER_CREATE_RESTORE_IDS's GET asks without changing anything: 0 or 1 where the kernel
// knows the prctl, EINVAL where it does not.
void probe_timer_restore_ids(KernelFeatures& f) {
  constexpr int kPrTimerCreateRestoreIds = 77, kGet = 2;
  int r = ::prctl(kPrTimerCreateRestoreIds, kGet, 0, 0, 0);
  f.timer_restore_ids = r >= 0;
  f.notes["prctl.timer_create_restore_ids"] =
      r >= 0 ? std::string("PR_TIMER_CREATE_RESTORE_IDS known")
             : cat("PR_TIMER_CREATE_RESTORE_IDS: ", err_text(errno),
                   " (before Linux 6.16: timers get their ids back by creating throw-away ones)");
}

// kcmp(KCMP_EPOLL_TFD) on a pipe registered in an epoll of our own: the dump's check that a
// registration's target number still holds the registered file (CONFIG_KCMP).
void probe_kcmp_epoll(KernelFeatures& f) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    f.notes["kcmp.epoll_tfd"] = cat("pipe2: ", err_text(errno));
    return;
  }
  UniqueFd r(p[0]), w(p[1]);
  UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  epoll_event ev{};
  ev.events = EPOLLIN;
  if (!ep || ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, r.get(), &ev) != 0) {
    f.notes["kcmp.epoll_tfd"] = cat("epoll: ", err_text(errno));
    return;
  }
  kcmp_epoll_slot slot{static_cast<uint32_t>(ep.get()), static_cast<uint32_t>(r.get()), 0};
  const pid_t me = ::getpid();
  long same = ::syscall(SYS_kcmp, me, me, KCMP_EPOLL_TFD, r.get(), &slot);
  if (same < 0) {
    f.notes["kcmp.epoll_tfd"] = cat("kcmp(KCMP_EPOLL_TFD): ", err_text(errno));
    return;
  }
  long other = ::syscall(SYS_kcmp, me, me, KCMP_EPOLL_TFD, w.get(), &slot);
  f.kcmp_epoll_tfd = same == 0 && other > 0;
  if (!f.kcmp_epoll_tfd)
    f.notes["kcmp.epoll_tfd"] = cat("kcmp(KCMP_EPOLL_TFD) answered ", same, " and ", other);
}

// --- CPU -------------------------------------------------------------------------------------

// --- descriptor kinds (objects/fd_kinds.h) ------------------------------------------------

void probe_timerfd_set_ticks(KernelFeatures& f) {
  UniqueFd t(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!t) {
    f.notes["timerfd.set_ticks"] = cat("timerfd_create: ", err_text(errno));
    return;
  }
  uint64_t ticks = 1;
  if (::ioctl(t.get(), TFD_IOC_SET_TICKS, &ticks) == 0) {
    f.timerfd_set_ticks = true;
    f.notes["timerfd.set_ticks"] = "TFD_IOC_SET_TICKS sets the ticks of a new timerfd";
  } else {
    f.notes["timerfd.set_ticks"] = cat("TFD_IOC_SET_TICKS: ", err_text(errno),
                                       errno == ENOTTY ? " (no CONFIG_CHECKPOINT_RESTORE)" : "");
  }
}

void probe_kcmp(KernelFeatures& f) {
  UniqueFd a(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!a) return;
  UniqueFd b(::fcntl(a.get(), F_DUPFD_CLOEXEC, 0));
  const pid_t me = ::getpid();
  long r = ::syscall(SYS_kcmp, me, me, KCMP_FILE, a.get(), b.get());
  f.kcmp_file = r == 0;
  f.notes["kcmp.file"] = r == 0
                             ? "kcmp(KCMP_FILE) tells a dup from its original"
                             : cat("kcmp(KCMP_FILE): ", r < 0 ? err_text(errno) : cat("gave ", r));
}

// A pty pair made here, and one byte put into its master's input with TIOCSTI: the way the
// dump puts back the unread data it had to read, and the restore fills a new pair's queues.
void probe_pty_tiocsti(KernelFeatures& f) {
  int m = ::open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
  if (m < 0) {
    f.notes["pty.tiocsti"] = cat("open /dev/ptmx: ", err_text(errno));
    return;
  }
  int zero = 0;
  int s = ::ioctl(m, TIOCSPTLCK, &zero) == 0 ? ::ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY) : -1;
  if (s < 0) {
    f.notes["pty.tiocsti"] = cat("unlockpt/TIOCGPTPEER: ", err_text(errno));
  } else {
    char c = 'x';
    int n = 0;
    if (::ioctl(m, TIOCSTI, &c) != 0)
      f.notes["pty.tiocsti"] = cat("TIOCSTI: ", err_text(errno));
    else
      f.pty_tiocsti = ::ioctl(m, FIONREAD, &n) == 0 && n == 1;
    ::close(s);
  }
  ::close(m);
}

void probe_sysv_shm(KernelFeatures& f) {
  f.sysv_shm_next_id = ::access("/proc/sysvipc/shm", R_OK) == 0 &&
                       ::access("/proc/sys/kernel/shm_next_id", W_OK) == 0;
}

void probe_xsave(KernelFeatures& f) {
  CpuXsave x = cpu_xsave();
  f.xsave_size = x.size;
  f.xsave_features = x.features;
}

KernelFeatures probe_all() {
  KernelFeatures f;
  utsname u{};
  if (::uname(&u) == 0) f.release = u.release;
  probe_userfaultfd(f);
  probe_unprivileged_sysctl(f);
  probe_ptrace_and_pidfd(f);
  probe_clone3_set_tid(f);
  probe_pr_set_mm_map(f);
  probe_arch_map_vdso(f);
  probe_pagemap_scan(f);
  probe_soft_dirty(f);
  probe_inet(f);
  probe_timerfd_set_ticks(f);
  probe_kcmp(f);
  probe_memfd_seals(f);
  probe_timer_restore_ids(f);
  probe_pty_tiocsti(f);
  probe_sysv_shm(f);
  probe_xsave(f);
  probe_kcmp_epoll(f);
  return f;
}

// pidfd_getfd out of lazycr itself: whether the kernel has the call and lets lazycr make it
// (seccomp, LSM). The permission it needs over another process (PTRACE_MODE_ATTACH) is the
// one the restore proves anyway by seizing each process before it pulls a uffd out. A probe
// child would cost a fork and a reap: 1-10 ms of every lazy restore on a loaded 2-core guest.
void probe_pidfd_getfd_on_self(KernelFeatures& f) {
  UniqueFd self(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  if (!self) {
    f.notes["pidfd.getfd"] = cat("pidfd_open(getpid()): ", err_text(errno));
    return;
  }
  UniqueFd pulled(static_cast<int>(::syscall(SYS_pidfd_getfd, self.get(), self.get(), 0)));
  if (pulled) {
    f.pidfd_getfd = true;
    f.notes["pidfd.getfd"] = "pulled a pidfd out of lazycr itself";
  } else {
    f.notes["pidfd.getfd"] = cat("pidfd_getfd(self, fd ", self.get(), "): ", err_text(errno));
  }
}

KernelFeatures probe_lazy() {
  KernelFeatures f;
  probe_userfaultfd(f);
  probe_unprivileged_sysctl(f);
  probe_pagemap_scan(f);
  fault_point("kill-during-probe");  // tests: lazycr dies in the middle of its probes
  probe_pidfd_getfd_on_self(f);
  return f;
}

}  // namespace

const KernelFeatures& kernel_features() {
  static const KernelFeatures features = probe_all();
  return features;
}

const KernelFeatures& lazy_restore_features() {
  static const KernelFeatures features = probe_lazy();
  return features;
}

CpuXsave cpu_xsave() {
  CpuXsave x;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return x;
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  x.features = (static_cast<uint64_t>(hi) << 32) | lo;
  // Leaf 0xD sub-leaf 0: EBX is the XSAVE area size for the features enabled in XCR0.
  if (__get_cpuid_count(0xD, 0, &eax, &ebx, &ecx, &edx)) x.size = ebx;
  return x;
}

bool clone3_knows_set_tid() {
  static const bool knows = [] {
    pid_t want = ::getpid();
    abi::clone_args args{};
    args.exit_signal = SIGCHLD;
    args.set_tid = reinterpret_cast<uint64_t>(&want);
    args.set_tid_size = 0;
    // A kernel with set_tid refuses a set_tid array of size 0 while it copies the arguments,
    // before any task is created (EINVAL); one with clone3 but no set_tid refuses the
    // non-zero bytes past its clone_args (E2BIG); one without clone3 says ENOSYS.
    long r = ::syscall(SYS_clone3, &args, abi::kCloneArgsSizeVer2);
    if (r == 0) child_exit(0);
    if (r > 0) {
      reap(static_cast<pid_t>(r));
      return false;
    }
    return errno == EINVAL;
  }();
  return knows;
}

std::vector<FeatureReport> describe_features(const KernelFeatures& f) {
  std::vector<FeatureReport> out;
  auto add = [&](const std::string& name, bool ok, bool required, const std::string& fallback,
                 const std::string& why) {
    auto it = f.notes.find(name);
    std::string detail = it != f.notes.end() ? it->second : ok ? "present" : fallback;
    out.push_back(FeatureReport{name, ok, required, detail, why});
  };
  const bool have_uffd = f.userfaultfd_syscall || f.dev_userfaultfd;

  // Either way of getting a uffd will do: the one that works is the required one.
  add("userfaultfd.syscall", f.userfaultfd_syscall, f.userfaultfd_syscall || !have_uffd,
      "not probed",
      "Lazy restore injects userfaultfd(2) into each restored process (or else uses "
      "/dev/userfaultfd).");
  add("userfaultfd.dev", f.dev_userfaultfd, !f.userfaultfd_syscall, "not probed",
      "/dev/userfaultfd is the fallback way to get a uffd when the syscall is refused.");
  {
    bool ok = f.unprivileged_userfaultfd == 1 || f.cap_sys_ptrace;
    std::string detail =
        f.unprivileged_userfaultfd < 0
            ? "unreadable"
            : cat(f.unprivileged_userfaultfd,
                  f.unprivileged_userfaultfd == 1 ? ""
                  : f.cap_sys_ptrace ? " (we have CAP_SYS_PTRACE, so it does not matter)"
                                     : " (and we lack CAP_SYS_PTRACE)");
    out.push_back(FeatureReport{
        "sysctl.unprivileged_userfaultfd", ok, false, detail,
        "At 0, userfaultfd(2) without UFFD_USER_MODE_ONLY needs CAP_SYS_PTRACE in the caller."});
  }

  struct UffdFeature {
    const char* name;
    uint64_t bit;
    bool required;
    const char* why;
  };
  const UffdFeature uffd_features[] = {
      {"uffd.feature.event_fork", UFFD_FEATURE_EVENT_FORK, true,
       "A restored process that forks while pages are owed must hand them to the child's uffd."},
      {"uffd.feature.event_remap", UFFD_FEATURE_EVENT_REMAP, true,
       "mremap of a lazy area must move its owed pages to the new address."},
      {"uffd.feature.event_remove", UFFD_FEATURE_EVENT_REMOVE, true,
       "After MADV_DONTNEED the program expects zeros, so owed old content must be dropped."},
      {"uffd.feature.event_unmap", UFFD_FEATURE_EVENT_UNMAP, true,
       "munmap of a lazy area must drop its owed pages so nothing is copied into a reused range."},
      {"uffd.feature.missing_shmem", UFFD_FEATURE_MISSING_SHMEM, false,
       "Shared memory areas can be restored lazily only with it; else they are restored eagerly."},
      {"uffd.feature.missing_hugetlbfs", UFFD_FEATURE_MISSING_HUGETLBFS, false,
       "hugetlbfs areas can be restored lazily only with it; else they are restored eagerly."},
      {"uffd.feature.thread_id", UFFD_FEATURE_THREAD_ID, false,
       "Fault messages then name the faulting thread, for statistics and diagnostics."},
      {"uffd.feature.wp_async", UFFD_FEATURE_WP_ASYNC, false,
       "Asynchronous write-protect with PAGEMAP_SCAN tracks written pages for incremental dumps."},
      {"uffd.feature.wp_unpopulated", UFFD_FEATURE_WP_UNPOPULATED, false,
       "dump --track write-protects pages not yet populated too (and PAGEMAP_SCAN needs it)."},
      {"uffd.feature.move", UFFD_FEATURE_MOVE, false,
       "UFFDIO_MOVE could place pages without a copy; the page server does not need it."},
  };
  for (const auto& uf : uffd_features) {
    bool ok = have_uffd && (f.uffd_features & uf.bit);
    std::string detail = !have_uffd ? "no userfaultfd"
                         : ok       ? cat("offered (", hex(uf.bit), ")")
                                    : cat("not offered (features ", hex(f.uffd_features), ")");
    out.push_back(FeatureReport{uf.name, ok, uf.required, detail, uf.why});
  }

  add("ptrace.seize", f.ptrace_seize, true, "not probed",
      "Dump and restore drive every process from outside with PTRACE_SEIZE and PTRACE_INTERRUPT.");
  add("ptrace.rseq_config", f.ptrace_get_rseq, false, "not probed",
      "Dump reads each thread's rseq registration so that restore can re-register it.");
  add("ptrace.suspend_seccomp", f.ptrace_suspend_seccomp, false, "not probed",
      "Calls injected into a process with seccomp filters bypass them; without it such "
      "processes cannot be dumped or restored.");
  add("ptrace.seccomp_filter", f.ptrace_seccomp_filter, false, "not probed",
      "Dump reads each thread's seccomp filters and their flags (PTRACE_SECCOMP_GET_FILTER, "
      "PTRACE_GET_SECCOMP_METADATA) so that restore installs them again.");
  add("pidfd.open", f.pidfd_open, true, "not probed",
      "The page server watches each restored process's pidfd to learn that it exited.");
  add("pidfd.getfd", f.pidfd_getfd, true, "not probed",
      "The restorer pulls the uffd created inside each restored process out with pidfd_getfd.");
  add("clone3.set_tid", f.clone3_set_tid, true, "not probed",
      "Processes are recreated with their exact PIDs, which glibc caches in TLS.");
  add("prctl.set_mm_map", f.pr_set_mm_map, true, "not probed",
      "PR_SET_MM_MAP restores brk, stack, argument and environment bounds, auxv and exe link.");
  add("arch_prctl.map_vdso", f.arch_map_vdso, true, "not probed",
      "The vdso is mapped at its image address with ARCH_MAP_VDSO_64 when moving it fails.");
  add("kcmp.epoll_tfd", f.kcmp_epoll_tfd, false, "not probed",
      "Dump checks that each epoll registration's target fd still holds the registered file; "
      "without it processes with an epoll descriptor cannot be dumped.");
  add("kcmp.file", f.kcmp_file, false, "not probed",
      "Dump tells descriptors that share one open file description (dup, fork) with kcmp; "
      "without it no tree can be dumped.");
  add("timerfd.set_ticks", f.timerfd_set_ticks, false, "not probed",
      "A timerfd whose expirations were not read gets them back with TFD_IOC_SET_TICKS; "
      "without it the restore refuses such a timerfd by name.");
  add("pagemap.scan", f.pagemap_scan, false, "not probed",
      "PAGEMAP_SCAN finds present pages in one call; else dump reads pagemap entry by entry.");
  add("pty.tiocsti", f.pty_tiocsti, false, "not probed",
      "Pseudo-terminal pairs: their unread data is put back (dump) and into the new pair "
      "(restore) with TIOCSTI (CAP_SYS_ADMIN or dev.tty.legacy_tiocsti=1).");
  add("pagemap.soft_dirty", f.soft_dirty, false, "not probed",
      "Soft-dirty bits are one way to track pages written between incremental dumps.");
  add("memfd.seals", f.memfd_seals, false, "not probed",
      "A memfd held as a descriptor comes back by memfd_create with its name and seals (dump "
      "stores it as a ghost file); without it such images cannot be restored.");
  add("prctl.timer_create_restore_ids", f.timer_restore_ids, false, "not probed",
      "POSIX timers are recreated with their own ids in one call each; without it the restore "
      "creates and deletes throw-away timers and refuses an id it cannot reach.");
  add("socket.udp_peek_off", f.udp_peek_off, false, "not probed",
      "A UDP socket's queued datagrams are peeked at dump (SO_PEEK_OFF), never taken from it.");
  add("socket.raw_hdrincl", f.raw_hdrincl, false, "not probed",
      "Queued UDP datagrams are put back from their own source addresses by raw IP sockets.");
  add("socket.tcp_repair", f.tcp_repair, false, "not probed",
      "Established TCP connections are read and made again in repair mode (TCP_REPAIR: dump and "
      "restore --tcp-established); it needs CAP_NET_ADMIN in the socket's network namespace.");
  add("netns.new", f.netns, false, "not probed",
      "restore --netns makes a network namespace with loopback up for the sockets and the tree.");
  add("sysvipc.shm_next_id", f.sysv_shm_next_id, false, "not probed",
      "SysV shared memory segments are read from /proc/sysvipc/shm and recreated with their ids "
      "through kernel.shm_next_id; without it a tree that attaches one cannot be restored.");
  {
    std::string detail =
        f.xsave_size ? cat("CPUID 0xD: ", f.xsave_size, " bytes, XCR0 ", hex(f.xsave_features))
                     : std::string("no XSAVE");
    if (f.xstate_regset_size) detail += cat("; NT_X86_XSTATE ", f.xstate_regset_size, " bytes");
    out.push_back(FeatureReport{
        "cpu.xsave", f.xsave_size > 0, false, detail,
        "The xsave layout is recorded at dump and must match the CPU that restores it."});
  }
  return out;
}

}  // namespace lazycr
