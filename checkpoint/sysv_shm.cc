// SysV shared memory segments attached by the tree: each attach is recorded on its area
// (MemoryArea.sysv_shm), each segment once (SharedObjects.sysv_shm) from /proc/sysvipc/shm.
// The pages are stored as those of any shared object (write_memory(), SHARED_ANON).
#include <sys/stat.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <sstream>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/json.h"

namespace lazycr::checkpoint {
namespace {

constexpr uint64_t kMaxSegmentBytes = 1ull << 40;

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}

// Every segment of lazycr's IPC namespace, by id.
std::map<int, image::SysvShm> read_segments() {
  std::istringstream in(proc::read_file("/proc/sysvipc/shm"));
  std::string line;
  std::getline(in, line);  // the header
  std::map<int, image::SysvShm> out;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    long long key, id, size, cpid, lpid, nattch, uid, gid, cuid, cgid;
    std::string perms;
    if (!(f >> key >> id >> perms >> size >> cpid >> lpid >> nattch >> uid >> gid >> cuid >> cgid))
      fail("cannot parse /proc/sysvipc/shm line '", line, "'");
    image::SysvShm s;
    s.set_key(static_cast<int32_t>(key));
    s.set_id(static_cast<int32_t>(id));
    s.set_mode(static_cast<uint32_t>(std::stoul(perms, nullptr, 8)));
    s.set_size(static_cast<uint64_t>(size));
    s.set_uid(static_cast<uint32_t>(uid));
    s.set_gid(static_cast<uint32_t>(gid));
    s.set_cuid(static_cast<uint32_t>(cuid));
    s.set_cgid(static_cast<uint32_t>(cgid));
    out[s.id()] = s;
  }
  return out;
}

uint64_t ipc_ns(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) fail_errno("cannot stat ", path);
  return st.st_ino;
}

}  // namespace

void collect_sysv_shm(const std::vector<image::Process>& procs,
                      std::vector<std::vector<image::MemoryArea>>& areas,
                      image::SharedObjects& objects) {
  std::map<int, image::SysvShm> segments, used;
  bool read = false;
  for (size_t i = 0; i < procs.size(); i++) {
    for (auto& a : areas[i]) {
      if (a.kind() != image::MemoryArea::SHARED_ANON || !starts_with(a.name(), "/SYSV")) continue;
      std::string what = cat("pid ", procs[i].pid(), ": area ", hex(a.start()), "-", hex(a.end()),
                             " maps SysV segment ", a.name(), " (shmid ", a.file().inode(), ")");
      // The segments of another IPC namespace are neither listed here nor creatable by lazycr.
      if (ipc_ns(cat("/proc/", procs[i].pid(), "/ns/ipc")) != ipc_ns("/proc/self/ns/ipc"))
        fail(what, " of another IPC namespace; lazycr restores SysV segments of its own only");
      if (!read) segments = read_segments(), read = true;
      auto it = segments.find(static_cast<int>(a.file().inode()));
      if (it == segments.end() || a.file().inode() > INT32_MAX)
        fail(what, " that /proc/sysvipc/shm does not list");
      const image::SysvShm& s = it->second;
      if (s.size() == 0 || s.size() > kMaxSegmentBytes)
        fail(what, " of ", s.size(), " bytes, beyond what lazycr restores");
      // Hugetlb segments, read-only attaches and partial attaches are left to the refusal of
      // the area (image::area_refusal) or refused here: only whole attaches are recreated.
      if (a.vmflags().find("ht") != std::string::npos ||
          a.vmflags().find("mw") == std::string::npos)
        continue;
      uint64_t len = (s.size() + 4095) / 4096 * 4096;
      if (a.pgoff() != 0 || a.end() - a.start() != len)
        fail(what, " partly (offset ", a.pgoff(), ", ", a.end() - a.start(), " of ", len,
             " bytes); lazycr restores whole attaches only");
      a.set_sysv_shm(true);
      used[s.id()] = s;
    }
  }
  for (auto& [id, s] : used) *objects.add_sysv_shm() = s;
}

}  // namespace lazycr::checkpoint
