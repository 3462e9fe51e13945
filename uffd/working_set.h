// Working-set prefetch (FORMAT.md "working-set.lzw"): a lazy restore run with
// --record-working-set notes, per process, the pages its faults were served (each fault's
// window, in the order the faults came) and writes them into the image directory when the
// recording ends; later lazy restores of that image push those pages first, in that order,
// before the rest of the prefetch (REAP, ASPLOS'21, for processes).
//
// The record is an order. Beside it, the recording writes each process's recorded pages once
// more, in record order, as a page store of their own (working-set-<pid>.lzp, "the record's
// pages"): pushing them then reads a few MiB in sequence instead of every frame of the main
// store that holds one (node: 2,100 frames, 131 MiB decompressed for 51 MiB of pages). A
// record that is damaged (bad checksum, bad bounds), was made for another image (a store
// digest that is not this image's) or names pages this image does not serve lazily is
// ignored whole, with one warning; record pages that are damaged or not the record's (their
// digest) are ignored with one warning, and the record's order is pushed from the main store.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "image-format/page_store.h"
#include "uffd/owed_set.h"

namespace lazycr::uffd {

inline constexpr char kWorkingSetMagic[8] = {'L', 'Z', 'C', 'R', 'W', 'S', 'E', 'T'};
// Version 2 adds, per process, the digest of its record pages and its push slice; version 1 is
// still read.
inline constexpr uint32_t kWorkingSetVersion = 2;
inline constexpr uint64_t kWorkingSetHeaderBytes = 56;  // magic, version, flags, size, sha256
inline constexpr uint64_t kMaxWorkingSetBytes = 64ull << 20;
inline constexpr uint64_t kMaxWorkingSetPages = 1ull << 22;  // 16 GiB per process
inline constexpr uint32_t kPushSlicePages = 1024;            // push_order()'s, as recorded

struct WorkingSetRun {
  uint64_t start = 0;  // page aligned
  uint64_t pages = 0;  // > 0
  uint64_t end() const { return start + pages * kOwedPage; }
  bool operator==(const WorkingSetRun&) const = default;
};

struct ProcessWorkingSet {
  int32_t image_pid = 0;
  std::string store_digest;  // 32 bytes: PageStoreReader::mac_digest() of its page store
  // 32 bytes: PageStoreReader::mac_digest() of its record pages (working-set-<pid>.lzp), or
  // empty: none were written.
  std::string pages_digest;
  // The slices push_order() cuts its record into (version 1: 1, the record's own order).
  uint32_t push_slice_pages = kPushSlicePages;
  std::vector<WorkingSetRun> runs;  // in the order they were first touched; disjoint
};

struct WorkingSetRecord {
  std::vector<ProcessWorkingSet> processes;  // image pids distinct
  uint64_t pages() const;
};

// The file's bytes, and back. parse throws Error saying what is wrong (size, magic, version,
// checksum, bounds: runs unaligned, empty, beyond user space, overlapping; pids repeated).
std::string encode_working_set(const WorkingSetRecord& record);
WorkingSetRecord parse_working_set(const std::string& bytes);

std::string working_set_path(const std::string& image_dir);
// <image_dir>/working-set-<pid>.lzp: page i is the i-th page of the process's record in
// push_order() with its push_slice_pages (page i at address i * 4096).
std::string working_set_pages_path(const std::string& image_dir, int32_t image_pid);
// Writes the record pages of `ws` read from `store` (its process's page store; a page the
// store does not hold is written as zeros: it is served as a zero page, never read) into
// their file, whole or not at all; returns its mac_digest().
std::string write_working_set_pages(const std::string& image_dir, const ProcessWorkingSet& ws,
                                    const image::PageStoreReader& store);
// The record pages of `ws`, nullptr when the record names none; throws Error saying what is
// wrong when the file is missing, damaged, or not these pages (digest, layout).
std::shared_ptr<const image::PageStoreReader> open_working_set_pages(const std::string& image_dir,
                                                                     const ProcessWorkingSet& ws);
// nullopt when the image has no record; throws Error (naming the file) when it is unreadable
// or damaged.
std::optional<WorkingSetRecord> read_working_set(const std::string& image_dir);
// Written whole or not at all (a temporary file renamed into place).
void write_working_set(const std::string& image_dir, const WorkingSetRecord& record);

// Checks one process's record against what the server owes it at the start (every stored page
// of its lazy areas) and the digest of its store; throws Error saying what does not fit.
void check_working_set(const ProcessWorkingSet& ws, const std::string& store_digest,
                       const OwedSet& owed);

// The image pid and directory of a page store's path (<dir>/pages-<pid>.lzp); pid 0 when
// the name is not a store's.
int32_t image_pid_of_store(const std::string& store_path, std::string* dir = nullptr);

struct WorkingSetTarget {
  std::string store_path;    // the process's page store (its directory holds the record)
  std::string store_digest;  // PageStoreReader::mac_digest()
  const OwedSet* owed;       // what the server owes it at the start
};
struct LoadedWorkingSet {
  std::vector<WorkingSetRun> runs;
  uint32_t push_slice_pages = 1;
  std::shared_ptr<const image::PageStoreReader> pages;  // its record pages, or nullptr
};
// The record's runs for each target (same order), empty where it has none. A record that is
// damaged or does not fit every process it names is ignored whole with one warning; record
// pages that cannot be used are left out with one warning each.
std::vector<LoadedWorkingSet> load_working_set(const std::vector<WorkingSetTarget>& targets);

// The order the push takes a record's pages in, and the order of its record pages: the record
// cut into slices (whole runs, in record order; a slice ends with the run that brings it to its
// size), each slice's runs sorted by address and merged where contiguous. The slices grow from
// kFirstPushSlicePages, doubling, up to `slice_pages`. Node touches its pages in runs of one or
// two pages that interleave a few regions (9,939 runs for 13,084 pages): slices of up to 4 MiB
// (kPushSlicePages, what recordings use) make them ~1,200 copies; small slices first keep the
// order of the first pages, which the process touches while the push begins (one 4 MiB slice
// for a small server's whole record cost it faults: node http answered 30 ms after the
// command's start against 24 in record order). A record carries its slice: the record pages
// are laid out by it.
inline constexpr uint64_t kFirstPushSlicePages = 16;
std::vector<WorkingSetRun> push_order(const std::vector<WorkingSetRun>& record,
                                      uint64_t slice_pages);

// A piece of the working set to push, and where its pages are in the record pages.
struct WorkingSetPiece : OwedRange {
  uint64_t record_addr = 0;  // address of its first page in working-set-<pid>.lzp
};

// The pages a process should get first, in order; the prefetch takes from its front.
class WorkingSetQueue {
 public:
  WorkingSetQueue() = default;
  // A record's runs, pushed in push_order().
  WorkingSetQueue(const std::vector<WorkingSetRun>& record, uint64_t slice_pages);
  // The next piece still owed (at most max_len bytes, inside one owed range and one run),
  // dropping from the front what is owed no more (filled by a fault, or dropped). nullopt
  // once done.
  std::optional<WorkingSetPiece> next(const OwedSet& owed, uint64_t max_len);
  bool contains(uint64_t addr) const;  // the page at addr is in the working set
  bool pending() const { return pos_ < runs_.size(); }
  uint64_t pages() const { return pages_; }

