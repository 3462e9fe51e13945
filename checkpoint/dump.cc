// The dump: seize every thread of every process of the tree, collect state while the tree is
// frozen, write the image, then kill the tree or let it go. Failure at any point leaves every
// process running as it was.
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
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "checkpoint/collect.h"
#include "checkpoint/early_smaps.h"
#include "checkpoint/frozen.h"
#include "checkpoint/interrupt.h"
#include "checkpoint/twin.h"
#include "checkpoint/write_tracking.h"
#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/json.h"
#include "common/kernel_features.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "common/signals.h"
#include "common/vdso.h"
#include "image-format/image_chain.h"
#include "image-format/image_dir.h"
#include "image-format/image_mac.h"
#include "image-format/unrestorable.h"
#include "objects/net_lock.h"
#include "objects/objects.h"

namespace lazycr::checkpoint {
namespace {

using image::kPageSize;

constexpr uint64_t kPfKthread = 0x00200000;
constexpr size_t kKernelSigactionSize = 32;  // handler, flags, restorer, mask
constexpr size_t kStackTSize = 24;           // ss_sp, ss_flags (+pad), ss_size
// --compress auto: runs of 16 pages sampled per process (1 MiB; LZ4 takes ~2 ms over them).
constexpr size_t kCodecSamples = 16;

// Test hook (--fault-inject STEP:SIGNAL): the signal a user would send, by name.
int injected_signal(const std::string& fault, const std::string& step) {
  if (fault.size() <= step.size() || fault.compare(0, step.size(), step) != 0 ||
      fault[step.size()] != ':')
    return 0;
  std::string name = fault.substr(step.size() + 1);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT})
    if (name == termination_signal_name(sig)) return sig;
  fail("--fault-inject ", fault, ": unknown signal ", name);
}

// A safe point between two steps. Test hook (--fault-inject): fails the dump at a named step
// ("STEP"), or sends lazycr a termination signal there ("STEP:SIGINT").
void fault_point(const DumpOptions& opts, const char* step) {
  if (opts.fault_inject == step) throw Error(cat("injected fault at step ", step), EIO);
  if (int sig = injected_signal(opts.fault_inject, step)) send_signal(::getpid(), sig);
  throw_if_interrupted();
}

uint64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Reading /proc/PID/ns/pid takes the kernel's ptrace access check: refuse here, before anything
// is touched, and say why it may have failed rather than which /proc file could not be read.
void check_access(pid_t pid, const proc::Status& target) {
  std::string path = cat("/proc/", pid, "/ns/pid");
  char buf[64];
  if (::readlink(path.c_str(), buf, sizeof buf) >= 0) return;
  if (errno != EACCES && errno != EPERM) fail_errno("readlink ", path);
  std::string why;
  proc::Status me = proc::read_status(::getpid());
  constexpr uint64_t kCapSysPtrace = uint64_t{1} << 19;
  if (!target.uids.empty() && !me.uids.empty() && target.uids[0] != me.uids[1] &&
      !(me.cap_eff & kCapSysPtrace))
    why = cat("it belongs to uid ", target.uids[0], " and lazycr runs as uid ", me.uids[1],
              " without CAP_SYS_PTRACE");
  else if (uint64_t extra = target.cap_prm & ~me.cap_prm)
    why = cat("it holds capabilities lazycr does not have (", hex(extra),
              "), or the kernel protects it");
  else
    why = "the kernel's ptrace access check refused (an LSM, or the process is not dumpable)";
  fail("not permitted to dump ", describe_pid(pid), ": ", why);
}

