#include "restore/open_files.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "common/error.h"
#include "common/file_type.h"
#include "common/proc.h"

namespace lazycr::restore {
namespace {

using image::FileDescriptor;

constexpr unsigned kPtySlaveMajor = 136;  // UNIX98_PTY_SLAVE_MAJOR, 8 majors
constexpr unsigned kPtySlaveMajors = 8;
// The status flags F_SETFL sets (the access mode and creation flags are fixed at open).
constexpr int kSettableFlags = O_APPEND | O_ASYNC | O_DIRECT | O_NOATIME | O_NONBLOCK;

int64_t ns_of(const struct timespec& t) {
  return static_cast<int64_t>(t.tv_sec) * 1000000000ll + t.tv_nsec;
}

bool is_pty(uint64_t rdev) {
  return major(rdev) >= kPtySlaveMajor && major(rdev) < kPtySlaveMajor + kPtySlaveMajors;
}

// Devices are opened non-blocking (a serial line would wait for its carrier) and get their
// status flags afterwards. The open goes through the /proc/self/fd link of the O_PATH
// descriptor already checked, which O_NOFOLLOW would refuse (ELOOP: sqlite opens its database
// with it).
// An O_PATH descriptor opens nothing (a device does not act) and takes no status flags.
int open_flags(const OpenRequest& req) {
  int flags = (req.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_NOFOLLOW)) | O_CLOEXEC | O_NOCTTY;
  if ((req.type == S_IFCHR || req.type == S_IFBLK) && !(req.flags & O_PATH)) flags |= O_NONBLOCK;
  return flags;
}
bool needs_setfl(const OpenRequest& req) {
  return (req.type == S_IFCHR || req.type == S_IFBLK) && !(req.flags & (O_NONBLOCK | O_PATH));
}

// A thread's credentials as capset and setgroups take them.
struct CapData {
  uint32_t words[6];  // effective, permitted, inheritable (low 32 bits), then the high halves
};
CapData cap_data(uint64_t eff, uint64_t prm, uint64_t inh) {
  return CapData{{static_cast<uint32_t>(eff), static_cast<uint32_t>(prm),
                  static_cast<uint32_t>(inh), static_cast<uint32_t>(eff >> 32),
                  static_cast<uint32_t>(prm >> 32), static_cast<uint32_t>(inh >> 32)}};
}
struct CapHeader {
  uint32_t version = _LINUX_CAPABILITY_VERSION_3;
  int32_t pid = 0;
};

// lazycr's own credentials: the process being built is a copy of lazycr.
const proc::Status& lazycr_creds() {
  static const proc::Status me = proc::read_status(::getpid());
  return me;
}

}  // namespace

OpenRequest request_for_fd(const FileDescriptor& f) {
  OpenRequest req;
  req.path = f.file().path().empty() ? f.target() : f.file().path();
  req.flags = static_cast<int>(f.flags());
  req.id = &f.file();
  req.rdev = f.rdev();
  req.what = cat("fd ", f.fd());
  switch (f.kind()) {
    case FileDescriptor::REGULAR:
      req.type = S_IFREG;
      break;
    case FileDescriptor::DIRECTORY:
      req.type = S_IFDIR;
      break;
    case FileDescriptor::CHARDEV:
      req.type = S_IFCHR;
      break;
    case FileDescriptor::BLOCKDEV:
      req.type = S_IFBLK;
      break;
    default:
      fail(req.what, " (", f.target(), ") is a ", FileDescriptor::Kind_Name(f.kind()),
           ", which lazycr does not open by path");
  }
  return req;
}

