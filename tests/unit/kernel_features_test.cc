// Kernel probes against the real kernel of this machine (Linux 6.18, root): what DESIGN.md
// section 7 says we have must be found, and the report must be well formed.
#include "common/kernel_features.h"

#include <gtest/gtest.h>
#include <linux/userfaultfd.h>

#include <set>

namespace lazycr {
namespace {

const FeatureReport* find(const std::vector<FeatureReport>& reports, const std::string& name) {
  for (const auto& r : reports) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

TEST(KernelFeatures, ProbedOnceSameObject) {
  const KernelFeatures& a = kernel_features();
  const KernelFeatures& b = kernel_features();
  EXPECT_EQ(&a, &b);
  EXPECT_FALSE(a.release.empty());
}

// The narrow probe of a lazy restore finds what the full probe finds, for every field it
// promises (kernel_features.h), and leaves the others unprobed.
TEST(KernelFeatures, LazyRestoreProbeAgreesWithTheFullProbe) {
  const KernelFeatures& lazy = lazy_restore_features();
  const KernelFeatures& full = kernel_features();
  EXPECT_NE(&lazy, &full);
  EXPECT_EQ(&lazy, &lazy_restore_features());
  EXPECT_EQ(lazy.userfaultfd_syscall, full.userfaultfd_syscall);
  EXPECT_EQ(lazy.dev_userfaultfd, full.dev_userfaultfd);
  EXPECT_EQ(lazy.uffd_features, full.uffd_features);
  EXPECT_EQ(lazy.uffd_ioctls, full.uffd_ioctls);
  EXPECT_EQ(lazy.unprivileged_userfaultfd, full.unprivileged_userfaultfd);
  EXPECT_EQ(lazy.cap_sys_ptrace, full.cap_sys_ptrace);
  EXPECT_EQ(lazy.pagemap_scan, full.pagemap_scan);
  EXPECT_EQ(lazy.pidfd_getfd, full.pidfd_getfd);
  EXPECT_TRUE(lazy.pidfd_getfd) << lazy.notes.at("pidfd.getfd");
  EXPECT_FALSE(lazy.ptrace_seize) << "probed by the full probe only";
}

TEST(KernelFeatures, UserfaultfdPresentWithLayoutEvents) {
  const KernelFeatures& f = kernel_features();
  EXPECT_TRUE(f.userfaultfd_syscall || f.dev_userfaultfd);
  EXPECT_TRUE(f.userfaultfd_syscall) << f.notes.at("userfaultfd.syscall");
  const uint64_t events = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
                          UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
  EXPECT_EQ(f.uffd_features & events, events) << std::hex << f.uffd_features;
  // UFFDIO_API reports at least REGISTER, UNREGISTER and API itself.
  EXPECT_TRUE(f.uffd_ioctls & (1ull << _UFFDIO_REGISTER));
  EXPECT_TRUE(f.uffd_ioctls & (1ull << _UFFDIO_API));
}

TEST(KernelFeatures, PtraceAndRestorePrimitives) {
  const KernelFeatures& f = kernel_features();
  EXPECT_TRUE(f.ptrace_seize) << f.notes.at("ptrace.seize");
  EXPECT_TRUE(f.pidfd_open);
  EXPECT_TRUE(f.pidfd_getfd) << f.notes.at("pidfd.getfd");
  EXPECT_TRUE(f.clone3_set_tid) << f.notes.at("clone3.set_tid");
  EXPECT_TRUE(f.pr_set_mm_map) << f.notes.at("prctl.set_mm_map");
  EXPECT_GT(f.mm_map_size, 0u);
  EXPECT_TRUE(f.arch_map_vdso) << f.notes.at("arch_prctl.map_vdso");
}

TEST(KernelFeatures, CpuXsave) {
  const KernelFeatures& f = kernel_features();
  EXPECT_GE(f.xsave_size, 576u);  // legacy area + header at least
  EXPECT_TRUE(f.xsave_features & 0x3) << "XCR0 must enable x87 and SSE";
  // The regset size is what dump and restore must use; it need not equal CPUID's figure.
  if (f.ptrace_seize) {
    EXPECT_GE(f.xstate_regset_size, 576u);
  }
}

TEST(KernelFeatures, DescribeGivesUniqueNamedLines) {
  const auto reports = describe_features(kernel_features());
  std::set<std::string> names;
  for (const auto& r : reports) {
    EXPECT_FALSE(r.name.empty());
    EXPECT_TRUE(names.insert(r.name).second) << "duplicate " << r.name;
    EXPECT_FALSE(r.detail.empty()) << r.name;
    EXPECT_FALSE(r.why.empty()) << r.name;
    EXPECT_EQ(r.detail.find('\n'), std::string::npos) << r.name;
  }
  for (const char* name : {"userfaultfd.syscall",
                           "userfaultfd.dev",
                           "uffd.feature.event_fork",
                           "uffd.feature.event_remap",
                           "uffd.feature.event_remove",
                           "uffd.feature.event_unmap",
                           "uffd.feature.missing_shmem",
                           "uffd.feature.missing_hugetlbfs",
                           "uffd.feature.thread_id",
                           "uffd.feature.wp_async",
                           "uffd.feature.move",
                           "ptrace.seize",
                           "ptrace.rseq_config",
                           "pidfd.open",
                           "pidfd.getfd",
                           "clone3.set_tid",
                           "prctl.set_mm_map",
                           "arch_prctl.map_vdso",
                           "pagemap.scan",
                           "pagemap.soft_dirty",
                           "kcmp.file",
                           "timerfd.set_ticks",
                           "memfd.seals",
                           "kcmp.epoll_tfd",
                           "sysctl.unprivileged_userfaultfd"}) {
    EXPECT_TRUE(names.count(name)) << "no line for " << name;
  }
}

TEST(KernelFeatures, RequiredItemsAllPresentHere) {
  const auto reports = describe_features(kernel_features());
  for (const auto& r : reports) {
    if (r.required) {
      EXPECT_TRUE(r.ok) << r.name << ": " << r.detail;
    }
  }
  for (const char* name :
       {"uffd.feature.event_fork", "uffd.feature.event_remap", "uffd.feature.event_remove",
        "uffd.feature.event_unmap", "ptrace.seize", "pidfd.open", "pidfd.getfd", "clone3.set_tid",
        "prctl.set_mm_map", "arch_prctl.map_vdso"}) {
    const FeatureReport* r = find(reports, name);
    ASSERT_NE(r, nullptr) << name;
    EXPECT_TRUE(r->required) << name;
  }
  EXPECT_FALSE(find(reports, "uffd.feature.thread_id")->required);
}

// A kernel with nothing: every required line is missing, and only one of the two userfaultfd
// lines is required.
TEST(KernelFeatures, DescribeEmptyKernel) {
  KernelFeatures none;
  const auto reports = describe_features(none);
  bool any_required = false;
  for (const auto& r : reports) {
    if (r.required) {
      any_required = true;
      EXPECT_FALSE(r.ok) << r.name;
    }
  }
  EXPECT_TRUE(any_required);
  EXPECT_TRUE(find(reports, "userfaultfd.syscall")->required);
  EXPECT_FALSE(find(reports, "uffd.feature.event_fork")->ok);

  // Only /dev/userfaultfd works: that line becomes the required one.
  KernelFeatures dev_only;
  dev_only.dev_userfaultfd = true;
  dev_only.uffd_features = UFFD_FEATURE_EVENT_FORK;
  const auto dev_reports = describe_features(dev_only);
  EXPECT_FALSE(find(dev_reports, "userfaultfd.syscall")->required);
  EXPECT_TRUE(find(dev_reports, "userfaultfd.dev")->required);
  EXPECT_TRUE(find(dev_reports, "userfaultfd.dev")->ok);
  EXPECT_TRUE(find(dev_reports, "uffd.feature.event_fork")->ok);
}

// This machine: no soft-dirty, PAGEMAP_SCAN works (DESIGN.md section 7).
TEST(KernelFeatures, PagemapAsMeasured) {
  const KernelFeatures& f = kernel_features();
  EXPECT_TRUE(f.pagemap_scan) << f.notes.at("pagemap.scan");
  EXPECT_EQ(f.notes.count("pagemap.soft_dirty"), 1u);
}

// Ghost files: memfds come back with their seals.
TEST(KernelFeatures, MemfdSealsWork) {
  const KernelFeatures& f = kernel_features();
  EXPECT_TRUE(f.memfd_seals) << (f.notes.count("memfd.seals") ? f.notes.at("memfd.seals") : "");
}

TEST(KernelFeatures, KcmpEpollTfdHere) {
  const KernelFeatures& f = kernel_features();
  EXPECT_TRUE(f.kcmp_epoll_tfd) << f.notes.count("kcmp.epoll_tfd");
}

}  // namespace
}  // namespace lazycr