// Refuses what cannot be dumped, with the reason.
void check_target(pid_t pid, bool leave_running) {
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
  check_access(pid, status);
  // Killing the init of lazycr's PID namespace after the image is written would take every
  // process of the namespace with it.
  if (pid == 1 && !leave_running)
    fail(
        "pid 1 is the init process of lazycr's PID namespace; killing it would end every "
        "process of the namespace (--leave-running dumps it and lets it run)");
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
    const long interrupted_with = -static_cast<long>(regs.rax);
    th->set_interrupted_syscall(fixup_interrupted_syscall(regs));
    if (th->interrupted_syscall()) th->set_restart_code(static_cast<int32_t>(interrupted_with));
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

    // Values only the thread itself can read, in one round trip: tid address, sigaltstack,
    // and the kernel-object kinds' (objects::thread_reads: the parent death signal).
    const std::vector<objects::ThreadRead> reads = objects::thread_reads(scratch + 8 + kStackTSize);
    std::vector<BatchCall> calls{{SYS_prctl, {PR_GET_TID_ADDRESS, scratch}},
                                 {SYS_sigaltstack, {0, scratch + 8}}};
    for (const auto& r : reads) calls.push_back(r.call);
    fp.run_calls(t, "prctl(PR_GET_TID_ADDRESS), sigaltstack and the objects' per-thread calls",
                 calls);
    std::vector<unsigned char> buf(8 + kStackTSize + 8 * reads.size());
    remote_read(fp.pid(), scratch, buf.data(), buf.size());
    for (size_t k = 0; k < reads.size(); k++) {
      uint64_t value;
      std::memcpy(&value, buf.data() + 8 + kStackTSize + 8 * k, 8);
      reads[k].record(*th, value);
    }
    uint64_t tid_addr, ss_sp, ss_size;
    int32_t ss_flags;
    std::memcpy(&tid_addr, buf.data(), 8);
    std::memcpy(&ss_sp, buf.data() + 8, 8);
    std::memcpy(&ss_flags, buf.data() + 16, 4);
    std::memcpy(&ss_size, buf.data() + 24, 8);
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
  std::vector<BatchCall> calls;
  std::vector<int> signals;
  for (int sig = 1; sig <= 64; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    calls.push_back(
        {SYS_rt_sigaction,
         {static_cast<uint64_t>(sig), 0, scratch + (sig - 1) * kKernelSigactionSize, 8, 0, 0}});
    signals.push_back(sig);
  }
  // One round trip instead of 62 (they were a third of a small server's frozen time).
  if (auto results = fp.try_batch(fp.leader(), calls)) {
    if (results->size() < calls.size() || results->back() != 0)
      fail_errno_value(static_cast<int>(-results->back()),
                       cat("rt_sigaction(", signals[results->size() - 1], ") in pid ", fp.pid()));
  } else {
    for (const BatchCall& c : calls)
      fp.call(fp.leader(), "rt_sigaction", c.nr, c.a[0], c.a[1], c.a[2], c.a[3]);
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

  // From outside when lazycr may (the same credentials, or CAP_SYS_RESOURCE): 16 injected calls
  // fewer, each a moment a SIGKILLed lazycr would leave the process in a trap (README). Else
  // from inside, as a process of another user is common.
  std::vector<struct rlimit64> lims(RLIMIT_NLIMITS);
  bool outside = true;
  for (int r = 0; r < RLIMIT_NLIMITS && outside; r++)
    outside = ::syscall(SYS_prlimit64, pid, r, nullptr, &lims[r]) == 0;
  if (!outside) {
    if (errno != EPERM) fail_errno("prlimit64 of pid ", pid);
    uint64_t scratch = fp.scratch();
    static_assert(RLIMIT_NLIMITS * sizeof(struct rlimit64) <= kPageSize);
    std::vector<BatchCall> calls;
    for (int r = 0; r < RLIMIT_NLIMITS; r++)
      calls.push_back(
          {SYS_prlimit64, {0, static_cast<uint64_t>(r), 0, scratch + r * sizeof(struct rlimit64)}});
    fp.run_calls(fp.leader(), "prlimit64", calls);
    remote_read(pid, scratch, lims.data(), lims.size() * sizeof(struct rlimit64));
  }
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
  const BatchCall calls[] = {
      {SYS_brk, {0}}, {SYS_prctl, {PR_GET_DUMPABLE}}, {SYS_prctl, {PR_GET_THP_DISABLE}}};
  const std::vector<long> r =
      fp.run_calls(fp.leader(), "brk(0), prctl(PR_GET_DUMPABLE), prctl(PR_GET_THP_DISABLE)", calls);
  mm->set_brk(static_cast<uint64_t>(r[0]));
  auto auxv = proc::read_auxv(pid);
  proc.set_auxv(std::string(auxv.begin(), auxv.end()));
  proc.set_dumpable(r[1] != 0);
  proc.set_thp_disable(static_cast<int32_t>(r[2]));
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

DumpResult dump_frozen(const DumpOptions& opts, uint64_t t0, std::vector<pid_t>& seized);

}  // namespace

DumpResult dump(const DumpOptions& opts) {
  uint64_t t0 = now_ns();
  HoldTerminationSignals hold;
  // The short sleeps of the waits for a tracee's stop (common/ptrace.cc) sleep what they ask,
  // not the default 50 us timer slack more: they are in the frozen time.
  ::prctl(PR_SET_TIMERSLACK, 1000);
  // Test hook: the signal arrives while a thread runs an injected call (it is parked in that
  // call's trap when lazycr would die of it).
  struct ClearHook {
    ~ClearHook() { set_injected_call_hook(nullptr); }
  } clear_hook;
  if (int sig = injected_signal(opts.fault_inject, "injected")) {
    auto sent = std::make_shared<bool>(false);
    set_injected_call_hook([sig, sent] {
      if (!*sent) *sent = send_signal(::getpid(), sig);
    });
  }
  check_target(opts.pid, opts.leave_running);
  std::vector<pid_t> seized;
  try {
    return dump_frozen(opts, t0, seized);
  } catch (const Interrupted& e) {
    // The tree has been released (dump_frozen unwound): say what the user finds.
    std::vector<pid_t> gone;
    for (pid_t p : seized)
      if (!alive(p)) gone.push_back(p);
    if (!alive(opts.pid) || !gone.empty())
      throw Interrupted(e.signo(), cat(e.what(), "; pid ", gone.empty() ? opts.pid : gone[0],
                                       " exited or was killed meanwhile"));
    throw Interrupted(
        e.signo(),
        cat(e.what(), "; pid ", opts.pid,
            seized.size() > 1 ? cat(" and the ", seized.size() - 1, " process(es) below it")
                              : std::string(),
            " left running as ", seized.size() > 1 ? "they were" : "it was"));
  } catch (const Error& e) {
    // A process that is gone explains the error only if the error is about it; a child that
    // simply finished (a `sleep` of a shell loop) while another cause failed the dump must
    // not hide that cause.
    auto gone = [&](pid_t p) {
      const std::string why = e.what();
      if (why.find(cat("pid ", p)) != std::string::npos ||
          why.find(std::strerror(ESRCH)) != std::string::npos)
        fail("pid ", p, " exited or was killed during the dump (", why, ")");
      fail(why, " (meanwhile pid ", p, " exited or was killed during the dump)");
    };
    if (!alive(opts.pid)) gone(opts.pid);
    for (pid_t p : seized)
      if (!alive(p)) gone(p);
    throw;
  }
}

namespace {

// Every descriptor the restore could not recreate, all named in one line, before the tree is
// touched any further. Standard descriptors usually lead outside the tree (a terminal, the
// caller's pipe): they are recorded, and the restore connects them to its own (--shell-job).
void refuse_unsupported_fds(const std::vector<TreeFiles>& files, const SharedCollection& shared) {
  std::string list;
  size_t count = 0;
  for (const auto& tf : files) {
    std::string mine;
    for (const auto& f : tf.process->fds()) {
      if (f.restorable() || f.fd() <= 2) continue;
      count++;
      std::string kind = image::FileDescriptor::Kind_Name(f.kind());
      auto why = shared.why_not.find({tf.process->pid(), f.fd()});
      mine += cat(mine.empty() ? "" : ", ", "fd ", f.fd(), " is ", article(kind), " ", kind, " (",
                  f.target(), ")",
                  why != shared.why_not.end() ? cat(": ", why->second)
                                              : std::string(" that lazycr cannot restore yet"));
    }
    if (!mine.empty())
      list += cat(list.empty() ? "" : "; ", describe_pid(tf.process->pid()), ": ", mine);
  }
  if (count == 0) return;
  fail("cannot dump ", count == 1 ? "a descriptor" : cat(count, " descriptors"),
       " lazycr cannot restore: ", list, "; with --skip-unsupported-fds the dump records ",
       count == 1 ? "it" : "them",
       " and 'lazycr restore --skip-unsupported-fds' opens /dev/null in ",
       count == 1 ? "its place" : "their places");
}

// What the restore would refuse whatever the machine (image-format/unrestorable.h): a dump that
// kills the tree refuses before anything is written, so that no program is killed into an
// image it cannot come back from; with --leave-running the image is written, with a warning.
void refuse_unrestorable(const std::vector<image::Process>& procs,
                         const std::vector<std::vector<image::MemoryArea>>& areas,
                         bool leave_running) {
  std::string list;
  for (size_t i = 0; i < procs.size(); i++) {
    std::vector<std::string> why = image::process_refusals(procs[i]);
    for (const auto& a : areas[i])
      if (std::string w = image::area_refusal(a); !w.empty()) why.push_back(w);
    if (why.empty()) continue;
    std::string mine;
    for (const auto& w : why) mine += cat(mine.empty() ? "" : ", ", w);
    list += cat(list.empty() ? "" : "; ", describe_pid(procs[i].pid()), ": ", mine);
  }
  if (list.empty()) return;
  if (leave_running) {
    log::warn("the restore will refuse this image: ", list);
    return;
  }
  fail("the restore would refuse this image, so the tree is left running: ", list,
       " (--leave-running writes it anyway)");
}

void record_zombie(const TreeNode& node, image::Process& proc) {
  const proc::Stat& st = node.zombie_stat;
  proc.set_pid(node.pid);
  proc.set_ppid(st.ppid);
  proc.set_pgid(st.pgrp);
  proc.set_sid(st.session);
  proc.set_comm(st.comm);
  proc.set_zombie(true);
  proc.set_exit_status(st.exit_code);
}

DumpResult dump_frozen(const DumpOptions& opts, uint64_t t0, std::vector<pid_t>& seized) {
  image::ImageWriter writer(opts.dir, opts.replace);
  image::PageStoreOptions store_opts;
  store_opts.frame_size = opts.frame_size;
  store_opts.compression = opts.compression;
  store_opts.level = opts.level;
  store_opts.auto_codec = opts.auto_codec;
  store_opts.threads = opts.threads;
  store_opts.page_hashes = opts.page_hashes || !opts.parent_dir.empty();

  if (opts.track) {
    if (!opts.leave_running) fail("--track needs --leave-running (it tracks a tree that runs on)");
    if (std::string why = write_tracking_unsupported(); !why.empty()) fail("cannot --track: ", why);
  }
  DumpResult result;
  image::Inventory inv;
  // The tree's identity, which a later --parent dump and every restore of a chain check.
  inv.set_root_start_ticks(proc::read_stat(opts.pid).start_time);
  inv.set_boot_id(image::read_boot_id());
  std::optional<image::ParentForDump> parent;
  if (!opts.parent_dir.empty()) {
    parent = image::open_parent_for_dump(opts.parent_dir, opts.pid, inv.root_start_ticks(),
                                         inv.boot_id());
    boost::system::error_code ec;
    if (boost::filesystem::equivalent(opts.dir, parent->record.dir(), ec))
      fail("parent image ", opts.parent_dir, ": is the image directory being written (-D)");
    *inv.mutable_parent() = parent->record;
    result.chain_length = parent->record.chain_length();
  }
  // -vv: the time of each stage, to see where the frozen time goes.
  uint64_t lap_from = now_ns();
  auto lap = [&](const char* stage) {
    const uint64_t t = now_ns();
    log::debug("dump: ", stage, " ", (t - lap_from) / 1000, " us");
    lap_from = t;
  };
  // Live dump: the twins' watchdog, forked before the tree is frozen (twin.h). Outlives the
  // twins (declared before them) and the tree.
  std::optional<TwinWatchdog> watchdog;
  std::map<pid_t, std::vector<proc::MapsEntry>> smaps_ahead;
  if (opts.leave_running && !opts.frozen_copy && !opts.track) {
    watchdog.emplace();
    smaps_ahead = read_smaps_ahead(opts.pid);
    lap("smaps read ahead");
    // Tests only: lets the program change its memory between the read and the freeze.
    if (opts.fault_inject == "stop-after-smaps") send_signal(::getpid(), SIGSTOP);
  }
  // The kernel's features are probed once (a few ms of forks and sockets): before the freeze,
  // not in the frozen time, where the dump first asks (XCR0, PAGEMAP_SCAN).
  (void)kernel_features();
  FrozenTree tree;
  tree.freeze(opts.pid);
  lap("freeze");
  // Write tracking (write_tracking.h): the parent's, taken over; this dump's, armed below.
  WriteTracking tracking;
  if (parent) tracking.take_over(parent->image->inventory(), tree);
  const std::vector<pid_t>& order = tree.preorder();
  for (pid_t p : order)
    if (!tree.node(p).zombie()) seized.push_back(p);
  fault_point(opts, "freeze");

  // Live dump (checkpoint/twin.h): each process gets a copy-on-write twin while frozen, the
  // tree runs on, and the pages are chosen and read from the twins. Write tracking starts (and
  // a tracked parent's ends) at the image's instant, with the tree frozen until the image is
  // committed (write_tracking.h): no live dump with it.
  const bool live_wanted = watchdog && !tracking.vouches();
  std::vector<std::unique_ptr<Twin>> twins(order.size());
  std::string why_not_live;  // a process no twin can stand in for: no live dump

  // Per process, in preorder: state first, memory later (once every descriptor is checked).
  std::vector<image::Process> procs(order.size());
  std::vector<std::vector<image::MemoryArea>> areas(order.size());
  const std::set<pid_t> tree_pids(order.begin(), order.end());
  std::map<std::pair<pid_t, int>, std::string> fd_why_not;  // objects/fd_kinds.h refusals
  VdsoFingerprint vdso;
  uint32_t xsave_size = 0;
  uint64_t xsave_features = 0;
  for (size_t i = 0; i < order.size(); i++) {
    throw_if_interrupted();
    TreeNode& node = tree.node(order[i]);
    image::Process& proc = procs[i];
    for (pid_t c : node.children) proc.add_children(c);
    if (node.zombie()) {
      record_zombie(node, proc);
      result.zombies++;
      continue;
    }
    FrozenProcess& fp = *node.frozen;
    // The address space is read before the scratch page exists, so the image never holds it.
    auto maps = smaps_while_frozen(fp.pid(), smaps_ahead);
    areas[i] = collect_areas(fp.pid(), maps);
    if (i == 0) vdso = fingerprint_vdso(fp.pid(), areas[i]);
    lap("areas");
    collect_threads(fp, proc, xsave_size, xsave_features);
    lap("threads");
    fault_point(opts, "threads");  // with the scratch page mapped
    collect_sigactions(fp, proc);
    lap("sigactions");
    collect_process_state(fp, proc);
    lap("process state");
    if (live_wanted && why_not_live.empty()) {
      // Cloned now, from the batch area the state was collected with: not mapped again.
      std::string why_not = twin_refusal(areas[i]);
      if (why_not.empty()) twins[i] = Twin::make(fp, why_not);
      if (twins[i]) {
        watchdog->watch(*twins[i]);
        lap("twin cloned");
        if (size_t n = mark_what_twin_lacks(fp.pid(), twins[i]->pid(), areas[i]))
          log::info(describe_pid(fp.pid()), ": ", n,
                    " area(s) changed MADV_DONTFORK / MADV_WIPEONFORK since smaps was read");
        lap("twin checked");
      } else {
        why_not_live = cat(describe_pid(fp.pid()), ": ", why_not);
      }
    }
    // The scratch page stays for the kernel objects (collect_objects releases it).
    proc.set_stop_signo(fp.stop_signo());
    for (auto& f : collect_fds(fp.pid(), tree_pids, fd_why_not)) *proc.add_fds() = std::move(f);
    lap("fds");
    result.threads += fp.threads().size();
    result.areas += areas[i].size();
  }

  // Descriptors across the tree: shared open file descriptions, pipes, socket pairs.
  std::vector<TreeFiles> files;
  for (size_t i = 0; i < order.size(); i++)
    if (!tree.node(order[i]).zombie())
      files.push_back({&procs[i], tree.node(order[i]).frozen->pidfd()});
  SharedCollection shared = collect_shared(files, {opts.tcp_established, opts.ext_unix_sk});
  shared.why_not.insert(fd_why_not.begin(), fd_why_not.end());
  lap("shared files");
  collect_ghosts(procs, areas, opts.ghost_limit, opts.skip_unsupported_fds, shared.objects);
  lap("ghosts");
  fault_point(opts, "files");
  if (!opts.skip_unsupported_fds) refuse_unsupported_fds(files, shared);
  // The tree will be killed: from now until the restore, the connections' incoming packets are
  // dropped (objects/net_lock.h), so that a peer sending meanwhile gets no reset. A failed dump
  // takes the lock away again.
  std::optional<objects::NetworkLock> net_lock;
  if (!opts.leave_running) net_lock.emplace(shared.objects.inet_sockets());
  collect_sysv_shm(procs, areas, shared.objects);
  refuse_unrestorable(procs, areas, opts.leave_running);
  collect_objects(tree, procs);  // seccomp filters, file locks (objects/)
  lap("objects");
  result.pipes = static_cast<uint64_t>(shared.objects.pipes_size());
  result.sockets = static_cast<uint64_t>(shared.objects.sockets_size());
  result.ghosts = static_cast<uint64_t>(shared.objects.ghosts_size());

  // Memory, process by process in preorder, so that a page shared with an earlier process
  // can refer to it. A single process needs no PFN pass.
  std::optional<PageDedup> dedup;
  if (opts.dedup && tree.live_count() > 1) dedup.emplace();

  // Live dump: what a twin cannot hold is copied now, the tree runs on, and the pages are
  // chosen and read from the twins.
  std::vector<MemoryPlan> plans;
  uint64_t frozen_end = 0;
  bool tree_running = false;
  if (opts.leave_running && !opts.frozen_copy && (opts.track || tracking.vouches())) {
    log::info(
        "live dump not used with write tracking (--track, or a tracked parent): the "
        "memory is read with the tree frozen");
  } else if (live_wanted && !why_not_live.empty()) {
    log::info("live dump not possible (", why_not_live,
              "): the memory is read with the tree frozen");
    for (auto& t : twins) t.reset();
  } else if (live_wanted) {
    plans.resize(order.size());
    uint64_t copied = 0;
    for (size_t i = 0; i < order.size(); i++) {
      if (!twins[i]) continue;
      plans[i] = plan_frozen_copies(order[i], areas[i]);
      copied += plans[i].copied_bytes;
    }
    lap("copied while frozen");
    fault_point(opts, "twins");
    shared.tcp_repair.resume();  // before the tree runs again
    tree.detach_all();
    tree_running = true;
    for (auto& t : twins)
      if (t) t->tree_released();
    frozen_end = now_ns();
    lap("tree released");
    result.live = true;
    log::info("live dump: tree frozen ", (frozen_end - tree.frozen_at()) / 1000, " us, ", copied,
              " bytes copied while frozen (shared, DONTFORK, WIPEONFORK memory)");
  }
  // Tests only: time for the program to act while its pages are read from the twins.
  uint64_t slow_us = 0;
  if (const char* v = ::getenv("LAZYCR_TEST_LIVE_READ_DELAY_US"); v != nullptr && result.live)
    slow_us = std::strtoull(v, nullptr, 10);
  log::Progress progress;
  bool first_batch = true;
  // Page store digests, taken as they were written: signing does not read them again.
  std::map<std::string, std::string> store_mac_digests;
  auto pages_name = [&](pid_t pid) {
    std::string path = writer.pages_path(pid);
    return path.substr(path.rfind('/') + 1);
  };
  for (size_t i = 0; i < order.size(); i++) {
    TreeNode& node = tree.node(order[i]);
    if (node.zombie()) continue;
    FrozenProcess& fp = *node.frozen;
    image::PageStoreOptions proc_store_opts = store_opts;
    if (parent && parent->image->has_pages(fp.pid()))
      proc_store_opts.parent = parent->image->shared_pages(fp.pid());
    image::PageStoreWriter pages(writer.pages_path(fp.pid()), proc_store_opts);
    auto report = [&](uint64_t pages_read) {
      throw_if_interrupted();
      if (first_batch) {
        first_batch = false;
        fault_point(opts, "memory");
        if (opts.fault_inject == "kill-target") send_signal_pidfd(fp.pidfd(), SIGKILL);
      }
      if (slow_us != 0) ::usleep(static_cast<useconds_t>(slow_us));
      if (!progress.enabled()) return;
      uint64_t written = pages.bytes_written();
      char line[200];
      double read_mib = pages_read * 4096.0 / (1 << 20);
      double written_mib = written / double(1 << 20);
      std::snprintf(line, sizeof line,
                    "dump: pid %d (%zu/%zu): %llu pages read (%.1f MiB), %.1f MiB written, "
                    "ratio %.2f",
                    fp.pid(), i + 1, order.size(), static_cast<unsigned long long>(pages_read),
                    read_mib, written_mib, read_mib > 0 ? written_mib / read_mib : 0.0);
      progress.update(line);
    };
    const WrittenRanges written = [&](uint64_t start, uint64_t end) {
      return tracking.written(fp.pid(), start, end);
    };
    // Flags given over whole areas between the early smaps read and the freeze.
    if (!smaps_ahead.empty())
      if (size_t n = refresh_vmflags(fp.pid(), twins[i] ? twins[i]->pid() : fp.pid(), areas[i]))
        log::info(describe_pid(fp.pid()), ": ", n, " area(s) changed flags since smaps was read");
    MemoryStats mem;
    // --compress auto: this store's codec, from a sample of what it will hold.
    auto choose_codec = [&](pid_t read_pid, const MemoryPlan& plan) {
      if (!proc_store_opts.auto_codec) return;
      const std::string sample = sample_planned_pages(read_pid, plan, areas[i], kCodecSamples);
      log::debug(describe_pid(fp.pid()), ": pages stored with ",
                 pages.choose_codec(sample.data(), sample.size()), " (auto, from a sample of ",
                 sample.size() / kPageSize, " pages)");
    };
    if (twins[i]) {
      // A twin is read through /proc/PID/mem: process_vm_readv pins pages (FOLL_PIN), which
      // makes the kernel copy every page the twin shares with the process first.
      plan_from_twin(fp.pid(), twins[i]->pid(), areas[i], plans[i], dedup ? &*dedup : nullptr);
      choose_codec(twins[i]->pid(), plans[i]);
      mem = write_memory(fp.pid(), twins[i]->pid(), plans[i], areas[i], pages, report,
                         dedup ? &*dedup : nullptr, true);
      // Nothing more is read from it (dedup re-reads earlier twins' pagemaps: they stay):
      // its teardown, as long as its memory is large, overlaps the rest of the dump.
      if (!dedup) twins[i]->kill();
    } else {
      MemoryPlan plan = plan_memory(fp.pid(), areas[i], dedup ? &*dedup : nullptr,
                                    parent ? &written : nullptr, &pages);
      choose_codec(fp.pid(), plan);
      mem = write_memory(fp.pid(), fp.pid(), plan, areas[i], pages, report,
                         dedup ? &*dedup : nullptr, tree.live_count() > 1);
    }
    auto stats = pages.finish();
    store_mac_digests[pages_name(fp.pid())] = stats.mac_digest;
    result.data_pages += stats.data_pages;
    result.zero_pages += stats.zero_pages;
    result.ref_pages += mem.ref_pages;
    result.parent_pages += stats.parent_pages;
    result.unread_pages += mem.unread_pages;
    log::info("pid ", fp.pid(), ": read ", mem.pages_read, " pages; stored ", stats.data_pages,
              " data + ", stats.zero_pages, " zero pages in ", stats.frames, " frames (",
              stats.raw_frames, " raw), ", mem.ref_pages, " pages refer to earlier processes");
  }
  progress.finish();
  lap("memory");
  if (opts.track) {
    for (size_t i = 0; i < order.size(); i++)
      if (!tree.node(order[i]).zombie()) tracking.arm(*tree.node(order[i]).frozen, areas[i]);
    if (auto rec = tracking.start_holder()) *inv.mutable_write_tracking() = std::move(*rec);
    lap("write tracking");
  }
  for (auto& t : twins)
    if (t) t->end();
  lap("twins ended");

  for (size_t i = 0; i < order.size(); i++) {
    for (auto& a : areas[i]) *procs[i].add_areas() = std::move(a);
    writer.write_process(procs[i]);
    if (!tree.node(order[i]).zombie())
      result.injected_syscalls += tree.node(order[i]).frozen->injected();
  }
  writer.write_shared(shared.objects);
  result.processes = order.size();

  // Until the image is committed the tree stays frozen: it must not run on past a state the
  // image does not describe, and it must survive if anything below fails.
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
  for (pid_t p : order) inv.add_pids(p);
  auto* o = inv.mutable_options();
  o->set_leave_running(opts.leave_running);
  o->set_compression_level(opts.level);
  o->set_compression(image::compression_name(store_opts));
  o->set_frame_size(opts.frame_size);
  o->set_skip_unsupported_fds(opts.skip_unsupported_fds);
  o->set_tcp_established(opts.tcp_established);
  o->set_ext_unix_sk(opts.ext_unix_sk);
  if (!tree_running) frozen_end = now_ns();
  inv.set_frozen_ns(frozen_end - tree.frozen_at());
  inv.set_dump_ns(now_ns() - t0);
  inv.set_created_unix_ns(wall_ns());
  writer.write_inventory(inv);
  lap("metadata");
  // Signed last, over every file: a restore trusts the credentials of a signed image only.
  // Without the key (lazycr is not root) the image stays unsigned: it restores only as what
  // it holds no privilege over (restore/trust.h).
  if (auto key = image::load_image_key(::geteuid() == 0)) {
    const uint64_t t_sign = now_ns();
    image::sign_image(writer.staging_dir(), *key, store_mac_digests);
    log::debug("dump: image signed in ", (now_ns() - t_sign) / 1000, " us");
  } else
    log::info("the image is not signed: ", image::image_key_path(), " is not readable");
  fault_point(opts, "commit");
  // Tests only: lets another dump commit to the same directory first, deterministically.
  if (opts.fault_inject == "stop-before-commit") send_signal(::getpid(), SIGSTOP);
  result.replaced = writer.commit();
  lap("commit");

  if (tree_running) {
    // Let go before the memory was read (live dump).
  } else if (opts.leave_running) {
    tracking.commit_and_protect();  // still frozen: the tracking starts at this image
    shared.tcp_repair.resume();     // before the tree runs again
    tree.detach_all();
    frozen_end = now_ns();
  } else {
    tree.kill_all();
    shared.tcp_repair.close_silently();  // the last close, in repair mode: no FIN, no RST
    if (net_lock) net_lock->keep();      // until the restore unlocks the connections
  }
  if (!opts.leave_running) frozen_end = now_ns();
  result.frozen_ns = frozen_end - tree.frozen_at();
  result.total_ns = now_ns() - t0;
  result.image_bytes = dir_bytes(opts.dir);
  return result;
}

}  // namespace

}  // namespace lazycr::checkpoint
