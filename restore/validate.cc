// Everything a restore checks before it creates anything.
#include <signal.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "common/error.h"
#include "common/json.h"
#include "common/kernel_features.h"
#include "common/proc.h"
#include "common/vdso.h"
#include "image-format/unrestorable.h"
#include "objects/fd_kinds.h"
#include "objects/socket_families.h"
#include "restore/internal.h"
#include "restore/open_files.h"
#include "restore/sysv_shm.h"

namespace lazycr::restore {
namespace {

using image::FileDescriptor;
using image::MemoryArea;

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}

std::string hexs(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out.empty() ? "none" : out;
}

// The file at identity.path() must be the very file the dump saw, of the type `req` expects.
// Paths are absolute: the restored process resolves them exactly as lazycr does here (same
// root), and open_files.h checks the same identity again on what it opened.
void check_file(const OpenRequest& req) {
  if (req.id != nullptr && req.id->deleted())
    fail(req.what, " ", req.path, " had been deleted at dump time; lazycr cannot restore it");
  if (req.path.empty() || req.path[0] != '/')
    fail(req.what, " ", req.path, " is not an absolute path");
  struct stat st;
  if (::stat(req.path.c_str(), &st) != 0) fail_errno(req.what, " ", req.path, ": cannot stat");
  if (req.id != nullptr && (req.id->mode() & S_IFMT) != req.type)
    fail(req.what, " ", req.path, " is recorded as file type ", std::oct, req.id->mode() & S_IFMT,
         "; lazycr opens only what it expects there");
  check_identity(st, req);
}

OpenRequest mapped_file(const image::FileIdentity& id, const std::string& what) {
  OpenRequest req;
  req.path = id.path();
  req.id = &id;
  req.strict = true;
  req.what = what;
  return req;
}

std::string describe_taken(pid_t id) {
  auto comm = proc::try_read_file(cat("/proc/", id, "/comm"));
  if (comm && !comm->empty() && comm->back() == '\n') comm->pop_back();
  return comm ? cat(id, " (", *comm, ")") : cat(id);
}

// Our own [vvar], [vvar_vclock], [vdso]: the image's must have the same sizes and layout.
void check_vdso_layout(const image::Process& p) {
  std::vector<std::pair<std::string, std::pair<uint64_t, uint64_t>>> mine, theirs;
  for (const auto& m : proc::parse_maps(proc::read_file("/proc/self/maps")))
    if (m.path == "[vdso]" || m.path == "[vvar]" || m.path == "[vvar_vclock]")
      mine.push_back({m.path, {m.start, m.end}});
  for (const auto& a : p.areas())
    if (a.kind() == MemoryArea::VDSO || a.kind() == MemoryArea::VVAR ||
        a.kind() == MemoryArea::VVAR_VCLOCK)
      theirs.push_back({a.name(), {a.start(), a.end()}});
  if (theirs.empty()) return;
  auto layout = [](const auto& v) {
    std::string s;
    if (v.empty()) return std::string("none");
    uint64_t base = v.front().second.first;
    for (const auto& [name, r] : v)
      s += cat(name, "@+", hex(r.first - base), ":", hex(r.second - r.first), " ");
    return s;
  };
  if (layout(mine) != layout(theirs))
    fail("the image's vdso block (", layout(theirs), ") is laid out unlike this kernel's (",
         layout(mine), ")");
}

// vm.mmap_min_addr: the kernel refuses MAP_FIXED below it (EPERM) to anyone without
// CAP_SYS_RAWIO in the initial namespace, and the areas are mapped from inside the process.
uint64_t mmap_min_addr() {
  std::string v = proc::read_file("/proc/sys/vm/mmap_min_addr");
  return std::strtoull(v.c_str(), nullptr, 10);
}

constexpr uint64_t sigbit(int sig) {
  return 1ull << (sig - 1);
}

}  // namespace

