// The image directory: inventory.pb, process-<pid>.pb, pages-<pid>.lzp, shared.pb. Every
// metadata file is a 24-byte header (magic, version, payload size) and a checksummed zstd
// frame holding one protobuf message (FORMAT.md). Readers validate everything before use.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "image-format/bounded_parse.h"
#include "image-format/inventory.pb.h"
#include "image-format/page_store.h"
#include "image-format/process.pb.h"
#include "image-format/shared.pb.h"

namespace lazycr::image {

inline constexpr uint32_t kFormatVersion = 4;
// Decoded (decompressed) size of each metadata file (FORMAT.md, "Metadata bounds"); the image
// as a whole and the parsed forms are bounded in bounded_parse.h.
inline constexpr uint64_t kMaxInventoryBytes = 1ull << 20;
inline constexpr uint64_t kMaxProcessBytes = 64ull << 20;
inline constexpr uint64_t kMaxSharedBytes = 64ull << 20;
inline constexpr uint64_t kUserSpaceEnd = 0x0000800000000000ull;  // x86_64, 4-level paging
inline constexpr int kMaxProcesses = 32768;
inline constexpr int kMaxThreads = 32768;
inline constexpr int kMaxAreas = 1 << 20;
inline constexpr int kMaxFds = 1 << 20;
// The image as a whole (sums over its processes): what show holds and restore recreates.
inline constexpr int64_t kMaxImageThreads = 1 << 17;
inline constexpr int64_t kMaxImageAreas = 1 << 22;
inline constexpr int64_t kMaxImageFds = 1 << 20;
inline constexpr uint32_t kMaxXsaveSize = 64 * 1024;
// Seccomp (the kernel's own bounds): one program holds at most BPF_MAXINSNS instructions; the
// filters a thread runs hold at most MAX_INSNS_PER_PATH, each filter counting 4 more.
inline constexpr int kMaxSeccompInsns = 4096;
inline constexpr int kMaxSeccompPathInsns = 32768;
inline constexpr int kSeccompFilterPenalty = 4;
inline constexpr int kMaxLocksPerFd = 1 << 16;
// epoll (objects/epoll): registrations per instance (one injected call each at restore), and
// the bits epoll_ctl(2) accepts in a mask (EPOLLIN .. EPOLLRDHUP, EPOLLEXCLUSIVE, EPOLLWAKEUP,
// EPOLLONESHOT, EPOLLET).
inline constexpr int kMaxEpollTargets = 1 << 16;
inline constexpr uint32_t kEpollKnownEvents =
    0x3fffu | (1u << 28) | (1u << 29) | (1u << 30) | (1u << 31);
// shared.pb (FORMAT.md): pipe capacity (F_GETPIPE_SZ: a power of two, at least a page) and
// data, queued socket data, counts.
inline constexpr uint32_t kMinPipeCapacity = 4096;
inline constexpr uint32_t kMaxPipeCapacity = 64u << 20;
inline constexpr uint64_t kMaxSocketQueuedBytes = 16u << 20;  // per socket
inline constexpr int kMaxSocketQueued = 1 << 16;              // elements per socket
inline constexpr int kMaxSharedObjects = 1 << 20;             // pipes, and sockets
// Pty pairs (kernel.pty.max defaults to 4096), their termios (struct termios2) and the unread
// bytes per direction the restore puts back into a line discipline of 4096 bytes.
inline constexpr int kMaxPtys = 4096;
inline constexpr size_t kPtyTermiosSize = 44;
inline constexpr size_t kMaxPtyQueuedBytes = 4031;
inline constexpr uint64_t kMaxSysvShmBytes = 1ull << 40;  // one SysV segment
// A SysV segment's mode: permissions, SHM_DEST (01000) and SHM_LOCKED (02000).
inline constexpr uint32_t kSysvShmModeBits = 03777;
// Sum of pipe capacities: the restore sizes each pipe (F_SETPIPE_SZ), and the kernel allocates
// its ring for that capacity whatever the data (root passes pipe-user-pages-hard).
inline constexpr uint64_t kMaxTotalPipeCapacity = 1ull << 30;

std::string inventory_path(const std::string& dir);
std::string process_path(const std::string& dir, int pid);
std::string pages_path(const std::string& dir, int pid);
std::string shared_path(const std::string& dir);

// Writes into "<dir>.tmp-<pid>" and renames to dir in commit(); an image is never seen
// half written, and never replaced without `replace`. Without commit() the temporary
// directory is removed.
class ImageWriter {
 public:
  // Refuses an existing, non-empty dir unless `replace` is set.
  ImageWriter(const std::string& dir, bool replace);
  ~ImageWriter();
  ImageWriter(const ImageWriter&) = delete;
  ImageWriter& operator=(const ImageWriter&) = delete;

