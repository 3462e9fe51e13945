// The memory step of a restore: every area of a process mapped at its address (files and
// shared objects opened as the process, areas the original's kernel kept apart kept apart),
// filled by the memory strategy (restore/memory.h), then given its final protection and VMA
// flags. Every step runs as a few batches (one ptrace round trip per batch, not per call).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "image-format/process.pb.h"
#include "restore/calls.h"

namespace lazycr::restore {

class Restoree;
class MemoryStrategy;
class GhostFiles;
class SysvSegments;

// [vdso], [vvar], [vvar_vclock]: moved as one block, never mapped as areas.
bool is_vdso_block(const image::MemoryArea& a);
// "0x7f0000-0x7f1000 [anon:name]", for messages.
std::string area_name(const image::MemoryArea& a);
// The madvise and mlock calls that give a mapped area the VMA flags of its image VmFlags that
// plain mmap does not give; without its THP advice when that was given at its mmap.
std::vector<Call> vmflag_calls(const image::MemoryArea& a, bool with_thp = true);

// Shared memory objects (shared anonymous memory, memfds) of the tree, by identity (the
// object's dev and inode in the image): the first process that maps one creates it; the others
// open it through /proc/<that process>/map_files and map the same object.
struct SharedObjectOrigin {
  pid_t pid = 0;                // the process that created it, as lazycr sees it
  uint64_t start = 0, end = 0;  // its mapping there
  uint64_t offset_base = 0;     // object offset = image pgoff - offset_base
};
using SharedObjectMap = std::map<std::pair<uint64_t, uint64_t>, SharedObjectOrigin>;

// The memory step: map every area, let the strategy fill them, set final protections. Every
// step runs as a few batches (one ptrace round trip per batch, not per call).
class AddressSpace {
 public:
  // `kept`: start addresses of areas inherited from the parent (image pid `parent_pid`) at
  // fork, in place already with the parent's pages (see inheritable_areas()).
  AddressSpace(Restoree& r, const image::Process& p, MemoryStrategy& strategy,
               SharedObjectMap& objects, const GhostFiles& ghosts, SysvSegments& sysv,
               std::set<uint64_t> kept = {}, int parent_pid = 0);

  // Protection while shaping: the strategy's, plus read/write for areas that must be touched
  // to stay apart from a neighbour (see find_split_runs()).
  uint32_t shaping_prot(size_t i) const;
  // Maps every area (opening what they map), touches the runs, lets the strategy prepare each.
  void map_areas();
  // Final protections, and the VMA flags that plain mmap does not give, from the image's
  // VmFlags: they change behaviour (fork, core dumps, THP, locking) and keep the kernel from
  // merging areas the original kept apart. mlock comes last, over final pages.
  void protect();

 private:
  void open_mapped_files();
  void open_files();
  void find_split_runs();
  void touch_runs();
  Call mmap_call(const image::MemoryArea& a, uint32_t prot);
  void register_objects();

  Restoree& r_;
  const image::Process& p_;
  MemoryStrategy& strategy_;
  SharedObjectMap& objects_;
  const GhostFiles& ghosts_;
  SysvSegments& sysv_;
  int parent_pid_;
  std::vector<bool> kept_;  // per area: inherited at fork, in place
  struct Marker {
    int set = -1, clear = -1;  // madvise advice, -1: none
  };
  std::vector<const image::MemoryArea*> areas_;
  std::vector<bool> in_run_;                     // part of a run of areas that must stay apart
  std::vector<Marker> marker_;                   // the temporary mark of every other area of a run
  std::map<std::string, uint64_t> files_;        // key -> fd in the process
  std::map<std::string, uint64_t> memfd_sizes_;  // memfd key -> size
};

}  // namespace lazycr::restore
