#include "objects/tcp_pending.h"

#include <arpa/inet.h>
#include <linux/sockios.h>
#include <linux/tcp.h>  // struct tcp_info with tcpi_bytes_acked (glibc's is older)
#include <netinet/in.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "objects/inet_socket.h"

namespace lazycr::objects {
namespace {

using image::InetSocket;

constexpr int kTcpEstablished = 1, kTcpClose = 7, kTcpListen = 10;
constexpr int kConnectWaitMs = 10000;  // a connect over loopback to a listener is immediate

// An address as 16 bytes (IPv4 as ::ffff:a.b.c.d) and a port.
struct Endpoint {
  std::string addr;
  uint32_t port = 0;
  bool operator==(const Endpoint&) const = default;
  bool operator<(const Endpoint& o) const { return addr != o.addr ? addr < o.addr : port < o.port; }
};

std::string mapped(const std::string& raw) {
  if (raw.size() == 4) return std::string("\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) + raw;
  return raw;
}

bool is_v4(const std::string& a16) {
  return std::memcmp(a16.data(), "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0;
}

bool is_any(const std::string& a16) {
  return a16 == std::string(16, '\0') || a16 == mapped(std::string(4, '\0'));
}

bool endpoint(const sockaddr_storage& ss, Endpoint& e) {
  if (ss.ss_family == AF_INET) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(ss);
    e.addr = mapped(std::string(reinterpret_cast<const char*>(&a.sin_addr), 4));
    e.port = ntohs(a.sin_port);
    return true;
  }
  if (ss.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(ss);
    e.addr.assign(reinterpret_cast<const char*>(&a.sin6_addr), 16);
    e.port = ntohs(a.sin6_port);
    return true;
  }
  return false;
}

// Whether a connection to `peer` can have reached a listener bound to `local` (v6only: an
// IPv6 listener that takes no IPv4).
bool reaches(const Endpoint& peer, const Endpoint& local, bool v4_listener, bool v6only) {
  if (peer.port != local.port) return false;
  if (v4_listener && !is_v4(peer.addr)) return false;
  if (v6only && is_v4(peer.addr)) return false;
  return is_any(local.addr) || peer.addr == local.addr;
}

std::string text(const Endpoint& e) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (is_v4(e.addr)) {
    ::inet_ntop(AF_INET, e.addr.data() + 12, buf, sizeof buf);
    return cat(buf, ":", e.port);
  }
  ::inet_ntop(AF_INET6, e.addr.data(), buf, sizeof buf);
  return cat("[", buf, "]:", e.port);
}

struct Tcp {
  uint64_t inode;
  int fd;
  int family;
  int state;
  bool v6only;
  uint32_t accept_queue;  // listener: sk_ack_backlog (TCP_INFO tcpi_unacked)
  Endpoint local, peer;
  tcp_info ti;
};

// Why a client of the tree queued at a listener cannot be connected again, or "".
std::string client_refusal(const Tcp& c) {
  const std::string who = cat("its client ", text(c.local), " (socket:[", c.inode, "])");
  if (c.state != kTcpEstablished) return cat(who, " is not ESTABLISHED (TCP state ", c.state, ")");
  int outq = 0;
  if (::ioctl(c.fd, SIOCOUTQ, &outq) != 0) outq = -1;
  // bytes_acked counts the SYN too (snd_una moved past it by the SYN-ACK).
  const uint64_t sent = c.ti.tcpi_bytes_acked > 0 ? c.ti.tcpi_bytes_acked - 1 : 0;
  if (sent != 0 || outq != 0)
    return cat(who, " has sent ", sent, " byte(s) (", outq < 0 ? 0 : outq,
               " more queued) the program has not accepted yet; a connection made again by "
               "connect() cannot carry them");
  if (c.ti.tcpi_bytes_received != 0)
    return cat(who, " has received ", c.ti.tcpi_bytes_received, " byte(s)");
  pollfd p{c.fd, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) < 0 || (p.revents & (POLLRDHUP | POLLERR | POLLHUP)))
    return cat(who, " was shut down or has an error pending");
  return {};
}

}  // namespace

