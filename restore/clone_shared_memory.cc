#include "restore/clone_shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <map>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "common/proc.h"
#include "restore/restoree.h"

namespace lazycr::restore {

using image::MemoryArea;

bool remade_in_clones(const MemoryArea& a) {
  return a.kind() == MemoryArea::SHARED_ANON && !a.sysv_shm() && a.ghost_id() == 0 &&
         !a.name().starts_with("/memfd:");
}

namespace {

// One object of the image: its areas and the span of object offsets they map.
struct Object {
  std::vector<const MemoryArea*> areas;
  uint64_t base = UINT64_MAX, end = 0;
};

UniqueFd open_object(pid_t pid, uint64_t start, uint64_t end, int flags) {
  const std::string path = cat("/proc/", pid, "/map_files/", std::hex, start, "-", end);
  UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC));
  if (!fd) fail_errno("open of ", path);
  return fd;
}

// `len` bytes of `from` at `from_off` to `to` at `to_off`; holes (pages never written) are
// skipped, so the new object has no page the template's lacks.
void copy_data(int from, uint64_t from_off, int to, uint64_t to_off, uint64_t len) {
  const uint64_t end = from_off + len;
  std::vector<char> buf;
  for (uint64_t pos = from_off; pos < end;) {
    off_t data = ::lseek(from, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0 && errno == ENXIO) return;  // nothing but holes up to the end
    if (data < 0) fail_errno("SEEK_DATA in the template's shared object");
    if (static_cast<uint64_t>(data) >= end) return;
    off_t hole = ::lseek(from, data, SEEK_HOLE);
    if (hole < 0) fail_errno("SEEK_HOLE in the template's shared object");
    const uint64_t stop = std::min(static_cast<uint64_t>(hole), end);
    loff_t in = data, out = static_cast<loff_t>(to_off + (static_cast<uint64_t>(data) - from_off));
    while (static_cast<uint64_t>(in) < stop) {
      ssize_t n = ::copy_file_range(from, &in, to, &out, stop - static_cast<uint64_t>(in), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n > 0) continue;
      if (n < 0 && errno != EXDEV && errno != EINVAL && errno != EOPNOTSUPP)
        fail_errno("copy_file_range into the clone's shared object");
      // No in-kernel copy between these two: through a buffer.
      buf.resize(1 << 20);
      const size_t want = std::min<uint64_t>(buf.size(), stop - static_cast<uint64_t>(in));
      ssize_t got = ::pread(from, buf.data(), want, in);
      if (got <= 0) fail_errno("read of the template's shared object");
      if (::pwrite(to, buf.data(), static_cast<size_t>(got), out) != got)
        fail_errno("write of the clone's shared object");
      in += got;
      out += got;
    }
    pos = stop;
  }
}

}  // namespace

SharedObjectMap remake_shared_memory(Restoree& tpl, Restoree& clone, const image::Process& p) {
  std::map<std::pair<uint64_t, uint64_t>, Object> objects;
  for (const auto& a : p.areas()) {
    if (!remade_in_clones(a)) continue;
    Object& o = objects[{a.file().dev(), a.file().inode()}];
    o.areas.push_back(&a);
    o.base = std::min(o.base, a.pgoff());
    o.end = std::max(o.end, a.pgoff() + (a.end() - a.start()));
  }
  SharedObjectMap out;
  if (objects.empty()) return out;

  // A new object per image object, as big as the span its areas map: made by a scratch
  // mapping (MAP_SHARED | MAP_ANONYMOUS is what the program did), then mapped over each area
  // through map_files, as the tree restore maps an object a second time.
  std::vector<Call> calls;
  for (const auto& [id, o] : objects)
    calls.push_back(make_call("mmap of a new shared anonymous object", SYS_mmap, 0, o.end - o.base,
                              PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                              static_cast<uint64_t>(-1), 0));
  clone.reset_arena();
  const std::vector<long> scratch = clone.batch(calls);
  calls.clear();
  clone.reset_arena();
  size_t i = 0;
  for (const auto& [id, o] : objects) {
    const uint64_t at = static_cast<uint64_t>(scratch[i++]);
    const std::string path =
        cat("/proc/", clone.pid(), "/map_files/", std::hex, at, "-", at + (o.end - o.base));
    calls.push_back(make_call(cat("open ", path), SYS_openat, static_cast<uint64_t>(AT_FDCWD),
                              clone.push_string(path), O_RDWR | O_CLOEXEC, 0));
  }
  const std::vector<long> fds = clone.batch(calls);
  calls.clear();
  clone.reset_arena();
  i = 0;
  for (const auto& [id, o] : objects) {
    for (const MemoryArea* a : o.areas) {
      calls.push_back(make_call(cat("mmap of area ", area_name(*a), " (the clone's own object)"),
                                SYS_mmap, a->start(), a->end() - a->start(), a->prot(),
                                MAP_SHARED | MAP_FIXED, static_cast<uint64_t>(fds[i]),
                                a->pgoff() - o.base));
      for (Call& c : vmflag_calls(*a)) calls.push_back(std::move(c));
    }
    calls.push_back(make_call("munmap of the scratch mapping", SYS_munmap,
                              static_cast<uint64_t>(scratch[i]), o.end - o.base));
    calls.push_back(make_call("close of the new object", SYS_close, static_cast<uint64_t>(fds[i])));
    i++;
  }
  clone.batch(calls);

  // The bytes: the template's mapping of each area to the clone's, at the object offsets each
  // mapping has (the template's as its restore made them).
  std::map<uint64_t, uint64_t> tpl_offset;
  for (const auto& m : proc::parse_maps(proc::read_file(cat("/proc/", tpl.pid(), "/maps"))))
    tpl_offset[m.start] = m.offset;
  for (const auto& [id, o] : objects) {
    for (const MemoryArea* a : o.areas) {
      auto t = tpl_offset.find(a->start());
      if (t == tpl_offset.end())
        fail("area ", area_name(*a), " is not mapped in the template any more");
      UniqueFd from = open_object(tpl.pid(), a->start(), a->end(), O_RDONLY);
      UniqueFd to = open_object(clone.pid(), a->start(), a->end(), O_RDWR);
      copy_data(from.get(), t->second, to.get(), a->pgoff() - o.base, a->end() - a->start());
    }
    SharedObjectOrigin origin;
    origin.pid = clone.pid();
    origin.start = o.areas.front()->start();
    origin.end = o.areas.front()->end();
    origin.offset_base = o.base;
    out[id] = origin;
  }
  return out;
}

}  // namespace lazycr::restore
