// Ghost files of a frozen tree (FORMAT.md "Ghost files"): what no path leads to any more, read
// once per file into shared.pb so that the restore can make it again.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <utility>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/json.h"
#include "image-format/ghost.h"

namespace lazycr::checkpoint {
namespace {

using image::FileDescriptor;
using image::GhostFile;
using image::MemoryArea;

constexpr const char kDeleted[] = " (deleted)";
constexpr const char kMemfdPrefix[] = "/memfd:";

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
std::string without_deleted(const std::string& s) {
  return ends_with(s, kDeleted) ? s.substr(0, s.size() - (sizeof kDeleted - 1)) : s;
}

class Collector {
 public:
  Collector(uint64_t limit, image::SharedObjects& shared) : limit_(limit), shared_(shared) {}

  // The ghost of the file behind `source` (a /proc magic link of the frozen process), read the
  // first time it is met; `reported` is the path the kernel shows for it, `holder` names the
  // reference for messages. Returns its id, or 0 when it is too large (listed in refusals()).
  // With `skippable`, one too large is not refused: the caller leaves it unrestorable.
  uint64_t ghost_of(const std::string& source, const std::string& reported, GhostFile::Kind kind,
                    const std::string& holder, bool skippable = false) {
    struct stat st;
    if (::stat(source.c_str(), &st) != 0) fail_errno("cannot stat ", source, " (", reported, ")");
    auto key = std::make_pair(static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino));
    if (auto it = ids_.find(key); it != ids_.end()) return it->second;
    if (kind != GhostFile::DIRECTORY && static_cast<uint64_t>(st.st_size) > limit_) {
      if (skippable) return 0;
      refusals_ += cat(refusals_.empty() ? "" : "; ", holder, " is ", reported, " of ", st.st_size,
                       " bytes");
      return 0;
    }
    GhostFile* g = shared_.add_ghosts();
    g->set_id(static_cast<uint64_t>(shared_.ghosts_size()));
    g->set_kind(kind);
    g->set_mode(st.st_mode);
    g->set_size(kind == GhostFile::DIRECTORY ? 0 : static_cast<uint64_t>(st.st_size));
    g->set_dev(key.first);
    g->set_inode(key.second);
    std::string path = without_deleted(reported);
    if (kind == GhostFile::MEMFD)
      g->set_name(path.substr(sizeof kMemfdPrefix - 1));
    else
      g->set_path(path);
    if (kind != GhostFile::DIRECTORY) read_contents(source, reported, *g);
    ids_[key] = g->id();
    total_ += g->data().size();
    return g->id();
  }

  // The memfd with this identity is a ghost already (held as a descriptor, or run).
  uint64_t known(uint64_t dev, uint64_t inode) const {
    auto it = ids_.find({dev, inode});
    return it == ids_.end() ? 0 : it->second;
  }

  const std::string& refusals() const { return refusals_; }
  uint64_t total() const { return total_; }

 private:
  void read_contents(const std::string& source, const std::string& reported, GhostFile& g) {
    int fd = ::open(source.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) fail_errno("cannot open ", source, " (", reported, ") to store its contents");
    UniqueFd own(fd);
    if (g.kind() == GhostFile::MEMFD) {
      int seals = ::fcntl(fd, F_GET_SEALS);
      if (seals < 0) fail_errno("fcntl(F_GET_SEALS) of ", source, " (", reported, ")");
      g.set_seals(static_cast<uint32_t>(seals));
    }
    std::string data(g.size(), '\0');
    size_t got = 0;
    while (got < data.size()) {
      ssize_t n = ::pread(fd, data.data() + got, data.size() - got, static_cast<off_t>(got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail_errno("reading ", source, " (", reported, ")");
      if (n == 0) break;  // the rest reads as zeros
      got += static_cast<size_t>(n);
    }
    // Trailing zeros are implied by the size: a sparse or mostly empty file stays small.
    size_t keep = data.find_last_not_of('\0');
    data.resize(keep == std::string::npos ? 0 : keep + 1);
    g.set_data(std::move(data));
  }

  uint64_t limit_;
  image::SharedObjects& shared_;
  std::map<std::pair<uint64_t, uint64_t>, uint64_t> ids_;
  std::string refusals_;
  uint64_t total_ = 0;
};

std::string map_files(pid_t pid, const MemoryArea& a) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "/proc/%d/map_files/%llx-%llx", pid,
                static_cast<unsigned long long>(a.start()),
                static_cast<unsigned long long>(a.end()));
  return buf;
}

GhostFile::Kind kind_of(const std::string& path) {
  return starts_with(path, kMemfdPrefix) ? GhostFile::MEMFD : GhostFile::REGULAR;
}

// A shared mapping the dump classified SHARED_ANON that is in fact a deleted file of a file
// system (a /dev/shm semaphore): not anonymous memory, not a memfd, SysV segment or /dev/zero.
bool deleted_shared_file(const MemoryArea& a) {
  return a.kind() == MemoryArea::SHARED_ANON && ends_with(a.name(), kDeleted) &&
         starts_with(a.name(), "/") && !starts_with(a.name(), kMemfdPrefix) &&
         !starts_with(a.name(), "/SYSV") && !starts_with(a.name(), "/dev/zero");
}

}  // namespace

