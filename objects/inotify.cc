// inotify (INOTIFY): every watch from fdinfo (wd, mask, and the watched inode's file handle,
// which the dump opens with open_by_handle_at on its mount to learn its path); refused with
// events queued unread (they cannot be put back) or a watched file that is gone. Made again
// by lazycr, each watch on the file opened as the process that holds it (fd_kinds.h
// open_readable), with its own watch descriptor: numbers the original had removed are used up
// and given back (their IN_IGNORED events read off) so that the next watch gets its wd.
#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <vector>

#include "common/error.h"
#include "common/json.h"
#include "common/proc.h"
#include "objects/fd_kinds.h"

namespace lazycr::objects {
namespace {

constexpr int kMaxWatches = 65536;
// Watch descriptors below this only: each number a watch lacks costs one add and one remove.
constexpr int kMaxWd = 1 << 20;
constexpr uint32_t kMaskBits = IN_ALL_EVENTS | IN_ONESHOT | IN_EXCL_UNLINK;

// One "inotify wd:1 ino:1a2 sdev:800001 mask:2 ignored_mask:0 fhandle-bytes:8
// fhandle-type:1 f_handle:a201000000000000" line.
struct FdinfoWatch {
  int wd = 0;
  uint64_t ino = 0, sdev = 0;
  uint32_t mask = 0;
  int handle_type = 0;
  std::string handle;  // bytes
};

std::vector<FdinfoWatch> parse_watches(const std::string& fdinfo) {
  std::vector<FdinfoWatch> out;
  std::istringstream in(fdinfo);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("inotify ", 0) != 0) continue;
    FdinfoWatch w;
    std::istringstream words(line.substr(8));
    std::string word;
    size_t handle_bytes = SIZE_MAX;
    while (words >> word) {
      auto colon = word.find(':');
      if (colon == std::string::npos) continue;
      const std::string key = word.substr(0, colon), v = word.substr(colon + 1);
      try {
        if (key == "wd") w.wd = static_cast<int>(std::stoul(v, nullptr, 16));
        if (key == "ino") w.ino = std::stoull(v, nullptr, 16);
        if (key == "sdev") w.sdev = std::stoull(v, nullptr, 16);
        if (key == "mask") w.mask = static_cast<uint32_t>(std::stoul(v, nullptr, 16));
        if (key == "fhandle-bytes") handle_bytes = std::stoul(v, nullptr, 16);
        if (key == "fhandle-type") w.handle_type = static_cast<int>(std::stol(v, nullptr, 16));
        if (key == "f_handle") {
          if (v.size() % 2) throw std::invalid_argument(v);
          for (size_t i = 0; i < v.size(); i += 2)
            w.handle += static_cast<char>(std::stoul(v.substr(i, 2), nullptr, 16));
        }
      } catch (const std::exception&) {
        fail("fdinfo line '", line, "': bad ", key);
      }
    }
    if (handle_bytes == SIZE_MAX || handle_bytes != w.handle.size() || w.handle.empty())
      fail("watch ", w.wd, " has no file handle in fdinfo ('", line, "')");
    out.push_back(std::move(w));
  }
  return out;
}

// The watched inode, opened O_PATH from its file handle through a mount of its file system.
UniqueFd open_watched(const FdinfoWatch& w) {
  // fdinfo prints the kernel's dev_t: major in the bits above 20.
  const unsigned major = static_cast<unsigned>(w.sdev >> 20), minor = w.sdev & 0xfffff;
  std::istringstream mounts(proc::read_file("/proc/self/mountinfo"));
  std::string line;
  int last_err = ENOENT;
  while (std::getline(mounts, line)) {
    std::istringstream f(line);
    std::string id, parent, devno, root, point;
    f >> id >> parent >> devno >> root >> point;
    if (devno != cat(major, ":", minor)) continue;
    // Not O_PATH: this kernel refuses (EBADF) to decode a directory's handle through one.
    UniqueFd mnt(::open(point.c_str(), O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC));
    if (!mnt) continue;
    std::vector<char> buf(sizeof(file_handle) + w.handle.size());
    auto* fh = reinterpret_cast<file_handle*>(buf.data());
    fh->handle_bytes = static_cast<unsigned>(w.handle.size());
    fh->handle_type = w.handle_type;
    std::memcpy(fh->f_handle, w.handle.data(), w.handle.size());
    UniqueFd fd(::open_by_handle_at(mnt.get(), fh, O_PATH | O_CLOEXEC));
    if (fd) return fd;
    last_err = errno;
  }
  if (last_err == ESTALE) fail("the file of watch ", w.wd, " (inode ", w.ino, ") is gone");
  fail_errno_value(last_err, cat("cannot open the file of watch ", w.wd, " (inode ", w.ino,
                                 ", device ", major, ":", minor, ") by its handle"));
}