 private:
  struct Run : WorkingSetRun {
    uint64_t record_page = 0;  // its first page's index in the record pages
  };
  std::vector<Run> runs_;
  std::map<uint64_t, uint64_t> by_start_;  // start -> end, for contains()
  size_t pos_ = 0;
  uint64_t pages_ = 0;
};

// Notes the pages faults were served, per process, until the recording ends: `quiet_ns`
// after the last fault (once there was one), `max_ns` after start(), or finish().
class WorkingSetRecorder {
 public:
  WorkingSetRecorder(int64_t max_ns, int64_t quiet_ns);
  // `store` (may be null: no record pages are written) is read when the recording ends.
  void add_process(uint64_t key, const std::string& store_path, std::string store_digest,
                   std::shared_ptr<const image::PageStoreReader> store = nullptr);
  void start(int64_t now);
  // A fault's window [start, end) was served (pages already noted are skipped).
  void note(uint64_t key, uint64_t start, uint64_t end, int64_t now);
  bool active() const { return active_; }
  // When the recording must end (steady clock ns), -1 when it is over.
  int64_t deadline() const;
  // Ends the recording and writes the record pages and the record (once) on a thread of its
  // own at SCHED_IDLE: reading them back from the stores takes seconds for a large record
  // (node after a full GC: 139,442 pages in 2 s), which the server's loop must spend serving.
  // A failure to write is one warning.
  void finish(const std::string& why);
  // Waits for what finish() writes (the destructor does too).
  void wait();
  ~WorkingSetRecorder();

 private:
  struct Proc {
    ProcessWorkingSet ws;
    std::shared_ptr<const image::PageStoreReader> store;
    std::map<uint64_t, uint64_t> seen;  // start -> end of what is recorded
    uint64_t pages = 0;
  };
  std::map<uint64_t, Proc> procs_;
  std::string dir_;
  int64_t max_ns_, quiet_ns_;
  int64_t started_ = 0, last_fault_ = -1;
  bool active_ = false, finished_ = false;
  std::thread writer_;
};

}  // namespace lazycr::uffd
