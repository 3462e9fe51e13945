// Internal to restore/: the steps that make one process of an image, each on its own, in the
// order restore() (restore.cc) runs them for every process of a tree. Clones of a tree
// (clone_tree.h) run the same steps for the processes they fork inside each clone.
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <set>
#include <vector>

#include "common/fd.h"
#include "image-format/image_dir.h"

namespace lazycr::restore {

class Restoree;
struct ThreadCtl;
class GhostFiles;
class SharedFiles;

inline constexpr uint64_t kRseqFlagUnregister = 1;  // RSEQ_FLAG_UNREGISTER

// The channel descriptions made by lazycr (shared_files.h) reach the processes through: a
// socket pair whose one end every process of the tree inherits (the root from lazycr at
// creation, the others from their parent at fork), at `fd_in_tree`, a number above every
// descriptor of the image. Each process closes it once its descriptors are in place.
struct FdTransport {
  UniqueFd ours;
  UniqueFd theirs;      // lazycr's copy of the end the tree inherits (closed once inherited)
  int fd_in_tree = -1;  // its number in the processes
  int high = 0;         // numbers from here up are free in every process while fds are placed
};

// The rseq area the new process inherited (from lazycr, or from its parent) unregistered:
// once the old TLS is unmapped every return to user space would fault, and the image's own
// area cannot be registered over it.
void unregister_inherited_rseq(Restoree& r);

// Everything but the trampoline and what the process keeps from its parent at fork (`kept`:
// areas by start address; `vdso_kept`: the vdso block is where the parent's is).
void unmap_inherited(Restoree& r, const image::Process& p, const std::set<uint64_t>& kept,
                     bool vdso_kept);
// The vdso block moved to the image's address (arch_prctl), and checked.
void move_vdso(Restoree& r, const image::Process& p);

// The areas `child` can keep from `parent` when it is forked once the parent's memory is
// restored (eager), by start address; and whether its vdso block is where the parent's is.
std::set<uint64_t> inheritable_areas(const image::Process& parent, const image::Process& child);
bool same_vdso_block(const image::Process& parent, const image::Process& child);

// Sessions: a process that led its session calls setsid() as soon as it exists.
void start_session(Restoree& r, const image::Process& p, bool is_root);
// Process groups, once every process exists: pass 0, leaders make their group; pass 1,
// members join theirs.
std::set<int> restored_group_leaders(const std::vector<image::Process>& procs);
void join_group(Restoree& r, const image::Process& p, const std::set<int>& leaders, int pass);
// Collects the SIGCHLD a process got from its children made zombies.
void consume_sigchld(Restoree& r);

// prctl(PR_SET_MM_MAP): brk, code/data/stack/arg/env bounds, auxv and the executable.
void set_mm(Restoree& r, const image::Process& p, const GhostFiles& ghosts);
// Personality, umask, cwd, dumpable, THP and no_new_privs.
void restore_process_state(Restoree& r, const image::Process& p, const GhostFiles& ghosts);
// Signal actions. `inherited_from_lazycr`: the process has lazycr's (only the differing ones
// are set); else (forked from a restored process) every action of the image is set.
void restore_sigactions(Restoree& r, const image::Process& p, bool inherited_from_lazycr = true);
// File descriptors at their numbers (`shell_job`: lazycr's fds 0-2 given where the image
// has a descriptor leading outside it).
void restore_fds(Restoree& r, const image::Process& p, bool shell_job, const SharedFiles& shared,
                 const FdTransport& transport);
// Pending signals, queued from inside.
void restore_pending(Restoree& r, const image::Process& p);
void restore_rlimits(Restoree& r, const image::Process& p);
// The image's credentials, last (each thread for itself).
void restore_credentials(Restoree& r, const image::Process& p);

// The image's rseq_cs word of a thread, from the page store (nullopt if not stored).
std::optional<uint64_t> image_rseq_cs(const image::PageStoreReader& store, uint64_t rseq_ptr);

// A thread's last state before it runs: its rseq_cs word from `store` (none given: the memory
// holds it already), xsave state, registers, signal mask and CPU affinity (`cpus` where the
// image recorded none).
void set_final_thread_state(Restoree& r, ThreadCtl& c, const image::PageStoreReader* store,
                            const cpu_set_t& cpus);

}  // namespace lazycr::restore
