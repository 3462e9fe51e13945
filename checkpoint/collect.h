// Internal to checkpoint/: the pieces of a dump, each over a frozen process or the frozen tree.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/fd.h"
#include "common/proc.h"
#include "image-format/page_store.h"
#include "image-format/process.pb.h"
#include "image-format/shared.pb.h"
#include "objects/tcp_connection.h"

namespace lazycr::checkpoint {

// Memory areas from smaps, classified (kind, file identity). vsyscall is kept (kind
// VSYSCALL) so the listing matches /proc/PID/maps; it is never restored.
std::vector<image::MemoryArea> collect_areas(pid_t pid, const std::vector<proc::MapsEntry>& maps);

// SysV segments the areas attach: marks each whole read-write attach (MemoryArea.sysv_shm) and
// records its segment once in `objects`; fails naming the area for a segment it cannot restore
// (another IPC namespace, a partial attach). Segments no process attaches are not dumped.
void collect_sysv_shm(const std::vector<image::Process>& procs,
                      std::vector<std::vector<image::MemoryArea>>& areas,
                      image::SharedObjects& objects);

struct MemoryStats {
  uint64_t pages_read = 0;
  uint64_t bytes_read = 0;
  uint64_t ref_pages = 0;     // pages written as REF runs (stored by an earlier process)
  uint64_t unread_pages = 0;  // write tracking: unwritten pages referred to the parent unread
};

// Write tracking (write_tracking.h): the [start, end) ranges of the area [start, end) written
// since the parent image, or nullopt when the area is not tracked (read and compare it all).
using WrittenRanges = std::function<std::optional<std::vector<std::pair<uint64_t, uint64_t>>>(
    uint64_t start, uint64_t end)>;

// Pages shared between the processes of one dump, so that each is stored once: private
// anonymous pages by physical page (PFN from /proc/PID/pagemap), shared anonymous / memfd
// objects by identity (dev, inode) and offset. Processes must be dumped in inventory order.
class PageDedup {
 public:
  struct Owner {
    pid_t pid;
    uint64_t addr;
  };
  // A run of a shared object's pages stored by `pid` at `addr`.
  struct Stored {
    pid_t pid;
    uint64_t offset;  // in the object, bytes
    uint64_t pages;
    uint64_t addr;
  };

  // The pagemap of a dumped process, kept open to re-check a page's PFN before a REF: its
  // twin's after read_through() (live dump).
  int pagemap_of(pid_t pid);
  // Live dump: `pid`'s pages are those of its copy-on-write twin (the same frames at the same
  // addresses as at the freeze, while the process runs on). Before any pagemap_of(pid).
  void read_through(pid_t pid, pid_t twin);

  std::unordered_map<uint64_t, Owner> pfns;  // first process (and address) seen with each PFN
  std::map<std::pair<uint64_t, uint64_t>, std::vector<Stored>> objects;  // (dev, inode)