void check_identity(const struct stat& st, const OpenRequest& req) {
  const std::string name = cat(req.what, " ", req.path);
  if ((st.st_mode & S_IFMT) != req.type)
    fail(name, " is ", file_type_name(st.st_mode), ", not ", file_type_name(req.type),
         " as in the image; lazycr will not open it");
  auto changed = [&](const char* field, auto before, auto now) {
    fail(name, " changed since the dump (", field, " ", before, " -> ", now, ")");
  };
  if (req.type == S_IFCHR || req.type == S_IFBLK) {
    if (st.st_rdev != req.rdev)
      changed("device number", cat(major(req.rdev), ":", minor(req.rdev)),
              cat(major(st.st_rdev), ":", minor(st.st_rdev)));
    // A terminal is the same only if it is the same pty: a new one takes a closed one's number.
    if (req.type == S_IFCHR && is_pty(st.st_rdev)) {
      if (req.id == nullptr || req.id->ctime_ns() == 0)
        fail(name,
             ": the image does not say which terminal it was (no ctime); --shell-job "
             "gives the process lazycr's terminal instead");
      if (ns_of(st.st_ctim) != req.id->ctime_ns())
        fail(name,
             " is another terminal than the process had (it was closed and its number "
             "reused); --shell-job gives the process lazycr's terminal instead");
    }
  }
  if (req.id == nullptr || req.id->inode() == 0) {
    if (req.type == S_IFCHR) return;  // devices of older images: the number identifies them
    fail(name, ": the image does not record its device and inode");
  }
  if (st.st_dev != req.id->dev()) changed("device", req.id->dev(), st.st_dev);
  if (st.st_ino != req.id->inode()) changed("inode", req.id->inode(), st.st_ino);
  if (!req.strict) return;
  if (static_cast<uint64_t>(st.st_size) != req.id->size())
    changed("size", req.id->size(), st.st_size);
  if (ns_of(st.st_mtim) != req.id->mtime_ns())
    changed("mtime ns", req.id->mtime_ns(), ns_of(st.st_mtim));
}

void push_enter_identity(RemoteProcess& r, const image::Credentials& c, std::vector<Call>& calls) {
  if (::geteuid() != 0) return;
  if (c.uids_size() != 4 || c.gids_size() != 4) fail("the image's uids/gids are incomplete");
  const proc::Status& me = lazycr_creds();
  std::vector<uint32_t> groups(c.groups().begin(), c.groups().end());
  uint64_t groups_at = groups.empty() ? 0 : r.push(groups.data(), groups.size() * 4);
  CapHeader header;
  CapData data = cap_data(c.cap_effective() & me.cap_prm, me.cap_prm, me.cap_inh);
  uint64_t header_at = r.push(&header, sizeof header);
  uint64_t data_at = r.push(&data, sizeof data);
  // setfs[ug]id never fail; the value each returns is checked by open_as_process().
  calls.push_back(make_call(cat("setgroups(", groups.size(), " groups of the image)"),
                            SYS_setgroups, groups.size(), groups_at));
  calls.push_back(make_call(cat("setfsgid(", c.gids(3), ")"), SYS_setfsgid, c.gids(3)));
  calls.push_back(make_call(cat("setfsuid(", c.uids(3), ")"), SYS_setfsuid, c.uids(3)));
  calls.push_back(
      make_call("capset to the image's effective capabilities", SYS_capset, header_at, data_at));
}

void push_leave_identity(RemoteProcess& r, std::vector<Call>& calls) {
  if (::geteuid() != 0) return;
  const proc::Status& me = lazycr_creds();
  CapHeader header;
  CapData data = cap_data(me.cap_eff, me.cap_prm, me.cap_inh);
  uint64_t header_at = r.push(&header, sizeof header);
  uint64_t data_at = r.push(&data, sizeof data);
  uint64_t groups_at = me.groups.empty() ? 0 : r.push(me.groups.data(), me.groups.size() * 4);
  calls.push_back(make_call("capset back to lazycr's", SYS_capset, header_at, data_at));
  calls.push_back(make_call("setfsuid back", SYS_setfsuid, me.uids.at(3)));
  calls.push_back(make_call("setfsgid back", SYS_setfsgid, me.gids.at(3)));
  calls.push_back(make_call("setgroups back", SYS_setgroups, me.groups.size(), groups_at));
}

