// Kernel ABI that Debian 12's headers (Linux 6.1) lack, defined in this one place.
// Values are from the mainline uapi headers; each is guarded so newer headers win.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>  // before our guards: glibc declares some PTRACE_* as enum values
#include <sys/types.h>

#include <cstdint>

// --- userfaultfd features (uapi/linux/userfaultfd.h) ---
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

// --- ptrace ---
#ifndef PTRACE_GET_RSEQ_CONFIGURATION  // glibc (included above) also defines it as a macro
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif
#ifndef PTRACE_GET_SECCOMP_METADATA
#define PTRACE_GET_SECCOMP_METADATA 0x420d
#endif
namespace lazycr::abi {
// PTRACE_GET_SECCOMP_METADATA argument and result (uapi/linux/ptrace.h).
struct seccomp_metadata {
  uint64_t filter_off;
  uint64_t flags;
};
struct ptrace_rseq_configuration {
  uint64_t rseq_abi_pointer;
  uint32_t rseq_abi_size;
  uint32_t signature;
  uint32_t flags;
  uint32_t pad;
};
}  // namespace lazycr::abi

// --- arch_prctl ---
#ifndef ARCH_MAP_VDSO_64
#define ARCH_MAP_VDSO_64 0x2003
#endif

// --- prctl ---
#ifndef PR_SET_MM_MAP
#define PR_SET_MM_MAP 14
#endif
#ifndef PR_SET_MM_MAP_SIZE
#define PR_SET_MM_MAP_SIZE 15
#endif

// --- clone3 (uapi/linux/sched.h) ---
namespace lazycr::abi {
struct clone_args {
  uint64_t flags;
  uint64_t pidfd;
  uint64_t child_tid;
  uint64_t parent_tid;
  uint64_t exit_signal;
  uint64_t stack;
  uint64_t stack_size;
  uint64_t tls;
  uint64_t set_tid;
  uint64_t set_tid_size;
  uint64_t cgroup;
};
inline constexpr size_t kCloneArgsSizeVer2 = 88;
}  // namespace lazycr::abi

// --- PAGEMAP_SCAN (uapi/linux/fs.h, Linux 6.7) ---
#ifndef PAGEMAP_SCAN
namespace lazycr::abi {
struct page_region {
  uint64_t start;
  uint64_t end;
  uint64_t categories;
};
struct pm_scan_arg {
  uint64_t size;
  uint64_t flags;
  uint64_t start;
  uint64_t end;
  uint64_t walk_end;
  uint64_t vec;
  uint64_t vec_len;
  uint64_t max_pages;
  uint64_t category_inverted;
  uint64_t category_mask;
  uint64_t category_anyof_mask;
  uint64_t return_mask;
};
}  // namespace lazycr::abi
#define PAGEMAP_SCAN _IOWR('f', 16, lazycr::abi::pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)
#else
namespace lazycr::abi {
using page_region = ::page_region;
using pm_scan_arg = ::pm_scan_arg;
}  // namespace lazycr::abi
#endif

// --- /proc/PID/pagemap entry bits ---
namespace lazycr::abi {
inline constexpr uint64_t kPmPresent = 1ull << 63;
inline constexpr uint64_t kPmSwapped = 1ull << 62;
inline constexpr uint64_t kPmFile = 1ull << 61;
inline constexpr uint64_t kPmExclusive = 1ull << 56;
inline constexpr uint64_t kPmSoftDirty = 1ull << 55;  // only with CONFIG_MEM_SOFT_DIRTY
inline constexpr uint64_t kPmPfnMask = (1ull << 55) - 1;
}  // namespace lazycr::abi

// --- timerfd (uapi/linux/timerfd.h; that header clashes with glibc's <sys/timerfd.h>) ---
#ifndef TFD_IOC_SET_TICKS
#define TFD_IOC_SET_TICKS _IOW('T', 0, uint64_t)
#endif