 private:
  std::map<pid_t, UniqueFd> pagemaps_;
  std::map<pid_t, pid_t> twins_;
};

// Open file descriptors with kind, flags, position, file identity and object inode (pipes,
// sockets, FIFOs), and the state of the kinds of objects/fd_kinds.h (`tree`: every pid of the
// image; why one of those cannot be restored goes to `why_not`). restorable is final for
// other kinds; collect_shared() decides the rest.
std::vector<image::FileDescriptor> collect_fds(
    pid_t pid, const std::set<pid_t>& tree, std::map<std::pair<pid_t, int>, std::string>& why_not);
inline std::vector<image::FileDescriptor> collect_fds(pid_t pid) {
  std::map<std::pair<pid_t, int>, std::string> why_not;
  return collect_fds(pid, {pid}, why_not);
}

// Identity (dev, inode, size, mtime, mode) of a path; `deleted` from a " (deleted)" suffix.
image::FileIdentity file_identity(const std::string& path_as_reported,
                                  const std::string& stat_path);

// "a" or "an" before a word or kind name ("an EPOLL", "a TCP/IPv4 socket").
const char* article(const std::string& word);

// "pipe:[N]" or "socket:[N]" -> N, else 0.
uint64_t object_inode_of(const std::string& target);

// One live process of the tree, for collect_shared().
struct TreeFiles {
  image::Process* process;  // fds already collected
  int pidfd;
};
// Lazycr's own descriptor of fd `fd` of `p` (pidfd_getfd); throws naming both.
UniqueFd copy_of_fd(const TreeFiles& p, int fd);
// Whether a descriptor's access mode (O_ACCMODE of its flags) lets it read / write.
bool fd_reads(const image::FileDescriptor& f);
bool fd_writes(const image::FileDescriptor& f);

struct SharedCollection {
  image::SharedObjects objects;
  // Descriptors found not restorable here, with the reason, by (pid, fd).
  std::map<std::pair<pid_t, int>, std::string> why_not;
  uint64_t kcmp_calls = 0;
  // Established TCP connections, in repair mode until the dump ends (objects/tcp_connection.h).
  objects::TcpRepairHold tcp_repair;
};

// Over every descriptor of the frozen tree: sets file_id (one per open file description,
// kcmp(KCMP_FILE) among candidates that look alike), decides restorable for pipes, FIFOs and
// sockets, and captures the pipes' buffered bytes (tee) and the UNIX sockets' queues (MSG_PEEK)
// without consuming them.
// What the dump's flags allow beyond the default.
struct SharedOptions {
  bool tcp_established = false;  // dump --tcp-established: record established TCP connections
  bool ext_unix_sk = false;      // dump --ext-unix-sk (objects/unix_socket.h)
};
SharedCollection collect_shared(std::vector<TreeFiles>& procs, const SharedOptions& flags = {});

// Ghost files (FORMAT.md "Ghost files"): every deleted regular file or directory a live
// process holds as a descriptor, maps, runs or works in, and every memfd it holds as a
// descriptor or runs (and then its mappings too), is read once into shared.ghosts; the
// references get its ghost_id (descriptors become restorable; shared mappings of deleted files
// and of those memfds become SHARED_FILE, their contents in the ghost); a deleted cwd loses its
// " (deleted)". `areas[i]` are procs[i]'s. Refuses, naming each, files larger than `limit`
// (a descriptor of one stays unrestorable instead with `skip_unsupported_fds`).
void collect_ghosts(std::vector<image::Process>& procs,
                    std::vector<std::vector<image::MemoryArea>>& areas, uint64_t limit,
                    bool skip_unsupported_fds, image::SharedObjects& shared);

// Part of collect_shared(): pseudo-terminal pairs whose master and a slave the tree holds
// (checkpoint/ptys.cc, objects/pty.h), with their settings and unread data; a master without
// its slave is not restorable.
void collect_ptys(std::vector<TreeFiles>& procs, SharedCollection& result);

// A process's memory is dumped in two steps: a plan of the pages each area stores (those the
// restore cannot get elsewhere, found with PAGEMAP_SCAN or /proc/PID/pagemap), then the read of
// those pages in large batches into the store writer. A live dump (checkpoint/twin.h) plans in two
// steps: while the tree is frozen, what its copy-on-write twin cannot stand in for
// (plan_frozen_copies); once it runs again, the other pages, from the twin (plan_from_twin). The
// pages are then read from the twin.
struct MemoryPlan {
  // Pages to store from `start`; with ref_pid != 0, pages an earlier process stored at ref_addr.
  struct Run {
    uint64_t start;
    uint64_t pages;
    pid_t ref_pid = 0;
    uint64_t ref_addr = 0;
    bool unchanged = false;  // write tracking: not written since the parent image, not read
  };
  struct Area {
    std::vector<Run> runs;  // private areas: the pages to store
    bool planned = false;   // runs chosen already (plan_frozen_copies)
    // Contents a fork child does not share, copied while frozen (live dump only): the stored
    // pages of a MADV_DONTFORK / MADV_WIPEONFORK area, in run order; for a shared object
    // (MAP_SHARED anonymous, memfd, SysV), a memfd copy of it at the same offsets.
    std::string copied;
    bool has_copy = false;
    UniqueFd object_copy;
  };
  std::vector<Area> areas;  // one per memory area, in order
  uint64_t copied_bytes = 0;
};
// While frozen: chooses the pages (and REFs, with `dedup`). With `written` (and `writer`, whose
// parent image must hold them), pages not written since the parent image become unchanged runs.
MemoryPlan plan_memory(pid_t pid, const std::vector<image::MemoryArea>& areas, PageDedup* dedup,
                       const WrittenRanges* written = nullptr,
                       const image::PageStoreWriter* writer = nullptr);
// Live dump, while frozen: chooses and copies the pages of MADV_DONTFORK / MADV_WIPEONFORK
// areas (a fork child has none of the first, zeros for the second), copies shared objects
// (shared with the twin, they would change under the background read), and chooses the pages
// of private mappings of deleted files kept whole (the twin maps only their anonymous pages).
// Cost: those areas only; the rest of the plan waits for plan_from_twin().
MemoryPlan plan_frozen_copies(pid_t pid, const std::vector<image::MemoryArea>& areas);
// Live dump, while frozen, its twin just made: what the twin lacks, whatever the flags read
// before the freeze say (a MADV_DONTFORK, MADV_DOFORK or MADV_WIPEONFORK given since): marks
// each private area absent from the twin "dc" (present: not "dc"), and each anonymous area
// whose pages the twin lacks "wf", for plan_frozen_copies(). Reads /proc/TWIN/maps and at most
// two PAGEMAP_SCANs per anonymous area, each stopping at the first page. Returns how many
// flags it changed.
size_t mark_what_twin_lacks(pid_t pid, pid_t twin, std::vector<image::MemoryArea>& areas);
// Live dump, the tree running again: chooses the pages of the other private areas from the
// twin's pagemap (the frames the process mapped at the freeze), with REFs to earlier processes
// of the dump with `dedup` (whose earlier processes were planned this way too). In preorder.
void plan_from_twin(pid_t pid, pid_t twin, const std::vector<image::MemoryArea>& areas,
                    MemoryPlan& plan, PageDedup* dedup);
// Up to `chunks` runs of 16 planned pages (REF and unchanged runs left out), spread evenly over
// the pages to store, read from `read_pid` (as write_memory): what --compress auto chooses its
// codec from (PageStoreWriter::choose_codec). Areas copied while frozen are left out.
std::string sample_planned_pages(pid_t read_pid, const MemoryPlan& plan,
                                 const std::vector<image::MemoryArea>& areas, size_t chunks);
// Reads the planned pages of `pid` from `read_pid` (the process itself, or its twin: the same
// addresses) and feeds the writer; sets stored_pages on each area. `progress` is called now
// and then with pages read so far. With `dedup`, pages an earlier process of the dump has
// stored are written as REF runs. With `via_mem`, pages are read through /proc/PID/mem instead
// of process_vm_readv: the latter pins pages (FOLL_PIN), and the kernel unshares (copies) a
// fork-shared anonymous page before pinning it, so reading a tree that way would break the
// sharing in the live tree and change the very PFNs dedup compares. /proc/PID/mem takes plain
// references.
MemoryStats write_memory(pid_t pid, pid_t read_pid, MemoryPlan& plan,
                         std::vector<image::MemoryArea>& areas, image::PageStoreWriter& writer,
                         const std::function<void(uint64_t pages)>& progress, PageDedup* dedup,
                         bool via_mem);

class FrozenTree;
// The kernel objects each live process holds (objects/: seccomp filters, file locks), after
// collect_shared() (descriptors final), while the tree is frozen. `procs` is in preorder.
void collect_objects(FrozenTree& tree, std::vector<image::Process>& procs);

}  // namespace lazycr::checkpoint
