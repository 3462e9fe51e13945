// The dump: seize every thread, collect state while the process is frozen, write the image,
// then kill the process or let it go. Failure at any point leaves it running as it was.
#include "checkpoint/dump.h"

#include <elf.h>
#include <fcntl.h>
#include <linux/prctl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/json.h"
#include "common/kernel_features.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "common/signals.h"
#include "common/vdso.h"
#include "image-format/image_dir.h"

namespace lazycr::checkpoint {
namespace {

using image::kPageSize;

constexpr uint64_t kPfKthread = 0x00200000;
constexpr size_t kKernelSigactionSize = 32;  // handler, flags, restorer, mask
constexpr size_t kStackTSize = 24;           // ss_sp, ss_flags (+pad), ss_size

// Test hook (--fault-inject): fails the dump at a named step.
void fault_point(const DumpOptions& opts, const char* step) {
  if (opts.fault_inject == step) throw Error(cat("injected fault at step ", step), EIO);
}

uint64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string describe_pid(pid_t pid) {
  auto comm = proc::try_read_file(cat("/proc/", pid, "/comm"));
  if (comm && !comm->empty() && comm->back() == '\n') comm->pop_back();
  return comm ? cat("pid ", pid, " (", *comm, ")") : cat("pid ", pid);
}

// Refuses what cannot be dumped, with the reason.
void check_target(pid_t pid) {
  if (pid <= 0) fail("invalid pid ", pid);
  if (pid == ::getpid()) fail("pid ", pid, " is lazycr itself");
  if (!proc::exists(pid)) fail("pid ", pid, ": no such process");
  proc::Stat st;
  proc::Status status;
  try {
    st = proc::read_stat(pid);
    status = proc::read_status(pid);
  } catch (const Error&) {
    if (!proc::exists(pid)) fail("pid ", pid, ": no such process (it exited)");
    throw;
  }
  if (st.flags & kPfKthread) fail(describe_pid(pid), " is a kernel thread");
  if (st.state == 'Z' || st.state == 'X') fail(describe_pid(pid), " is a zombie");
  if (status.tgid != pid)
    fail("pid ", pid, " is a thread of process ", status.tgid, "; dump the process");
  if (status.tracer_pid != 0)
    fail(describe_pid(pid), " is already traced by pid ", status.tracer_pid);
  auto children = proc::list_children(pid);
  if (!children.empty())
    fail(describe_pid(pid), " has ", children.size(), " child process(es) (first: ", children[0],
         "); process trees are not supported yet");
}

// The vdso's identity, with the same fingerprint a restore computes of its own (common/vdso.h).
VdsoFingerprint fingerprint_vdso(pid_t pid, const std::vector<image::MemoryArea>& areas) {
  for (const auto& a : areas) {
    if (a.kind() != image::MemoryArea::VDSO) continue;
    std::string bytes(a.end() - a.start(), '\0');
    remote_read(pid, a.start(), bytes.data(), bytes.size());
    return lazycr::fingerprint_vdso(bytes);
  }
  return {};
}

// The frozen process: every thread seized and stopped. The destructor undoes everything
// that was done to it (scratch page, then detach), so a failed dump leaves it as it was.
class FrozenProcess {
 public:
  explicit FrozenProcess(pid_t pid) : pid_(pid) {
    pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd_) fail_errno("pidfd_open(", pid, ")");
  }

  ~FrozenProcess() {
    try {
      release_scratch();
    } catch (const Error& e) {
      log::warn("pid ", pid_, ": could not unmap the scratch page at ", hex(scratch_), ": ",
                e.what());
    }
    // Detach the leader last: once killed, it reports only after every other thread has.
    while (!threads_.empty()) threads_.pop_back();
  }

  // Seizes and stops every thread; re-lists until no new thread shows up.
  void freeze() {
    std::set<pid_t> seen;
    for (int round = 0;; round++) {
      if (round > 100) fail("pid ", pid_, ": threads keep appearing; cannot freeze it");
      std::vector<pid_t> tids = proc::list_tasks(pid_);
      if (tids.empty() || !proc::exists(pid_)) fail("pid ", pid_, " exited during the dump");
      bool added = false;
      for (pid_t tid : tids) {
        if (seen.count(tid)) continue;
        try {
          threads_.push_back(TracedThread::seize(tid, PTRACE_O_TRACEEXEC));
        } catch (const Error& e) {
          // A thread that exited between listing and seizing is simply gone.
          if (e.sys_errno() == ESRCH && tid != pid_) {
            seen.insert(tid);
            continue;
          }
          throw;
        }
        if (frozen_at_ == 0) frozen_at_ = now_ns();
        seen.insert(tid);
        added = true;
        threads_.back().interrupt_and_wait();
      }
      if (!added) break;
    }
    // The leader first.
    std::stable_partition(threads_.begin(), threads_.end(),
                          [&](const TracedThread& t) { return t.tid() == pid_; });
    if (threads_.empty() || threads_[0].tid() != pid_)
      fail("pid ", pid_, ": main thread has exited (a zombie leader with live threads)");
    insn_ = find_vdso_syscall_insn(pid_);
  }