namespace {

// Sessions and process groups the restore can make (restore.cc, start_session/join_group):
// a process is the leader of its session, or in its parent's; a process group is led by a
// process of the image, or is the root's group.
void validate_tree(const std::vector<image::Process>& procs) {
  std::map<int, const image::Process*> by_pid;
  for (const auto& p : procs) by_pid[p.pid()] = &p;
  const image::Process& root = procs.front();
  for (size_t i = 1; i < procs.size(); i++) {
    const image::Process& p = procs[i];
    auto parent = by_pid.find(p.ppid());
    if (parent == by_pid.end())
      fail("pid ", p.pid(), ": its parent ", p.ppid(), " is not in the image");
    if (p.sid() != p.pid() && p.sid() != parent->second->sid())
      fail("pid ", p.pid(), ": session ", p.sid(), " is neither its own nor its parent's (",
           parent->second->sid(), "); lazycr cannot recreate that session");
    if (p.pgid() == p.pid()) continue;
    auto leader = by_pid.find(p.pgid());
    bool led_here = leader != by_pid.end() && leader->second->pgid() == p.pgid();
    if (led_here) {
      if (leader->second->sid() != p.sid())
        fail("pid ", p.pid(), ": process group ", p.pgid(), " is in another session");
      continue;
    }
    if (p.pgid() != root.pgid() || p.sid() != root.sid())
      fail("pid ", p.pid(), ": process group ", p.pgid(),
           " has its leader outside the image and is not the root's; lazycr cannot recreate it");
  }
}

// What every live process of the image needs.
void validate_process(const image::Process& p, const RestoreOptions& opts,
                      const std::set<int>& image_pids);

}  // namespace

void validate_image(const image::ImageReader& img, const RestoreOptions& opts) {
  const auto& inv = img.inventory();
  const auto& procs = img.processes();
  const image::Process& p = procs.front();
  if (p.zombie()) fail("it was a zombie at dump time; there is nothing to run");

  // Same kernel, same vdso: the process keeps calling into its vdso text.
  struct utsname uts;
  ::uname(&uts);
  if (inv.kernel().release() != uts.release)
    fail("the image is from kernel ", inv.kernel().release(), ", this is ", uts.release);
  VdsoFingerprint own = fingerprint_vdso_of(0);
  const auto& k = inv.kernel();
  bool same = own.size == k.vdso_size() && (!own.build_id.empty() && !k.vdso_build_id().empty()
                                                ? own.build_id == k.vdso_build_id()
                                                : own.hash == k.vdso_hash());
  if (!same)
    fail("the image's vdso (build-id ", hexs(k.vdso_build_id()), ", ", k.vdso_size(),
         " bytes, hash ", hex(k.vdso_hash()), ") is not this kernel's (build-id ",
         hexs(own.build_id), ", ", own.size, " bytes, hash ", hex(own.hash), ")");
  for (const auto& q : procs)
    if (!q.zombie()) check_vdso_layout(q);

  // xsave: the kernel takes exactly its own size, and only features this CPU has.
  // CPUID/XGETBV only: the full kernel_features() probe costs ~1.4 ms of every restore.
  const CpuXsave cpu = cpu_xsave();
  bool any_xsave = false;
  for (const auto& q : procs)
    for (const auto& t : q.threads()) any_xsave |= !t.xsave().empty();
  if (any_xsave) {
    if (inv.cpu().xsave_size() != cpu.size)
      fail("the image's xsave areas are ", inv.cpu().xsave_size(), " bytes, this CPU's are ",
           cpu.size, " bytes");
    uint64_t missing = inv.cpu().xsave_features() & ~cpu.features;
    if (missing != 0)
      fail("the image uses xsave features ", hex(missing), " this CPU lacks (XCR0 ",
           hex(cpu.features), ")");
  }
  if (!clone3_knows_set_tid()) fail("this kernel lacks clone3 with set_tid");

  // PIDs and TIDs (a zombie has its pid only).
  std::vector<int> ids;
  for (const auto& q : procs) {
    if (q.threads_size() == 0) ids.push_back(q.pid());
    for (const auto& t : q.threads()) ids.push_back(t.tid());
  }
  if (opts.pidns) {
    for (int id : ids)
      if (id == 1)
        fail("pid/tid 1 belongs to the reaper in a new PID namespace; --pidns cannot restore it");
  } else {
    std::string taken;
    int count = 0;
    for (int id : ids)
      if (proc::exists(id) && count++ < 16)
        taken += cat(taken.empty() ? "" : ", ", describe_taken(id));
    if (count > 16) taken += cat(" and ", count - 16, " more");
    if (!taken.empty())
      fail("PID/TID in use: ", taken, "; --pidns restores into a fresh PID namespace");
  }
  validate_tree(procs);
  objects::SocketOptions sock_opts;
  sock_opts.tcp_established = opts.tcp_established;
  sock_opts.ext_unix_sk = opts.ext_unix_sk;
  for (const objects::SocketFamily* fam : objects::socket_families())
    fam->validate(img.shared(), sock_opts);
  std::set<int> image_pids;
  for (const auto& q : procs) image_pids.insert(q.pid());
  validate_sysv_areas(procs, img.shared());
  for (const auto& q : procs) {
    if (q.zombie()) continue;
    try {
      validate_process(q, opts, image_pids);
    } catch (const Error& e) {
      // The caller names the root already ("validate for pid N: ").
      if (&q == &procs.front()) throw;
      throw Error(cat("pid ", q.pid(), ": ", e.what()), e.sys_errno());
    }
  }
}