void push_place_fds(const std::vector<const image::FileDescriptor*>& opened,
                    const std::vector<long>& fds, std::vector<Call>& calls) {
  for (size_t k = 0; k < opened.size(); k++) {
    const auto& f = *opened[k];
    const uint64_t num = static_cast<uint64_t>(f.fd());
    const uint64_t fd = static_cast<uint64_t>(fds[k]);
    calls.push_back(make_call(cat("dup3(", fd, ", ", num, ")"), SYS_dup3, fd, num,
                              f.cloexec() ? O_CLOEXEC : 0));
    calls.push_back(make_call(cat("close(", fd, ")"), SYS_close, fd));
    if (f.kind() == image::FileDescriptor::REGULAR && f.pos() != 0)
      calls.push_back(
          make_call(cat("lseek(", num, ", ", f.pos(), ")"), SYS_lseek, num, f.pos(), SEEK_SET));
  }
}

std::vector<long> open_as_process(RemoteProcess& r, const image::Credentials& creds,
                                  const std::vector<OpenRequest>& reqs, int min_fd) {
  if (reqs.empty()) return {};
  const bool switching = ::geteuid() == 0;
  // 1. O_PATH descriptors (they open nothing), moved to min_fd and up, as the image's process:
  //    the path is walked with its permissions.
  r.reset_arena();
  std::vector<Call> calls;
  push_enter_identity(r, creds, calls);
  size_t check_at = calls.size();
  if (switching) {
    calls.push_back(make_call("setfsuid(-1)", SYS_setfsuid, ~0u));
    calls.push_back(make_call("setfsgid(-1)", SYS_setfsgid, ~0u));
  }
  // Each open takes the lowest free number (known from the process's descriptor table) and is
  // moved to min_fd and up in the same batch, so the lowest free number stays the same.
  std::vector<int> listed = proc::list_fds(r.pid());
  std::set<int> taken(listed.begin(), listed.end());
  int lowest = 0;
  while (taken.count(lowest)) lowest++;
  std::vector<size_t> dup_at;
  for (const auto& req : reqs) {
    if (req.path.empty() || req.path[0] != '/')
      fail(req.what, " ", req.path, ": not an absolute path");
    calls.push_back(make_call(cat("open ", req.path, " for ", req.what, " (O_PATH)"), SYS_openat,
                              static_cast<uint64_t>(AT_FDCWD),
                              r.push(req.path.c_str(), req.path.size() + 1), O_PATH | O_CLOEXEC,
                              0));
    dup_at.push_back(calls.size());
    calls.push_back(make_call(cat("fcntl(F_DUPFD_CLOEXEC) for ", req.what), SYS_fcntl,
                              static_cast<uint64_t>(lowest), F_DUPFD_CLOEXEC,
                              static_cast<uint64_t>(min_fd)));
    calls.push_back(
        make_call(cat("close(", lowest, ")"), SYS_close, static_cast<uint64_t>(lowest)));
  }
  push_leave_identity(r, calls);
  std::vector<long> res = r.batch(calls);
  if (switching) {
    if (res[check_at] != creds.uids(3) || res[check_at + 1] != creds.gids(3))
      fail("the process did not take the image's fsuid/fsgid (", res[check_at], "/",
           res[check_at + 1], ") to open its files");
  }
  std::vector<long> paths;
  for (size_t at : dup_at) paths.push_back(res[at]);

  // 2. Each is what the image says it is (checked on the object the descriptor holds).
  for (size_t k = 0; k < reqs.size(); k++) {
    struct stat st;
    std::string link = cat("/proc/", r.pid(), "/fd/", paths[k]);
    if (::stat(link.c_str(), &st) != 0) fail_errno("stat of ", link, " (", reqs[k].path, ")");
    check_identity(st, reqs[k]);
  }

  // 3. Reopened with the real flags, again as the image's process (the file's permissions).
  r.reset_arena();
  calls.clear();
  push_enter_identity(r, creds, calls);
  std::vector<size_t> got_at;
  for (size_t k = 0; k < reqs.size(); k++) {
    std::string self = cat("/proc/self/fd/", paths[k]);
    calls.push_back(make_call(cat("open ", reqs[k].path, " for ", reqs[k].what), SYS_openat,
                              static_cast<uint64_t>(AT_FDCWD),
                              r.push(self.c_str(), self.size() + 1),
                              static_cast<uint64_t>(open_flags(reqs[k])), 0));
    if (needs_setfl(reqs[k]))
      calls.push_back(make_call(cat("fcntl(F_SETFL) of ", reqs[k].what), SYS_fcntl,
                                static_cast<uint64_t>(lowest), F_SETFL,
                                static_cast<uint64_t>(reqs[k].flags & kSettableFlags)));
    got_at.push_back(calls.size());
    calls.push_back(make_call(cat("fcntl(F_DUPFD_CLOEXEC) for ", reqs[k].what), SYS_fcntl,
                              static_cast<uint64_t>(lowest), F_DUPFD_CLOEXEC,
                              static_cast<uint64_t>(min_fd)));
    calls.push_back(
        make_call(cat("close(", lowest, ")"), SYS_close, static_cast<uint64_t>(lowest)));
    calls.push_back(make_call(cat("close of the O_PATH descriptor of ", reqs[k].what), SYS_close,
                              static_cast<uint64_t>(paths[k])));
  }
  push_leave_identity(r, calls);
  res = r.batch(calls);
  std::vector<long> out;
  for (size_t at : got_at) out.push_back(res[at]);
  return out;
}

