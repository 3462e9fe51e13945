// Kernel features lazycr depends on, probed once per process (CRIU's kerndat). `lazycr check`
// and the code paths read the same answers.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lazycr {

struct KernelFeatures {
  std::string release;                // uname -r
  bool userfaultfd_syscall = false;   // userfaultfd(2) works for us
  bool dev_userfaultfd = false;       // /dev/userfaultfd + USERFAULTFD_IOC_NEW works
  uint64_t uffd_features = 0;         // UFFDIO_API features offered (0 if no uffd at all)
  uint64_t uffd_ioctls = 0;           // UFFDIO_API ioctls mask
  int unprivileged_userfaultfd = -1;  // vm.unprivileged_userfaultfd, -1 if unreadable
  bool ptrace_seize = false;
  bool ptrace_get_rseq = false;         // PTRACE_GET_RSEQ_CONFIGURATION
  bool ptrace_suspend_seccomp = false;  // PTRACE_O_SUSPEND_SECCOMP accepted (needs us unfiltered)
  bool ptrace_seccomp_filter = false;   // PTRACE_SECCOMP_GET_FILTER and _GET_SECCOMP_METADATA known
  bool pidfd_open = false;
  bool pidfd_getfd = false;
  bool clone3_set_tid = false;
  bool pr_set_mm_map = false;   // prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE) answers
  bool arch_map_vdso = false;   // ARCH_MAP_VDSO_64 known, and maps a vdso once the old is gone
  bool pagemap_scan = false;    // PAGEMAP_SCAN ioctl on /proc/self/pagemap
  bool soft_dirty = false;      // pagemap soft-dirty bit (CONFIG_MEM_SOFT_DIRTY)
  bool memfd_seals = false;     // memfd_create(MFD_ALLOW_SEALING) and F_ADD_SEALS work
  bool pty_tiocsti = false;     // TIOCSTI into a pty pair made here (pty pairs' unread data)
  bool kcmp_epoll_tfd = false;  // kcmp(KCMP_EPOLL_TFD): an epoll target is the file at an fd
  bool udp_peek_off = false;    // SO_PEEK_OFF on a UDP socket: its queue is read, not taken
  bool raw_hdrincl = false;     // raw IPv4 IP_HDRINCL and IPv6 IPPROTO_RAW sockets (root): UDP
                                // queues go back with their source addresses
  bool netns = false;           // a network namespace made and entered (restore --netns)
  bool tcp_repair = false;      // TCP_REPAIR on a TCP socket (dump/restore --tcp-established)
  uint32_t xsave_size = 0;      // XSAVE size for XCR0's features (CPUID leaf 0xD sub-leaf 0)
  uint64_t xsave_features = 0;  // XCR0
  // Descriptor kinds (objects/fd_kinds.h) and shared descriptions:
  bool timerfd_set_ticks = false;  // TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE)
  bool kcmp_file = false;          // kcmp(KCMP_FILE) (CONFIG_KCMP / CONFIG_CHECKPOINT_RESTORE)
  // prctl(PR_TIMER_CREATE_RESTORE_IDS) known (Linux 6.16): timers get their ids back directly.
  bool timer_restore_ids = false;
  // /proc/sysvipc/shm readable and /proc/sys/kernel/shm_next_id writable: SysV segments are
  // dumped and recreated with their ids.
  bool sysv_shm_next_id = false;
  // Added by the probes (0/false when a probe could not run):
  bool cap_sys_ptrace = false;      // we have CAP_SYS_PTRACE (userfaultfd without the sysctl)
  uint32_t mm_map_size = 0;         // sizeof(struct prctl_mm_map) as the kernel reports it
  uint32_t xstate_regset_size = 0;  // NT_X86_XSTATE size, by PTRACE_GETREGSET on a child: the
                                    // size dump reads (need not equal xsave_size)
  // What each probe saw, keyed by the FeatureReport name (errno names, values); used as the
  // `detail` of that line. Probes that found nothing worth saying leave no entry.
  std::map<std::string, std::string> notes;
};

// Probed on first call; cheap afterwards.
const KernelFeatures& kernel_features();

// Only what a lazy restore needs, probed on first call by the same probes: the userfaultfd
// fields (userfaultfd_syscall, dev_userfaultfd, uffd_features, uffd_ioctls,
// unprivileged_userfaultfd), cap_sys_ptrace, pagemap_scan and pidfd_getfd (tried on lazycr
// itself), with their notes; every other field is left unprobed (false/0). The full probe
// forks and traces several children and cost 3-13 ms of every lazy restore on a loaded 2-core
// guest; this one forks none.
const KernelFeatures& lazy_restore_features();

// The CPU's xsave layout from CPUID and XGETBV alone (~15 us in our VMs, where CPUID traps),
// for code that needs only this: the full probe forks children and costs about a millisecond.
// kernel_features() reports the same values.
struct CpuXsave {
  uint32_t size = 0;      // CPUID leaf 0xD sub-leaf 0 EBX (0 without OSXSAVE)
  uint64_t features = 0;  // XCR0
};
CpuXsave cpu_xsave();

// Whether clone3 knows set_tid, from one clone3 call the kernel refuses while copying its
// arguments (no task is created: ~7 us instead of ~0.2 ms for the full probe's, which lets
// the kernel copy this process up to the pid allocation). Unlike
// kernel_features().clone3_set_tid it does not prove the permission to use set_tid
// (CAP_CHECKPOINT_RESTORE): the clone3 that creates a process checks that itself.
bool clone3_knows_set_tid();

// One line of `lazycr check`.
struct FeatureReport {
  std::string name;  // stable key, e.g. "uffd.feature.event_fork"
  bool ok = false;
  bool required = false;  // the lazy restore path cannot work without it
  std::string detail;     // what was found (e.g. "features 0x1ffff")
  std::string why;        // why lazycr needs it
};
std::vector<FeatureReport> describe_features(const KernelFeatures& features);

}  // namespace lazycr