PendingAccepts find_pending_accepts(const std::map<uint64_t, int>& socks) {
  PendingAccepts out;
  std::vector<Tcp> all;
  for (const auto& [inode, fd] : socks) {
    Tcp t{};
    t.inode = inode;
    t.fd = fd;
    socklen_t len = sizeof t.family;
    int type = 0, protocol = 0;
    if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &t.family, &len) != 0) continue;
    len = sizeof type;
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) continue;
    len = sizeof protocol;
    if (::getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) != 0 || protocol != IPPROTO_TCP)
      continue;
    len = sizeof t.ti;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &t.ti, &len) != 0) continue;
    t.state = t.ti.tcpi_state;
    if (t.state == kTcpClose) continue;
    sockaddr_storage ss{};
    len = sizeof ss;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0 || !endpoint(ss, t.local))
      continue;
    if (t.state == kTcpListen) {
      t.accept_queue = t.ti.tcpi_unacked;
      int v6only = 0;
      len = sizeof v6only;
      t.v6only = t.family == AF_INET6 &&
                 ::getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) == 0 && v6only;
    } else {
      len = sizeof ss;
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0 || !endpoint(ss, t.peer))
        continue;
    }
    all.push_back(t);
  }
  // Connections whose other end is in the tree too (accepted, or both ends held) are not queued.
  std::set<std::pair<Endpoint, Endpoint>> conns;
  for (const Tcp& t : all)
    if (t.state != kTcpListen) conns.insert({t.local, t.peer});
  std::map<uint64_t, std::vector<const Tcp*>> clients_of;  // listener inode -> clients
  std::map<uint64_t, int> listeners_of;                    // client inode -> listeners it fits
  for (const Tcp& l : all) {
    if (l.state != kTcpListen || l.accept_queue == 0) continue;
    auto& mine = clients_of[l.inode];
    for (const Tcp& c : all)
      if (c.state != kTcpListen && !conns.count({c.peer, c.local}) &&
          reaches(c.peer, l.local, l.family == AF_INET, l.v6only)) {
        mine.push_back(&c);
        listeners_of[c.inode]++;
      }
  }
  for (const Tcp& l : all) {
    if (l.state != kTcpListen || l.accept_queue == 0) continue;
    const auto& mine = clients_of[l.inode];
    const std::string head =
        cat("TCP/", l.family == AF_INET ? "IPv4" : "IPv6", " socket listening on ", text(l.local),
            " (socket:[", l.inode, "]) has ", l.accept_queue,
            " connection(s) in its accept queue not accepted yet");
    std::string why;
    if (mine.size() < l.accept_queue) {
      why = cat(head, ", ", l.accept_queue - mine.size(),
                " of them from clients outside the tree (the kernel gives no descriptor of a "
                "queued connection but through accept(), which would take it from the program; "
                "lazycr connects again only clients of the tree that sent nothing; "
                "--tcp-established restores accepted connections only)");
    } else if (mine.size() > l.accept_queue) {
      why = cat(head, " but ", mine.size(),
                " clients of the tree are connected to it and their accepted ends are not in the "
                "tree");
    } else {
      for (const Tcp* c : mine) {
        if (listeners_of[c->inode] > 1) {
          why = cat(head, ": its client ", text(c->local),
                    " could be queued at another listener of the tree too");
          break;
        }
        std::string r = client_refusal(*c);
        if (!r.empty()) {
          why = cat(head, ": ", r);
          break;
        }
      }
    }
    if (why.empty()) {
      out.listeners[l.inode] = l.accept_queue;
      for (const Tcp* c : mine) out.clients.insert(c->inode);
    } else {
      out.why_not[l.inode] = why;
      for (const Tcp* c : mine) out.why_not[c->inode] = why;
    }
  }
  for (const auto& [inode, why] : out.why_not) out.clients.erase(inode);
  return out;
}

void validate_pending_accepts(const google::protobuf::RepeatedPtrField<InetSocket>& all) {
  std::map<uint64_t, uint32_t> counted;
  for (const InetSocket& c : all) {
    if (!c.pending_accept()) continue;
    const std::string what = cat("socket:[", c.inode(), "] (TCP client queued at a listener)");
    if (c.type() != SOCK_STREAM || c.listening() || c.has_tcp() || c.local_port() == 0 ||
        c.peer_port() == 0 || c.accept_queue() != 0)
      fail(what, ": a queued client must be a bound, connected TCP socket, not listening");
    Endpoint peer{mapped(c.peer_addr()), c.peer_port()};
    const InetSocket* found = nullptr;
    for (const InetSocket& l : all) {
      if (!l.listening() || l.type() != SOCK_STREAM) continue;
      Endpoint local{
          mapped(l.local_addr().empty() ? std::string(l.family() == AF_INET ? 4 : 16, '\0')
                                        : l.local_addr()),
          l.local_port()};
      if (!reaches(peer, local, l.family() == AF_INET, l.v6only())) continue;
      if (found != nullptr)
        fail(what, ": its peer ", text(peer), " is reached by two listeners of the image");
      found = &l;
    }
    if (found == nullptr) fail(what, ": its peer ", text(peer), " is not a listener of the image");
    counted[found->inode()]++;
  }
  for (const InetSocket& l : all) {
    if (l.accept_queue() == 0) continue;
    if (!l.listening())
      fail("socket:[", l.inode(), "]: an accept queue on a socket that is not listening");
    if (counted[l.inode()] != l.accept_queue())
      fail("socket:[", l.inode(), "] (listener): an accept queue of ", l.accept_queue(),
           " connection(s) but ", counted[l.inode()], " queued client(s) in the image");
    if (l.accept_queue() > l.backlog() + 1)
      fail("socket:[", l.inode(), "] (listener): an accept queue of ", l.accept_queue(),
           " connection(s) exceeds its backlog of ", l.backlog());
  }
}

void connect_pending(int fd, const InetSocket& s, const std::string& what) {
  sockaddr_storage ss{};
  socklen_t len;
  if (s.family() == AF_INET) {
    auto& a = reinterpret_cast<sockaddr_in&>(ss);
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(s.peer_port()));
    std::memcpy(&a.sin_addr, s.peer_addr().data(), 4);
    len = sizeof a;
  } else {
    auto& a = reinterpret_cast<sockaddr_in6&>(ss);
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(static_cast<uint16_t>(s.peer_port()));
    std::memcpy(&a.sin6_addr, s.peer_addr().data(), 16);
    len = sizeof a;
  }
  const std::string to = describe_inet_address(s.family(), s.peer_addr(), s.peer_port());
  // The descriptor may already be non-blocking (the image's flags): wait for the handshake.
  int r = ::connect(fd, reinterpret_cast<sockaddr*>(&ss), len);
  if (r != 0 && errno == EINPROGRESS) {
    pollfd p{fd, POLLOUT, 0};
    int n;
    do {
      n = ::poll(&p, 1, kConnectWaitMs);
    } while (n < 0 && errno == EINTR);
    if (n == 0) fail(what, ": connecting again to its listener ", to, " did not complete");
    int err = 0;
    socklen_t elen = sizeof err;
    if (n < 0 || ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0) err = errno;
    errno = err;
    r = err == 0 ? 0 : -1;
  }
  if (r != 0) fail_errno(what, ": connecting again to its listener ", to);
}

}  // namespace lazycr::objects
