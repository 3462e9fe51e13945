#include "image-format/image_dir.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "common/error.h"
#include "common/fd.h"
#include "image-format/ghost.h"
#include "image-format/regular_file.h"
#include "image-format/validate_timers.h"

namespace fs = boost::filesystem;

namespace lazycr::image {
namespace {

constexpr size_t kHeaderSize = 24;
constexpr uint64_t kVsyscallStart = 0xffffffffff600000ull;
constexpr uint64_t kVsyscallEnd = 0xffffffffff601000ull;

void put_u32(unsigned char* p, uint32_t v) {
  std::memcpy(p, &v, 4);
}
void put_u64(unsigned char* p, uint64_t v) {
  std::memcpy(p, &v, 8);
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void write_all(int fd, const void* data, size_t len, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, ": write failed");
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
}

bool page_aligned(uint64_t v) {
  return (v & (kPageSize - 1)) == 0;
}

}  // namespace

std::string inventory_path(const std::string& dir) {
  return dir + "/inventory.pb";
}
std::string process_path(const std::string& dir, int pid) {
  return cat(dir, "/process-", pid, ".pb");
}
std::string pages_path(const std::string& dir, int pid) {
  return cat(dir, "/pages-", pid, ".lzp");
}
std::string shared_path(const std::string& dir) {
  return dir + "/shared.pb";
}

namespace {

// "format 1, this lazycr reads 3", with a hint at which side is older.
std::string version_mismatch(uint32_t version) {
  return cat("format ", version, ", this lazycr reads ", kFormatVersion,
             version < kFormatVersion ? " (the image is from an older lazycr)"
                                      : " (the image is from a newer lazycr, or damaged)");
}

}  // namespace

void write_message_file(const std::string& path, const char magic[8],
                        const google::protobuf::MessageLite& msg) {
  std::string raw;
  if (!msg.SerializeToString(&raw)) fail(path, ": cannot serialize ", msg.GetTypeName());
  // The reader would refuse it: say so now, while the dump can still report why.
  if (raw.size() > max_decoded_bytes(magic))
    fail(path, ": metadata of ", raw.size(), " bytes exceeds the bound of ",
         max_decoded_bytes(magic), " for this file");

  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  if (cctx == nullptr) fail(path, ": out of memory for zstd");
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, 3);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
  std::string out(kHeaderSize + ZSTD_compressBound(raw.size()), '\0');
  size_t n = ZSTD_compress2(cctx, out.data() + kHeaderSize, out.size() - kHeaderSize, raw.data(),
                            raw.size());
  ZSTD_freeCCtx(cctx);
  if (ZSTD_isError(n)) fail(path, ": zstd: ", ZSTD_getErrorName(n));
  out.resize(kHeaderSize + n);
  auto* h = reinterpret_cast<unsigned char*>(out.data());
  std::memcpy(h, magic, 8);
  put_u32(h + 8, kFormatVersion);
  put_u32(h + 12, 0);
  put_u64(h + 16, n);

  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) fail_errno(path, ": cannot create");
  write_all(fd.get(), out.data(), out.size(), path);
  if (::fsync(fd.get()) != 0) fail_errno(path, ": fsync failed");
}

uint64_t max_decoded_bytes(const char magic[8]) {
  if (std::memcmp(magic, kInventoryMagic, 8) == 0) return kMaxInventoryBytes;
  if (std::memcmp(magic, kSharedMagic, 8) == 0) return kMaxSharedBytes;
  return kMaxProcessBytes;
}

void parse_message_bytes(const std::string& what, const std::string& bytes, const char magic[8],
                         google::protobuf::Message* msg, MetadataBudget* budget) {
  if (bytes.size() < kHeaderSize)
    fail(what, ": truncated (", bytes.size(), " bytes, header is 24)");
  auto* h = reinterpret_cast<const unsigned char*>(bytes.data());
  if (std::memcmp(h, magic, 8) != 0)
    fail(what, ": bad magic (not a ", std::string(magic, 7), " file)");
  uint32_t version = get_u32(h + 8);
  if (version != kFormatVersion) fail(what, ": ", version_mismatch(version));
  if (get_u32(h + 12) != 0) fail(what, ": unknown header flags ", get_u32(h + 12));
  uint64_t payload = get_u64(h + 16);
  if (payload != bytes.size() - kHeaderSize)
    fail(what, ": header says ", payload, " payload bytes, file has ", bytes.size() - kHeaderSize);
  const char* src = bytes.data() + kHeaderSize;
  size_t frame = ZSTD_findFrameCompressedSize(src, payload);
  if (ZSTD_isError(frame) || frame != payload)
    fail(what, ": payload is not one complete zstd frame");
  unsigned long long content = ZSTD_getFrameContentSize(src, payload);
  if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN)
    fail(what, ": zstd frame has no valid content size");
  // Refused from the frame header, before anything is allocated or decompressed.
  if (content > max_decoded_bytes(magic))
    fail(what, ": metadata of ", content, " bytes exceeds the bound of ", max_decoded_bytes(magic),
         " for this file");
  if (budget != nullptr) budget->take_decoded(what, content);
  std::string raw(content, '\0');
  size_t n = ZSTD_decompress(raw.data(), raw.size(), src, payload);
  if (ZSTD_isError(n)) fail(what, ": ", ZSTD_getErrorName(n));
  if (n != content) fail(what, ": decompressed ", n, " bytes, frame header says ", content);
  parse_bounded(what, raw.data(), raw.size(), msg, budget);
}

