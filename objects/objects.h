// Kernel objects a process holds beyond memory and descriptors (seccomp filters, file locks,
// ...), one unit per kind holding both halves: what the dump records and how the restore
// recreates it, in the manner of CRIU's eventfd.c/timerfd.c. Every kind is registered in one
// table (objects.cc); dump and restore call the table at fixed points and never name a kind,
// so adding a kind is adding one file and one table entry.
#pragma once

#include <sched.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "image-format/process.pb.h"
#include "objects/remote.h"

namespace lazycr::objects {

// Where in the restore sequence (restore/restore.cc) a kind is called.
enum class RestorePoint {
  kFilesInPlace,   // "objects-fds": every descriptor is in place, only the leader exists
  kBeforeThreads,  // "objects-leader": the other threads are created next and inherit from it
  kThreadsExist,   // "objects-threads": every thread exists with its state; credentials,
                   // registers and the release come after
  kBeforeRelease,  // "unmap-trampoline": the last calls injected before the trampoline goes;
                   // only registers, affinity and the release come after
};

// What the dump halves share over the whole tree: an object held by several processes (an
// open file description's lock) is recorded once.
class DumpContext {
 public:
  // True the first time `key` is claimed.
  bool claim(const std::string& key) { return claimed_.insert(key).second; }
  // What the first holder of an object left for the others under `key` (empty at first).
  std::string& note(const std::string& key) { return notes_[key]; }

 private:
  std::set<std::string> claimed_;
  std::map<std::string, std::string> notes_;
};

// Dump, while the whole tree is frozen and after descriptors are collected (file_id and
// restorable are final): every kind records what `p` (the process behind `proc`) holds into
// `proc`, or throws naming what cannot be restored.
void dump_objects(RemoteProcess& p, image::Process& proc, DumpContext& ctx);

// Values only a thread itself can read (a prctl of its own), read in the one injected round
// trip that reads the rest of its state (checkpoint/dump.cc) instead of one more per thread
// per kind: each kind's call, writing 8 bytes at `slot` in the process, and what to record of
// them. thread_reads(first_slot) gives one per kind, their slots 8 bytes apart from it.
struct ThreadRead {
  BatchCall call;
  void (*record)(image::Thread& thread, uint64_t slot_value);
};
std::vector<ThreadRead> thread_reads(uint64_t first_slot);

// Restore: every kind recreates at `point` what `proc` records; throws naming what failed.
void restore_objects(RestorePoint point, RemoteProcess& p, const image::Process& proc);

// As thread `tid` (as lazycr sees it) is released: the CPUs the image gives it (objects/sched),
// or `unrecorded` where an older image has none. Throws naming the thread and its CPUs.
void restore_affinity(pid_t tid, const image::Thread& th, const cpu_set_t& unrecorded);

}  // namespace lazycr::objects
