// Seizing a process tree: every thread of every process stopped before anything is read.
#include "checkpoint/frozen.h"

#include <linux/kcmp.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>

#include "checkpoint/interrupt.h"
#include "common/clock.h"
#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/signals.h"
#include "image-format/page_store.h"

namespace lazycr::checkpoint {
namespace {

using image::kPageSize;

constexpr unsigned long kSeizeOptions = PTRACE_O_TRACEEXEC;

// Bound on re-scans of the tree: each round must have found something new.
constexpr int kMaxRounds = 1000;

bool is_stop_signal(int signo) {
  return signo == SIGSTOP || signo == SIGTSTP || signo == SIGTTIN || signo == SIGTTOU;
}

bool is_dead_state(char state) {
  return state == 'Z' || state == 'X' || state == 'x';
}

// kcmp(2): 0 if the two resources are the same, > 0 if not.
long kcmp(pid_t a, pid_t b, int type) {
  return ::syscall(SYS_kcmp, a, b, type, 0, 0);
}

}  // namespace

std::string describe_pid(pid_t pid) {
  auto comm = proc::try_read_file(cat("/proc/", pid, "/comm"));
  if (comm && !comm->empty() && comm->back() == '\n') comm->pop_back();
  return comm ? cat("pid ", pid, " (", *comm, ")") : cat("pid ", pid);
}

FrozenProcess::FrozenProcess(pid_t pid) : pid_(pid) {
  pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd_) fail_errno("pidfd_open(", pid, ")");
}

FrozenProcess::~FrozenProcess() {
  try {
    release_scratch();
  } catch (const Error& e) {
    log::warn("pid ", pid_, ": could not unmap the scratch page at ", hex(scratch_), ": ",
              e.what());
  }
  // Detach the leader last: once killed, it reports only after every other thread has.
  while (!threads_.empty()) threads_.pop_back();
}

bool FrozenProcess::seize_new_threads() {
  std::vector<pid_t> tids = proc::list_tasks(pid_);
  if (tids.empty() || !proc::exists(pid_)) fail("pid ", pid_, " exited during the dump");
  const size_t first_new = threads_.size();
  for (pid_t tid : tids) {
    if (seen_.count(tid)) continue;
    try {
      threads_.push_back(TracedThread::seize(tid, kSeizeOptions));
    } catch (const Error& e) {
      // A thread that exited between listing and seizing is simply gone.
      if (e.sys_errno() == ESRCH && tid != pid_) {
        seen_.insert(tid);
        continue;
      }
      throw;
    }
    if (frozen_at_ == 0) frozen_at_ = now_ns();
    seen_.insert(tid);
  }
  // Every new thread is asked to stop before any is waited for: they stop together.
  for (size_t k = first_new; k < threads_.size(); k++) threads_[k].send_interrupt();
  const bool added = threads_.size() > first_new;
  for (size_t k = first_new; k < threads_.size();) {
    int signo = 0;
    try {
      signo = threads_[k].interrupt_and_wait();
    } catch (const Error&) {
      // A thread that exits while being interrupted is gone as well (the kernel ended the
      // link); the leader's exit is the process's, which the caller handles.
      if (threads_[k].tid() == pid_ || threads_[k].attached()) throw;
      threads_.erase(threads_.begin() + static_cast<std::ptrdiff_t>(k));
      continue;
    }
    if (threads_[k].tid() == pid_ && is_stop_signal(signo)) stop_signo_ = signo;
    k++;
  }
  if (added) {
    // The leader first.
    std::stable_partition(threads_.begin(), threads_.end(),
                          [&](const TracedThread& t) { return t.tid() == pid_; });
  }
  return added;
}

void FrozenProcess::freeze() {
  for (int round = 0;; round++) {
    if (round > 100) fail("pid ", pid_, ": threads keep appearing; cannot freeze it");
    throw_if_interrupted();
    if (!seize_new_threads()) break;
  }
  if (threads_.empty() || threads_[0].tid() != pid_)
    fail("pid ", pid_, ": main thread has exited (a zombie leader with live threads)");
  // A seccomp filter could refuse, or fake, the calls the dump injects. Checked once every
  // thread is stopped: until then another thread could still add a filter (TSYNC).
  for (auto& t : threads_)
    if (proc::read_status(t.tid()).seccomp != 0)
      t.set_options(kSeizeOptions | PTRACE_O_SUSPEND_SECCOMP);
  insn_ = find_vdso_syscall_insn(pid_);
}