void read_message_file(const std::string& path, const char magic[8], google::protobuf::Message* msg,
                       MetadataBudget* budget) {
  uint64_t size = 0;
  UniqueFd fd = open_regular_file(path, "metadata file", &size);
  // zstd never makes data bigger than its bound, plus the header.
  if (size > kHeaderSize + ZSTD_compressBound(max_decoded_bytes(magic)))
    fail(path, ": ", size, " bytes is larger than any such metadata file lazycr writes");
  std::string bytes(static_cast<size_t>(size), '\0');
  size_t got = 0;
  while (got < bytes.size()) {
    ssize_t n = ::read(fd.get(), bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno(path, ": read failed");
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  bytes.resize(got);
  parse_message_bytes(path, bytes, magic, msg, budget);
}

void validate_inventory(const Inventory& inv) {
  if (inv.format_version() != kFormatVersion) fail(version_mismatch(inv.format_version()));
  if (inv.page_size() != kPageSize)
    fail("page size ", inv.page_size(), " (only 4096 is supported)");
  if (inv.pids_size() == 0) fail("no processes");
  if (inv.pids_size() > kMaxProcesses) fail(inv.pids_size(), " processes exceeds the bound");
  std::set<int> seen;
  for (int pid : inv.pids()) {
    if (pid <= 0) fail("invalid pid ", pid);
    if (!seen.insert(pid).second) fail("pid ", pid, " listed twice");
  }
  if (inv.pids(0) != inv.root_pid()) fail("root pid ", inv.root_pid(), " is not listed first");
  if (inv.cpu().xsave_size() > kMaxXsaveSize)
    fail("xsave size ", inv.cpu().xsave_size(), " too large");
}

// A seccomp filter: a whole number of instructions within the kernel's bound, known flags.
// Returns its cost on the thread's path (instructions + the kernel's per-filter penalty).
int validate_seccomp_filter(const SeccompFilter& f, const std::string& who) {
  const size_t bytes = f.program().size();
  if (bytes == 0 || bytes % 8 != 0 || bytes / 8 > static_cast<size_t>(kMaxSeccompInsns))
    fail(who, ": a seccomp filter of ", bytes, " bytes (want 1..", kMaxSeccompInsns,
         " instructions of 8 bytes)");
  constexpr uint32_t kFlagLog = 2;  // SECCOMP_FILTER_FLAG_LOG
  if (f.flags() & ~kFlagLog) fail(who, ": a seccomp filter with unknown flags ", f.flags());
  return static_cast<int>(bytes / 8) + kSeccompFilterPenalty;
}

void validate_seccomp(const Process& p, const std::string& who) {
  constexpr int kMaxFilters = kMaxSeccompPathInsns / (1 + kSeccompFilterPenalty);
  if (p.seccomp_shared_size() > kMaxFilters)
    fail(who, ": ", p.seccomp_shared_size(), " shared seccomp filters exceeds the bound");
  int shared_cost = 0;
  for (const auto& f : p.seccomp_shared()) shared_cost += validate_seccomp_filter(f, who);
  for (const auto& t : p.threads()) {
    std::string thread = cat(who, " thread ", t.tid());
    if (t.seccomp_mode() < 0 || t.seccomp_mode() > 2)
      fail(thread, ": unknown seccomp mode ", t.seccomp_mode());
    if (t.seccomp_mode() != 2 && (t.seccomp_filters_size() > 0 || p.seccomp_shared_size() > 0))
      fail(thread, ": seccomp filters in seccomp mode ", t.seccomp_mode(),
           " (filters need mode 2)");
    if (t.seccomp_mode() == 2 && t.seccomp_filters_size() + p.seccomp_shared_size() == 0)
      fail(thread, ": seccomp mode 2 without a filter");
    if (t.seccomp_filters_size() > kMaxFilters)
      fail(thread, ": ", t.seccomp_filters_size(), " seccomp filters exceeds the bound");
    int cost = shared_cost;
    for (const auto& f : t.seccomp_filters()) cost += validate_seccomp_filter(f, thread);
    if (cost > kMaxSeccompPathInsns)
      fail(thread, ": seccomp filters of ", cost, " instructions (with ", kSeccompFilterPenalty,
           " per filter) exceed the kernel's ", kMaxSeccompPathInsns);
  }
}

// Lock ranges must be ones fcntl(2) can express (off_t), FLOCK locks the whole file.
void validate_locks(const FileDescriptor& f, const std::string& who) {
  if (f.locks_size() == 0) return;
  std::string fd = cat(who, ": fd ", f.fd());
  if (f.locks_size() > kMaxLocksPerFd) fail(fd, ": ", f.locks_size(), " locks exceeds the bound");
  if (!f.restorable()) fail(fd, ": holds locks but is not restorable");
  constexpr uint64_t kMaxOff = static_cast<uint64_t>(INT64_MAX);
  for (const auto& l : f.locks()) {
    if (!FileLock::Kind_IsValid(l.kind())) fail(fd, ": a lock of unknown kind ", l.kind());
    if (l.kind() == FileLock::FLOCK && (l.start() != 0 || l.length() != 0))
      fail(fd, ": a FLOCK lock with a byte range");
    if (l.start() > kMaxOff || l.length() > kMaxOff - l.start())
      fail(fd, ": a lock on bytes ", l.start(), " + ", l.length(), " beyond the largest offset");
  }
}

// An epoll instance's registrations: targets that are descriptors of the process (the kernel
// keys them by number), known event bits, each (target) once. Which descriptor makes the
// instance is checked across the image (check_descriptors).
void validate_epoll(const Process& p, const FileDescriptor& f, const std::string& who) {
  std::string fd = cat(who, ": fd ", f.fd());
  if (f.kind() != FileDescriptor::EPOLL) {
    if (f.has_epoll()) fail(fd, ": a ", FileDescriptor::Kind_Name(f.kind()), " with epoll state");
    return;
  }
  if (!f.restorable()) return;
  if (!f.has_epoll()) fail(fd, ": a restorable EPOLL without its interest list");
  const Epoll& e = f.epoll();
  if (e.made_in_pid() <= 0 || e.made_at_fd() < 0)
    fail(fd, ": epoll made in pid ", e.made_in_pid(), " at fd ", e.made_at_fd());
  const bool here = e.made_in_pid() == p.pid() && e.made_at_fd() == f.fd();
  if (!here && e.targets_size() > 0)
    fail(fd, ": an epoll made at fd ", e.made_at_fd(), " of pid ", e.made_in_pid(),
         " with registrations of its own");
  if (e.targets_size() > kMaxEpollTargets)
    fail(fd, ": ", e.targets_size(), " epoll registrations exceeds the bound");
  std::set<int> fds, seen;
  for (const auto& g : p.fds()) fds.insert(g.fd());
  for (const auto& t : e.targets()) {
    std::string reg = cat(fd, ": epoll registration of fd ", t.fd());
    if (t.fd() == f.fd() || !fds.count(t.fd())) fail(reg, ", which the process does not hold");
    if (!seen.insert(t.fd()).second) fail(reg, " twice");
    if (t.events() & ~kEpollKnownEvents)
      fail(reg, ": unknown event bits 0x", std::hex, t.events() & ~kEpollKnownEvents);
  }
}

void validate_process(const Process& p, const Inventory& inv) {
  std::string who = cat("process ", p.pid());
  if (p.pid() <= 0) fail("invalid pid ", p.pid());
  if (p.ppid() < 0 || p.pgid() < 0 || p.sid() < 0) fail(who, ": negative ppid/pgid/sid");
  if (!p.zombie() && p.threads_size() == 0) fail(who, ": no threads");
  // A zombie is only its exit status now: nothing of it runs, maps or holds files.
  if (p.zombie() && (p.threads_size() > 0 || p.areas_size() > 0 || p.fds_size() > 0))
    fail(who, ": a zombie with ", p.threads_size(), " threads, ", p.areas_size(), " areas and ",
         p.fds_size(), " descriptors (must have none)");
  if (p.children_size() > kMaxProcesses)
    fail(who, ": ", p.children_size(), " children exceeds the bound");
  const int stop = p.stop_signo();
  if (stop != 0 && stop != SIGSTOP && stop != SIGTSTP && stop != SIGTTIN && stop != SIGTTOU)
    fail(who, ": stop signal ", stop, " is not a stop signal");
  if (stop != 0 && p.zombie()) fail(who, ": a zombie cannot be stopped");
  if (p.threads_size() > kMaxThreads)
    fail(who, ": ", p.threads_size(), " threads exceeds the bound");
  std::set<int> tids;
  for (int i = 0; i < p.threads_size(); i++) {
    const Thread& t = p.threads(i);
    if (t.tid() <= 0) fail(who, ": invalid tid ", t.tid());
    if (!tids.insert(t.tid()).second) fail(who, ": tid ", t.tid(), " listed twice");
    if (i == 0 && t.tid() != p.pid()) fail(who, ": first thread is ", t.tid(), ", not the leader");
    if (!t.xsave().empty() && t.xsave().size() != inv.cpu().xsave_size())
      fail(who, " thread ", t.tid(), ": xsave blob of ", t.xsave().size(),
           " bytes, inventory says ", inv.cpu().xsave_size());
    for (const auto& s : t.pending())
      if (s.signo() < 1 || s.signo() > 64 || s.siginfo().size() != 128)
        fail(who, " thread ", t.tid(), ": malformed pending signal");
    if (t.comm().size() > 64) fail(who, " thread ", t.tid(), ": comm too long");
  }
  validate_seccomp(p, who);
  validate_timers_and_sched(p, who);
  for (const auto& s : p.shared_pending())
    if (s.signo() < 1 || s.signo() > 64 || s.siginfo().size() != 128)
      fail(who, ": malformed pending signal");
  for (const auto& a : p.sigactions())
    if (a.signo() < 1 || a.signo() > 64 || a.signo() == SIGKILL || a.signo() == SIGSTOP)
      fail(who, ": signal handler for invalid signal ", a.signo());
  for (const auto& r : p.rlimits())
    if (r.resource() < 0 || r.resource() >= RLIMIT_NLIMITS)
      fail(who, ": unknown rlimit resource ", r.resource());
  if (p.auxv().size() % 16 != 0 || p.auxv().size() > 8192)
    fail(who, ": auxv of ", p.auxv().size(), " bytes is malformed");

  if (p.areas_size() > kMaxAreas)
    fail(who, ": ", p.areas_size(), " memory areas exceeds the bound");
  uint64_t prev_end = 0;
  for (const auto& a : p.areas()) {
    std::string area = cat(who, ": area ", std::hex, a.start(), "-", a.end(), std::dec);
    if (!MemoryArea::Kind_IsValid(a.kind())) fail(area, ": unknown kind ", a.kind());
    if (a.start() >= a.end()) fail(area, ": empty or inverted");
    if (!page_aligned(a.start()) || !page_aligned(a.end()) || !page_aligned(a.pgoff()))
      fail(area, ": not page aligned");
    bool vsyscall = a.kind() == MemoryArea::VSYSCALL;
    if (vsyscall ? (a.start() != kVsyscallStart || a.end() != kVsyscallEnd)
                 : a.end() > kUserSpaceEnd)
      fail(area, ": outside user space");
    if (a.start() < prev_end) fail(area, ": overlaps or is out of order");
    prev_end = a.end();
    if (a.prot() & ~7u) fail(area, ": unknown protection bits ", a.prot());
    if (a.stored_pages() > (a.end() - a.start()) / kPageSize)
      fail(area, ": more stored pages than fit");
  }
  if (p.fds_size() > kMaxFds) fail(who, ": ", p.fds_size(), " descriptors exceeds the bound");
  int prev_fd = -1;
  for (const auto& f : p.fds()) {
    if (f.fd() <= prev_fd) fail(who, ": descriptor ", f.fd(), " out of order or duplicated");
    prev_fd = f.fd();
    if (!FileDescriptor::Kind_IsValid(f.kind())) fail(who, ": fd ", f.fd(), ": unknown kind");
    if (f.file_id() == 0) fail(who, ": fd ", f.fd(), " has no file_id (format 2 requires one)");
    bool object = f.kind() == FileDescriptor::PIPE || f.kind() == FileDescriptor::FIFO ||
                  f.kind() == FileDescriptor::SOCKET;
    if (!object && f.object_inode() != 0)
      fail(who, ": fd ", f.fd(), " is a ", FileDescriptor::Kind_Name(f.kind()),
           " with an object inode (only pipes, FIFOs and sockets have one)");
    if (object && f.restorable() && f.object_inode() == 0)
      fail(who, ": fd ", f.fd(), " is a restorable ", FileDescriptor::Kind_Name(f.kind()),
           " without an object inode");
    if (!FileDescriptor::PtyEnd_IsValid(f.pty_end()))
      fail(who, ": fd ", f.fd(), ": unknown pty end ", f.pty_end());
    if (f.pty_end() != FileDescriptor::NOT_PTY_PAIR &&
        (f.kind() != FileDescriptor::CHARDEV || !f.restorable()))
      fail(who, ": fd ", f.fd(), " is a pty end but not a restorable CHARDEV");
    validate_locks(f, who);
    validate_epoll(p, f, who);
  }
  if (p.ctty_pty() != 0) {
    bool held = false;
    for (const auto& f : p.fds())
      held |= f.pty_end() == FileDescriptor::PTY_SLAVE && f.pty_index() + 1 == p.ctty_pty();
    if (!held || p.sid() != p.pid())
      fail(who, ": controlling terminal pty ", p.ctty_pty() - 1,
           " without being a session leader holding its slave");
  }
}

void validate_sysv_shm(const SharedObjects& s) {
  if (s.sysv_shm_size() > kMaxSharedObjects)
    fail(s.sysv_shm_size(), " SysV segments exceeds the bound");
  int prev = -1;
  for (const SysvShm& m : s.sysv_shm()) {
    std::string what = cat("SysV segment id ", m.id());
    if (m.id() < 0) fail(what, ": a negative id");
    if (m.id() <= prev) fail(what, ": segments are not sorted by id, or listed twice");
    prev = m.id();
    if (m.size() == 0 || m.size() > kMaxSysvShmBytes)
      fail(what, ": size ", m.size(), " is not in [1, ", kMaxSysvShmBytes, "]");
    if (m.mode() & ~kSysvShmModeBits)
      fail(what, ": mode ", std::oct, m.mode(), " has bits beyond ", kSysvShmModeBits);
  }
}

void validate_shared(const SharedObjects& s) {
  validate_ghosts(s);
  validate_sysv_shm(s);
  if (s.pipes_size() > kMaxSharedObjects) fail(s.pipes_size(), " pipes exceeds the bound");
  if (s.sockets_size() > kMaxSharedObjects) fail(s.sockets_size(), " sockets exceeds the bound");
  uint64_t prev = 0;
  uint64_t total_capacity = 0;
  for (const Pipe& p : s.pipes()) {
    std::string what = cat(p.fifo() ? "FIFO inode " : "pipe:[", p.inode(), p.fifo() ? "" : "]");
    if (p.inode() == 0) fail("a pipe has inode 0");
    if (p.inode() <= prev) fail(what, ": pipes are not sorted by inode, or listed twice");
    prev = p.inode();
    uint32_t cap = p.capacity();
    if (cap < kMinPipeCapacity || cap > kMaxPipeCapacity || (cap & (cap - 1)) != 0)
      fail(what, ": capacity ", cap, " is not a power of two in [", kMinPipeCapacity, ", ",
           kMaxPipeCapacity, "]");
    if (p.data().size() > cap)
      fail(what, ": ", p.data().size(), " bytes buffered, more than its capacity ", cap);
    if (p.no_writers() && p.no_readers()) fail(what, ": has neither a reader nor a writer");
    if (p.no_readers() && !p.data().empty())
      fail(what, ": has no reader but ", p.data().size(), " bytes buffered");
    total_capacity += cap;
    if (total_capacity > kMaxTotalPipeCapacity)
      fail(what, ": the pipes up to this one have a capacity of ", total_capacity,
           " bytes, more than the bound of ", kMaxTotalPipeCapacity);
  }
  if (s.ptys_size() > kMaxPtys) fail(s.ptys_size(), " pty pairs exceeds the bound ", kMaxPtys);
  int64_t prev_pty = -1;
  for (const auto& t : s.ptys()) {
    std::string what = cat("pty ", t.index());
    if (static_cast<int64_t>(t.index()) <= prev_pty)
      fail(what, ": ptys are not sorted by index, or listed twice");
    prev_pty = t.index();
    if (t.termios().size() != kPtyTermiosSize)
      fail(what, ": termios of ", t.termios().size(), " bytes, not ", kPtyTermiosSize);
    if (t.rows() > 0xffff || t.cols() > 0xffff || t.xpixel() > 0xffff || t.ypixel() > 0xffff)
      fail(what, ": window size out of range");
    if (t.to_master().size() > kMaxPtyQueuedBytes || t.to_slave().size() > kMaxPtyQueuedBytes)
      fail(what, ": more than ", kMaxPtyQueuedBytes, " unread bytes in a direction");
  }
  prev = 0;
  std::map<uint64_t, const UnixSocket*> by_inode;
  for (const UnixSocket& u : s.sockets()) {
    std::string what = cat("socket:[", u.inode(), "]");
    if (u.inode() == 0) fail("a socket has inode 0");
    if (u.inode() <= prev) fail(what, ": sockets are not sorted by inode, or listed twice");
    prev = u.inode();
    by_inode[u.inode()] = &u;
    if (u.type() != SOCK_STREAM && u.type() != SOCK_DGRAM && u.type() != SOCK_SEQPACKET)
      fail(what, ": type ", u.type(), " is not SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET");
    if (u.type() == SOCK_STREAM && u.queued_size() > 1)
      fail(what, ": a stream socket with ", u.queued_size(), " queued elements (at most 1)");
    if (u.queued_size() > kMaxSocketQueued)
      fail(what, ": ", u.queued_size(), " queued messages exceeds the bound ", kMaxSocketQueued);
    uint64_t bytes = 0;
    for (const std::string& q : u.queued()) bytes += q.size();  // <= 256 MiB: a parsed message
    if (bytes > kMaxSocketQueuedBytes)
      fail(what, ": ", bytes, " bytes queued exceeds the bound ", kMaxSocketQueuedBytes);
    if (u.sndbuf() > INT32_MAX || u.rcvbuf() > INT32_MAX)
      fail(what, ": buffer sizes ", u.sndbuf(), "/", u.rcvbuf(), " exceed INT_MAX");
  }
  if (s.inet_sockets_size() > kMaxSharedObjects)
    fail(s.inet_sockets_size(), " IPv4/IPv6 sockets exceeds the bound");
  prev = 0;
  for (const auto& in : s.inet_sockets()) {
    std::string what = cat("socket:[", in.inode(), "]");
    if (in.inode() == 0) fail("an IPv4/IPv6 socket has inode 0");
    if (in.inode() <= prev)
      fail(what, ": IPv4/IPv6 sockets are not sorted by inode, or listed twice");
    prev = in.inode();
    if (by_inode.count(in.inode())) fail(what, ": listed both as a UNIX and an IPv4/IPv6 socket");
    // Each field's bounds: objects/inet_socket.h validate_inet_socket (restore/validate.cc).
  }
  for (const UnixSocket& u : s.sockets()) {
    if (u.peer_inode() == 0) continue;
    std::string what = cat("socket:[", u.inode(), "]");
    if (u.peer_inode() == u.inode()) fail(what, ": is its own peer");
    auto it = by_inode.find(u.peer_inode());
    if (it == by_inode.end())
      fail(what, ": peer socket:[", u.peer_inode(), "] is not in shared.pb");
    // A datagram socket connected one way to a bound one (connected_by_name) is not pointed back
    // at; objects/unix_socket.h validates the rest.
    if (it->second->peer_inode() != u.inode() && !u.connected_by_name())
      fail(what, ": peer socket:[", u.peer_inode(), "] has peer socket:[", it->second->peer_inode(),
           "], not this one");
    if (it->second->type() != u.type())
      fail(what, ": type ", u.type(), ", its peer's is ", it->second->type());
  }
}

namespace {

// Every stored page must lie inside a memory area, and each area's stored_pages must match.
void check_store_against_areas(const Process& p, const PageStoreReader& store) {
  std::vector<uint64_t> counted(p.areas_size(), 0);
  int ai = 0;
  for (const auto& run : store.index().runs()) {
    uint64_t addr = run.start();
    uint64_t end = run.start() + run.pages() * kPageSize;
    while (addr < end) {
      while (ai < p.areas_size() && p.areas(ai).end() <= addr) ai++;
      if (ai == p.areas_size() || p.areas(ai).start() > addr)
        fail(store.path(), ": page ", std::hex, addr, std::dec, " lies outside every memory area");
      uint64_t upto = std::min(end, p.areas(ai).end());
      counted[ai] += (upto - addr) / kPageSize;
      addr = upto;
    }
  }
  for (int i = 0; i < p.areas_size(); i++)
    if (counted[i] != p.areas(i).stored_pages())
      fail(store.path(), ": area ", std::hex, p.areas(i).start(), std::dec, " has ", counted[i],
           " stored pages, process file says ", p.areas(i).stored_pages());
}

}  // namespace

ImageWriter::ImageWriter(const std::string& dir, bool replace) : dir_(dir), replace_(replace) {
  // "img/" and "img" are the same image; the staging directory must be a sibling, not a child.
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
  if (dir_.empty() || dir_ == "/" || dir_ == "." || dir_ == "..")
    fail("'", dir, "' cannot be an image directory");
  boost::system::error_code ec;
  if (fs::exists(dir_, ec)) {
    if (!fs::is_directory(dir_, ec)) fail(dir_, ": exists and is not a directory");
    if (!replace_ && !fs::is_empty(dir_, ec)) fail(dir_, ": exists and is not empty");
  }
  staging_ = cat(dir_, ".tmp-", ::getpid());
  fs::remove_all(staging_, ec);
  if (!fs::create_directories(staging_, ec) || ec)
    fail(staging_, ": cannot create directory: ", ec.message());
}

ImageWriter::~ImageWriter() {
  if (!committed_) {
    boost::system::error_code ec;
    fs::remove_all(staging_, ec);
  }
}

void ImageWriter::write_process(const Process& process) {
  write_message_file(process_path(staging_, process.pid()), kProcessMagic, process);
}

std::string ImageWriter::pages_path(int pid) const {
  return image::pages_path(staging_, pid);
}

void ImageWriter::write_inventory(const Inventory& inventory) {
  write_message_file(inventory_path(staging_), kInventoryMagic, inventory);
}

void ImageWriter::write_shared(const SharedObjects& shared) {
  const std::string path = shared_path(staging_);
  // The reader would refuse it: say so now, while the dump can still report why.
  try {
    validate_shared(shared);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
  write_message_file(path, kSharedMagic, shared);
}

namespace {

// What a replaced directory held, for the dump to say what -f removed.
std::string describe_replaced(const std::string& dir) {
  try {
    Inventory inv;
    read_message_file(inventory_path(dir), kInventoryMagic, &inv);
    return cat("an image of pid ", inv.root_pid(), " (", inv.pids_size(), " process(es))");
  } catch (const Error&) {
  }
  boost::system::error_code ec;
  size_t entries = 0;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) entries++;
  return cat("a directory of ", entries, " entries that was not an image");
}

}  // namespace

std::string ImageWriter::commit() {
  boost::system::error_code ec;
  if (!fs::exists(inventory_path(staging_), ec)) fail(staging_, ": no inventory written");
  std::string replaced;
  bool done = false;
  if (replace_) {
    // Swapped in one step: dir is never missing, and the old image is removed only after.
    if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, dir_.c_str(), RENAME_EXCHANGE) == 0) {
      done = true;
      replaced = describe_replaced(staging_);
      fs::remove_all(staging_, ec);
      if (ec) fail(staging_, ": cannot remove the replaced image: ", ec.message());
    } else if (errno != ENOENT) {
      fail_errno("cannot exchange ", staging_, " with ", dir_);
    }
  }
  if (!done) {
    // An empty directory (made by the caller) gives way; rmdir refuses any other atomically.
    if (::rmdir(dir_.c_str()) != 0 && errno != ENOENT && errno != ENOTEMPTY && errno != EEXIST &&
        errno != ENOTDIR)
      fail_errno(dir_, ": cannot remove the empty directory");
    // Never replaces anything: another dump that committed to dir first keeps its image.
    if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, dir_.c_str(), RENAME_NOREPLACE) != 0) {
      if (errno == EEXIST)
        fail(dir_,
             ": appeared during the dump (another dump into the same directory?); "
             "not replaced without -f");
      fail_errno("cannot rename ", staging_, " to ", dir_);
    }
  }
  UniqueFd parent(
      ::open(fs::path(dir_).parent_path().empty() ? "." : fs::path(dir_).parent_path().c_str(),
             O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (parent) ::fsync(parent.get());
  committed_ = true;
  return replaced;
}

ImageReader::ImageReader(const std::string& dir) : dir_(dir) {
  boost::system::error_code ec;
  if (!fs::is_directory(dir_, ec))
    fail(dir_, ": not an image directory (", ec ? ec.message() : "not a directory", ")");
  std::string inv_path = inventory_path(dir_);
  read_message_file(inv_path, kInventoryMagic, &inventory_, &budget_);
  try {
    validate_inventory(inventory_);
  } catch (const Error& e) {
    fail(inv_path, ": ", e.what());
  }
  int64_t threads = 0, areas = 0, fds = 0;
  for (int pid : inventory_.pids()) {
    std::string path = process_path(dir_, pid);
    Process p;
    read_message_file(path, kProcessMagic, &p, &budget_);
    try {
      validate_process(p, inventory_);
    } catch (const Error& e) {
      fail(path, ": ", e.what());
    }
    if (p.pid() != pid) fail(path, ": holds process ", p.pid(), ", inventory says ", pid);
    threads += p.threads_size();
    areas += p.areas_size();
    fds += p.fds_size();
    if (threads > kMaxImageThreads || areas > kMaxImageAreas || fds > kMaxImageFds)
      fail(path, ": the image's processes up to this one have ", threads, " threads, ", areas,
           " memory areas and ", fds, " descriptors, past the bounds for an image (",
           kMaxImageThreads, ", ", kMaxImageAreas, ", ", kMaxImageFds, ")");
    if (!p.zombie()) {
      std::shared_ptr<PageStoreReader> store =
          PageStoreReader::open(image::pages_path(dir_, pid), 16, &budget_);
      check_store_against_areas(p, *store);
      pages_[pid] = std::move(store);
    }
    processes_.push_back(std::move(p));
  }
  std::string sh = shared_path(dir_);
  if (fs::exists(fs::symlink_status(sh, ec))) {
    read_message_file(sh, kSharedMagic, &shared_, &budget_);
    try {
      validate_shared(shared_);
    } catch (const Error& e) {
      fail(sh, ": ", e.what());
    }
  }
  check_tree();
  check_descriptors();
  try {
    check_ghost_refs(processes_, shared_);
  } catch (const Error& e) {
    fail(dir_, ": ", e.what());
  }
  link_parent_image();  // before the REF links: a REF may point at a PARENT page
  link_page_stores();
}

// Process.children against ppid: the image is one tree, parents listed before children.
void ImageReader::check_tree() const {
  std::map<int, int> position;
  for (int i = 0; i < inventory_.pids_size(); ++i) position[inventory_.pids(i)] = i;
  std::set<int> listed;
  for (const Process& p : processes_) {
    std::string path = process_path(dir_, p.pid());
    for (int child : p.children()) {
      auto pos = position.find(child);
      if (pos == position.end()) fail(path, ": child ", child, " is not a process of the image");
      const Process& c = processes_[static_cast<size_t>(pos->second)];
      if (c.ppid() != p.pid())
        fail(path, ": child ", child, " has ppid ", c.ppid(), ", not ", p.pid());
      if (pos->second <= position.at(p.pid()))
        fail(path, ": child ", child, " is listed before its parent in the inventory");
      if (!listed.insert(child).second) fail(path, ": child ", child, " is listed twice");
    }
  }
  for (const Process& p : processes_)
    if (p.pid() != inventory_.root_pid() && listed.count(p.pid()) == 0)
      fail(process_path(dir_, p.pid()), ": process ", p.pid(), " (ppid ", p.ppid(),
           ") is not the root and no process lists it as a child");
}

// Descriptors against shared.pb, and open file descriptions (file_id) across the image.
void ImageReader::check_descriptors() const {
  std::map<uint64_t, const Pipe*> pipes;
  for (const Pipe& p : shared_.pipes()) pipes[p.inode()] = &p;
  std::set<uint64_t> sockets;
  for (const UnixSocket& u : shared_.sockets()) sockets.insert(u.inode());
  std::set<uint32_t> ptys;
  for (const auto& t : shared_.ptys()) ptys.insert(t.index());
  for (const auto& in : shared_.inet_sockets()) sockets.insert(in.inode());
  struct Seen {
    int pid;
    const FileDescriptor* fd;
  };
  std::map<uint64_t, Seen> descriptions;
  for (const Process& p : processes_) {
    std::string path = process_path(dir_, p.pid());
    for (const FileDescriptor& f : p.fds()) {
      std::string what = cat(path, ": fd ", f.fd(), " (", f.target(), ")");
      if (f.restorable() && f.object_inode() != 0) {
        if (f.kind() == FileDescriptor::PIPE || f.kind() == FileDescriptor::FIFO) {
          auto it = pipes.find(f.object_inode());
          if (it == pipes.end())
            fail(what, ": pipe inode ", f.object_inode(), " is not in shared.pb");
          bool fifo = f.kind() == FileDescriptor::FIFO;
          if (it->second->fifo() != fifo)
            fail(what, ": a ", fifo ? "FIFO" : "pipe", " descriptor, shared.pb has a ",
                 it->second->fifo() ? "FIFO" : "pipe", " with inode ", f.object_inode());
        } else if (f.kind() == FileDescriptor::SOCKET && sockets.count(f.object_inode()) == 0) {
          fail(what, ": socket inode ", f.object_inode(), " is not in shared.pb");
        }
      }
      if (f.pty_end() != FileDescriptor::NOT_PTY_PAIR && !ptys.count(f.pty_index()))
        fail(what, ": pty ", f.pty_index(), " is not in shared.pb");
      auto [it, fresh] = descriptions.emplace(f.file_id(), Seen{p.pid(), &f});
      // An epoll description is made by its first descriptor in the image, which the others
      // take it from (objects/epoll): the restore builds in image order.
      if (f.kind() == FileDescriptor::EPOLL && f.restorable() &&
          (f.epoll().made_in_pid() != it->second.pid ||
           f.epoll().made_at_fd() != it->second.fd->fd()))
        fail(what, ": epoll made at fd ", f.epoll().made_at_fd(), " of process ",
             f.epoll().made_in_pid(), ", but its first descriptor in the image is fd ",
             it->second.fd->fd(), " of process ", it->second.pid);
      if (fresh) continue;
      const FileDescriptor& o = *it->second.fd;
      if (o.kind() != f.kind() || o.object_inode() != f.object_inode() ||
          o.target() != f.target() || o.pty_end() != f.pty_end() || o.pty_index() != f.pty_index())
        fail(what, ": shares file_id ", f.file_id(), " with fd ", o.fd(), " of process ",
             it->second.pid, " (", o.target(), "), which is a different file");
    }
  }
}

// REF runs point only to processes listed earlier, so linking in inventory order never needs
// a store that is not linked yet, and the links cannot form a cycle.
void ImageReader::link_page_stores() {
  std::map<int, int> position;
  for (int i = 0; i < inventory_.pids_size(); ++i) position[inventory_.pids(i)] = i;
  for (int i = 0; i < inventory_.pids_size(); ++i) {
    auto it = pages_.find(inventory_.pids(i));
    if (it == pages_.end()) continue;
    PageStoreReader& store = *it->second;
    for (int32_t ref : store.ref_pids()) {
      auto pos = position.find(ref);
      if (pos == position.end())
        fail(store.path(), ": REF runs refer to pid ", ref, ", which is not in the image");
      if (pos->second >= i)
        fail(store.path(), ": REF runs refer to pid ", ref,
             ", which is not listed before this process in the inventory");
      if (pages_.count(ref) == 0)
        fail(store.path(), ": REF runs refer to pid ", ref, ", a zombie without pages");
    }
    store.link_refs([this](int32_t pid) -> std::shared_ptr<const PageStoreReader> {
      auto p = pages_.find(pid);
      return p == pages_.end() ? nullptr : p->second;
    });
  }
}

ImageReader::~ImageReader() = default;

const Process& ImageReader::process(int pid) const {
  for (const auto& p : processes_)
    if (p.pid() == pid) return p;
  fail(dir_, ": no process ", pid, " in the image");
}

const PageStoreReader& ImageReader::pages(int pid) const {
  return *shared_pages(pid);
}

std::shared_ptr<const PageStoreReader> ImageReader::shared_pages(int pid) const {
  auto it = pages_.find(pid);
  if (it == pages_.end()) fail(dir_, ": no page store for process ", pid);
  return it->second;
}

}  // namespace lazycr::image
