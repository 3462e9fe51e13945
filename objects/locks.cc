#include "objects/locks.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/syscall.h>

#include <cerrno>
#include <cstdint>
#include <sstream>
#include <vector>

#include "common/error.h"
#include "common/proc.h"

namespace lazycr::objects::locks {
namespace {

std::string kind_name(image::FileLock::Kind k) {
  switch (k) {
    case image::FileLock::POSIX:
      return "POSIX";
    case image::FileLock::OFD:
      return "OFD";
    case image::FileLock::FLOCK:
      return "flock";
    default:
      return cat("kind ", static_cast<int>(k));
  }
}

std::string describe(const image::FileLock& l) {
  std::string s = cat(kind_name(l.kind()), l.write() ? " write lock" : " read lock");
  if (l.kind() == image::FileLock::FLOCK) return s;
  if (l.length() == 0) return cat(s, " on bytes ", l.start(), "..EOF");
  return cat(s, " on bytes ", l.start(), "..", l.start() + l.length() - 1);
}

uint64_t to_offset(const std::string& text, const std::string& line) {
  try {
    size_t used = 0;
    unsigned long long v = std::stoull(text, &used, 10);
    if (used != text.size() || text[0] == '-') throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    fail("fdinfo lock line '", line, "': bad offset '", text, "'");
  }
}

}  // namespace

image::FileLock parse_fdinfo_lock(const std::string& line) {
  std::istringstream in(line);
  std::string id, kind, advisory, type, pid, dev, start, end;
  in >> id >> kind >> advisory >> type >> pid >> dev >> start >> end;
  if (end.empty() || id.back() != ':') fail("malformed fdinfo lock line '", line, "'");
  image::FileLock l;
  if (kind == "POSIX")
    l.set_kind(image::FileLock::POSIX);
  else if (kind == "OFDLCK")
    l.set_kind(image::FileLock::OFD);
  else if (kind == "FLOCK")
    l.set_kind(image::FileLock::FLOCK);
  else if (kind == "LEASE" || kind == "DELEG")
    fail("a file lease (", line, "); lazycr cannot restore leases");
  else
    fail("a lock of kind ", kind, " (", line, "); lazycr restores POSIX, OFD and flock locks");
  if (advisory != "ADVISORY")
    fail("a ", advisory, " lock (", line, "); lazycr restores advisory locks only");
  if (type != "READ" && type != "WRITE")
    fail("a lock of type ", type, " (", line, "); lazycr restores read and write locks");
  l.set_write(type == "WRITE");
  if (l.kind() == image::FileLock::FLOCK) return l;  // "0 EOF": the whole file
  const uint64_t first = to_offset(start, line);
  l.set_start(first);
  if (end != "EOF") {
    const uint64_t last = to_offset(end, line);
    if (last < first) fail("fdinfo lock line '", line, "': range ends before it starts");
    l.set_length(last - first + 1);
  }
  return l;
}

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx) {
  for (auto& fd : *proc.mutable_fds()) {
    auto text = proc::try_read_file(cat("/proc/", p.pid(), "/fdinfo/", fd.fd()));
    if (!text) fail("cannot read /proc/", p.pid(), "/fdinfo/", fd.fd());
    proc::FdInfo info = proc::parse_fdinfo(*text);
    if (info.locks.empty()) continue;
    const std::string where = cat("fd ", fd.fd(), " (", fd.target(), ")");
    if (!fd.restorable())
      fail(where, " holds a lock (", info.locks.front(), ") but is a ",
           image::FileDescriptor::Kind_Name(fd.kind()),
           " that lazycr cannot reopen; its locks would be lost");
    // fdinfo shows, on every descriptor of a description, the POSIX locks the process took
    // through it and the description's own OFD and flock locks: record each owner's once.
    const bool first_in_process = ctx.claim(cat("posix ", proc.pid(), " ", fd.file_id()));
    const bool first_in_image = ctx.claim(cat("description ", fd.file_id()));
    for (const auto& line : info.locks) {
      image::FileLock l;
      try {
        l = parse_fdinfo_lock(line);
      } catch (const Error& e) {
        fail(where, ": ", e.what());
      }
      const bool mine = l.kind() == image::FileLock::POSIX ? first_in_process : first_in_image;
      if (mine) *fd.add_locks() = l;
    }
  }
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kFilesInPlace) return;
  for (const auto& fd : proc.fds()) {
    for (const auto& l : fd.locks()) {
      const std::string what =
          cat("taking the ", describe(l), " of fd ", fd.fd(), " (", fd.target(), ")");
      try {
        if (l.kind() == image::FileLock::FLOCK) {
          p.call(0, what, SYS_flock, static_cast<uint64_t>(fd.fd()),
                 static_cast<uint64_t>((l.write() ? LOCK_EX : LOCK_SH) | LOCK_NB));
          continue;
        }
        struct flock fl {};
        fl.l_type = static_cast<short>(l.write() ? F_WRLCK : F_RDLCK);
        fl.l_whence = SEEK_SET;
        fl.l_start = static_cast<off_t>(l.start());
        fl.l_len = static_cast<off_t>(l.length());
        const uint64_t arg = p.put(&fl, sizeof fl);
        p.call(0, what, SYS_fcntl, static_cast<uint64_t>(fd.fd()),
               l.kind() == image::FileLock::OFD ? F_OFD_SETLK : F_SETLK, arg);
      } catch (const Error& e) {
        if (e.sys_errno() == EAGAIN || e.sys_errno() == EACCES)
          fail(what,
               ": someone else holds a conflicting lock now (the original process still "
               "running?); a process is never resumed without a lock it held");
        throw;
      }
    }
  }
}

}  // namespace lazycr::objects::locks
