#include "restore/address_space.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include <algorithm>
#include <sstream>

#include "common/error.h"
#include "common/log.h"
#include "common/ptrace.h"
#include "restore/ghost_files.h"
#include "restore/memory.h"
#include "restore/open_files.h"
#include "restore/restoree.h"
#include "restore/sysv_shm.h"

namespace lazycr::restore {

using image::kPageSize;
using image::MemoryArea;

bool is_vdso_block(const MemoryArea& a) {
  return a.kind() == MemoryArea::VDSO || a.kind() == MemoryArea::VVAR ||
         a.kind() == MemoryArea::VVAR_VCLOCK;
}

std::string area_name(const MemoryArea& a) {
  return cat(hex(a.start()), "-", hex(a.end()), a.name().empty() ? "" : " ", a.name());
}

namespace {

std::set<std::string> vmflag_set(const MemoryArea& a) {
  std::set<std::string> out;
  std::istringstream in(a.vmflags());
  std::string f;
  while (in >> f) out.insert(f);
  return out;
}

bool mergeable(const MemoryArea& a, const MemoryArea& b) {
  if (a.end() != b.start() || a.shared() || b.shared() || a.prot() != b.prot() ||
      a.vmflags() != b.vmflags() || a.growsdown() || b.growsdown() || a.name() != b.name())
    return false;
  auto anon = [](const MemoryArea& m) {
    return m.kind() == MemoryArea::ANON || m.kind() == MemoryArea::HEAP;
  };
  if (anon(a) && anon(b)) return true;
  return a.kind() == MemoryArea::PRIVATE_FILE && b.kind() == MemoryArea::PRIVATE_FILE &&
         a.file().dev() == b.file().dev() && a.file().inode() == b.file().inode() &&
         b.pgoff() == a.pgoff() + (a.end() - a.start());
}

// A private mapping needs read access only; a shared one the access it may use: VM_MAYWRITE
// ("mw") comes from a descriptor open for writing.
int file_mode(const MemoryArea& a) {
  if (a.kind() != MemoryArea::SHARED_FILE) return O_RDONLY;
  bool may_write = a.vmflags().find("mw") != std::string::npos || (a.prot() & PROT_WRITE);
  return may_write ? O_RDWR : O_RDONLY;
}

std::string file_key(const std::string& path, int mode) {
  return cat(mode == O_RDWR ? "rw:" : "ro:", path);
}

std::string mapping_key(const MemoryArea& a) {
  return a.ghost_id() != 0 ? file_key(cat("ghost:", a.ghost_id()), file_mode(a))
                           : file_key(a.file().path(), file_mode(a));
}

// Areas of the same memfd share one (the same object mapped twice stays one object).
std::pair<uint64_t, uint64_t> object_id(const MemoryArea& a) {
  return {a.file().dev(), a.file().inode()};
}

std::string object_key(const MemoryArea& a) {
  return cat("object:", a.file().dev(), ":", a.file().inode());
}

std::string memfd_key(const MemoryArea& a) {
  return cat("memfd:", a.file().dev(), ":", a.file().inode());
}

// The THP advice of an area's VmFlags ("hg", "nh"): given right after its mmap, before any of
// its pages is written, so that the pages the restore writes come as the original's did (2 MiB
// folios in an "hg" area on a THP "madvise" machine, none in an "nh" area on an "always" one).
// Given with the other flags at the end, the restore's writes had made 4 KiB pages of an "hg"
// area (a 64 MiB MADV_HUGEPAGE target restored with AnonHugePages 0 against 64 MiB).
std::vector<Call> thp_calls(const MemoryArea& a) {
  std::vector<Call> calls;
  const uint64_t len = a.end() - a.start();
  std::set<std::string> flags = vmflag_set(a);
  for (const auto& [flag, advice] : {std::pair{"hg", MADV_HUGEPAGE}, {"nh", MADV_NOHUGEPAGE}})
    if (flags.count(flag))
      calls.push_back(make_call(cat("madvise(", flag, ") of area ", area_name(a)), SYS_madvise,
                                a.start(), len, static_cast<uint64_t>(advice)));
  return calls;
}

}  // namespace

// `kept`: start addresses of areas inherited from the parent (image pid `parent_pid`) at
// fork, in place already with the parent's pages (see inheritable_areas()).
AddressSpace::AddressSpace(Restoree& r, const image::Process& p, MemoryStrategy& strategy,
                           SharedObjectMap& objects, const GhostFiles& ghosts, SysvSegments& sysv,
                           std::set<uint64_t> kept, int parent_pid)
    : r_(r),
      p_(p),
      strategy_(strategy),
      objects_(objects),
      ghosts_(ghosts),
      sysv_(sysv),
      parent_pid_(parent_pid) {
  for (const auto& a : p_.areas())
    if (!is_vdso_block(a) && a.kind() != MemoryArea::VSYSCALL) {
      areas_.push_back(&a);
      kept_.push_back(kept.count(a.start()) > 0);
    }
  find_split_runs();
}

// Protection while shaping: the strategy's, plus read/write for areas that must be touched
// to stay apart from a neighbour (see find_split_runs()).
uint32_t AddressSpace::shaping_prot(size_t i) const {
  uint32_t prot = strategy_.shaping_prot(*areas_[i]);
  return in_run_[i] ? prot | PROT_READ | PROT_WRITE : prot;
}

void AddressSpace::map_areas() {
  open_files();
  std::vector<const MemoryArea*> fresh;
  for (size_t i = 0; i < areas_.size(); i++)
    if (!kept_[i]) fresh.push_back(areas_[i]);
  sysv_.create(r_, fresh);
  // Memfds get their size, every area its mapping and, if it had one, its name.
  r_.reset_arena();
  std::vector<Call> calls;
  for (const auto& [key, size] : memfd_sizes_)
    calls.push_back(make_call(cat("ftruncate of ", key), SYS_ftruncate, files_.at(key), size));
  std::vector<size_t> mmap_index;  // calls[] index of each area's mmap
  for (size_t i = 0; i < areas_.size(); i++) {
    const MemoryArea* a = areas_[i];
    mmap_index.push_back(calls.size());
    if (kept_[i]) {  // in place: at most its protection changes while it is filled
      calls.push_back(make_call(cat("mprotect of the inherited area ", area_name(*a)), SYS_mprotect,
                                a->start(), a->end() - a->start(), shaping_prot(i)));
      continue;
    }
    calls.push_back(mmap_call(*a, shaping_prot(i)));
    if (a->sysv_shm())  // shmat maps read-write
      calls.push_back(make_call(cat("mprotect of area ", area_name(*a)), SYS_mprotect, a->start(),
                                a->end() - a->start(), shaping_prot(i)));
    if (a->name().starts_with("[anon:") && a->name().ends_with("]")) {
      uint64_t name = r_.push_string(a->name().substr(6, a->name().size() - 7));
      calls.push_back(make_call(cat("naming area ", area_name(*a)), SYS_prctl, PR_SET_VMA,
                                PR_SET_VMA_ANON_NAME, a->start(), a->end() - a->start(), name));
    }
    if (marker_[i].set >= 0)
      calls.push_back(make_call(cat("madvise marking area ", area_name(*a)), SYS_madvise,
                                a->start(), a->end() - a->start(),
                                static_cast<uint64_t>(marker_[i].set)));
    for (Call& c : thp_calls(*a)) calls.push_back(std::move(c));
  }
  std::vector<long> res = r_.batch(calls);
  for (size_t i = 0; i < areas_.size(); i++)
    if (!kept_[i] && static_cast<uint64_t>(res[mmap_index[i]]) != areas_[i]->start())
      fail("mmap of area ", area_name(*areas_[i]), " landed at ",
           hex(static_cast<uint64_t>(res[mmap_index[i]])));
  touch_runs();
  register_objects();
  // The descriptors opened for mapping are no longer needed (each closed by its number: the
  // descriptor transport of a tree stays).
  std::vector<Call> closes;
  for (const auto& [key, fd] : files_)
    closes.push_back(make_call(cat("close of the mapping descriptor of ", key), SYS_close, fd));
  if (!closes.empty()) {
    r_.reset_arena();
    r_.batch(closes);
  }
  files_.clear();
  for (size_t i = 0; i < areas_.size(); i++) {
    if (kept_[i])
      strategy_.prepare_inherited_area(r_, *areas_[i], parent_pid_);
    else
      strategy_.prepare_area(r_, *areas_[i]);
  }
}

// Final protections, and the VMA flags that plain mmap does not give, from the image's
// VmFlags: they change behaviour (fork, core dumps, THP, locking) and keep the kernel from
// merging areas the original kept apart. mlock comes last, over final pages.
std::vector<Call> vmflag_calls(const MemoryArea& a, bool with_thp) {
  struct Advice {
    const char* flag;
    int advice;
  };
  static const Advice kAdvice[] = {{"dd", MADV_DONTDUMP},   {"dc", MADV_DONTFORK},
                                   {"wf", MADV_WIPEONFORK}, {"sr", MADV_SEQUENTIAL},
                                   {"rr", MADV_RANDOM},     {"mg", MADV_MERGEABLE}};
  std::vector<Call> calls = with_thp ? thp_calls(a) : std::vector<Call>{};
  const uint64_t len = a.end() - a.start();
  std::set<std::string> flags = vmflag_set(a);
  for (const auto& adv : kAdvice)
    if (flags.count(adv.flag))
      calls.push_back(make_call(cat("madvise(", adv.flag, ") of area ", area_name(a)), SYS_madvise,
                                a.start(), len, static_cast<uint64_t>(adv.advice)));
  if (flags.count("lo") || flags.count("lf"))
    calls.push_back(make_call(cat("mlock2 of area ", area_name(a)), SYS_mlock2, a.start(), len,
                              flags.count("lf") ? MLOCK_ONFAULT : 0));
  return calls;
}

void AddressSpace::protect() {
  std::vector<Call> calls;
  for (size_t i = 0; i < areas_.size(); i++) {
    const MemoryArea* a = areas_[i];
    uint64_t len = a->end() - a->start();
    if (shaping_prot(i) != a->prot())
      calls.push_back(make_call(cat("mprotect of area ", area_name(*a), " to ", a->prot()),
                                SYS_mprotect, a->start(), len, a->prot()));
    if (marker_[i].clear >= 0)
      calls.push_back(make_call(cat("madvise unmarking area ", area_name(*a)), SYS_madvise,
                                a->start(), len, static_cast<uint64_t>(marker_[i].clear)));
    // A fresh area had its THP advice at its mmap (thp_calls()).
    for (Call& c : vmflag_calls(*a, /*with_thp=*/kept_[i])) calls.push_back(std::move(c));
  }
  r_.reset_arena();
  r_.batch(calls);
}

// Files, opened as the process (open_files.h): one descriptor per file and access mode.
void AddressSpace::open_mapped_files() {
  std::vector<OpenRequest> reqs;
  std::vector<std::string> keys;
  for (size_t i = 0; i < areas_.size(); i++) {
    const MemoryArea* a = areas_[i];
    if (kept_[i] || a->ghost_id() != 0 ||
        (a->kind() != MemoryArea::PRIVATE_FILE && a->kind() != MemoryArea::SHARED_FILE))
      continue;
    std::string key = file_key(a->file().path(), file_mode(*a));
    if (files_.count(key)) continue;
    files_[key] = 0;
    OpenRequest req;
    req.path = a->file().path();
    req.flags = file_mode(*a);
    req.id = &a->file();
    req.strict = true;
    req.what = cat("area ", area_name(*a), " maps");
    reqs.push_back(std::move(req));
    keys.push_back(key);
  }
  std::vector<long> fds = open_as_process(r_, p_.creds(), reqs, 0);
  for (size_t i = 0; i < keys.size(); i++) files_[keys[i]] = static_cast<uint64_t>(fds[i]);
}

// One open per distinct file (and access mode) and one memfd per shared object.
void AddressSpace::open_files() {
  open_mapped_files();
  r_.reset_arena();
  std::vector<Call> calls;
  std::vector<std::string> keys;
  for (size_t i = 0; i < areas_.size(); i++) {
    const MemoryArea* a = areas_[i];
    if (kept_[i]) continue;
    std::string key;
    uint64_t path_addr = 0;
    switch (a->kind()) {
      case MemoryArea::PRIVATE_FILE:
      case MemoryArea::SHARED_FILE: {
        if (a->ghost_id() == 0) continue;  // open_mapped_files()
        // Recreated by lazycr (ghost_files.h), opened while the process is still lazycr's.
        key = mapping_key(*a);
        if (files_.count(key)) continue;
        calls.push_back(ghosts_.open_call(r_, a->ghost_id(), file_mode(*a),
                                          cat("the ghost of area ", area_name(*a))));
        break;
      }
      case MemoryArea::SHARED_ANON: {
        if (a->sysv_shm()) continue;  // attached by id (mmap_call())
        auto origin = objects_.find(object_id(*a));
        if (origin != objects_.end() && origin->second.pid != r_.pid()) {
          key = object_key(*a);
          if (files_.count(key)) continue;
          const SharedObjectOrigin& o = origin->second;
          std::string path = cat("/proc/", o.pid, "/map_files/", std::hex, o.start, "-", o.end);
          path_addr = r_.push_string(path);
          calls.push_back(make_call(cat("open ", path, " (the object of area ", area_name(*a), ")"),
                                    SYS_openat, static_cast<uint64_t>(AT_FDCWD), path_addr,
                                    O_RDWR | O_CLOEXEC, 0));
          break;
        }
        if (!a->name().starts_with("/memfd:")) continue;
        key = memfd_key(*a);
        if (files_.count(key)) continue;
        std::string name = a->name().substr(7);
        if (name.ends_with(" (deleted)")) name.resize(name.size() - 10);
        path_addr = r_.push_string(name);
        calls.push_back(
            make_call(cat("memfd_create(", name, ")"), SYS_memfd_create, path_addr, MFD_CLOEXEC));
        memfd_sizes_[key] = a->file().size();
        break;
      }
      default:
        continue;
    }
    files_[key] = 0;
    keys.push_back(key);
  }
  if (calls.empty()) return;
  std::vector<long> fds = r_.batch(calls);
  for (size_t i = 0; i < keys.size(); i++) files_[keys[i]] = static_cast<uint64_t>(fds[i]);
}

// Adjacent private areas that the image lists apart although their attributes would let the
// kernel merge them: the original's kernel kept them apart because each had its own
// anon_vma (their pages came to be while they were not neighbours). Mapped as they are,
// the restore would get one merged area. So every other area of such a run is marked with
// a VMA flag it does not have (MADV_DONTFORK or MADV_DONTDUMP) while pages are faulted in:
// the kernel then gives each area its own anon_vma (it shares one only between compatible
// neighbours), and once the marks are cleared, areas with different anon_vmas stay apart.
// Every area of a run gets a page faulted in (touch_runs()) so that it has an anon_vma.
void AddressSpace::find_split_runs() {
  in_run_.assign(areas_.size(), false);
  marker_.assign(areas_.size(), Marker{});
  bool mark = false;
  for (size_t i = 1; i < areas_.size(); i++) {
    if (kept_[i - 1] || kept_[i] || !mergeable(*areas_[i - 1], *areas_[i])) {
      mark = false;
      continue;
    }
    in_run_[i - 1] = in_run_[i] = true;
    mark = !mark;
    if (!mark) continue;
    std::set<std::string> flags = vmflag_set(*areas_[i]);
    if (!flags.count("dc"))
      marker_[i] = {MADV_DONTFORK, MADV_DOFORK};
    else if (!flags.count("dd"))
      marker_[i] = {MADV_DONTDUMP, MADV_DODUMP};
    else
      log::info("area ", area_name(*areas_[i]), " may merge with the area before it");
  }
}

// Faults one page into every area of a run (writing what a fresh area reads there: zeros for
// anonymous memory, the file's bytes for a file) and drops it again with MADV_DONTNEED,
// which leaves the area's anon_vma in place. The fill comes after.
void AddressSpace::touch_runs() {
  std::vector<Call> calls;
  std::vector<char> page(kPageSize, 0);
  for (size_t i = 0; i < areas_.size(); i++) {
    if (!in_run_[i]) continue;
    const MemoryArea& a = *areas_[i];
    if (a.kind() == MemoryArea::PRIVATE_FILE) {
      remote_read(r_.pid(), a.start(), page.data(), kPageSize);
    } else {
      std::fill(page.begin(), page.end(), 0);
    }
    remote_write(r_.pid(), a.start(), page.data(), kPageSize);
    calls.push_back(make_call(cat("madvise(MADV_DONTNEED) of a page of area ", area_name(a)),
                              SYS_madvise, a.start(), kPageSize, MADV_DONTNEED));
  }
  if (calls.empty()) return;
  r_.reset_arena();
  r_.batch(calls);
}

Call AddressSpace::mmap_call(const MemoryArea& a, uint32_t prot) {
  uint64_t len = a.end() - a.start();
  uint64_t flags = MAP_FIXED_NOREPLACE | (a.shared() ? MAP_SHARED : MAP_PRIVATE);
  if (a.growsdown()) flags |= MAP_GROWSDOWN;
  if (vmflag_set(a).count("nr")) flags |= MAP_NORESERVE;
  uint64_t fd = static_cast<uint64_t>(-1);
  uint64_t off = 0;
  switch (a.kind()) {
    case MemoryArea::ANON:
    case MemoryArea::HEAP:
    case MemoryArea::STACK:
      flags |= MAP_ANONYMOUS;
      break;
    case MemoryArea::SHARED_ANON:
      if (a.sysv_shm()) return sysv_.attach(a);
      if (files_.count(object_key(a))) {
        fd = files_.at(object_key(a));
        off = a.pgoff() - objects_.at(object_id(a)).offset_base;
      } else if (a.name().starts_with("/memfd:")) {
        fd = files_.at(memfd_key(a));
        off = a.pgoff();
      } else {
        flags |= MAP_ANONYMOUS;
      }
      break;
    case MemoryArea::PRIVATE_FILE:
    case MemoryArea::SHARED_FILE:
      fd = files_.at(mapping_key(a));
      off = a.pgoff();
      break;
    default:
      fail("area ", area_name(a), ": cannot map kind ", MemoryArea::Kind_Name(a.kind()));
  }
  return make_call(cat("mmap of area ", area_name(a)), SYS_mmap, a.start(), len, prot, flags, fd,
                   off);
}

// Shared objects this process created: the next processes of the tree open them.
void AddressSpace::register_objects() {
  for (const MemoryArea* a : areas_) {
    if (a->kind() != MemoryArea::SHARED_ANON || a->file().inode() == 0 || a->sysv_shm()) continue;
    if (objects_.count(object_id(*a))) continue;
    SharedObjectOrigin o;
    o.pid = r_.pid();
    o.start = a->start();
    o.end = a->end();
    // A fresh shared anonymous mapping is its object from offset 0; a memfd keeps offsets.
    o.offset_base = a->name().starts_with("/memfd:") ? 0 : a->pgoff();
    objects_[object_id(*a)] = o;
  }
}

}  // namespace lazycr::restore
