#include "image-format/unrestorable.h"

#include <signal.h>

#include <cstring>

#include "common/error.h"
#include "common/json.h"

namespace lazycr::image {
namespace {

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}

std::string deleted(const FileIdentity& id, const std::string& what) {
  return cat(what, " ", id.path(), " had been deleted at dump time; lazycr cannot restore it");
}

constexpr uint64_t sigbit(int sig) {
  return uint64_t{1} << (sig - 1);
}

// Signals the restore's injected calls keep unblocked: one of them pending from the kernel
// (a fault) cannot wait for the end of the restore, nor be queued again.
constexpr uint64_t kForced = sigbit(SIGTRAP) | sigbit(SIGSEGV) | sigbit(SIGBUS) | sigbit(SIGILL) |
                             sigbit(SIGFPE) | sigbit(SIGSYS);

std::string pending_refusal(const PendingSignal& s, const std::string& where) {
  if (s.signo() < 1 || s.signo() > 64 || !(kForced & sigbit(s.signo()))) return "";
  siginfo_t si;
  if (s.siginfo().size() != sizeof si) return "";  // the restore's reader refuses it first
  std::memcpy(&si, s.siginfo().data(), sizeof si);
  if (si.si_code <= 0) return "";
  return cat(where, " has a pending kernel-generated signal ", s.signo(), " (si_code ", si.si_code,
             ") that lazycr cannot queue again");
}

}  // namespace

std::string area_refusal(const MemoryArea& a) {
  std::string what = cat("area ", hex(a.start()), "-", hex(a.end()), " maps");
  switch (a.kind()) {
    case MemoryArea::PRIVATE_FILE:
    case MemoryArea::SHARED_FILE:
      return a.file().deleted() && a.ghost_id() == 0 ? deleted(a.file(), what) : "";
    case MemoryArea::SHARED_ANON:
      if (a.name().empty() || a.name() == "/dev/zero (deleted)" ||
          starts_with(a.name(), "/memfd:") || starts_with(a.name(), "[anon_shmem:"))
        return "";
      if (a.sysv_shm()) return "";
      if (starts_with(a.name(), "/SYSV")) {
        if (a.vmflags().find("ht") != std::string::npos)
          return cat(what, " SysV segment ", a.name(), " of huge pages (SHM_HUGETLB)");
        return cat(what, " SysV segment ", a.name(),
                   " attached read-only (SHM_RDONLY); lazycr restores read-write attaches");
      }
      return cat(what, " ", a.name(),
                 " (shared); lazycr restores shared anonymous memory, memfds, deleted files (as "
                 "ghosts) and SysV segments");
    default:
      return "";
  }
}

std::vector<std::string> process_refusals(const Process& p) {
  std::vector<std::string> out;
  if (p.zombie()) return out;
  if (p.exe().deleted() && p.exe_ghost_id() == 0) out.push_back(deleted(p.exe(), "executable"));
  for (const auto& a : p.areas())
    if (std::string why = area_refusal(a); !why.empty()) out.push_back(why);
  for (const auto& t : p.threads())
    for (const auto& s : t.pending())
      if (std::string why = pending_refusal(s, cat("thread ", t.tid())); !why.empty())
        out.push_back(why);
  for (const auto& s : p.shared_pending())
    if (std::string why = pending_refusal(s, "the process"); !why.empty()) out.push_back(why);
  return out;
}

}  // namespace lazycr::image
