// Descriptors across the tree: open file descriptions (file_id), and the kernel objects
// several descriptors lead to (pipes, FIFOs; sockets through their objects/ units) with the
// data buffered in them, read without consuming it.
#include <dirent.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <tuple>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/proc.h"
#include "image-format/image_dir.h"
#include "objects/socket_families.h"
#include "objects/socket_name.h"

namespace lazycr::checkpoint {
namespace {

using image::FileDescriptor;

struct FdRef {
  size_t proc;  // index into the process list
  int index;    // index into that process's fds
};

// The bytes buffered in a pipe, left in place: tee(2) duplicates the pipe's buffers into a
// pipe of ours (no copy, nothing consumed), which we then read.
void capture_pipe(int src, image::Pipe& out, const std::string& what) {
  int cap = ::fcntl(src, F_GETPIPE_SZ);
  if (cap < 0) fail_errno("F_GETPIPE_SZ on ", what);
  out.set_capacity(static_cast<uint32_t>(cap));
  int avail = 0;
  if (::ioctl(src, FIONREAD, &avail) != 0) fail_errno("FIONREAD on ", what);
  if (avail <= 0) return;
  int pp[2];
  if (::pipe2(pp, O_CLOEXEC | O_NONBLOCK) != 0) fail_errno("pipe2 (to copy ", what, ")");
  UniqueFd r(pp[0]), w(pp[1]);
  // Same number of slots as the source: tee copies buffer references, one slot each.
  if (::fcntl(w.get(), F_GETPIPE_SZ) < cap && ::fcntl(w.get(), F_SETPIPE_SZ, cap) < 0)
    fail_errno("F_SETPIPE_SZ ", cap, " (to copy ", what, ")");
  ssize_t n = ::tee(src, w.get(), static_cast<size_t>(avail), SPLICE_F_NONBLOCK);
  if (n < 0) fail_errno("tee from ", what);
  if (n != avail) fail("tee from ", what, ": copied ", n, " of ", avail, " buffered bytes");
  std::string data(static_cast<size_t>(avail), '\0');
  size_t got = 0;
  while (got < data.size()) {
    ssize_t k = ::read(r.get(), data.data() + got, data.size() - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail_errno("reading the copy of ", what);
    got += static_cast<size_t>(k);
  }
  out.set_data(std::move(data));
}

uint64_t inode_in(const std::string& target, const char* prefix) {
  size_t plen = std::strlen(prefix);
  if (target.compare(0, plen, prefix) != 0 || target.size() < plen + 2 || target.back() != ']')
    return 0;
  return std::strtoull(target.c_str() + plen, nullptr, 10);
}

// Whether the kernel's pipe behind `end` (lazycr's copy of one end held in the tree) has the
// other end open anywhere, in any process or in flight in a socket: poll() reports POLLHUP on a
// reading end when the pipe has no writer, POLLERR on a writing end when it has no reader
// (fs/pipe.c pipe_poll). For a FIFO opened for reading that never saw a writer, the kernel
// shows no POLLHUP: it counts as held, and is refused rather than restored with a false EOF.
bool other_end_open(int end, bool end_writes, const std::string& what) {
  pollfd p{end, static_cast<short>(end_writes ? POLLOUT : POLLIN), 0};
  int n;
  do {
    n = ::poll(&p, 1, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) fail_errno("poll on ", what);
  return !(p.revents & (end_writes ? POLLERR : POLLHUP));
}

// "by pid N (comm) " for the processes outside the tree that hold pipe `inode` (a scan of
// every /proc/PID/fd, for the message only: a holder may also be a descriptor in flight), or
// "" when none is found.
std::string holders_outside(uint64_t inode, bool fifo, const std::vector<TreeFiles>& tree) {
  std::set<pid_t> mine{::getpid()};  // lazycr holds a copy of the tree's end right now
  for (const auto& t : tree) mine.insert(t.process->pid());
  std::string want = cat("pipe:[", inode, "]");
  std::string found;
  int count = 0;
  DIR* dir = ::opendir("/proc");
  if (dir == nullptr) return found;
  std::vector<pid_t> pids;
  while (dirent* e = ::readdir(dir))
    if (e->d_name[0] >= '1' && e->d_name[0] <= '9') pids.push_back(std::atoi(e->d_name));
  ::closedir(dir);
  for (pid_t pid : pids) {
    if (mine.count(pid)) continue;
    bool holds = false;
    try {
      for (int fd : proc::list_fds(pid)) {
        std::string link = cat("/proc/", pid, "/fd/", fd);
        if (fifo) {
          struct stat st;
          holds = ::stat(link.c_str(), &st) == 0 && S_ISFIFO(st.st_mode) && st.st_ino == inode;
        } else {
          char target[64];
          ssize_t n = ::readlink(link.c_str(), target, sizeof target);
          holds = n > 0 && std::string(target, static_cast<size_t>(n)) == want;
        }
        if (holds) break;
      }
    } catch (const Error&) {
      continue;  // gone meanwhile, or not ours to read
    }
    if (!holds) continue;
    if (++count > 3) continue;
    auto comm = proc::try_read_file(cat("/proc/", pid, "/comm"));
    std::string name = comm ? comm->substr(0, comm->find('\n')) : std::string("?");
    found += cat(found.empty() ? "by " : ", ", "pid ", pid, " (", name, ")");
  }
  if (count > 3) found += cat(" and ", count - 3, " more");
  return found.empty() ? std::string() : found + " ";
}

}  // namespace

UniqueFd copy_of_fd(const TreeFiles& p, int fd) {
  UniqueFd out(static_cast<int>(::syscall(SYS_pidfd_getfd, p.pidfd, fd, 0)));
  if (!out) fail_errno("pidfd_getfd of fd ", fd, " of pid ", p.process->pid());
  return out;
}

bool fd_reads(const FileDescriptor& f) {
  uint32_t acc = f.flags() & O_ACCMODE;
  return acc == O_RDONLY || acc == O_RDWR;
}

bool fd_writes(const FileDescriptor& f) {
  uint32_t acc = f.flags() & O_ACCMODE;
  return acc == O_WRONLY || acc == O_RDWR;
}

uint64_t object_inode_of(const std::string& target) {
  if (uint64_t i = inode_in(target, "pipe:[")) return i;
  return inode_in(target, "socket:[");
}

SharedCollection collect_shared(std::vector<TreeFiles>& procs, const SharedOptions& flags) {
  SharedCollection result;
  auto fd_at = [&](const FdRef& r) -> FileDescriptor& {
    return *procs[r.proc].process->mutable_fds(r.index);
  };
  auto pid_of = [&](const FdRef& r) { return procs[r.proc].process->pid(); };
  auto why_not = [&](const FdRef& r, const std::string& why) {
    fd_at(r).set_restorable(false);
    result.why_not[{pid_of(r), fd_at(r).fd()}] = why;
  };

  // Open file descriptions: candidates share everything fdinfo shows; kcmp decides.
  using Key = std::tuple<std::string, uint32_t, uint64_t, uint64_t, uint64_t, uint64_t>;
  std::map<Key, std::vector<std::pair<FdRef, uint64_t>>> seen;
  uint64_t next_id = 1;
  std::map<uint64_t, std::vector<FdRef>> pipes, sockets;
  for (size_t p = 0; p < procs.size(); p++) {
    for (int i = 0; i < procs[p].process->fds_size(); i++) {
      FdRef ref{p, i};
      FileDescriptor& f = fd_at(ref);
      Key key{f.target(), f.flags(), f.pos(), f.file().dev(), f.file().inode(), f.rdev()};
      auto& reps = seen[key];
      uint64_t id = 0;
      for (const auto& [rep, rep_id] : reps) {
        result.kcmp_calls++;
        long r = ::syscall(SYS_kcmp, pid_of(rep), pid_of(ref), KCMP_FILE, fd_at(rep).fd(), f.fd());
        if (r < 0)
          fail_errno("kcmp(KCMP_FILE) of fd ", fd_at(rep).fd(), " of pid ", pid_of(rep), " and fd ",
                     f.fd(), " of pid ", pid_of(ref));
        if (r == 0) {
          id = rep_id;
          break;
        }
      }
      if (id == 0) {
        id = next_id++;
        reps.push_back({ref, id});
      }
      f.set_file_id(id);
      if (f.kind() == FileDescriptor::PIPE || f.kind() == FileDescriptor::FIFO)
        pipes[f.object_inode()].push_back(ref);
      else if (f.kind() == FileDescriptor::SOCKET && f.object_inode() != 0)
        sockets[f.object_inode()].push_back(ref);
    }
  }

  // Pipes and FIFOs: restorable when both ends are in the tree, or when one is and the kernel's
  // pipe has no other end open anywhere (other_end_open()).
  for (const auto& [inode, refs] : pipes) {
    bool fifo = fd_at(refs[0]).kind() == FileDescriptor::FIFO;
    std::string what = fifo ? cat("FIFO ", fd_at(refs[0]).target()) : cat("pipe:[", inode, "]");
    const FdRef* reader = nullptr;
    const FdRef* writer = nullptr;
    bool deleted = false;
    for (const auto& r : refs) {
      if (fd_reads(fd_at(r)) && reader == nullptr) reader = &r;
      if (fd_writes(fd_at(r)) && writer == nullptr) writer = &r;
      deleted |= fd_at(r).file().deleted();
    }
    // Holders outside are named for the refusal only, and standard descriptors are never
    // refused (refuse_unsupported_fds): a pipe only they hold (a server's stdout to its
    // supervisor) costs no scan of every process's descriptors (ms, in the frozen time).
    const bool refusable =
        std::any_of(refs.begin(), refs.end(), [&](const FdRef& r) { return fd_at(r).fd() > 2; });
    auto holders = [&] { return refusable ? holders_outside(inode, fifo, procs) : std::string(); };
    image::Pipe pipe;
    std::string why;
    if (fifo && deleted) {
      why = cat(what, " has been unlinked");
    } else if (writer == nullptr) {
      UniqueFd end = copy_of_fd(procs[reader->proc], fd_at(*reader).fd());
      if (other_end_open(end.get(), false, what))
        why = cat("only the reading end of ", what, " is in the tree; its writing end is held ",
                  holders(), "outside the tree");
      else
        pipe.set_no_writers(true);
    } else if (reader == nullptr) {
      UniqueFd end = copy_of_fd(procs[writer->proc], fd_at(*writer).fd());
      if (other_end_open(end.get(), true, what))
        why = cat("only the writing end of ", what, " is in the tree; its reading end is held ",
                  holders(), "outside the tree");
      else
        pipe.set_no_readers(true);
    }
    if (!why.empty()) {
      for (const auto& r : refs) why_not(r, why);
      continue;
    }
    pipe.set_inode(inode);
    pipe.set_fifo(fifo);
    if (reader != nullptr) {
      UniqueFd src = copy_of_fd(procs[reader->proc], fd_at(*reader).fd());
      capture_pipe(src.get(), pipe, what);
    } else {
      // Nobody can ever read what is buffered (no reader is left and the restored pipe gets
      // none): only the capacity matters.
      UniqueFd src = copy_of_fd(procs[writer->proc], fd_at(*writer).fd());
      int cap = ::fcntl(src.get(), F_GETPIPE_SZ);
      if (cap < 0) fail_errno("F_GETPIPE_SZ on ", what);
      pipe.set_capacity(static_cast<uint32_t>(cap));
      if (fifo) {
        // A FIFO's buffered bytes outlive its readers: a later open by path reads them.
        int avail = 0;
        if (::ioctl(src.get(), FIONREAD, &avail) != 0) fail_errno("FIONREAD on ", what);
        if (avail > 0) {
          for (const auto& r : refs)
            why_not(r, cat(what, " has no reader and ", avail,
                           " bytes buffered, which lazycr cannot read without opening a reader"));
          continue;
        }
      }
    }
    for (const auto& r : refs) fd_at(r).set_restorable(true);
    log::debug(what, ": ", pipe.data().size(), " bytes buffered, capacity ", pipe.capacity(),
               pipe.no_writers()   ? ", no writer left"
               : pipe.no_readers() ? ", no reader left"
                                   : "");
    *result.objects.add_pipes() = std::move(pipe);
  }

  // Sockets: each family of objects/socket_families.h takes its own; the rest are named and
  // refused.
  if (!sockets.empty()) {
    objects::SocketDump dump;
    dump.opts.tcp_established = flags.tcp_established;
    dump.opts.ext_unix_sk = flags.ext_unix_sk;
    dump.tcp_repair = &result.tcp_repair;
    dump.out = &result.objects;
    for (const auto& [inode, refs] : sockets) {
      const FdRef first = refs[0];
      dump.untaken[inode] = objects::HeldSocket{
          pid_of(first),
          [&procs, &fd_at, first] { return copy_of_fd(procs[first.proc], fd_at(first).fd()); }};
    }
    for (const objects::SocketFamily* fam : objects::socket_families()) fam->dump(dump);
    for (const auto& [inode, held] : dump.untaken) {
      UniqueFd sock;
      try {
        sock = held.open();
      } catch (const Error&) {
        // Gone meanwhile: named as a socket.
      }
      std::string kind = sock ? objects::describe_socket(sock.get()) : std::string("socket");
      dump.why_not[inode] =
          cat("socket:[", inode, "] is ", article(kind), " ", kind,
              kind.find("/UNIX ") != std::string::npos ? " of another network namespace" : "");
    }
    for (const auto& [inode, why] : dump.why_not)
      for (const auto& r : sockets[inode]) why_not(r, why);
    for (uint64_t inode : dump.restorable)
      for (const auto& r : sockets[inode]) fd_at(r).set_restorable(true);
  }
  collect_ptys(procs, result);
  // Both lists sorted by inode (std::map order); a FIFO whose inode number equals a pipe's
  // would make two entries with one inode.
  std::sort(result.objects.mutable_pipes()->begin(), result.objects.mutable_pipes()->end(),
            [](const image::Pipe& a, const image::Pipe& b) { return a.inode() < b.inode(); });
  for (int i = 1; i < result.objects.pipes_size(); i++)
    if (result.objects.pipes(i).inode() == result.objects.pipes(i - 1).inode())
      fail("a FIFO and a pipe share inode number ", result.objects.pipes(i).inode(),
           "; lazycr cannot record both");
  return result;
}

}  // namespace lazycr::checkpoint
