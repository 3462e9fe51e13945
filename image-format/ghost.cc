#include "image-format/ghost.h"

#include <sys/stat.h>

#include <string>

#include "common/error.h"
#include "common/json.h"

namespace lazycr::image {
namespace {

std::string kind_name(int kind) {
  if (GhostFile::Kind_IsValid(kind))
    return GhostFile::Kind_Name(static_cast<GhostFile::Kind>(kind));
  return cat("kind ", kind);
}

void check_path(const std::string& what, const std::string& path) {
  if (path.size() < 2 || path[0] != '/' || path.back() == '/')
    fail(what, ": path '", path, "' is not an absolute path to a file");
  if (path.size() > kMaxGhostPath) fail(what, ": path of ", path.size(), " bytes is too long");
  if (path.find('\0') != std::string::npos) fail(what, ": path holds a NUL byte");
}

}  // namespace

void validate_ghosts(const SharedObjects& shared) {
  if (shared.ghosts_size() > kMaxGhosts)
    fail(shared.ghosts_size(), " ghost files exceeds the bound ", kMaxGhosts);
  uint64_t total = 0;
  for (int i = 0; i < shared.ghosts_size(); i++) {
    const GhostFile& g = shared.ghosts(i);
    std::string what = cat("ghost file ", g.id());
    if (g.id() != static_cast<uint64_t>(i) + 1)
      fail(what, ": ghost files are not numbered 1, 2, ... in order (expected ", i + 1, ")");
    if (!GhostFile::Kind_IsValid(g.kind())) fail(what, ": unknown ", kind_name(g.kind()));
    if (g.size() > kMaxGhostBytes)
      fail(what, ": size ", g.size(), " exceeds the bound ", kMaxGhostBytes);
    if (g.data().size() > g.size())
      fail(what, ": ", g.data().size(), " bytes of data for a file of ", g.size(), " bytes");
    total += g.data().size();
    if (total > kMaxGhostTotalBytes)
      fail(what, ": the ghost files up to this one hold ", total, " bytes, past the bound ",
           kMaxGhostTotalBytes);
    if (g.seals() != 0 && g.kind() != GhostFile::MEMFD) fail(what, ": seals on a non-memfd");
    if (g.seals() & ~kKnownSeals) fail(what, ": unknown seals ", hex(g.seals() & ~kKnownSeals));
    if (g.mode() & ~static_cast<uint32_t>(S_IFMT | 07777))
      fail(what, ": mode ", std::oct, g.mode(), " has unknown bits");
    switch (g.kind()) {
      case GhostFile::REGULAR:
        check_path(what, g.path());
        if ((g.mode() & S_IFMT) != S_IFREG)
          fail(what, ": a REGULAR ghost of mode ", std::oct, g.mode());
        break;
      case GhostFile::DIRECTORY:
        check_path(what, g.path());
        if ((g.mode() & S_IFMT) != S_IFDIR)
          fail(what, ": a DIRECTORY ghost of mode ", std::oct, g.mode());
        if (!g.data().empty()) fail(what, ": a directory with data");
        break;
      case GhostFile::MEMFD:
        if (g.name().size() > kMaxMemfdName)
          fail(what, ": memfd name of ", g.name().size(), " bytes (at most ", kMaxMemfdName, ")");
        if (g.name().find('\0') != std::string::npos) fail(what, ": memfd name holds a NUL byte");
        if ((g.mode() & S_IFMT) != S_IFREG)
          fail(what, ": a MEMFD ghost of mode ", std::oct, g.mode());
        break;
      default:
        break;
    }
  }
}

void check_ghost_refs(const std::vector<Process>& processes, const SharedObjects& shared) {
  auto ghost = [&](uint64_t id, const std::string& what) -> const GhostFile& {
    if (id == 0 || id > static_cast<uint64_t>(shared.ghosts_size()))
      fail(what, " refers to ghost file ", id, ", which shared.pb does not hold");
    return shared.ghosts(static_cast<int>(id - 1));
  };
  for (const Process& p : processes) {
    std::string who = cat("process ", p.pid());
    for (const FileDescriptor& f : p.fds()) {
      if (f.ghost_id() == 0) continue;
      std::string what = cat(who, " fd ", f.fd());
      const GhostFile& g = ghost(f.ghost_id(), what);
      bool fits = (f.kind() == FileDescriptor::REGULAR && g.kind() == GhostFile::REGULAR) ||
                  (f.kind() == FileDescriptor::MEMFD && g.kind() == GhostFile::MEMFD) ||
                  (f.kind() == FileDescriptor::DIRECTORY && g.kind() == GhostFile::DIRECTORY);
      if (!fits)
        fail(what, ": a ", FileDescriptor::Kind_Name(f.kind()), " descriptor of the ",
             kind_name(g.kind()), " ghost file ", g.id());
    }
    for (const MemoryArea& a : p.areas()) {
      if (a.ghost_id() == 0) continue;
      std::string what = cat(who, " area ", hex(a.start()));
      const GhostFile& g = ghost(a.ghost_id(), what);
      if (a.kind() != MemoryArea::PRIVATE_FILE && a.kind() != MemoryArea::SHARED_FILE)
        fail(what, ": a ", MemoryArea::Kind_Name(a.kind()), " area cannot map a ghost file");
      if (g.kind() == GhostFile::DIRECTORY) fail(what, ": maps the directory ghost ", g.id());
    }
    if (p.exe_ghost_id() != 0 &&
        ghost(p.exe_ghost_id(), cat(who, "'s executable")).kind() == GhostFile::DIRECTORY)
      fail(who, ": its executable is the directory ghost ", p.exe_ghost_id());
    if (p.cwd_ghost_id() != 0 &&
        ghost(p.cwd_ghost_id(), cat(who, "'s working directory")).kind() != GhostFile::DIRECTORY)
      fail(who, ": its working directory is the file ghost ", p.cwd_ghost_id());
  }
}

}  // namespace lazycr::image
