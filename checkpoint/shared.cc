// Descriptors across the tree: open file descriptions (file_id), and the kernel objects
// several descriptors lead to (pipes, FIFOs, AF_UNIX socket pairs) with the data buffered in
// them, read without consuming it.
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
#include "checkpoint/socket_name.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/sock_diag.h"
#include "image-format/image_dir.h"
#include "objects/inet_socket.h"
#include "objects/tcp_connection.h"

namespace lazycr::checkpoint {
namespace {

using image::FileDescriptor;

constexpr int kTcpListen = 10;  // TCP_LISTEN, as UNIX_DIAG reports it
// What shared.pb may hold for one socket (image_dir.h).
constexpr size_t kMaxDatagrams = image::kMaxSocketQueued;
constexpr size_t kMaxQueuedBytes = image::kMaxSocketQueuedBytes;

struct FdRef {
  size_t proc;  // index into the process list
  int index;    // index into that process's fds
};

UniqueFd get_fd(const TreeFiles& p, int fd) {
  UniqueFd out(static_cast<int>(::syscall(SYS_pidfd_getfd, p.pidfd, fd, 0)));
  if (!out) fail_errno("pidfd_getfd of fd ", fd, " of pid ", p.process->pid());
  return out;
}

bool readable(const FileDescriptor& f) {
  uint32_t acc = f.flags() & O_ACCMODE;
  return acc == O_RDONLY || acc == O_RDWR;
}
bool writable(const FileDescriptor& f) {
  uint32_t acc = f.flags() & O_ACCMODE;
  return acc == O_WRONLY || acc == O_RDWR;
}

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

// SO_PEEK_OFF belongs to the socket, which the target shares: put its value back.
class PeekOffset {
 public:
  PeekOffset(int fd, const std::string& what) : fd_(fd), what_(what) {
    socklen_t len = sizeof old_;
    if (::getsockopt(fd_, SOL_SOCKET, SO_PEEK_OFF, &old_, &len) != 0)
      fail_errno("getsockopt(SO_PEEK_OFF) on ", what_);
  }
  ~PeekOffset() {
    if (changed_ && ::setsockopt(fd_, SOL_SOCKET, SO_PEEK_OFF, &old_, sizeof old_) != 0)
      log::warn("cannot put SO_PEEK_OFF of ", what_, " back to ", old_, ": ", std::strerror(errno));
  }
  void set(int off) {
    changed_ = true;
    if (::setsockopt(fd_, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off) != 0)
      fail_errno("setsockopt(SO_PEEK_OFF, ", off, ") on ", what_);
  }

 private:
  int fd_;
  std::string what_;
  int old_ = -1;
  bool changed_ = false;
};

// MSG_PEEK that also reports descriptors in flight (SCM_RIGHTS): those are closed at once and
// make the queue unrestorable. Returns recvmsg's value, or -errno.
ssize_t peek(int fd, std::vector<char>& buf, int flags, bool& fds_in_flight) {
  alignas(cmsghdr) char control[4096];
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, flags | MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  if (msg.msg_flags & MSG_CTRUNC) fds_in_flight = true;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    fds_in_flight = true;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int passed;
      std::memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof passed);
      ::close(passed);
    }
  }
  return n;
}

