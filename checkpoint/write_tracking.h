// Write tracking between dumps (dump --track, README "Write tracking"): each process of the
// tree gets a userfaultfd registered for asynchronous write-protect (UFFD_FEATURE_WP_ASYNC |
// WP_UNPOPULATED) on its private anonymous areas, and every page is write-protected once the
// image is committed. The kernel then clears the protection of a page at its first write,
// without telling anyone; a later `dump --parent` reads which pages lost it (PAGEMAP_SCAN
// PAGE_IS_WRITTEN) and refers every other page to the parent image unread.
//
// Where the tracking lives between dumps: a registration lasts only while its uffd is open, so
// a small detached holder process (comm "lazycr-track", a grandchild of the dump, stdio on
// /dev/null) keeps the uffds, one per process, and a pidfd of each process. It exits when the
// last tracked process has exited, or when the next dump takes the uffds over (it SIGKILLs the
// holder once its own image is committed). The uffd is created inside the target by an injected
// userfaultfd(2), taken with pidfd_getfd and closed there again: the program never sees it.
// The image records the holder (pid, start time) and each process's uffd (pid, start time, the
// descriptor in the holder, its inode, the registered areas): the next dump trusts the tracking
// only when all of these match, and only for areas still registered (PM_SCAN_CHECK_WPASYNC:
// an area unmapped and mapped again, moved by mremap or replaced by exec is not), reading and
// comparing by content whatever it cannot trust (one -v line says why).
//
// Why the protection is applied only after the commit: a page the kernel says unwritten is
// referred to the parent unread, so the protection must start exactly at the instant of an
// image that exists. Protecting earlier and then failing would leave the previous image's
// tracking wrong; the old holder is killed (and waited for) before the protection moves on.
// Not protecting at all (lazycr killed after the commit) only over-reports writes.
//
// Consequences for the program: none visible (no descriptor, signal or child); a first write
// to each page after a dump costs one minor fault. Private mappings of files are not tracked
// (see trackable() in write_tracking.cc: the uffd-wp markers would read as swapped pages).
// Fork, exec, exit (README "Write tracking"): the uffd asks for no event (an EVENT_FORK would
// block the program's fork until read), so a fork child loses the registration and is stored by
// content until a dump with --track arms it; an exec leaves a new address space that nothing
// registers (PM_SCAN_CHECK_WPASYNC refuses it) and arm() gives it a new uffd; the holder drops
// an exited process's uffd. A process that has a userfaultfd of its own is not tracked (its
// registrations would collide with ours: EBUSY); one that makes its first only after a tracked
// dump gets EBUSY on memory that existed then. Writes that bypass page tables (a device or
// io_uring writing into pages it pinned before the dump) are not seen.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/frozen.h"
#include "common/fd.h"
#include "image-format/inventory.pb.h"
#include "image-format/process.pb.h"

namespace lazycr::checkpoint {

// Whether this kernel can track writes; empty, or why not (names the missing feature).
std::string write_tracking_unsupported();

class WriteTracking {
 public:
  WriteTracking() = default;
  ~WriteTracking();  // without commit_and_protect(): ends the holder it started
  WriteTracking(const WriteTracking&) = delete;
  WriteTracking& operator=(const WriteTracking&) = delete;

  // Takes over the tracking the parent image recorded, for the processes of `tree` it still
  // describes; logs (-v) why it cannot be used when it cannot.
  void take_over(const image::Inventory& parent, FrozenTree& tree);
  // The ranges of [start, end) in `pid` written since the parent image; nullopt where the
  // tracking cannot vouch for the area (not tracked, or no longer the registered mapping).
  std::optional<std::vector<std::pair<uint64_t, uint64_t>>> written(pid_t pid, uint64_t start,
                                                                    uint64_t end);
  // Whether a parent's tracking was taken over for any process.
  bool vouches() const { return !taken_.empty(); }

  // dump --track: registers the private anonymous areas of `fp` (a uffd taken over is used again,
  // or a new one made inside the process: for a new process, or a new address space after an exec).
  // Logs and skips a process it cannot track.
  void arm(FrozenProcess& fp, const std::vector<image::MemoryArea>& areas);
  // Starts the holder of every armed uffd; the record for the image. Empty if nothing is armed.
  std::optional<image::WriteTracking> start_holder();
  // Once the image is committed, with the tree still frozen: ends the previous holder, then
  // write-protects every armed area, so that the tracking starts at this image.
  void commit_and_protect();

 private:
  std::optional<image::WriteTracking> start_holder_or_throw();

  struct Tracked {
    UniqueFd uffd;
    uint64_t start_ticks = 0;
    std::vector<std::pair<uint64_t, uint64_t>> areas;  // registered areas
    UniqueFd pagemap;
    bool lost_logged = false;
  };
  std::map<pid_t, Tracked> taken_;  // from the parent's holder
  std::map<pid_t, Tracked> armed_;  // for this image's holder
  UniqueFd old_holder_;             // pidfd of the parent's holder
  UniqueFd new_holder_;             // pidfd of the holder this dump started
  bool committed_ = false;
};

}  // namespace lazycr::checkpoint