namespace {

void validate_process(const image::Process& p, const RestoreOptions& opts,
                      const std::set<int>& image_pids) {
  // What the image alone rules out; the dump asked the same before it killed anything.
  auto refusals = image::process_refusals(p);
  if (!refusals.empty()) fail(refusals.front());
  // Credentials are restored as the last step, which needs lazycr to be allowed to set them.
  const auto& c = p.creds();
  if (c.uids_size() != 4 || c.gids_size() != 4) fail("its uids/gids are incomplete in the image");
  if (::geteuid() != 0) {
    proc::Status me = proc::read_status(::getpid());
    if (!std::equal(c.uids().begin(), c.uids().end(), me.uids.begin(), me.uids.end()) ||
        !std::equal(c.gids().begin(), c.gids().end(), me.gids.begin(), me.gids.end()))
      fail("its uids/gids differ from lazycr's and lazycr is not root");
  }

  std::string root = proc::read_link("/proc/self/root");
  if (p.root() != root) fail("its root directory was ", p.root(), ", lazycr's is ", root);
  struct stat st;
  if (p.cwd().empty() || p.cwd()[0] != '/')
    fail("its working directory ", p.cwd(), " is not an absolute path");
  // A ghost (deleted at dump time) is recreated from the image (ghost_files.h).
  if (p.cwd_ghost_id() == 0 && (::stat(p.cwd().c_str(), &st) != 0 || !S_ISDIR(st.st_mode)))
    fail("its working directory ", p.cwd(), " is not a directory any more");
  if (p.exe_ghost_id() == 0) check_file(mapped_file(p.exe(), "executable"));

  const uint64_t min_addr = mmap_min_addr();
  for (const auto& a : p.areas()) {
    if (a.start() < min_addr)
      fail("area ", hex(a.start()), "-", hex(a.end()), " lies below vm.mmap_min_addr (",
           hex(min_addr), "); the kernel refuses to map it there");
    std::string what = cat("area ", hex(a.start()), "-", hex(a.end()), " maps");
    switch (a.kind()) {
      case MemoryArea::PRIVATE_FILE:
      case MemoryArea::SHARED_FILE:
        if (a.ghost_id() == 0) check_file(mapped_file(a.file(), what));
        break;
      default:
        break;
    }
  }

  for (const auto& f : p.fds()) {
    std::string kind = FileDescriptor::Kind_Name(f.kind());
    bool tty = f.kind() == FileDescriptor::CHARDEV &&
               (starts_with(f.target(), "/dev/pts/") || starts_with(f.target(), "/dev/tty"));
    tty = tty && f.pty_end() == FileDescriptor::NOT_PTY_PAIR;  // a pair's slave is remade
    if (opts.shell_job && f.fd() <= 2 && (tty || !f.restorable())) continue;  // lazycr's own
    if (!f.restorable())
      fail("fd ", f.fd(), " is a ", kind, " (", f.target(), ") that lazycr cannot restore",
           f.fd() <= 2 ? "; --shell-job gives the process lazycr's fds 0-2 instead" : "");
    // Pipes, sockets and pty pairs are made by lazycr (shared_files.h), which checks them;
    // epoll instances inside the process (objects/epoll).
    if (f.kind() == FileDescriptor::PIPE || f.kind() == FileDescriptor::SOCKET ||
        f.kind() == FileDescriptor::EPOLL || f.pty_end() != FileDescriptor::NOT_PTY_PAIR)
      continue;
    if (f.ghost_id() != 0) continue;  // recreated from the image (ghost_files.h)
    if (const objects::FdKind* k = objects::fd_kind(f.kind())) {
      try {
        k->validate(f, image_pids);
      } catch (const Error& e) {
        fail("fd ", f.fd(), " (", kind, "): ", e.what());
      }
      continue;
    }
    // The same file; its contents may have moved on (a log), unlike a mapped file's.
    check_file(request_for_fd(f));
  }
}

}  // namespace

}  // namespace lazycr::restore