long FrozenProcess::call(TracedThread& t, const char* what, long nr, uint64_t a1, uint64_t a2,
                         uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6) {
  // Between two injected calls the thread is back in its own registers: a safe point.
  throw_if_interrupted();
  return call_now(t, what, nr, a1, a2, a3, a4, a5, a6);
}

long FrozenProcess::call_now(TracedThread& t, const char* what, long nr, uint64_t a1, uint64_t a2,
                             uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6) {
  long r = t.syscall(insn_, InjectMode::kSingleStep, nr, a1, a2, a3, a4, a5, a6);
  if (r < 0 && r > -4096)
    fail_errno_value(static_cast<int>(-r), cat(what, " in thread ", t.tid(), " of pid ", pid_));
  return r;
}

namespace {
constexpr uint64_t kBatchAreaSize = 2 * kPageSize;  // the loop, then the table
constexpr uint64_t kBatchTableOffset = 256;
constexpr uint64_t kTwinStubOffset = 192;  // checkpoint/twin.h: the clone's stub
}  // namespace

uint64_t FrozenProcess::scratch() {
  if (scratch_ != 0) return scratch_;
  // One mapping, one round trip each way: the scratch page, then the batch area (where an
  // executable page can be mapped at all).
  if (!no_batch_area_) {
    throw_if_interrupted();
    const long r = leader().syscall(insn_, InjectMode::kSingleStep, SYS_mmap, 0,
                                    kPageSize + kBatchAreaSize, PROT_READ | PROT_WRITE | PROT_EXEC,
                                    MAP_SHARED | MAP_ANONYMOUS, static_cast<uint64_t>(-1), 0);
    if (r < 0 && r > -4096) {
      log::debug("pid ", pid_, ": no executable batch area (", std::strerror(static_cast<int>(-r)),
                 "): system calls are injected one by one");
      no_batch_area_ = true;
    } else {
      scratch_ = static_cast<uint64_t>(r);
      scratch_since_ = now_ns();
      batch_area_ = scratch_ + kPageSize;
      static_assert(kBatchTableOffset >= 128);
      if (batch_code().size() > kTwinStubOffset) fail("the batch loop does not fit its area");
      remote_write(pid_, batch_area_, batch_code().data(), batch_code().size());
      return scratch_;
    }
  }
  scratch_ = static_cast<uint64_t>(call(leader(), "mmap of a scratch page", SYS_mmap, 0, kPageSize,
                                        PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                                        static_cast<uint64_t>(-1), 0));
  scratch_since_ = now_ns();
  return scratch_;
}

std::optional<std::vector<long>> FrozenProcess::try_batch(TracedThread& t,
                                                          std::span<const BatchCall> calls) {
  if (!map_batch_area()) return std::nullopt;
  throw_if_interrupted();
  return run_batch(t, pid_, batch_area_, batch_area_ + kBatchTableOffset,
                   (kBatchAreaSize - kBatchTableOffset) / kBatchEntrySize, calls);
}

std::vector<long> FrozenProcess::run_calls(TracedThread& t, const char* what,
                                           std::span<const BatchCall> calls) {
  if (auto results = try_batch(t, calls)) {
    if (results->size() < calls.size() || (results->back() < 0 && results->back() > -4096))
      fail_errno_value(
          static_cast<int>(-results->back()),
          cat(what, " (call ", results->size() - 1, ") in thread ", t.tid(), " of pid ", pid_));
    return *results;
  }
  std::vector<long> results;
  for (const BatchCall& c : calls)
    results.push_back(call(t, what, c.nr, c.a[0], c.a[1], c.a[2], c.a[3], c.a[4], c.a[5]));
  return results;
}

bool FrozenProcess::map_batch_area() {
  if (no_batch_area_) return false;
  if (batch_area_ == 0) scratch();  // mapped together
  return batch_area_ != 0;
}

// The twin's clone: the parent traps at the int3 (+7, rip +8); the child (rax 0) goes on to
// exit_group(0). The child never gets that far while lazycr holds it.
constexpr unsigned char kTwinStub[] = {
    0x0f, 0x05,                    // syscall (clone)
    0x48, 0x85, 0xc0,              // test rax, rax
    0x74, 0x01,                    // jz child
    0xcc,                          // int3 (parent)
    0xb8, 0xe7, 0x00, 0x00, 0x00,  // child: mov eax, SYS_exit_group
    0x31, 0xff,                    // xor edi, edi
    0x0f, 0x05,                    // syscall
    0xeb, 0xf5,                    // jmp child
};
constexpr uint64_t kTwinStubParentTrap = 8;