  pid_t pid() const { return pid_; }
  int pidfd() const { return pidfd_.get(); }
  uint64_t frozen_at() const { return frozen_at_; }
  std::vector<TracedThread>& threads() { return threads_; }
  TracedThread& leader() { return threads_[0]; }

  // Runs a syscall inside thread t; throws with the syscall's name on failure.
  long call(TracedThread& t, const char* what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
            uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) {
    long r = t.syscall(insn_, InjectMode::kSingleStep, nr, a1, a2, a3, a4, a5, a6);
    if (r < 0 && r > -4096)
      fail_errno_value(static_cast<int>(-r), cat(what, " in thread ", t.tid()));
    return r;
  }

  // A page inside the target for results of injected calls. MAP_SHARED so that it can never
  // merge with a neighbouring private area.
  uint64_t scratch() {
    if (scratch_ == 0)
      scratch_ = static_cast<uint64_t>(
          call(leader(), "mmap of a scratch page", SYS_mmap, 0, kPageSize, PROT_READ | PROT_WRITE,
               MAP_SHARED | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0));
    return scratch_;
  }

  void release_scratch() {
    if (scratch_ == 0 || threads_.empty()) return;
    uint64_t s = scratch_;
    scratch_ = 0;
    call(leader(), "munmap of the scratch page", SYS_munmap, s, kPageSize);
  }

  uint64_t injected() const {
    uint64_t n = 0;
    for (const auto& t : threads_) n += t.injected_syscalls();
    return n;
  }

  // Kills the process (after a complete image) and waits until it is gone.
  void kill_and_wait() {
    if (!send_signal_pidfd(pidfd_.get(), SIGKILL)) fail_errno("cannot kill pid ", pid_);
    // Collect each traced thread's exit; the leader reports last, after all the others.
    for (auto it = threads_.rbegin(); it != threads_.rend(); ++it)
      while (it->attached() && it->wait_stop().kind != StopKind::kExited) {
      }
    threads_.clear();
    pollfd p{pidfd_.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) log::warn("pid ", pid_, " did not exit within 10 s of SIGKILL");
  }

  void detach_all() {
    while (!threads_.empty()) threads_.pop_back();
  }