namespace {

// The calling thread's file-system identity, switched to an image process's and back.
class ActingAs {
 public:
  explicit ActingAs(const image::Credentials& c) {
    if (::geteuid() != 0) return;
    if (c.uids_size() != 4 || c.gids_size() != 4) fail("the image's uids/gids are incomplete");
    const proc::Status& me = lazycr_creds();
    saved_ = cap_data(me.cap_eff, me.cap_prm, me.cap_inh);
    active_ = true;
    std::vector<uint32_t> groups(c.groups().begin(), c.groups().end());
    // Raw system calls: they change this thread only (glibc's change every thread).
    if (::syscall(SYS_setgroups, groups.size(), groups.data()) != 0)
      fail_errno("setgroups to the image's groups");
    ::syscall(SYS_setfsgid, c.gids(3));
    ::syscall(SYS_setfsuid, c.uids(3));
    CapHeader h;
    CapData d = cap_data(c.cap_effective() & me.cap_prm, me.cap_prm, me.cap_inh);
    if (::syscall(SYS_capset, &h, d.words) != 0) fail_errno("capset to the image's capabilities");
    if (::syscall(SYS_setfsuid, ~0u) != static_cast<long>(c.uids(3)) ||
        ::syscall(SYS_setfsgid, ~0u) != static_cast<long>(c.gids(3)))
      fail("lazycr could not take the image's fsuid/fsgid to open its files");
  }
  ~ActingAs() {
    if (!active_) return;
    const proc::Status& me = lazycr_creds();
    CapHeader h;
    ::syscall(SYS_capset, &h, saved_.words);
    ::syscall(SYS_setfsuid, me.uids.at(3));
    ::syscall(SYS_setfsgid, me.gids.at(3));
    ::syscall(SYS_setgroups, me.groups.size(), me.groups.data());
  }
  ActingAs(const ActingAs&) = delete;
  ActingAs& operator=(const ActingAs&) = delete;

 private:
  bool active_ = false;
  CapData saved_{};
};

}  // namespace

UniqueFd open_here_as(const image::Credentials& creds, const OpenRequest& req) {
  if (req.path.empty() || req.path[0] != '/')
    fail(req.what, " ", req.path, ": not an absolute path");
  ActingAs as(creds);
  UniqueFd path(::open(req.path.c_str(), O_PATH | O_CLOEXEC));
  if (!path) fail_errno(req.what, " ", req.path, ": open");
  struct stat st;
  if (::fstat(path.get(), &st) != 0) fail_errno(req.what, " ", req.path, ": fstat");
  check_identity(st, req);
  UniqueFd fd(::open(cat("/proc/self/fd/", path.get()).c_str(), open_flags(req)));
  if (!fd) fail_errno(req.what, " ", req.path, ": open");
  if (needs_setfl(req) && ::fcntl(fd.get(), F_SETFL, req.flags & kSettableFlags) != 0)
    fail_errno(req.what, " ", req.path, ": fcntl(F_SETFL)");
  return fd;
}

void run_here_as(const image::Credentials& creds, const std::function<void()>& fn) {
  ActingAs as(creds);
  fn();
}

}  // namespace lazycr::restore