std::optional<FrozenProcess::TwinIds> FrozenProcess::clone_twin(std::string& why_not) {
  TracedThread& t = leader();
  throw_if_interrupted();
  if (!map_batch_area()) {
    why_not = "no executable page can be mapped in it for the clone";
    return std::nullopt;
  }
  const uint64_t stub = batch_area_ + kTwinStubOffset;
  remote_write(pid_, stub, kTwinStub, sizeof kTwinStub);
  const unsigned long options =
      kSeizeOptions | (proc::read_status(t.tid()).seccomp != 0 ? PTRACE_O_SUSPEND_SECCOMP : 0);
  // exit_signal 0 makes PTRACE_EVENT_CLONE the event that auto-attaches the child.
  t.set_options(options | PTRACE_O_TRACECLONE);
  long r;
  try {
    r = t.syscall_trap_at(stub, stub + kTwinStubParentTrap, SYS_clone, CLONE_FILES, 0, 0, 0, 0);
  } catch (...) {
    t.set_options(options);
    throw;
  }
  t.set_options(options);
  std::vector<pid_t> born = t.take_new_tasks();
  if (r < 0 && r > -4096) {
    why_not = cat("clone failed: ", std::strerror(static_cast<int>(-r)));
    return std::nullopt;
  }
  if (born.size() != 1) fail("pid ", pid_, ": the injected clone reported ", born.size(), " tasks");
  return TwinIds{born[0], static_cast<pid_t>(r)};
}

long FrozenProcess::reap_child(pid_t ns_pid) {
  return leader().syscall(insn_, InjectMode::kSingleStep, SYS_wait4, static_cast<uint64_t>(ns_pid),
                          0, __WCLONE | WNOHANG, 0);
}

void FrozenProcess::release_scratch() {
  if (threads_.empty()) return;
  if (scratch_ == 0) return;
  const uint64_t s = std::exchange(scratch_, 0);
  const uint64_t len = std::exchange(batch_area_, 0) != 0 ? kPageSize + kBatchAreaSize : kPageSize;
  // Also on the way out of an interrupted dump: not a safe point, it is the rollback.
  call_now(leader(), "munmap of the scratch page", SYS_munmap, s, len);
  scratch_ns_ += now_ns() - scratch_since_;
}

uint64_t FrozenProcess::injected() const {
  uint64_t n = 0;
  for (const auto& t : threads_) n += t.injected_syscalls();
  return n;
}

void FrozenProcess::send_kill() {
  if (!send_signal_pidfd(pidfd_.get(), SIGKILL)) fail_errno("cannot kill pid ", pid_);
}

void FrozenProcess::wait_killed() {
  // Collect each traced thread's exit; the leader reports last, after all the others.
  for (auto it = threads_.rbegin(); it != threads_.rend(); ++it)
    while (it->attached() && it->wait_stop().kind != StopKind::kExited) {
    }
  threads_.clear();
  pollfd p{pidfd_.get(), POLLIN, 0};
  if (::poll(&p, 1, 10000) <= 0) log::warn("pid ", pid_, " did not exit within 10 s of SIGKILL");
}

void FrozenProcess::detach_all() {
  while (!threads_.empty()) threads_.pop_back();
}

FrozenTree::~FrozenTree() {
  // Children first: every process is stopped, so the order only matters for how quickly the
  // tree as a whole runs again; release in reverse discovery order.
  for (auto it = found_.rbegin(); it != found_.rend(); ++it) nodes_.at(*it).frozen.reset();
}

size_t FrozenTree::live_count() const {
  size_t n = 0;
  for (const auto& [pid, node] : nodes_) n += node.zombie() ? 0 : 1;
  return n;
}

void FrozenTree::freeze(pid_t root) {
  root_ = root;
  root_pidns_ = proc::read_link(cat("/proc/", root, "/ns/pid"));
  {
    TreeNode& n = nodes_[root];
    n.pid = root;
    found_.push_back(root);
    n.frozen = std::make_unique<FrozenProcess>(root);
    n.frozen->freeze();
    frozen_at_ = n.frozen->frozen_at();
  }
  // A frozen process cannot fork, so the children listed after it is stopped are all it
  // has; a fork in flight when it was interrupted has completed by then and shows up as a
  // child. The re-scan catches the rest (threads cloned in flight, CLONE_PARENT).
  for (int round = 0;; round++) {
    if (round >= kMaxRounds) fail(describe_pid(root), ": the process tree keeps changing");
    bool changed = false;
    for (size_t i = 0; i < found_.size(); i++) {
      pid_t p = found_[i];
      if (nodes_.at(p).zombie()) continue;
      if (round > 0 && nodes_.at(p).frozen->seize_new_threads()) changed = true;
      for (pid_t c : proc::list_children(p)) {
        if (nodes_.count(c)) continue;
        throw_if_interrupted();
        size_t before = nodes_.size();
        add_child(p, c);
        changed |= nodes_.size() != before;
      }
    }
    if (!changed && round > 0) break;
  }
  // Depth-first preorder from the root.
  std::function<void(pid_t)> visit = [&](pid_t p) {
    preorder_.push_back(p);
    for (pid_t c : nodes_.at(p).children) visit(c);
  };
  visit(root);
  log::info("froze ", describe_pid(root), " and ", preorder_.size() - 1, " process(es) below it (",
            nodes_.size() - live_count(), " zombie(s))");
}

