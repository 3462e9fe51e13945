#include "restore/sysv_shm.h"

#include <fcntl.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/error.h"
#include "common/fd.h"
#include "common/json.h"
#include "common/log.h"
#include "common/proc.h"

namespace lazycr::restore {
namespace {

constexpr const char* kNextId = "/proc/sys/kernel/shm_next_id";

void write_next_id(long id) {
  UniqueFd fd(::open(kNextId, O_WRONLY | O_CLOEXEC));
  if (!fd) fail_errno("cannot open ", kNextId);
  std::string v = std::to_string(id);
  if (::write(fd.get(), v.data(), v.size()) != static_cast<ssize_t>(v.size()))
    fail_errno("cannot write ", v, " to ", kNextId);
}

// The next shmget of the namespace takes the id, and the kernel sets shm_next_id back to -1
// (it refuses -1 from user space). A shmget that failed before taking it leaves it set: lazycr
// takes it with a segment of its own, removed at once, so that no later shmget gets that id.
struct NextIdScope {
  explicit NextIdScope(int id) { write_next_id(id); }
  ~NextIdScope() {
    auto now = proc::try_read_file(kNextId);
    if (!now || std::atol(now->c_str()) == -1) return;
    int id = ::shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    if (id < 0 || ::shmctl(id, IPC_RMID, nullptr) != 0)
      log::warn("cannot clear ", kNextId, ": ", std::strerror(errno));
  }
};

std::string describe(const image::SysvShm& s) {
  return cat("SysV segment key ", hex(static_cast<uint32_t>(s.key())), " id ", s.id());
}

}  // namespace

void validate_sysv_areas(const std::vector<image::Process>& procs,
                         const image::SharedObjects& shared) {
  std::map<uint64_t, const image::SysvShm*> by_id;
  for (const auto& s : shared.sysv_shm()) by_id[static_cast<uint64_t>(s.id())] = &s;
  for (const auto& p : procs)
    for (const auto& a : p.areas()) {
      if (!a.sysv_shm()) continue;
      std::string what = cat("pid ", p.pid(), ": area ", hex(a.start()), "-", hex(a.end()),
                             " attaches SysV segment id ", a.file().inode());
      auto it = by_id.find(a.file().inode());
      if (it == by_id.end()) fail(what, ", which the image does not list");
      uint64_t len = (it->second->size() + 4095) / 4096 * 4096;
      if (a.kind() != image::MemoryArea::SHARED_ANON || !a.shared() || a.pgoff() != 0 ||
          a.end() - a.start() != len)
        fail(what, " but is not a whole shared attach of its ", it->second->size(), " bytes");
    }
}

SysvSegments::SysvSegments(const image::SharedObjects& shared) {
  for (const auto& s : shared.sysv_shm()) by_id_[s.id()] = &s;
}

SysvSegments::~SysvSegments() {
  for (int id : created_) ::shmctl(id, IPC_RMID, nullptr);
}

void SysvSegments::create(RemoteProcess& r, const std::vector<const image::MemoryArea*>& areas) {
  for (const image::MemoryArea* a : areas) {
    if (!a->sysv_shm()) continue;
    const image::SysvShm& s = *by_id_.at(static_cast<int>(a->file().inode()));
    if (std::find(created_.begin(), created_.end(), s.id()) != created_.end()) continue;
    std::string what = cat("pid ", r.pid(), ": ", describe(s));
    struct shmid_ds ds;
    if (::shmctl(s.id(), IPC_STAT, &ds) >= 0 || errno == EACCES)
      fail(what, ": id ", s.id(), " is taken now (key ",
           hex(static_cast<uint32_t>(ds.shm_perm.__key)), ")");
    if (s.key() != IPC_PRIVATE) {
      int other = ::shmget(s.key(), 0, 0);
      if (other >= 0 || errno == EACCES)
        fail(what, ": key ", hex(static_cast<uint32_t>(s.key())), " is taken now (id ", other, ")");
    }
    long got;
    {
      NextIdScope next(s.id());
      got = r.inject(cat("shmget of ", what), SYS_shmget, static_cast<uint64_t>(s.key()), s.size(),
                     IPC_CREAT | IPC_EXCL | (s.mode() & 0777));
    }
    if (got != s.id()) {
      ::shmctl(static_cast<int>(got), IPC_RMID, nullptr);
      fail(what, ": the kernel gave id ", got, " (another segment took the id meanwhile)");
    }
    created_.push_back(s.id());
    if (::shmctl(s.id(), IPC_STAT, &ds) == 0 &&
        (ds.shm_perm.cuid != s.cuid() || ds.shm_perm.cgid != s.cgid()))
      log::warn(what, ": created by uid ", ds.shm_perm.cuid, " gid ", ds.shm_perm.cgid,
                " (the image's creator was uid ", s.cuid(), " gid ", s.cgid(), ")");
  }
}

Call SysvSegments::attach(const image::MemoryArea& a) const {
  const image::SysvShm& s = *by_id_.at(static_cast<int>(a.file().inode()));
  return make_call(cat("shmat of ", describe(s), " at ", hex(a.start())), SYS_shmat,
                   static_cast<uint64_t>(s.id()), a.start(), SHM_REMAP);
}

void SysvSegments::finish() {
  for (int id : created_) {
    const image::SysvShm& s = *by_id_.at(id);
    struct shmid_ds ds;
    if (::shmctl(id, IPC_STAT, &ds) != 0) fail_errno("IPC_STAT of ", describe(s));
    ds.shm_perm.uid = s.uid();
    ds.shm_perm.gid = s.gid();
    ds.shm_perm.mode = s.mode() & 0777;
    if (::shmctl(id, IPC_SET, &ds) != 0) fail_errno("IPC_SET of ", describe(s));
    if ((s.mode() & SHM_LOCKED) && ::shmctl(id, SHM_LOCK, nullptr) != 0)
      fail_errno("SHM_LOCK of ", describe(s));
    if ((s.mode() & SHM_DEST) && ::shmctl(id, IPC_RMID, nullptr) != 0)
      fail_errno("IPC_RMID of ", describe(s), " (it was marked for removal)");
  }
}

}  // namespace lazycr::restore