void collect_ghosts(std::vector<image::Process>& procs,
                    std::vector<std::vector<image::MemoryArea>>& areas, uint64_t limit,
                    bool skip_unsupported_fds, image::SharedObjects& shared) {
  Collector c(limit, shared);
  // Descriptors, executables and working directories first: a memfd one of them holds is a
  // ghost, and then so is every mapping of it.
  for (auto& p : procs) {
    if (p.zombie()) continue;
    const pid_t pid = p.pid();
    std::string who = cat("pid ", pid);
    if (ends_with(p.cwd(), kDeleted)) {
      std::string shown = p.cwd();
      p.set_cwd(without_deleted(shown));
      p.set_cwd_ghost_id(
          c.ghost_of(cat("/proc/", pid, "/cwd"), shown, GhostFile::DIRECTORY, who + " cwd"));
    }
    if (p.exe().deleted()) {
      std::string shown = p.exe().path() + kDeleted;
      p.set_exe_ghost_id(c.ghost_of(cat("/proc/", pid, "/exe"), shown, kind_of(p.exe().path()),
                                    who + " executable"));
    }
    for (auto& f : *p.mutable_fds()) {
      bool deleted = ends_with(f.target(), kDeleted);
      GhostFile::Kind kind;
      if (f.kind() == FileDescriptor::MEMFD)
        kind = GhostFile::MEMFD;
      else if (f.kind() == FileDescriptor::REGULAR && deleted)
        kind = GhostFile::REGULAR;
      else if (f.kind() == FileDescriptor::DIRECTORY && deleted)
        kind = GhostFile::DIRECTORY;
      else
        continue;
      uint64_t id = c.ghost_of(cat("/proc/", pid, "/fd/", f.fd()), f.target(), kind,
                               cat(who, " fd ", f.fd()), skip_unsupported_fds);
      f.set_ghost_id(id);
      f.set_restorable(id != 0);
    }
  }
  for (size_t i = 0; i < procs.size(); i++) {
    if (procs[i].zombie()) continue;
    const pid_t pid = procs[i].pid();
    for (auto& a : areas[i]) {
      std::string holder = cat("pid ", pid, " area ", hex(a.start()), "-", hex(a.end()));
      if ((a.kind() == MemoryArea::PRIVATE_FILE || a.kind() == MemoryArea::SHARED_FILE) &&
          a.file().deleted()) {
        a.set_ghost_id(c.ghost_of(map_files(pid, a), a.name(), kind_of(a.file().path()), holder));
      } else if (deleted_shared_file(a)) {
        a.set_ghost_id(c.ghost_of(map_files(pid, a), a.name(), GhostFile::REGULAR, holder));
        if (a.ghost_id() != 0) a.set_kind(MemoryArea::SHARED_FILE);
      } else if (a.kind() == MemoryArea::SHARED_ANON && starts_with(a.name(), kMemfdPrefix)) {
        // One object with the descriptor that holds it: its contents come from the ghost.
        a.set_ghost_id(c.known(a.file().dev(), a.file().inode()));
        if (a.ghost_id() != 0) a.set_kind(MemoryArea::SHARED_FILE);
      }
    }
  }
  if (!c.refusals().empty())
    fail("cannot store the contents of deleted files past --ghost-limit (", limit,
         " bytes): ", c.refusals(), "; a larger --ghost-limit (at most ", image::kMaxGhostBytes,
         ") stores them");
  if (c.total() > image::kMaxGhostTotalBytes)
    fail("the deleted files and memfds of the tree hold ", c.total(),
         " bytes together, past the bound of ", image::kMaxGhostTotalBytes,
         " bytes an image holds");
}

}  // namespace lazycr::checkpoint
