// Internal to restore/: how the contents of the restored address space get there.
//
// The restore maps every area itself (restore.cc); a MemoryStrategy decides what goes into the
// areas and when. The sequence, for one process:
//   1. for each area: mmap it with shaping_prot(area), then prepare_area(area);
//   2. fill_mapped(): every area is mapped, none has its final protection yet;
//   3. every area gets its final protection (mprotect where shaping_prot differed);
//   4. after_shaping(): the address space is final, mm fields set, only the leader thread
//      exists and it still sits in the trampoline (injection works);
//   5. on_running(): every thread has been detached and runs.
// EagerFiller writes every stored page in step 2. A lazy strategy (DESIGN.md step 8) would
// record owed anonymous ranges in prepare_area() (filling the others eagerly), create a
// userfaultfd inside the target and register those ranges in after_shaping() (inject
// userfaultfd(), pidfd_getfd, UFFDIO_API/REGISTER from here), and hand the uffd to the page
// server in on_running().
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "image-format/page_store.h"
#include "image-format/process.pb.h"

namespace lazycr::restore {

// The process under construction, as a memory strategy sees it.
class RemoteProcess {
 public:
  virtual ~RemoteProcess() = default;
  // The process as seen from lazycr (process_vm_writev, pidfd_getfd).
  virtual pid_t pid() const = 0;
  virtual int pidfd() const = 0;
  // Runs one system call in the leader thread (from the trampoline); throws naming `what` on
  // failure, returns the result otherwise.
  virtual long inject(const std::string& what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
                      uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) = 0;
  // A scratch buffer inside the process (in the trampoline mapping) for syscall arguments:
  // writes `len` bytes there and returns their address in the process.
  virtual uint64_t put_data(const void* data, size_t len) = 0;
};

struct MemoryStats {
  uint64_t pages_written = 0;
  uint64_t bytes_written = 0;
  uint64_t write_calls = 0;  // process_vm_writev calls
  uint64_t fill_ns = 0;      // whole fill
  uint64_t read_ns = 0;      // of which reading (decompressing) pages from the store
  uint64_t write_ns = 0;     // of which writing them into the process
};

class MemoryStrategy {
 public:
  virtual ~MemoryStrategy() = default;
  virtual const char* name() const = 0;
  // Protection to mmap `area` with while the address space is shaped: its final protection
  // plus whatever this strategy needs to fill it.
  virtual uint32_t shaping_prot(const image::MemoryArea& area) const = 0;
  // `area` is mapped at its address with shaping_prot(area).
  virtual void prepare_area(RemoteProcess& target, const image::MemoryArea& area) = 0;
  // Every area is mapped (none has its final protection yet).
  virtual void fill_mapped(RemoteProcess& target) = 0;
  // The address space is final; the leader can still run injected calls; no other thread yet.
  virtual void after_shaping(RemoteProcess& target) = 0;
  // Every thread runs.
  virtual void on_running(RemoteProcess& target) = 0;
  virtual MemoryStats stats() const = 0;
};

// Writes every stored page with process_vm_writev before the process resumes. The pages are
// cut into batches of up to 8 MiB and 1024 ranges; two workers (the calling thread and a
// helper thread) each take the next batch, read (decompress) it from the page store into their
// own reused buffer and write it with one call. Pages the store records as ZERO are written
// only where the fresh mapping is not already zero (private file mappings). The helper thread
// runs on `helper_cpus` when given (the restorer itself is pinned to one CPU while it shapes).
std::unique_ptr<MemoryStrategy> make_eager_filler(const image::PageStoreReader& store,
                                                  const cpu_set_t* helper_cpus = nullptr);

}  // namespace lazycr::restore
