// Open file descriptors of a frozen process.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/proc.h"
#include "objects/fd_kinds.h"

namespace lazycr::checkpoint {
namespace {

using image::FileDescriptor;

constexpr const char kDeletedSuffix[] = " (deleted)";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

FileDescriptor::Kind classify(const std::string& target, const struct stat* st) {
  if (starts_with(target, "pipe:")) return FileDescriptor::PIPE;
  if (starts_with(target, "socket:")) return FileDescriptor::SOCKET;
  if (starts_with(target, "anon_inode:")) {
    std::string what = target.substr(11);
    if (const objects::FdKind* k = objects::fd_kind_of_anon(what)) return k->kind;
    // Kinds lazycr records but cannot restore yet (objects/fd_kinds.h restores the others).
    if (what == "[eventfd]") return FileDescriptor::EVENTFD;
    if (what == "[eventpoll]") return FileDescriptor::EPOLL;
    if (what == "[signalfd]") return FileDescriptor::SIGNALFD;
    if (what == "[timerfd]") return FileDescriptor::TIMERFD;
    if (what == "inotify") return FileDescriptor::INOTIFY;
    if (what == "[pidfd]") return FileDescriptor::PIDFD;
    if (what == "[userfaultfd]") return FileDescriptor::USERFAULTFD;
    return FileDescriptor::ANON_INODE;
  }
  if (starts_with(target, "/memfd:")) return FileDescriptor::MEMFD;
  if (st == nullptr) return FileDescriptor::UNKNOWN;
  if (S_ISREG(st->st_mode)) return FileDescriptor::REGULAR;
  if (S_ISDIR(st->st_mode)) return FileDescriptor::DIRECTORY;
  if (S_ISCHR(st->st_mode)) return FileDescriptor::CHARDEV;
  if (S_ISBLK(st->st_mode)) return FileDescriptor::BLOCKDEV;
  if (S_ISFIFO(st->st_mode)) return FileDescriptor::FIFO;
  if (S_ISSOCK(st->st_mode)) return FileDescriptor::SOCKET;
  return FileDescriptor::UNKNOWN;
}

}  // namespace

const char* article(const std::string& word) {
  if (word.empty()) return "a";
  char c = word[0];
  // "UNIX", "USERFAULTFD", "UDP" sound like "you"; "UNKNOWN" does not.
  if (c == 'U' || c == 'u') return word.rfind("UNKNOWN", 0) == 0 ? "an" : "a";
  return std::strchr("AEIOaeio", c) ? "an" : "a";
}

image::FileIdentity file_identity(const std::string& reported, const std::string& stat_path) {
  image::FileIdentity id;
  std::string path = reported;
  if (ends_with(path, kDeletedSuffix)) {
    path.resize(path.size() - (sizeof kDeletedSuffix - 1));
    id.set_deleted(true);
  }
  id.set_path(path);
  struct stat st;
  if (::stat(stat_path.c_str(), &st) != 0)
    fail_errno("cannot stat ", stat_path, " (", reported, ")");
  id.set_dev(st.st_dev);
  id.set_inode(st.st_ino);
  id.set_size(static_cast<uint64_t>(st.st_size));
  id.set_mtime_ns(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000ll + st.st_mtim.tv_nsec);
  id.set_mode(st.st_mode);
  id.set_ctime_ns(static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000ll + st.st_ctim.tv_nsec);
  return id;
}

std::vector<image::FileDescriptor> collect_fds(
    pid_t pid, const std::set<pid_t>& tree, std::map<std::pair<pid_t, int>, std::string>& why_not) {
  std::vector<FileDescriptor> out;
  UniqueFd pidfd;  // opened for the first descriptor of a kind of objects/fd_kinds.h
  for (int fd : proc::list_fds(pid)) {
    std::string link = cat("/proc/", pid, "/fd/", fd);
    auto target = proc::read_link(link);
    std::string fdinfo = proc::read_file(cat("/proc/", pid, "/fdinfo/", fd));
    auto info = proc::parse_fdinfo(fdinfo);
    FileDescriptor d;
    d.set_fd(fd);
    d.set_target(target);
    d.set_flags(info.flags & ~static_cast<uint32_t>(O_CLOEXEC));
    d.set_cloexec((info.flags & O_CLOEXEC) != 0);
    d.set_pos(info.pos);
    struct stat st;
    bool have_stat = ::stat(link.c_str(), &st) == 0;
    auto kind = classify(target, have_stat ? &st : nullptr);
    d.set_kind(kind);
    bool deleted = ends_with(target, kDeletedSuffix);
    switch (kind) {
      case FileDescriptor::REGULAR:
      case FileDescriptor::DIRECTORY:
      case FileDescriptor::CHARDEV:
      case FileDescriptor::BLOCKDEV:
      case FileDescriptor::FIFO:
        if (have_stat) *d.mutable_file() = file_identity(target, link);
        if (kind == FileDescriptor::CHARDEV || kind == FileDescriptor::BLOCKDEV)
          d.set_rdev(st.st_rdev);
        break;
      default:
        break;
    }
    if (kind == FileDescriptor::FIFO)
      d.set_object_inode(d.file().inode());
    else if (kind == FileDescriptor::PIPE || kind == FileDescriptor::SOCKET)
      d.set_object_inode(object_inode_of(target));
    // What the restore can recreate by itself: files reachable by path, directories, and
    // character devices (/dev/null, terminals). Pipes, FIFOs and sockets depend on the rest
    // of the tree (collect_shared).
    d.set_restorable(!deleted && target.size() > 0 && target[0] == '/' &&
                     (kind == FileDescriptor::REGULAR || kind == FileDescriptor::DIRECTORY ||
                      kind == FileDescriptor::CHARDEV));
    if (const objects::FdKind* k = objects::fd_kind(kind)) {
      try {
        if (!pidfd) pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
        if (!pidfd) fail_errno("pidfd_open(", pid, ")");
        UniqueFd dup(static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), fd, 0)));
        if (!dup) fail_errno("pidfd_getfd of fd ", fd, " of pid ", pid);
        k->dump(objects::FdDumpSource{pid, fd, fdinfo, dup.get(), &tree}, d);
        d.set_restorable(true);
      } catch (const Error& e) {
        why_not[{pid, fd}] = e.what();
      }
    }
    out.push_back(std::move(d));
  }
  return out;
}

}  // namespace lazycr::checkpoint
