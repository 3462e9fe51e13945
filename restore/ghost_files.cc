// Recreating ghost files in lazycr.
#include "restore/ghost_files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "image-format/ghost.h"
#include "restore/open_files.h"

namespace lazycr::restore {
namespace {

using image::GhostFile;

// What F_SETFL sets and the flags a description is opened with (open_files.cc has the same).
constexpr int kStatusFlags = O_APPEND | O_NONBLOCK | O_DIRECT | O_NOATIME;

std::string describe(const GhostFile& g) {
  return cat("ghost file ", g.id(), " (",
             g.kind() == GhostFile::MEMFD ? cat("memfd:", g.name()) : g.path(), ")");
}

std::string dir_of(const std::string& path) {
  return path.substr(0, std::max<size_t>(path.rfind('/'), 1));
}

// A new description of `fd` through its /proc/self/fd link (the file has no path).
UniqueFd reopen(int fd, int flags, const std::string& what) {
  UniqueFd got(::open(cat("/proc/self/fd/", fd).c_str(), flags | O_CLOEXEC | O_NOCTTY));
  if (!got) fail_errno(what, ": reopening it through /proc/self/fd");
  return got;
}

void write_contents(int fd, const GhostFile& g, const std::string& what) {
  const std::string& d = g.data();
  size_t off = 0;
  while (off < d.size()) {
    ssize_t n = ::pwrite(fd, d.data() + off, d.size() - off, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail_errno(what, ": writing its ", d.size(), " bytes");
    off += static_cast<size_t>(n);
  }
  if (::ftruncate(fd, static_cast<off_t>(g.size())) != 0)
    fail_errno(what, ": ftruncate to ", g.size());
  if (::fchmod(fd, g.mode() & 07777) != 0) fail_errno(what, ": fchmod to 0", std::oct, g.mode());
}

// At its own path when that is free (O_EXCL, never through a symbolic link), else unnamed in
// its directory (O_TMPFILE: /proc shows "#inode" then); unlinked before anything is written.
UniqueFd create_regular(const GhostFile& g, const image::Credentials& creds,
                        const std::string& what) {
  UniqueFd fd;
  run_here_as(creds, [&] {
    const mode_t mode = g.mode() & 0777;
    fd.reset(::open(g.path().c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
    if (fd) {
      if (::unlink(g.path().c_str()) != 0) {
        int err = errno;
        fd.reset();
        fail_errno_value(err, cat(what, ": unlinking it once created"));
      }
      return;
    }
    if (errno != EEXIST) fail_errno(what, ": creating it");
    log::info(what, ": the path exists again; recreated without a name in ", dir_of(g.path()));
    fd.reset(::open(dir_of(g.path()).c_str(), O_RDWR | O_TMPFILE | O_CLOEXEC, mode));
    if (!fd) fail_errno(what, ": creating it unnamed (O_TMPFILE) in ", dir_of(g.path()));
  });
  return fd;
}

// Made at its own path when that is free, else under a fresh name beside it; kept by an O_PATH
// descriptor and removed.
UniqueFd create_directory(const GhostFile& g, const image::Credentials& creds,
                          const std::string& what) {
  UniqueFd fd;
  run_here_as(creds, [&] {
    std::string path = g.path();
    if (::mkdir(path.c_str(), g.mode() & 07777) != 0) {
      if (errno != EEXIST) fail_errno(what, ": mkdir");
      std::string tmpl = path + ".lazycr-XXXXXX";
      if (::mkdtemp(tmpl.data()) == nullptr) fail_errno(what, ": mkdtemp ", tmpl);
      log::info(what, ": the path exists again; recreated as ", tmpl);
      path = tmpl;
    }
    fd.reset(::open(path.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    int err = errno;
    if (::rmdir(path.c_str()) != 0 && fd) fail_errno(what, ": rmdir ", path);
    if (!fd) fail_errno_value(err, cat(what, ": opening ", path));
  });
  return fd;
}

// A memfd that was made without MFD_ALLOW_SEALING has exactly F_SEAL_SEAL.
UniqueFd create_memfd(const GhostFile& g, const std::string& what) {
  bool sealing = g.seals() != F_SEAL_SEAL;
  unsigned flags = MFD_CLOEXEC | (sealing ? MFD_ALLOW_SEALING : 0u);
  UniqueFd fd(::memfd_create(g.name().c_str(), flags));
  if (!fd) fail_errno(what, ": memfd_create");
  write_contents(fd.get(), g, what);
  if (sealing && g.seals() != 0 && ::fcntl(fd.get(), F_ADD_SEALS, g.seals()) != 0)
    fail_errno(what, ": fcntl(F_ADD_SEALS, ", hex(g.seals()), ")");
  return fd;
}

}  // namespace

GhostFiles::GhostFiles(const std::vector<image::Process>& processes,
                       const image::SharedObjects& shared) {
  if (shared.ghosts_size() == 0) return;
  // Each is created as the first process that has it (files in its directories are its own).
  std::map<uint64_t, const image::Credentials*> owner;
  for (const auto& p : processes) {
    if (p.zombie()) continue;
    auto claim = [&](uint64_t id) {
      if (id != 0) owner.emplace(id, &p.creds());
    };
    claim(p.cwd_ghost_id());
    claim(p.exe_ghost_id());
    for (const auto& f : p.fds()) claim(f.ghost_id());
    for (const auto& a : p.areas()) claim(a.ghost_id());
  }
  for (const GhostFile& g : shared.ghosts()) {
    auto who = owner.find(g.id());
    if (who == owner.end()) continue;  // nothing refers to it
    std::string what = describe(g);
    UniqueFd made;
    switch (g.kind()) {
      case GhostFile::REGULAR:
        made = create_regular(g, *who->second, what);
        write_contents(made.get(), g, what);
        break;
      case GhostFile::MEMFD:
        made = create_memfd(g, what);
        break;
      case GhostFile::DIRECTORY:
        fds_[g.id()] = create_directory(g, *who->second, what);
        continue;
      default:
        fail(what, ": unknown kind ", static_cast<int>(g.kind()));
    }
    fds_[g.id()] = reopen(made.get(), O_RDONLY, what);
  }
}

int GhostFiles::fd_of(uint64_t id) const {
  auto it = fds_.find(id);
  if (it == fds_.end()) fail("ghost file ", id, " was not recreated");
  return it->second.get();
}

std::string GhostFiles::path_in_process(uint64_t id) const {
  return cat("/proc/", ::getpid(), "/fd/", fd_of(id));
}

Call GhostFiles::open_call(RemoteProcess& r, uint64_t id, int flags,
                           const std::string& what) const {
  std::string path = path_in_process(id);
  return make_call(cat("open ", path, " (", what, ")"), SYS_openat, static_cast<uint64_t>(AT_FDCWD),
                   r.push(path.c_str(), path.size() + 1), static_cast<uint64_t>(flags | O_CLOEXEC),
                   0);
}

long GhostFiles::open_in(RemoteProcess& r, uint64_t id, int flags, const std::string& what) const {
  r.reset_arena();
  return r.batch({open_call(r, id, flags, what)}).at(0);
}

Call GhostFiles::chdir_call(RemoteProcess& r, const image::Process& p) const {
  std::string path = path_in_process(p.cwd_ghost_id());
  return make_call(cat("chdir(", path, ") into the deleted ", p.cwd()), SYS_chdir,
                   r.push(path.c_str(), path.size() + 1));
}

UniqueFd GhostFiles::open_description(const image::FileDescriptor& f,
                                      const std::string& what) const {
  int flags = static_cast<int>(f.flags()) & (O_ACCMODE | kStatusFlags);
  if (f.kind() == image::FileDescriptor::DIRECTORY) flags = O_RDONLY | O_DIRECTORY;
  UniqueFd fd = reopen(fd_of(f.ghost_id()), flags, what);
  if (f.kind() != image::FileDescriptor::DIRECTORY && f.pos() != 0 &&
      ::lseek(fd.get(), static_cast<off_t>(f.pos()), SEEK_SET) < 0)
    fail_errno(what, ": lseek to ", f.pos());
  return fd;
}

}  // namespace lazycr::restore