void dump(const FdDumpSource& src, image::FileDescriptor& f) {
  int queued = 0;
  if (::ioctl(src.dup, FIONREAD, &queued) != 0) fail_errno("ioctl(FIONREAD)");
  if (queued > 0) fail(queued, " bytes of events queued unread, which lazycr cannot put back");
  auto* st = f.mutable_inotify();
  for (const FdinfoWatch& w : parse_watches(src.fdinfo)) {
    UniqueFd fd = open_watched(w);
    struct stat s;
    if (::fstat(fd.get(), &s) != 0) fail_errno("fstat of the file of watch ", w.wd);
    std::string path = proc::read_link(cat("/proc/self/fd/", fd.get()));
    if (s.st_nlink == 0 || path.empty() || path[0] != '/')
      fail("the file of watch ", w.wd, " (", path, ") was deleted");
    if (!S_ISREG(s.st_mode) && !S_ISDIR(s.st_mode))
      fail("watch ", w.wd, " is on ", path, ", neither a file nor a directory");
    auto* out = st->add_watches();
    out->set_wd(w.wd);
    out->set_mask(w.mask);
    out->set_path(path);
    out->set_dev(s.st_dev);
    out->set_inode(s.st_ino);
    out->set_directory(S_ISDIR(s.st_mode));
  }
  std::sort(st->mutable_watches()->begin(), st->mutable_watches()->end(),
            [](const auto& a, const auto& b) { return a.wd() < b.wd(); });
}

void validate(const image::FileDescriptor& f, const std::set<int>&) {
  if (!f.has_inotify()) fail("has no inotify state");
  const auto& ws = f.inotify().watches();
  if (ws.size() > kMaxWatches) fail("inotify with ", ws.size(), " watches, past ", kMaxWatches);
  int prev = 0;
  for (const auto& w : ws) {
    if (w.wd() <= prev || w.wd() >= kMaxWd)
      fail("inotify watch ", w.wd(), " out of order or past ", kMaxWd);
    prev = w.wd();
    if (w.mask() == 0 || (w.mask() & ~kMaskBits))
      fail("inotify watch ", w.wd(), " mask ", hex(w.mask()), " has unknown bits");
    if (w.path().empty() || w.path()[0] != '/' || w.path().size() >= PATH_MAX ||
        w.path().find('\0') != std::string::npos)
      fail("inotify watch ", w.wd(), ": not an absolute path");
  }
}

UniqueFd create(const image::FileDescriptor& f, const FdCreateContext& ctx) {
  UniqueFd fd(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK));
  if (!fd) fail_errno("inotify_init1");
  UniqueFd gap;  // an inode no watch of the image is on, for the numbers to use up
  int next = 1, used_up = 0;
  for (const auto& w : f.inotify().watches()) {
    while (next < w.wd()) {
      if (!gap) gap.reset(::memfd_create("lazycr-inotify-gap", MFD_CLOEXEC));
      if (!gap) fail_errno("memfd_create");
      int got = ::inotify_add_watch(fd.get(), cat("/proc/self/fd/", gap.get()).c_str(), IN_ATTRIB);
      if (got < 0) fail_errno("using up watch descriptor ", next);
      if (::inotify_rm_watch(fd.get(), got) != 0) fail_errno("inotify_rm_watch(", got, ")");
      next = got + 1;
      used_up++;
    }
    UniqueFd file = ctx.open_readable(w.path(), w.directory(), w.dev(), w.inode());
    int got = ::inotify_add_watch(fd.get(), cat("/proc/self/fd/", file.get()).c_str(), w.mask());
    if (got < 0) fail_errno("inotify_add_watch(", w.path(), ", ", hex(w.mask()), ")");
    if (got != w.wd()) fail("watch on ", w.path(), " got wd ", got, " instead of ", w.wd());
    next = got + 1;
  }
  // Each removal queued an IN_IGNORED: read them off. An event of a real watch read here
  // cannot be put back: the restore fails rather than lose it.
  for (int left = used_up; left > 0;) {
    alignas(inotify_event) char buf[4096];
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n <= 0) fail("reading back the IN_IGNORED events of the watch descriptors used up");
    for (ssize_t off = 0; off < n;) {
      auto* e = reinterpret_cast<inotify_event*>(buf + off);
      if (e->mask != IN_IGNORED || e->len != 0)
        fail("an event on a watched file (wd ", e->wd, ", mask ", hex(e->mask),
             ") came while the watches were being made; try again");
      left--;
      off += static_cast<ssize_t>(sizeof(inotify_event) + e->len);
    }
  }
  if (!(f.flags() & O_NONBLOCK) && ::fcntl(fd.get(), F_SETFL, 0) != 0)
    fail_errno("fcntl(F_SETFL, 0)");
  return fd;
}

}  // namespace

const FdKind kInotifyKind = {
    image::FileDescriptor::INOTIFY, "inotify", dump, validate, create, nullptr};

}  // namespace lazycr::objects