 private:
  pid_t pid_;
  UniqueFd pidfd_;
  std::vector<TracedThread> threads_;
  uint64_t insn_ = 0;
  uint64_t scratch_ = 0;
  uint64_t frozen_at_ = 0;
};

image::X86Regs to_proto(const Regs& r) {
  image::X86Regs p;
  p.set_r15(r.r15);
  p.set_r14(r.r14);
  p.set_r13(r.r13);
  p.set_r12(r.r12);
  p.set_rbp(r.rbp);
  p.set_rbx(r.rbx);
  p.set_r11(r.r11);
  p.set_r10(r.r10);
  p.set_r9(r.r9);
  p.set_r8(r.r8);
  p.set_rax(r.rax);
  p.set_rcx(r.rcx);
  p.set_rdx(r.rdx);
  p.set_rsi(r.rsi);
  p.set_rdi(r.rdi);
  p.set_orig_rax(r.orig_rax);
  p.set_rip(r.rip);
  p.set_cs(r.cs);
  p.set_eflags(r.eflags);
  p.set_rsp(r.rsp);
  p.set_ss(r.ss);
  p.set_fs_base(r.fs_base);
  p.set_gs_base(r.gs_base);
  p.set_ds(r.ds);
  p.set_es(r.es);
  p.set_fs(r.fs);
  p.set_gs(r.gs);
  return p;
}

void add_pending(const std::vector<siginfo_t>& infos,
                 google::protobuf::RepeatedPtrField<image::PendingSignal>* out) {
  for (const auto& si : infos) {
    auto* s = out->Add();
    s->set_signo(si.si_signo);
    s->set_siginfo(std::string(reinterpret_cast<const char*>(&si), sizeof si));
  }
}

std::string read_comm(const std::string& path) {
  std::string c = proc::read_file(path);
  if (!c.empty() && c.back() == '\n') c.pop_back();
  return c;
}

void collect_threads(FrozenProcess& fp, image::Process& proc, uint32_t& xsave_size,
                     uint64_t& xsave_features) {
  uint64_t scratch = fp.scratch();
  for (auto& t : fp.threads()) {
    image::Thread* th = proc.add_threads();
    th->set_tid(t.tid());
    th->set_comm(read_comm(cat("/proc/", fp.pid(), "/task/", t.tid(), "/comm")));
    Regs regs = t.get_regs();
    th->set_interrupted_syscall(fixup_interrupted_syscall(regs));
    *th->mutable_regs() = to_proto(regs);
    auto xs = t.get_xstate();
    if (xsave_size == 0) {
      xsave_size = static_cast<uint32_t>(xs.size());
      xsave_features = kernel_features().xsave_features;  // XCR0: what any blob may hold
    }
    th->set_xsave(std::string(xs.begin(), xs.end()));
    th->set_blocked(t.get_sigmask());
    auto rseq = t.get_rseq();
    auto* r = th->mutable_rseq();
    r->set_rseq_abi_pointer(rseq.rseq_abi_pointer);
    r->set_rseq_abi_size(rseq.rseq_abi_size);
    r->set_signature(rseq.signature);
    r->set_flags(rseq.flags);

    // Values only the thread itself can read: tid address and sigaltstack.
    fp.call(t, "prctl(PR_GET_TID_ADDRESS)", SYS_prctl, PR_GET_TID_ADDRESS, scratch);
    fp.call(t, "sigaltstack", SYS_sigaltstack, 0, scratch + 8);
    unsigned char buf[8 + kStackTSize];
    remote_read(fp.pid(), scratch, buf, sizeof buf);
    uint64_t tid_addr, ss_sp, ss_size;
    int32_t ss_flags;
    std::memcpy(&tid_addr, buf, 8);
    std::memcpy(&ss_sp, buf + 8, 8);
    std::memcpy(&ss_flags, buf + 16, 4);
    std::memcpy(&ss_size, buf + 24, 8);
    th->set_clear_child_tid(tid_addr);
    th->mutable_sigaltstack()->set_sp(ss_sp);
    th->mutable_sigaltstack()->set_size(ss_size);
    th->mutable_sigaltstack()->set_flags(ss_flags);

    uint64_t head = 0;
    size_t len = 0;
    if (::syscall(SYS_get_robust_list, t.tid(), &head, &len) != 0)
      fail_errno("get_robust_list of thread ", t.tid());
    th->set_robust_list(head);
    th->set_robust_list_len(len);
    add_pending(t.peek_siginfo(false), th->mutable_pending());
  }
  add_pending(fp.leader().peek_siginfo(true), proc.mutable_shared_pending());
}

void collect_sigactions(FrozenProcess& fp, image::Process& proc) {
  uint64_t scratch = fp.scratch();
  static_assert(64 * kKernelSigactionSize <= kPageSize);
  for (int sig = 1; sig <= 64; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    fp.call(fp.leader(), "rt_sigaction", SYS_rt_sigaction, sig, 0,
            scratch + (sig - 1) * kKernelSigactionSize, 8);
  }
  std::vector<uint64_t> raw(64 * 4);
  remote_read(fp.pid(), scratch, raw.data(), raw.size() * 8);
  for (int sig = 1; sig <= 64; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    const uint64_t* k = &raw[(sig - 1) * 4];
    auto* a = proc.add_sigactions();
    a->set_signo(sig);
    a->set_handler(k[0]);
    a->set_flags(k[1]);
    a->set_restorer(k[2]);
    a->set_mask(k[3]);
  }
}

void collect_process_state(FrozenProcess& fp, image::Process& proc) {
  pid_t pid = fp.pid();
  auto st = proc::read_stat(pid);
  auto status = proc::read_status(pid);
  proc.set_pid(pid);
  proc.set_ppid(st.ppid);
  proc.set_pgid(st.pgrp);
  proc.set_sid(st.session);
  proc.set_comm(st.comm);
  proc.set_umask(status.umask);
  proc.set_cwd(proc::read_link(cat("/proc/", pid, "/cwd")));
  proc.set_root(proc::read_link(cat("/proc/", pid, "/root")));
  std::string exe_link = cat("/proc/", pid, "/exe");
  *proc.mutable_exe() = file_identity(proc::read_link(exe_link), exe_link);
  proc.set_personality(static_cast<uint32_t>(
      std::stoul(proc::read_file(cat("/proc/", pid, "/personality")), nullptr, 16)));

  auto* c = proc.mutable_creds();
  for (auto u : status.uids) c->add_uids(u);
  for (auto g : status.gids) c->add_gids(g);
  for (auto g : status.groups) c->add_groups(g);
  c->set_cap_inheritable(status.cap_inh);
  c->set_cap_permitted(status.cap_prm);
  c->set_cap_effective(status.cap_eff);
  c->set_cap_bounding(status.cap_bnd);
  c->set_cap_ambient(status.cap_amb);
  c->set_no_new_privs(status.no_new_privs);

  // Read from inside: prlimit on another process needs CAP_SYS_RESOURCE or the same
  // credentials, and a process of another user is common.
  uint64_t scratch = fp.scratch();
  static_assert(RLIMIT_NLIMITS * sizeof(struct rlimit64) <= kPageSize);
  for (int r = 0; r < RLIMIT_NLIMITS; r++)
    fp.call(fp.leader(), "prlimit64", SYS_prlimit64, 0, static_cast<uint64_t>(r), 0,
            scratch + r * sizeof(struct rlimit64));
  std::vector<struct rlimit64> lims(RLIMIT_NLIMITS);
  remote_read(pid, scratch, lims.data(), lims.size() * sizeof(struct rlimit64));
  for (int r = 0; r < RLIMIT_NLIMITS; r++) {
    auto* l = proc.add_rlimits();
    l->set_resource(r);
    l->set_cur(lims[r].rlim_cur);
    l->set_max(lims[r].rlim_max);
  }

  auto* mm = proc.mutable_mm();
  mm->set_start_code(st.start_code);
  mm->set_end_code(st.end_code);
  mm->set_start_data(st.start_data);
  mm->set_end_data(st.end_data);
  mm->set_start_brk(st.start_brk);
  mm->set_start_stack(st.start_stack);
  mm->set_arg_start(st.arg_start);
  mm->set_arg_end(st.arg_end);
  mm->set_env_start(st.env_start);
  mm->set_env_end(st.env_end);
  mm->set_brk(static_cast<uint64_t>(fp.call(fp.leader(), "brk(0)", SYS_brk, 0)));
  auto auxv = proc::read_auxv(pid);
  proc.set_auxv(std::string(auxv.begin(), auxv.end()));
  proc.set_dumpable(fp.call(fp.leader(), "prctl(PR_GET_DUMPABLE)", SYS_prctl, PR_GET_DUMPABLE) !=
                    0);
  proc.set_thp_disable(static_cast<int32_t>(
      fp.call(fp.leader(), "prctl(PR_GET_THP_DISABLE)", SYS_prctl, PR_GET_THP_DISABLE)));
}

uint64_t dir_bytes(const std::string& dir) {
  uint64_t total = 0;
  boost::system::error_code ec;
  for (boost::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (boost::filesystem::is_regular_file(it->path(), ec))
      total += boost::filesystem::file_size(it->path(), ec);
  return total;
}

bool alive(pid_t pid) {
  auto stat = proc::try_read_file(cat("/proc/", pid, "/stat"));
  if (!stat) return false;
  try {
    char state = proc::parse_stat(*stat).state;
    return state != 'Z' && state != 'X';
  } catch (const Error&) {
    return false;
  }
}

DumpResult dump_frozen(const DumpOptions& opts, uint64_t t0);

}  // namespace

DumpResult dump(const DumpOptions& opts) {
  uint64_t t0 = now_ns();
  check_target(opts.pid);
  try {
    return dump_frozen(opts, t0);
  } catch (const Error& e) {
    if (!alive(opts.pid))
      fail("pid ", opts.pid, " exited or was killed during the dump (", e.what(), ")");
    throw;
  }
}

namespace {

DumpResult dump_frozen(const DumpOptions& opts, uint64_t t0) {
  image::ImageWriter writer(opts.dir, opts.replace);
  image::PageStoreOptions store_opts;
  store_opts.frame_size = opts.frame_size;
  store_opts.level = opts.level;
  store_opts.threads = opts.threads;

  DumpResult result;
  image::Process proc;
  image::Inventory inv;
  FrozenProcess fp(opts.pid);
  fp.freeze();
  log::info("froze ", describe_pid(opts.pid), " with ", fp.threads().size(), " thread(s)");
  fault_point(opts, "freeze");

  // The address space is read before the scratch page exists, so the image never holds it.
  auto maps = proc::read_smaps(opts.pid);
  auto areas = collect_areas(opts.pid, maps);
  VdsoFingerprint vdso = fingerprint_vdso(opts.pid, areas);

  uint32_t xsave_size = 0;
  uint64_t xsave_features = 0;
  collect_threads(fp, proc, xsave_size, xsave_features);
  fault_point(opts, "threads");  // with the scratch page mapped
  collect_sigactions(fp, proc);
  collect_process_state(fp, proc);
  fp.release_scratch();

  auto fds = collect_fds(opts.pid);
  for (const auto& f : fds) {
    // Standard descriptors usually lead outside the process (a terminal, the caller's pipe):
    // they are recorded, and the restore connects them to its own (--shell-job).
    if (f.restorable() || opts.skip_unsupported_fds || f.fd() <= 2) continue;
    fail(describe_pid(opts.pid), ": fd ", f.fd(), " is a ",
         image::FileDescriptor::Kind_Name(f.kind()), " (", f.target(),
         ") that lazycr cannot restore yet; --skip-unsupported-fds records it anyway");
  }

  log::Progress progress;
  {
    image::PageStoreWriter pages(writer.pages_path(opts.pid), store_opts);
    bool first_batch = true;
    auto report = [&](uint64_t pages_read) {
      if (first_batch) {
        first_batch = false;
        fault_point(opts, "memory");
        if (opts.fault_inject == "kill-target") send_signal_pidfd(fp.pidfd(), SIGKILL);
      }
      if (!progress.enabled()) return;
      uint64_t written = pages.bytes_written();
      char line[160];
      double read_mib = pages_read * 4096.0 / (1 << 20);
      double written_mib = written / double(1 << 20);
      std::snprintf(line, sizeof line,
                    "dump: %llu pages read (%.1f MiB), %.1f MiB written, ratio %.2f",
                    static_cast<unsigned long long>(pages_read), read_mib, written_mib,
                    read_mib > 0 ? written_mib / read_mib : 0.0);
      progress.update(line);
    };
    auto mem = dump_memory(opts.pid, areas, pages, report);
    auto stats = pages.finish();
    progress.finish();
    result.data_pages = stats.data_pages;
    result.zero_pages = stats.zero_pages;
    log::info("read ", mem.pages_read, " pages; stored ", stats.data_pages, " data + ",
              stats.zero_pages, " zero pages in ", stats.frames, " frames");
  }
  for (auto& a : areas) *proc.add_areas() = std::move(a);
  for (auto& f : fds) *proc.add_fds() = std::move(f);
  result.threads = fp.threads().size();
  result.areas = static_cast<uint64_t>(proc.areas_size());
  result.injected_syscalls = fp.injected();
  writer.write_process(proc);

  // Until the image is committed the process stays frozen: it must not run on past a state
  // the image does not describe, and it must survive if anything below fails.
  struct utsname uts;
  ::uname(&uts);
  inv.set_format_version(image::kFormatVersion);
  inv.set_tool_version(LAZYCR_VERSION);
  inv.mutable_kernel()->set_release(uts.release);
  inv.mutable_kernel()->set_version(uts.version);
  inv.mutable_kernel()->set_machine(uts.machine);
  inv.mutable_kernel()->set_vdso_build_id(vdso.build_id);
  inv.mutable_kernel()->set_vdso_hash(vdso.hash);
  inv.mutable_kernel()->set_vdso_size(vdso.size);
  inv.mutable_cpu()->set_xsave_size(xsave_size);
  inv.mutable_cpu()->set_xsave_features(xsave_features);
  inv.set_page_size(kPageSize);
  inv.set_root_pid(opts.pid);
  inv.add_pids(opts.pid);
  auto* o = inv.mutable_options();
  o->set_leave_running(opts.leave_running);
  o->set_compression_level(opts.level);
  o->set_frame_size(opts.frame_size);
  o->set_skip_unsupported_fds(opts.skip_unsupported_fds);
  uint64_t frozen_end = now_ns();
  inv.set_frozen_ns(frozen_end - fp.frozen_at());
  inv.set_dump_ns(frozen_end - t0);
  inv.set_created_unix_ns(wall_ns());
  writer.write_inventory(inv);
  fault_point(opts, "commit");
  writer.commit();

  if (opts.leave_running)
    fp.detach_all();
  else
    fp.kill_and_wait();
  result.frozen_ns = now_ns() - fp.frozen_at();
  result.total_ns = now_ns() - t0;
  result.image_bytes = dir_bytes(opts.dir);
  return result;
}

}  // namespace

}  // namespace lazycr::checkpoint
