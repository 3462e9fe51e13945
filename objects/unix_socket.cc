#include "objects/unix_socket.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "common/error.h"
#include "common/file_type.h"
#include "common/log.h"
#include "image-format/image_dir.h"
#include "objects/socket_name.h"

namespace lazycr::objects {
namespace {

using image::UnixSocket;

constexpr int kTcpListen = 10;  // TCP_LISTEN, as UNIX_DIAG reports it
constexpr size_t kMaxDatagrams = image::kMaxSocketQueued;
constexpr size_t kMaxQueuedBytes = image::kMaxSocketQueuedBytes;
constexpr uint32_t kMaxBacklog = 1u << 20;                  // somaxconn is an int; 4096 by default
constexpr size_t kMaxName = sizeof(sockaddr_un::sun_path);  // 108, the '\0' of a path included
// A socket's buffers are not grown past this to make its queued data fit.
constexpr int kMaxSocketBuf = 1 << 30;

int int_opt(int sock, int name) {
  int v = 0;
  socklen_t len = sizeof v;
  return ::getsockopt(sock, SOL_SOCKET, name, &v, &len) == 0 ? v : -1;
}

// An address from a name as the image holds it (path, or '\0' + abstract name).
socklen_t to_sockaddr(const std::string& name, sockaddr_un& a) {
  std::memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  if (name.size() > kMaxName) fail("UNIX socket name of ", name.size(), " bytes is too long");
  std::memcpy(a.sun_path, name.data(), name.size());
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size() +
                                (name[0] == '\0' ? 0 : 1));
}

// The name recvmsg gave a sender (msg_name), as the image holds names.
std::string name_of(const sockaddr_un& a, socklen_t len) {
  size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
  if (n == 0) return "";
  if (a.sun_path[0] == '\0') return std::string(a.sun_path, n);
  return std::string(a.sun_path, ::strnlen(a.sun_path, n));
}

// ---------------------------------------------------------------------------------------------
// Dump

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
// make the queue unrestorable; `from` gets the sender's name. Returns recvmsg's value, or
// -errno.
ssize_t peek(int fd, std::vector<char>& buf, int flags, bool& fds_in_flight, std::string& from) {
  alignas(cmsghdr) char control[4096];
  iovec iov{buf.data(), buf.size()};
  sockaddr_un sender{};
  msghdr msg{};
  msg.msg_name = &sender;
  msg.msg_namelen = sizeof sender;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, flags | MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  from = name_of(sender, msg.msg_namelen);
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

// The data queued for reading at one end of a UNIX socket, oldest first, left in place, with
// the sender of each datagram or record in `from`. Returns false (and why) when it cannot be
// captured faithfully.
bool capture_queue(int fd, int type, UnixSocket& out, std::vector<std::string>& from,
                   const std::string& what, std::string& why) {
  PeekOffset peek_off(fd, what);
  std::vector<char> buf(256 * 1024);
  bool fds_in_flight = false;
  size_t total = 0;
  std::string sender;
  if (type == SOCK_STREAM) {
    // With a peek offset each peek continues where the previous one stopped.
    peek_off.set(0);
    std::string all;
    for (;;) {
      ssize_t n = peek(fd, buf, 0, fds_in_flight, sender);
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
      ssize_t n = peek(fd, buf, MSG_TRUNC, fds_in_flight, sender);
      if (n == -EAGAIN) break;
      if (n < 0) fail_errno_value(static_cast<int>(-n), cat("MSG_PEEK on ", what));
      if (static_cast<size_t>(n) > buf.size()) {
        buf.resize(static_cast<size_t>(n));
        continue;
      }
      out.add_queued(std::string(buf.data(), static_cast<size_t>(n)));
      from.push_back(sender);
      total += static_cast<size_t>(n);
      if (total > kMaxQueuedBytes) fail(what, ": more than ", kMaxQueuedBytes, " bytes queued");
      off += static_cast<int>(n);
    }
  }
  if (fds_in_flight) {
    why = cat(what, " has descriptors in flight (SCM_RIGHTS) in its queue");
    return false;
  }
  return true;
}

// A bound path: absolute, and still the socket's own file (UNIX_DIAG_VFS), as seen from the
// holder's root. Records the file's mode and owner; returns why not, or "".
std::string check_bound_path(const sockdiag::UnixSocket& s, pid_t holder, UnixSocket& u,
                             const std::string& what) {
  const std::string& path = s.name;
  if (path[0] != '/') return cat(what, " is bound to the relative path ", path);
  struct stat st;
  std::string seen = cat("/proc/", holder, "/root", path);
  if (::lstat(seen.c_str(), &st) != 0)
    return cat(what, " is bound to ", path, ", which has been removed (", std::strerror(errno),
               ")");
  if (!S_ISSOCK(st.st_mode) || st.st_ino != s.vfs_ino)
    return cat(what, " is bound to ", path, ", which now leads to another file (",
               file_type_name(st.st_mode), ", inode ", st.st_ino, " instead of ", s.vfs_ino, ")");
  u.set_file_mode(st.st_mode & 07777);
  u.set_file_uid(st.st_uid);
  u.set_file_gid(st.st_gid);
  return "";
}

}  // namespace

std::string unix_name_text(const std::string& name) {
  if (name.empty()) return "an unnamed address";
  if (name[0] == '\0') return cat("@", name.substr(1));
  return name;
}

UnixDump dump_unix_sockets(const std::map<uint64_t, HeldSocket>& held,
                           const std::map<uint64_t, sockdiag::UnixSocket>& diag, bool ext_unix_sk) {
  UnixDump out;
  // Connections not accepted yet: each listener lists the client ends of its embryos (the
  // server ends accept() would return, which have no inode yet: a client end's peer reads 0).
  std::map<uint64_t, uint64_t> listener_of;  // client end -> listener
  for (const auto& [ino, d] : diag)
    if (d.state == kTcpListen)
      for (uint64_t c : d.icons)
        if (c != 0) listener_of[c] = ino;

  for (const auto& [inode, h] : held) {
    const sockdiag::UnixSocket& s = diag.at(inode);
    std::string what = cat("socket:[", inode, "]");
    std::string why;
    UnixSocket u;
    u.set_inode(inode);
    u.set_type(s.type);
    u.set_shutdown_read(s.shutdown_read);
    u.set_shutdown_write(s.shutdown_write);
    if (s.type != SOCK_STREAM && s.type != SOCK_DGRAM && s.type != SOCK_SEQPACKET) {
      out.why_not[inode] = cat(what, " is a UNIX socket of ", socket_type_text(s.type));
      continue;
    }
    UniqueFd sock = h.open();
    if (int v = int_opt(sock.get(), SO_SNDBUF); v > 0) u.set_sndbuf(static_cast<uint32_t>(v));
    if (int v = int_opt(sock.get(), SO_RCVBUF); v > 0) u.set_rcvbuf(static_cast<uint32_t>(v));
    u.set_passcred(int_opt(sock.get(), SO_PASSCRED) == 1);
    const sockdiag::UnixSocket* peer = nullptr;
    if (auto pit = diag.find(s.peer); s.peer != 0 && pit != diag.end()) peer = &pit->second;
    bool pair = peer != nullptr && held.count(s.peer) && peer->peer == inode;
    bool pending_client = listener_of.count(inode) != 0;
    // A name is bound again unless the socket is one end of a stream pair (an accepted end
    // shares its listener's name, which the listener binds).
    bool keeps_name = !s.name.empty() && !(pair && s.type != SOCK_DGRAM);
    std::vector<std::string> from;
    if (keeps_name) {
      u.set_name(s.name);
      if (s.name[0] != '\0') why = check_bound_path(s, h.pid, u, what);
    }
    if (!why.empty()) {
      // the bound path is refused
    } else if (s.state == kTcpListen) {
      u.set_listening(true);
      u.set_backlog(s.wqueue);
      for (uint64_t c : s.icons) {
        if (c == 0 || !held.count(c)) {
          why = cat(what, " (listening on ", unix_name_text(s.name),
                    ") has a connection not accepted yet whose client end",
                    c != 0 ? cat(" (socket:[", c, "])") : std::string(), " is outside the tree");
          break;
        }
        const auto& cd = diag.at(c);
        if (cd.wqueue != 0) {
          why = cat(what, " (listening on ", unix_name_text(s.name),
                    ") has a connection not accepted yet from socket:[", c,
                    "] whose client already wrote to it (", cd.wqueue,
                    " bytes in the kernel's accounting): lazycr cannot read them without "
                    "accept()");
          break;
        }
        u.add_pending(c);
      }
    } else if (pending_client) {
      uint64_t listener = listener_of.at(inode);
      if (!held.count(listener))
        why = cat(what, " is connected to ", unix_name_text(diag.at(listener).name), " (socket:[",
                  listener, "], outside the tree), which has not accepted it yet");
      // Its listener records it (UnixSocket.pending); peer_inode stays 0.
    } else if (pair) {
      u.set_peer_inode(s.peer);
      if (s.type == SOCK_DGRAM && (!s.name.empty() || !peer->name.empty()))
        why = cat(what, " is a datagram socket bound to an address and connected to socket:[",
                  s.peer, "] both ways");
    } else if (s.peer != 0 && held.count(s.peer)) {
      if (s.type == SOCK_DGRAM && peer != nullptr && !peer->name.empty()) {
        u.set_peer_inode(s.peer);
        u.set_connected_by_name(true);
      } else {
        why = cat(what, " is connected to socket:[", s.peer, "], which is not connected back");
      }
    } else if (s.peer != 0) {
      std::string there = peer != nullptr ? unix_name_text(peer->name) : "an unnamed address";
      std::string desc = cat(what, " (", socket_type_text(s.type), ") is connected to socket:[",
                             s.peer, "] (", there, ") outside the tree");
      if (!ext_unix_sk)
        why = cat(desc, "; dump and restore --ext-unix-sk connect a datagram socket to it again");
      else if (s.type != SOCK_DGRAM)
        why = cat(desc, ": the other half of a ", socket_type_text(s.type),
                  " connection cannot be made again (--ext-unix-sk covers datagram sockets "
                  "only, as CRIU's)");
      else if (peer == nullptr || peer->name.empty())
        why = cat(desc, ": an unnamed peer cannot be connected to again");
      else {
        u.set_external_peer(true);
        u.set_peer_name(peer->name);
      }
    }
    if (why.empty() && !u.listening() && capture_queue(sock.get(), s.type, u, from, what, why)) {
      // Senders matter where the receiver can be reached by others: a datagram socket not
      // connected both ways. A named sender cannot be impersonated soundly.
      if (s.type == SOCK_DGRAM && !pair) {
        for (size_t i = 0; i < from.size() && why.empty(); i++) {
          if (from[i].empty()) continue;
          if (u.external_peer() && from[i] == u.peer_name())
            why = cat(what, " has a datagram queued from its peer outside the tree (",
                      unix_name_text(from[i]), "), which lazycr cannot send again");
          else
            why = cat(what, " has a datagram queued from ", unix_name_text(from[i]),
                      ", which lazycr cannot send again from that name");
        }
        // Unnamed and connected one way: nothing of lazycr's could reach it to queue them.
        if (why.empty() && u.queued_size() > 0 && s.name.empty() && s.peer != 0)
          why = cat(what, " is an unnamed datagram socket connected to socket:[", s.peer, "] with ",
                    u.queued_size(), " datagram(s) queued for it");
      }
      if (pending_client && u.queued_size() > 0)
        why = cat(what, " has data queued from a connection not accepted yet");
    }
    if (!why.empty()) {
      out.why_not[inode] = why;
      continue;
    }
    out.sockets[inode] = std::move(u);
  }
  // A pair, a listener and its pending clients, a one-way datagram connection: whole or not
  // at all.
  for (bool changed = true; changed;) {
    changed = false;
    for (auto it = out.sockets.begin(); it != out.sockets.end();) {
      const UnixSocket& u = it->second;
      std::string why;
      if (u.peer_inode() != 0 && !out.sockets.count(u.peer_inode()))
        why = cat("socket:[", u.inode(), "] is connected to socket:[", u.peer_inode(),
                  "], which cannot be restored: ",
                  out.why_not.count(u.peer_inode()) ? out.why_not.at(u.peer_inode())
                                                    : std::string("not held in the tree"));
      for (uint64_t c : u.pending())
        if (why.empty() && !out.sockets.count(c))
          why = cat("socket:[", u.inode(), "] has a connection not accepted yet from socket:[", c,
                    "], which cannot be restored: ",
                    out.why_not.count(c) ? out.why_not.at(c) : std::string("?"));
      if (why.empty()) {
        ++it;
        continue;
      }
      out.why_not[it->first] = why;
      it = out.sockets.erase(it);
      changed = true;
    }
    // A pending client whose listener was refused.
    for (const auto& [ino, l] : listener_of) {
      if (out.sockets.count(ino) && !out.sockets.count(l)) {
        out.why_not[ino] = cat("socket:[", ino, "] is a connection not accepted yet by socket:[", l,
                               "], which cannot be restored: ",
                               out.why_not.count(l) ? out.why_not.at(l) : std::string("?"));
        out.sockets.erase(ino);
        changed = true;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Restore

void validate_unix_socket(const UnixSocket& s) {
  std::string what = cat("socket inode ", s.inode());
  if (s.type() != SOCK_STREAM && s.type() != SOCK_DGRAM && s.type() != SOCK_SEQPACKET)
    fail(what, ": ", socket_type_constant(s.type()), " is not a type lazycr restores");
  auto check_name = [&](const std::string& n, const char* field) {
    if (n.empty()) return;
    if (n[0] == '\0') {
      if (n.size() < 2 || n.size() > kMaxName)
        fail(what, ": abstract ", field, " of ", n.size() - 1, " bytes (1..", kMaxName - 1, ")");
      return;
    }
    if (n.size() >= kMaxName)
      fail(what, ": ", field, " path of ", n.size(), " bytes (at most ", kMaxName - 1, ")");
    if (n.find('\0') != std::string::npos) fail(what, ": ", field, " path holds a NUL byte");
    if (n[0] != '/') fail(what, ": ", field, " path ", n, " is not absolute");
  };
  check_name(s.name(), "name");
  check_name(s.peer_name(), "peer_name");
  if (s.listening()) {
    if (s.type() == SOCK_DGRAM) fail(what, ": a datagram socket cannot listen");
    if (s.name().empty()) fail(what, ": listening without a name");
    if (s.backlog() > kMaxBacklog)
      fail(what, ": backlog ", s.backlog(), " (at most ", kMaxBacklog, ")");
    if (static_cast<uint64_t>(s.pending_size()) > uint64_t{s.backlog()} + 1)
      fail(what, ": ", s.pending_size(), " pending connections for a backlog of ", s.backlog());
    if (s.peer_inode() != 0 || s.queued_size() != 0 || s.external_peer())
      fail(what, ": listening, yet connected or with data queued");
  } else if (s.backlog() != 0 || s.pending_size() != 0) {
    fail(what, ": backlog or pending connections without listening");
  }
  if (s.external_peer()) {
    if (s.type() != SOCK_DGRAM)
      fail(what, ": an external peer for a ", socket_type_constant(s.type()));
    if (s.peer_name().empty()) fail(what, ": an external peer without a name");
    if (s.peer_inode() != 0) fail(what, ": an external peer and a peer inode");
  } else if (!s.peer_name().empty()) {
    fail(what, ": peer_name without external_peer");
  }
  if (s.connected_by_name() && (s.type() != SOCK_DGRAM || s.peer_inode() == 0))
    fail(what, ": connected_by_name for a ", socket_type_constant(s.type()), " without a peer");
  if (s.type() == SOCK_DGRAM && s.queued_size() > 0 && s.name().empty() &&
      (s.connected_by_name() || s.external_peer()))
    fail(what, ": datagrams queued at an unnamed socket connected one way");
  if (s.queued_size() > static_cast<int>(kMaxDatagrams))
    fail(what, ": ", s.queued_size(), " queued elements (at most ", kMaxDatagrams, ")");
  uint64_t total = 0;
  for (const auto& q : s.queued()) total += q.size();
  if (total > kMaxQueuedBytes)
    fail(what, ": ", total, " queued bytes (at most ", kMaxQueuedBytes, ")");
  if (s.file_mode() > 07777) fail(what, ": file mode ", s.file_mode(), " beyond 07777");
  if ((s.file_mode() != 0 || s.file_uid() != 0 || s.file_gid() != 0) &&
      (s.name().empty() || s.name()[0] == '\0'))
    fail(what, ": file mode or owner for a socket not bound to a path");
  if (s.sndbuf() > static_cast<uint32_t>(kMaxSocketBuf) ||
      s.rcvbuf() > static_cast<uint32_t>(kMaxSocketBuf))
    fail(what, ": buffer size beyond ", kMaxSocketBuf);
}

namespace {

int get_sockopt(int fd, int opt, const std::string& what) {
  int v = 0;
  socklen_t len = sizeof v;
  if (::getsockopt(fd, SOL_SOCKET, opt, &v, &len) != 0)
    fail_errno(what, ": getsockopt(", opt == SO_SNDBUF ? "SO_SNDBUF" : "SO_RCVBUF", ")");
  return v;
}

// Sets SO_SNDBUF or SO_RCVBUF so that getsockopt reads `bytes` (the kernel doubles what it is
// given); beyond net.core.[wr]mem_max only with CAP_NET_ADMIN (the FORCE variants).
void set_sockbuf(int fd, int opt, int bytes, const std::string& what) {
  int half = std::max(bytes / 2, 1);
  int force = opt == SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE;
  if (::setsockopt(fd, SOL_SOCKET, force, &half, sizeof half) == 0) return;
  if (errno != EPERM)
    fail_errno(what, ": setsockopt(", opt == SO_SNDBUF ? "SO_SNDBUFFORCE" : "SO_RCVBUFFORCE", ", ",
               half, ")");
  if (::setsockopt(fd, SOL_SOCKET, opt, &half, sizeof half) != 0)
    fail_errno(what, ": setsockopt(", opt == SO_SNDBUF ? "SO_SNDBUF" : "SO_RCVBUF", ", ", half,
               ")");
}

// One end of a socket being made, with the buffer sizes it was born with (restored after the
// queued data is in, unless the image has its own).
struct SocketEnd {
  UniqueFd fd;
  int sndbuf0 = 0;
  int rcvbuf0 = 0;
};

SocketEnd make_end(int fd, const std::string& what) {
  SocketEnd e;
  e.fd = UniqueFd(fd);
  e.sndbuf0 = get_sockopt(fd, SO_SNDBUF, what);
  e.rcvbuf0 = get_sockopt(fd, SO_RCVBUF, what);
  return e;
}

SocketEnd make_socket(const UnixSocket& s, const std::string& what) {
  int fd = ::socket(AF_UNIX, s.type() | SOCK_CLOEXEC, 0);
  if (fd < 0) fail_errno(what, ": socket(AF_UNIX, ", socket_type_constant(s.type()), ")");
  return make_end(fd, what);
}

std::pair<SocketEnd, SocketEnd> make_pair_of(const UnixSocket& s) {
  std::string what = cat("socket inode ", s.inode());
  int sv[2];
  if (::socketpair(AF_UNIX, s.type() | SOCK_CLOEXEC, 0, sv) != 0)
    fail_errno(what, ": socketpair(AF_UNIX, ", socket_type_constant(s.type()), ")");
  UniqueFd a(sv[0]), b(sv[1]);
  SocketEnd ea = make_end(a.release(), what);
  SocketEnd eb = make_end(b.release(), what);
  return {std::move(ea), std::move(eb)};
}

// The data queued for reading at `to` (socket `s`) is sent through `from` (its peer, or, with
// `to_name`, any socket: sendto that name), in order, one send per datagram or record; the
// sender's buffer (which the queued data is charged to) and the receiver's grow until it fits.
void queue_data(const SocketEnd& from, const SocketEnd& to, const UnixSocket& s,
                const std::string& to_name = "") {
  std::string what = cat("socket inode ", s.inode(), " (", socket_type_constant(s.type()), ")");
  sockaddr_un addr;
  socklen_t alen = to_name.empty() ? 0 : to_sockaddr(to_name, addr);
  uint64_t total = 0;
  for (const auto& e : s.queued()) total += e.size();
  for (const auto& e : s.queued()) {
    if (s.type() == SOCK_STREAM && e.empty()) continue;
    size_t off = 0;
    while (true) {
      ssize_t n =
          ::sendto(from.fd.get(), e.data() + off, e.size() - off, MSG_DONTWAIT | MSG_NOSIGNAL,
                   alen ? reinterpret_cast<sockaddr*>(&addr) : nullptr, alen);
      if (n >= 0) {
        off += static_cast<size_t>(n);
        if (s.type() != SOCK_STREAM || off == e.size()) break;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EMSGSIZE)
        fail_errno(what, ": sending its ", total, " queued bytes through ",
                   alen ? "a socket of lazycr" : "its peer");
      int snd = get_sockopt(from.fd.get(), SO_SNDBUF, what);
      int64_t want =
          std::max<int64_t>(int64_t{snd} * 2, static_cast<int64_t>(e.size()) * 2 + 65536);
      if (want > kMaxSocketBuf || snd >= kMaxSocketBuf)
        fail(what, ": its ", s.queued_size(), " queued messages (", total,
             " bytes) do not fit in a socket buffer of ", snd, " bytes");
      set_sockbuf(from.fd.get(), SO_SNDBUF, static_cast<int>(want), what);
      int rcv = get_sockopt(to.fd.get(), SO_RCVBUF, what);
      if (rcv < want) set_sockbuf(to.fd.get(), SO_RCVBUF, static_cast<int>(want), what);
      int now = get_sockopt(from.fd.get(), SO_SNDBUF, what);
      if (now <= snd)
        fail(what, ": its ", s.queued_size(), " queued messages (", total,
             " bytes) do not fit: the sending end's SO_SNDBUF stays at ", snd,
             " bytes (net.core.wmem_max without CAP_NET_ADMIN), or the receiver's queue is "
             "full (net.unix.max_dgram_qlen)");
    }
  }
}

// The image's buffer sizes (or the ones the socket was born with) and options.
void finish_end(const SocketEnd& e, const UnixSocket& s) {
  std::string what = cat("socket inode ", s.inode());
  int snd = s.sndbuf() != 0 ? static_cast<int>(s.sndbuf()) : e.sndbuf0;
  int rcv = s.rcvbuf() != 0 ? static_cast<int>(s.rcvbuf()) : e.rcvbuf0;
  if (get_sockopt(e.fd.get(), SO_SNDBUF, what) != snd)
    set_sockbuf(e.fd.get(), SO_SNDBUF, snd, what);
  if (get_sockopt(e.fd.get(), SO_RCVBUF, what) != rcv)
    set_sockbuf(e.fd.get(), SO_RCVBUF, rcv, what);
}

void set_passcred(const SocketEnd& e, const UnixSocket& s) {
  int on = 1;
  if (s.passcred() && ::setsockopt(e.fd.get(), SOL_SOCKET, SO_PASSCRED, &on, sizeof on) != 0)
    fail_errno("socket inode ", s.inode(), ": setsockopt(SO_PASSCRED)");
}

void shut(const SocketEnd& e, const UnixSocket& s) {
  std::string what = cat("socket inode ", s.inode());
  if (s.shutdown_read() && ::shutdown(e.fd.get(), SHUT_RD) != 0)
    fail_errno(what, ": shutdown(SHUT_RD)");
  if (s.shutdown_write() && ::shutdown(e.fd.get(), SHUT_WR) != 0)
    fail_errno(what, ": shutdown(SHUT_WR)");
}

// A socket without a peer that can be recreated through a pair whose other end is then closed:
// a datagram socket with data queued from a gone peer, or a stream/seqpacket end whose peer is
// gone (shut down both ways, which is what the peer's close leaves).
bool peerless(const UnixSocket& s) {
  if (!s.name().empty() || s.listening() || s.external_peer()) return false;
  return (s.type() == SOCK_DGRAM && s.queued_size() > 0) ||
         (s.type() != SOCK_DGRAM && s.shutdown_read() && s.shutdown_write());
}

// Whether a socket answers at `path` (sock_diag sees those of this network namespace; a
// connect sees any). Throws for anything but a socket file.
bool path_is_live(const std::string& path, const struct stat& st, const std::string& what,
                  const std::map<uint64_t, sockdiag::UnixSocket>& diag) {
  for (const auto& [ino, d] : diag)
    if (d.vfs_ino == st.st_ino && !d.name.empty() && d.name == path) return true;
  sockaddr_un a;
  socklen_t len = to_sockaddr(path, a);
  for (int type : {SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET}) {
    UniqueFd probe(::socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!probe) fail_errno(what, ": socket(AF_UNIX) to probe ", path);
    if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&a), len) == 0) return true;
    if (errno == EAGAIN || errno == EINPROGRESS) return true;  // a listener with a full queue
    if (errno == EPROTOTYPE) continue;
    if (errno == ECONNREFUSED) return false;
    fail_errno(what, ": probing ", path, " with connect()");
  }
  return false;
}

}  // namespace

std::map<uint64_t, UniqueFd> create_unix_sockets(const UnixRestore& in) {
  std::map<uint64_t, SocketEnd> ends;
  std::vector<UniqueFd> temporaries;  // closed on return: ends no descriptor holds
  auto who = [&](uint64_t inode) { return in.held.at(inode).second; };
  auto sock = [&](uint64_t inode) -> const UnixSocket& { return *in.held.at(inode).first; };
  auto what_of = [&](uint64_t inode) {
    return cat("socket inode ", inode, " (", socket_type_constant(sock(inode).type()), ", ",
               who(inode), ")");
  };

  // Relations between sockets, checked before anything is made.
  std::map<uint64_t, uint64_t> listener_of;  // pending client -> listener
  std::set<std::string> names;
  for (const auto& [inode, h] : in.held) {
    const UnixSocket& s = *h.first;
    std::string what = what_of(inode);
    if (s.inode() != inode) fail(what, ": the image's shared objects name it ", s.inode());
    if (!s.name().empty() && !names.insert(s.name()).second)
      fail(what, ": two sockets of the image bind ", unix_name_text(s.name()));
    if (s.external_peer() && !in.ext_unix_sk)
      fail(what, " was connected to ", unix_name_text(s.peer_name()),
           " outside the tree; restore --ext-unix-sk connects it again");
    for (uint64_t c : s.pending()) {
      auto it = in.held.find(c);
      if (it == in.held.end())
        fail(what, ": its pending connection from socket inode ", c,
             " is held by no descriptor of the image");
      const UnixSocket& cs = *it->second.first;
      if (cs.type() != s.type() || cs.listening() || cs.peer_inode() != 0 || cs.external_peer() ||
          cs.queued_size() != 0)
        fail(what, ": its pending connection from socket inode ", c,
             " is not a fresh client socket of the same type");
      if (!listener_of.emplace(c, inode).second)
        fail(what, ": socket inode ", c, " is pending at two listeners");
    }
    if (s.peer_inode() != 0) {
      auto it = in.held.find(s.peer_inode());
      if (s.connected_by_name() && (it == in.held.end() || it->second.first->name().empty() ||
                                    it->second.first->type() != SOCK_DGRAM))
        fail(what, ": connected by name to socket inode ", s.peer_inode(),
             ", which is not a bound datagram socket of the image");
    }
  }

  // Paths to bind: free, or a stale socket file nobody answers at (unlinked once every check
  // passed). A live one or any other file refuses the restore before anything is made.
  std::vector<std::string> stale;
  {
    std::map<uint64_t, sockdiag::UnixSocket> diag;
    bool diag_read = false;
    for (const auto& [inode, h] : in.held) {
      const std::string& n = h.first->name();
      if (n.empty() || n[0] == '\0') continue;
      if (h.first->peer_inode() != 0 && !h.first->connected_by_name() &&
          h.first->type() != SOCK_DGRAM)
        continue;  // an end of a stream pair: not bound again
      struct stat st;
      if (::lstat(n.c_str(), &st) != 0) {
        if (errno == ENOENT) continue;
        fail_errno(what_of(inode), ": cannot look at ", n, ", where it binds");
      }
      if (!S_ISSOCK(st.st_mode))
        fail(what_of(inode), ": ", n, " exists and is ", file_type_name(st.st_mode),
             ", not a stale socket; lazycr will not remove it");
      if (!diag_read) {
        diag = sockdiag::unix_sockets();
        diag_read = true;
      }
      if (path_is_live(n, st, what_of(inode), diag))
        fail(what_of(inode), ": ", n, " is in use: a socket answers there");
      stale.push_back(n);
    }
  }
  for (const auto& p : stale) {
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) fail_errno("removing the stale socket ", p);
    log::info("removed the stale socket file ", p, " (nobody listened on it)");
  }

  // Connected pairs, and sockets whose peer is gone.
  for (const auto& [inode, h] : in.held) {
    if (ends.count(inode)) continue;  // made with its peer
    const UnixSocket& s = *h.first;
    std::string what = what_of(inode);
    uint64_t peer = s.peer_inode();
    if (s.connected_by_name()) continue;
    auto peer_held = in.held.find(peer);
    if (peer != 0 && peer_held != in.held.end()) {
      const UnixSocket& ps = *peer_held->second.first;
      if (ps.peer_inode() != inode)
        fail(what, ": its peer, socket inode ", peer, ", is connected to socket inode ",
             ps.peer_inode());
      if (ps.type() != s.type())
        fail(what, ": its peer, socket inode ", peer, ", is a ", socket_type_constant(ps.type()));
      auto [a, b] = make_pair_of(s);
      queue_data(b, a, s);
      queue_data(a, b, ps);
      ends[inode] = std::move(a);
      ends[peer] = std::move(b);
    } else if (peer != 0 || peerless(s)) {
      // Its peer is held by no descriptor of the image (or is gone): the pair is made so that
      // the data can be queued, then the peer's end is closed, as in the original.
      auto [a, b] = make_pair_of(s);
      queue_data(b, a, s);
      ends[inode] = std::move(a);
      temporaries.push_back(std::move(b.fd));
    }
  }

  // Every other socket: made, bound (as its holder: permissions and owner as the process's own
  // bind would have them, then the recorded mode and owner), listening.
  for (const auto& [inode, h] : in.held) {
    if (ends.count(inode)) continue;
    const UnixSocket& s = *h.first;
    std::string what = what_of(inode);
    SocketEnd e = make_socket(s, what);
    set_passcred(e, s);
    if (!s.name().empty()) {
      sockaddr_un a;
      socklen_t len = to_sockaddr(s.name(), a);
      bool path = s.name()[0] != '\0';
      in.as_holder(inode, [&] {
        if (::bind(e.fd.get(), reinterpret_cast<sockaddr*>(&a), len) != 0)
          fail_errno(what, ": bind to ", unix_name_text(s.name()));
        if (!path) return;
        if (::fchmodat(AT_FDCWD, s.name().c_str(), s.file_mode(), 0) != 0)
          fail_errno(what, ": chmod ", s.name(), " to ", s.file_mode());
        struct stat st;
        if (::lstat(s.name().c_str(), &st) != 0) fail_errno(what, ": stat ", s.name());
        if ((st.st_uid != s.file_uid() || st.st_gid != s.file_gid()) &&
            ::lchown(s.name().c_str(), s.file_uid(), s.file_gid()) != 0)
          fail_errno(what, ": chown ", s.name(), " to ", s.file_uid(), ":", s.file_gid());
      });
    }
    if (s.listening() && ::listen(e.fd.get(), static_cast<int>(s.backlog())) != 0)
      fail_errno(what, ": listen(", s.backlog(), ")");
    ends[inode] = std::move(e);
  }

  // Data queued at bound or unconnected datagram sockets, from unnamed senders (validated),
  // sent again from an unnamed socket of lazycr's, before any of them connects anywhere (a
  // connected datagram socket takes datagrams from its peer only).
  for (const auto& [inode, h] : in.held) {
    const UnixSocket& s = *h.first;
    if (s.type() != SOCK_DGRAM || s.queued_size() == 0 || s.name().empty()) continue;
    if (s.peer_inode() != 0 && !s.connected_by_name()) continue;  // queued through its pair
    std::string what = what_of(inode);
    int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fail_errno(what, ": socket(AF_UNIX, SOCK_DGRAM) to queue its datagrams");
    SocketEnd sender = make_end(fd, what);
    queue_data(sender, ends.at(inode), s, s.name());
  }

  // Connections: one-way datagram ones to a bound socket of the image; pending ones, in the
  // order of each listener's queue (accept() returns them in that order); external ones.
  auto connect_to = [&](uint64_t inode, const std::string& name, bool nonblocking) {
    std::string what = what_of(inode);
    sockaddr_un a;
    socklen_t len = to_sockaddr(name, a);
    int fd = ends.at(inode).fd.get();
    int fl = ::fcntl(fd, F_GETFL);
    if (nonblocking) ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    int r = ::connect(fd, reinterpret_cast<sockaddr*>(&a), len);
    int err = errno;
    if (nonblocking) ::fcntl(fd, F_SETFL, fl);
    if (r != 0) fail_errno_value(err, cat(what, ": connect to ", unix_name_text(name)));
  };
  for (const auto& [inode, h] : in.held)
    if (h.first->connected_by_name()) connect_to(inode, sock(h.first->peer_inode()).name(), true);
  for (const auto& [inode, h] : in.held)
    for (uint64_t c : h.first->pending()) connect_to(c, h.first->name(), true);
  for (const auto& [inode, h] : in.held)
    if (h.first->external_peer()) connect_to(inode, h.first->peer_name(), true);

  std::map<uint64_t, UniqueFd> out;
  for (auto& [inode, e] : ends) {
    const UnixSocket& s = sock(inode);
    finish_end(e, s);
    if (s.peer_inode() != 0 && !s.connected_by_name()) set_passcred(e, s);
    shut(e, s);
    out[inode] = std::move(e.fd);
  }
  return out;
}

std::string describe_unix_socket(const UnixSocket& s) {
  std::string t = socket_type_text(s.type());
  if (s.listening())
    return cat(t, " socket listening on ", unix_name_text(s.name()), " (backlog ", s.backlog(),
               ", ", s.pending_size(), " pending", s.passcred() ? ", SO_PASSCRED" : "", ")");
  std::string out = cat(t, " socket");
  if (!s.name().empty()) out += cat(" bound to ", unix_name_text(s.name()));
  if (s.external_peer())
    out += cat(" connected to ", unix_name_text(s.peer_name()), " outside the tree");
  else if (s.connected_by_name())
    out += cat(" connected to socket inode ", s.peer_inode(), " by name");
  if (s.passcred()) out += ", SO_PASSCRED";
  return out;
}

namespace {

void dump_family(SocketDump& d) {
  const std::map<uint64_t, sockdiag::UnixSocket> diag = sockdiag::unix_sockets();
  std::map<uint64_t, HeldSocket> held;
  for (auto it = d.untaken.begin(); it != d.untaken.end();) {
    if (!diag.count(it->first)) {
      ++it;
      continue;
    }
    held.insert(d.untaken.extract(it++));
  }
  UnixDump u = dump_unix_sockets(held, diag, d.opts.ext_unix_sk);
  d.why_not.merge(u.why_not);
  for (auto& [inode, s] : u.sockets) {
    d.restorable.insert(inode);
    size_t bytes = 0;
    for (const auto& q : s.queued()) bytes += q.size();
    log::debug("socket:[", inode, "] ", describe_unix_socket(s), " (peer socket:[", s.peer_inode(),
               "]): ", s.queued_size(), " record(s), ", bytes, " bytes queued");
    *d.out->add_sockets() = std::move(s);
  }
}

void validate_family(const image::SharedObjects& shared, const SocketOptions&) {
  for (const auto& s : shared.sockets()) validate_unix_socket(s);
}

class UnixSocketRestore : public SocketRestore {
 public:
  UnixSocketRestore(const image::SharedObjects& shared, const SocketOptions& opts)
      : ext_unix_sk_(opts.ext_unix_sk) {
    for (const auto& s : shared.sockets()) sockets_[s.inode()] = &s;
  }
  bool has(uint64_t inode) const override { return sockets_.count(inode) != 0; }
  // A socket whose peer no descriptor holds; anything else (bound, listening, connected to a
  // name) is made again.
  bool leads_outside(uint64_t inode, const std::set<uint64_t>& held) const override {
    const UnixSocket& s = *sockets_.at(inode);
    return s.peer_inode() != 0 && !held.count(s.peer_inode());
  }
  std::map<uint64_t, UniqueFd> create(
      const std::map<uint64_t, std::string>& held,
      const std::function<void(uint64_t, const std::function<void()>&)>& as_holder) override {
    UnixRestore in;
    in.ext_unix_sk = ext_unix_sk_;
    for (const auto& [inode, who] : held) in.held[inode] = {sockets_.at(inode), who};
    in.as_holder = as_holder;
    return create_unix_sockets(in);
  }

 private:
  bool ext_unix_sk_;
  std::map<uint64_t, const UnixSocket*> sockets_;
};

std::unique_ptr<SocketRestore> restore_family(const image::SharedObjects& shared,
                                              const SocketOptions& opts) {
  return std::make_unique<UnixSocketRestore>(shared, opts);
}

}  // namespace

const SocketFamily kUnixSocketFamily{"UNIX", dump_family, validate_family, restore_family};

}  // namespace lazycr::objects