// The data queued for reading at one end of a UNIX socket, oldest first, left in place.
// Returns false (and why) when it cannot be captured faithfully.
bool capture_unix_queue(int fd, int type, image::UnixSocket& out, const std::string& what,
                        std::string& why) {
  PeekOffset peek_off(fd, what);
  std::vector<char> buf(256 * 1024);
  bool fds_in_flight = false;
  size_t total = 0;
  if (type == SOCK_STREAM) {
    // With a peek offset each peek continues where the previous one stopped.
    peek_off.set(0);
    std::string all;
    for (;;) {
      ssize_t n = peek(fd, buf, 0, fds_in_flight);
      if (n == -EAGAIN) break;
      if (n < 0) fail_errno_value(static_cast<int>(-n), cat("MSG_PEEK on ", what));
      if (n == 0) break;  // end of stream (the peer shut down writing)
      all.append(buf.data(), static_cast<size_t>(n));
      if (all.size() > kMaxQueuedBytes)
        fail(what, ": more than ", kMaxQueuedBytes, " bytes queued");
    }
    if (!all.empty()) out.add_queued(std::move(all));
  } else {
    // One record per peek; the offset is set before each so that a record larger than the
    // buffer can be peeked again whole.
    int off = 0;
    for (size_t count = 0;; count++) {
      if (count > kMaxDatagrams) fail(what, ": more than ", kMaxDatagrams, " datagrams queued");
      peek_off.set(off);
      ssize_t n = peek(fd, buf, MSG_TRUNC, fds_in_flight);
      if (n == -EAGAIN) break;
      if (n < 0) fail_errno_value(static_cast<int>(-n), cat("MSG_PEEK on ", what));
      if (static_cast<size_t>(n) > buf.size()) {
        buf.resize(static_cast<size_t>(n));
        continue;
      }
      out.add_queued(std::string(buf.data(), static_cast<size_t>(n)));
      total += static_cast<size_t>(n);
      if (total > kMaxQueuedBytes) fail(what, ": more than ", kMaxQueuedBytes, " bytes queued");
      off += static_cast<int>(n);
    }
  }
  if (fds_in_flight) {
    why = "it has descriptors in flight (SCM_RIGHTS) in its queue";
    return false;
  }
  return true;
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

uint64_t object_inode_of(const std::string& target) {
  if (uint64_t i = inode_in(target, "pipe:[")) return i;
  return inode_in(target, "socket:[");
}

SharedCollection collect_shared(std::vector<TreeFiles>& procs, bool tcp_established) {
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
      if (readable(fd_at(r)) && reader == nullptr) reader = &r;
      if (writable(fd_at(r)) && writer == nullptr) writer = &r;
      deleted |= fd_at(r).file().deleted();
    }
    image::Pipe pipe;
    std::string why;
    if (fifo && deleted) {
      why = cat(what, " has been unlinked");
    } else if (writer == nullptr) {
      UniqueFd end = get_fd(procs[reader->proc], fd_at(*reader).fd());
      if (other_end_open(end.get(), false, what))
        why = cat("only the reading end of ", what, " is in the tree; its writing end is held ",
                  holders_outside(inode, fifo, procs), "outside the tree");
      else
        pipe.set_no_writers(true);
    } else if (reader == nullptr) {
      UniqueFd end = get_fd(procs[writer->proc], fd_at(*writer).fd());
      if (other_end_open(end.get(), true, what))
        why = cat("only the writing end of ", what, " is in the tree; its reading end is held ",
                  holders_outside(inode, fifo, procs), "outside the tree");
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
      UniqueFd src = get_fd(procs[reader->proc], fd_at(*reader).fd());
      capture_pipe(src.get(), pipe, what);
    } else {
      // Nobody can ever read what is buffered (no reader is left and the restored pipe gets
      // none): only the capacity matters.
      UniqueFd src = get_fd(procs[writer->proc], fd_at(*writer).fd());
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

  // AF_UNIX sockets: restorable when connected to each other inside the tree.
  if (!sockets.empty()) {
    auto diag = sockdiag::unix_sockets();
    std::map<uint64_t, image::UnixSocket> captured;
    for (const auto& [inode, refs] : sockets) {
      std::string what = cat("socket:[", inode, "]");
      std::string why;
      auto it = diag.find(inode);
      const sockdiag::UnixSocket* peer = nullptr;
      if (it == diag.end()) {
        // Not an AF_UNIX socket of this network namespace: name what it is.
        UniqueFd sock(static_cast<int>(
            ::syscall(SYS_pidfd_getfd, procs[refs[0].proc].pidfd, fd_at(refs[0]).fd(), 0)));
        if (sock && objects::is_inet_socket(sock.get())) {
          image::InetSocket in;
          if ((!objects::is_tcp_connection(sock.get()) ||
               objects::dump_tcp_connection(sock.get(), inode, tcp_established, in, why,
                                            result.tcp_repair)) &&
              objects::dump_inet_socket(sock.get(), inode, in, why)) {
            for (const auto& r : refs) fd_at(r).set_restorable(true);
            log::debug(what, ": ", objects::describe_inet_socket(in));
            *result.objects.add_inet_sockets() = std::move(in);
          } else {
            for (const auto& r : refs) why_not(r, why);
          }
          continue;
        }
        std::string kind = sock ? describe_socket(sock.get()) : std::string("socket");
        why = cat(what, " is ", article(kind), " ", kind,
                  kind.find("/UNIX ") != std::string::npos ? " of another network namespace" : "");
      } else {
        const auto& s = it->second;
        auto pit = diag.find(s.peer);
        peer = pit == diag.end() ? nullptr : &pit->second;
        if (s.state == kTcpListen)
          why = cat(what, " is a listening socket");
        else if (s.peer == 0)
          why = cat(what, " is not connected");
        else if (!sockets.count(s.peer))
          why = cat(what, " is connected to socket:[", s.peer, "] outside the tree");
        else if (peer == nullptr || peer->peer != inode)
          why = cat(what, " is connected to socket:[", s.peer, "], which is not connected back");
        else if (s.type == SOCK_DGRAM && (!s.name.empty() || !peer->name.empty()))
          why = cat(what, " is a datagram socket bound to an address");
      }
      if (why.empty()) {
        const auto& s = it->second;
        image::UnixSocket u;
        u.set_inode(inode);
        u.set_peer_inode(s.peer);
        u.set_type(s.type);
        u.set_shutdown_read(s.shutdown_read);
        u.set_shutdown_write(s.shutdown_write);
        UniqueFd sock = get_fd(procs[refs[0].proc], fd_at(refs[0]).fd());
        int v = 0;
        socklen_t len = sizeof v;
        if (::getsockopt(sock.get(), SOL_SOCKET, SO_SNDBUF, &v, &len) == 0)
          u.set_sndbuf(static_cast<uint32_t>(v));
        len = sizeof v;
        if (::getsockopt(sock.get(), SOL_SOCKET, SO_RCVBUF, &v, &len) == 0)
          u.set_rcvbuf(static_cast<uint32_t>(v));
        if (capture_unix_queue(sock.get(), s.type, u, what, why)) captured[inode] = std::move(u);
      }
      if (!why.empty())
        for (const auto& r : refs) why_not(r, why);
    }
    // A pair is restored whole or not at all.
    for (auto it = captured.begin(); it != captured.end();) {
      if (captured.count(it->second.peer_inode())) {
        ++it;
        continue;
      }
      for (const auto& r : sockets[it->first])
        why_not(r, cat("socket:[", it->first, "] is connected to socket:[", it->second.peer_inode(),
                       "], which cannot be restored"));
      it = captured.erase(it);
    }
    for (auto& [inode, u] : captured) {
      for (const auto& r : sockets[inode]) fd_at(r).set_restorable(true);
      size_t bytes = 0;
      for (const auto& q : u.queued()) bytes += q.size();
      log::debug("socket:[", inode, "] (peer socket:[", u.peer_inode(), "], type ", u.type(),
                 "): ", u.queued_size(), " record(s), ", bytes, " bytes queued");
      *result.objects.add_sockets() = std::move(u);
    }
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
