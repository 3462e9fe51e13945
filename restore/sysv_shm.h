// Internal to restore/: the SysV shared memory segments of the tree (SharedObjects.sysv_shm),
// recreated with their key and id in lazycr's IPC namespace by the first process that attaches
// each, attached at their addresses by every process that had them.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "image-format/process.pb.h"
#include "image-format/shared.pb.h"
#include "restore/calls.h"
#include "restore/memory.h"

namespace lazycr::restore {

// Every area marked sysv_shm attaches, whole, a segment the image lists.
void validate_sysv_areas(const std::vector<image::Process>& procs,
                         const image::SharedObjects& shared);

class SysvSegments {
 public:
  explicit SysvSegments(const image::SharedObjects& shared);
  // A failed restore removes (IPC_RMID) every segment it created.
  ~SysvSegments();
  SysvSegments(const SysvSegments&) = delete;
  SysvSegments& operator=(const SysvSegments&) = delete;

  // Creates inside `r`, with the image's key, id and size, each segment an area of `areas`
  // attaches that this restore has not created yet: refuses a key or id that exists already.
  void create(RemoteProcess& r, const std::vector<const image::MemoryArea*>& areas);
  // The shmat of area `a` at its address (it returns that address).
  Call attach(const image::MemoryArea& a) const;
  // Once every process is attached: owner and mode (IPC_SET), SHM_LOCK, and IPC_RMID of the
  // segments that were marked for removal.
  void finish();
  // The restore succeeded: the segments stay.
  void keep() { created_.clear(); }

 private:
  std::map<int, const image::SysvShm*> by_id_;
  std::vector<int> created_;
};

}  // namespace lazycr::restore