void FrozenTree::add_child(pid_t parent, pid_t child) {
  if (child == ::getpid())
    fail(describe_pid(root_), ": lazycr itself (pid ", child, ") is in the tree below it");
  auto record_zombie = [&](const proc::Stat& st) {
    if (st.num_threads > 1)
      fail(describe_pid(child), ": main thread has exited (a zombie leader with live threads)");
    TreeNode& n = nodes_[child];
    n.pid = child;
    n.parent = parent;
    n.zombie_stat = st;
    nodes_.at(parent).children.push_back(child);
    found_.push_back(child);
  };
  auto stat_text = proc::try_read_file(cat("/proc/", child, "/stat"));
  if (!stat_text) return;  // reaped already (its parent ignores SIGCHLD)
  proc::Stat st = proc::parse_stat(*stat_text);
  if (st.ppid != parent) return;  // reaped and the pid reused
  if (is_dead_state(st.state)) return record_zombie(st);

  std::unique_ptr<FrozenProcess> fp;
  try {
    fp = std::make_unique<FrozenProcess>(child);
    fp->freeze();
  } catch (const Error& e) {
    // It may have exited meanwhile: a zombie now, or reaped. Anything else stands.
    fp.reset();
    auto again = proc::try_read_file(cat("/proc/", child, "/stat"));
    if (!again) return;
    proc::Stat st2 = proc::parse_stat(*again);
    if (st2.ppid != parent) return;
    if (is_dead_state(st2.state)) return record_zombie(st2);
    throw;
  }
  // Seized: it cannot change parent any more. A different parent means the pid was reused
  // between the listing and the seize.
  if (proc::read_stat(child).ppid != parent) return;
  std::string ns = proc::read_link(cat("/proc/", child, "/ns/pid"));
  if (ns != root_pidns_)
    fail(describe_pid(child), " (below ", describe_pid(root_),
         ") is in a nested PID namespace; lazycr cannot dump those");
  check_shared_tables(parent, child);
  TreeNode& n = nodes_[child];
  n.pid = child;
  n.parent = parent;
  n.frozen = std::move(fp);
  nodes_.at(parent).children.push_back(child);
  found_.push_back(child);
}

// What a restore could not give back: a child sharing its parent's memory (CLONE_VM, a
// vfork child before exec) or descriptor table (CLONE_FILES).
void FrozenTree::check_shared_tables(pid_t parent, pid_t child) {
  long vm = kcmp(parent, child, KCMP_VM);
  if (vm < 0) fail_errno("kcmp(", parent, ", ", child, ", KCMP_VM)");
  if (vm == 0)
    fail(describe_pid(child), " shares its memory with its parent ", parent,
         " (CLONE_VM or vfork); lazycr cannot dump that");
  long files = kcmp(parent, child, KCMP_FILES);
  if (files < 0) fail_errno("kcmp(", parent, ", ", child, ", KCMP_FILES)");
  if (files == 0)
    fail(describe_pid(child), " shares its descriptor table with its parent ", parent,
         " (CLONE_FILES); lazycr cannot dump that");
}

void FrozenTree::detach_all() {
  for (auto it = found_.rbegin(); it != found_.rend(); ++it) {
    auto& n = nodes_.at(*it);
    if (n.frozen) n.frozen->detach_all();
  }
}

void FrozenTree::kill_all() {
  // Every process is stopped, so none sees another's death before its own; SIGKILL them all
  // (children first) and only then collect the exits.
  for (auto it = preorder_.rbegin(); it != preorder_.rend(); ++it) {
    auto& n = nodes_.at(*it);
    if (n.frozen) n.frozen->send_kill();
  }
  for (auto it = preorder_.rbegin(); it != preorder_.rend(); ++it) {
    auto& n = nodes_.at(*it);
    if (n.frozen) n.frozen->wait_killed();
  }
}

}  // namespace lazycr::checkpoint