  const std::string& staging_dir() const { return staging_; }
  void write_process(const Process& process);
  // Path where the page store of `pid` must be written before commit().
  std::string pages_path(int pid) const;
  void write_inventory(const Inventory& inventory);
  // shared.pb: pipes and sockets with their buffered data (validated before writing).
  void write_shared(const SharedObjects& shared);
  // Renames the staging directory to dir. Without `replace` it never replaces anything
  // (RENAME_NOREPLACE; only an empty dir gives way): a dir that appeared since the constructor
  // checked, e.g. another dump's, is an Error naming it. With `replace` the two are exchanged
  // (RENAME_EXCHANGE) and the old one removed; returns what it held ("" if nothing).
  std::string commit();

 private:
  std::string dir_;
  std::string staging_;
  bool replace_;
  bool committed_ = false;
};

// Reads and validates a whole image directory.
class ImageReader {
 public:
  // Throws Error naming the file and what is wrong. Validates the inventory, every process
  // file (threads, areas sorted, in user space, not overlapping, sizes bounded) and opens
  // every page store (header, index, footer; frames are checked when read), then links the
  // stores' REF runs (each to a process listed before its own, covered by DATA/ZERO runs
  // there), so that pages(pid).read() serves every stored page.
  explicit ImageReader(const std::string& dir);
  ~ImageReader();

  const std::string& dir() const { return dir_; }
  const Inventory& inventory() const { return inventory_; }
  const std::vector<Process>& processes() const { return processes_; }
  // For a restore that stands something in for what the image holds (restore/skipped_fds.h),
  // after the checks above.
  std::vector<Process>& mutable_processes() { return processes_; }
  const Process& process(int pid) const;
  // The pipes and sockets of shared.pb; an empty message when the image has no shared.pb.
  const SharedObjects& shared() const { return shared_; }
  const PageStoreReader& pages(int pid) const;
  bool has_pages(int pid) const { return pages_.count(pid) != 0; }
  // Incremental images: the parent image (its own parent linked in turn), or nullptr for a
  // full image. Its page stores serve this image's PARENT runs (image_chain.h).
  const ImageReader* parent() const { return parent_.get(); }
  // The same store, for holders that may outlive this reader (it keeps its linked stores).
  std::shared_ptr<const PageStoreReader> shared_pages(int pid) const;

 private:
  void check_tree() const;
  void check_descriptors() const;
  void link_page_stores();
  void link_parent_image();  // image_chain.cc

  std::string dir_;
  Inventory inventory_;
  std::vector<Process> processes_;
  SharedObjects shared_;
  std::map<int, std::shared_ptr<PageStoreReader>> pages_;
  MetadataBudget budget_;
  std::shared_ptr<const ImageReader> parent_;
};

// Low-level: one metadata file. Used by the reader and writer and by the fuzz target. The
// readers enforce the file's bounds (by magic), and charge `budget` when it is not null.
void write_message_file(const std::string& path, const char magic[8],
                        const google::protobuf::MessageLite& msg);
void read_message_file(const std::string& path, const char magic[8], google::protobuf::Message* msg,
                       MetadataBudget* budget = nullptr);
void parse_message_bytes(const std::string& what, const std::string& bytes, const char magic[8],
                         google::protobuf::Message* msg, MetadataBudget* budget = nullptr);
// The bound on the decoded size of the metadata file with this magic.
uint64_t max_decoded_bytes(const char magic[8]);

// Semantic checks, also used by the fuzz target.
void validate_inventory(const Inventory& inv);
void validate_process(const Process& proc, const Inventory& inv);
void validate_shared(const SharedObjects& shared);

inline constexpr char kInventoryMagic[8] = {'L', 'Z', 'C', 'R', 'I', 'N', 'V', '\0'};
inline constexpr char kProcessMagic[8] = {'L', 'Z', 'C', 'R', 'P', 'R', 'O', 'C'};
inline constexpr char kSharedMagic[8] = {'L', 'Z', 'C', 'R', 'S', 'H', 'R', 'D'};

}  // namespace lazycr::image
