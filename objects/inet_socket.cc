#include "objects/inet_socket.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <sched.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "image-format/image_dir.h"
#include "objects/tcp_connection.h"

namespace lazycr::objects {
namespace {

using image::InetDatagram;
using image::InetSocket;

// Largest UDP payload over IPv4 / IPv6 (without jumbograms).
constexpr size_t kMaxUdp4Payload = 65507;
constexpr size_t kMaxUdp6Payload = 65527;
constexpr int kTcpEstablished = 1, kTcpClose = 7, kTcpListen = 10;
constexpr uint32_t kMaxBacklog = 1u << 20;  // somaxconn is an int; 4096 by default

const char* tcp_state_name(int st) {
  static const char* const names[] = {
      "?",     "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",   "TIME_WAIT",
      "CLOSE", "CLOSE_WAIT",  "LAST_ACK", "LISTEN",   "CLOSING",   "NEW_SYN_RECV"};
  return st >= 0 && st < static_cast<int>(std::size(names)) ? names[st] : "?";
}

int int_opt(int sock, int level, int name, bool& ok) {
  int v = 0;
  socklen_t len = sizeof v;
  ok = ::getsockopt(sock, level, name, &v, &len) == 0;
  return ok ? v : 0;
}

int int_opt(int sock, int level, int name) {
  bool ok;
  return int_opt(sock, level, name, ok);
}

std::string addr_text(int family, const std::string& raw, uint32_t port) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (raw.size() == 4 || raw.size() == 16)
    ::inet_ntop(raw.size() == 4 ? AF_INET : AF_INET6, raw.data(), buf, sizeof buf);
  bool v6 = raw.size() == 16 || (raw.empty() && family == AF_INET6);
  if (raw.empty()) std::strcpy(buf, v6 ? "::" : "0.0.0.0");
  return v6 ? cat("[", buf, "]:", port) : cat(buf, ":", port);
}

socklen_t join(int family, const std::string& addr, uint32_t port, uint32_t scope,
               sockaddr_storage& ss) {
  std::memset(&ss, 0, sizeof ss);
  if (family == AF_INET) {
    auto& a = reinterpret_cast<sockaddr_in&>(ss);
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (addr.size() == 4) std::memcpy(&a.sin_addr, addr.data(), 4);
    return sizeof a;
  }
  auto& a = reinterpret_cast<sockaddr_in6&>(ss);
  a.sin6_family = AF_INET6;
  a.sin6_port = htons(static_cast<uint16_t>(port));
  a.sin6_scope_id = scope;
  if (addr.size() == 16) std::memcpy(&a.sin6_addr, addr.data(), 16);
  return sizeof a;
}

// Options lazycr does not restore yet: a socket with one of them set is refused by name rather
// than given back without it.
struct Unrestored {
  int family;  // 0: any
  int level, name;
  const char* text;
};
const Unrestored kUnrestored[] = {
    {AF_INET, IPPROTO_IP, IP_PKTINFO, "IP_PKTINFO"},
    {AF_INET, IPPROTO_IP, IP_RECVERR, "IP_RECVERR"},
    {AF_INET, IPPROTO_IP, IP_RECVTOS, "IP_RECVTOS"},
    {AF_INET, IPPROTO_IP, IP_RECVTTL, "IP_RECVTTL"},
    {AF_INET, IPPROTO_IP, IP_TRANSPARENT, "IP_TRANSPARENT"},
    {AF_INET, IPPROTO_IP, IP_FREEBIND, "IP_FREEBIND"},
    {AF_INET6, IPPROTO_IPV6, IPV6_RECVPKTINFO, "IPV6_RECVPKTINFO"},
    {AF_INET6, IPPROTO_IPV6, IPV6_RECVERR, "IPV6_RECVERR"},
    {0, SOL_SOCKET, SO_TIMESTAMP, "SO_TIMESTAMP"},
    {0, SOL_SOCKET, SO_TIMESTAMPNS, "SO_TIMESTAMPNS"},
    {0, SOL_SOCKET, SO_BROADCAST, "SO_BROADCAST"},
};

// Options of a TCP socket lazycr does not restore: one that reads differently from a new TCP
// socket of the same family (made here, so sysctl defaults are this namespace's) is refused by
// name rather than given back at its default.
struct TcpUnrestored {
  int family;  // 0: any
  int level, name;
  const char* text;
  bool unconnected_only;  // meaningful before a connection only (TCP_MAXSEG)
};
const TcpUnrestored kTcpUnrestored[] = {
    {0, SOL_SOCKET, SO_OOBINLINE, "SO_OOBINLINE", false},
    {0, SOL_SOCKET, SO_LINGER, "SO_LINGER", false},
    {0, SOL_SOCKET, SO_RCVLOWAT, "SO_RCVLOWAT", false},
    {0, SOL_SOCKET, SO_RCVTIMEO_OLD, "SO_RCVTIMEO", false},
    {0, SOL_SOCKET, SO_SNDTIMEO_OLD, "SO_SNDTIMEO", false},
    {0, SOL_SOCKET, SO_PRIORITY, "SO_PRIORITY", false},
    {0, SOL_SOCKET, SO_MARK, "SO_MARK", false},
    {0, SOL_SOCKET, SO_DONTROUTE, "SO_DONTROUTE", false},
    {0, SOL_SOCKET, SO_ZEROCOPY, "SO_ZEROCOPY", false},
    {0, SOL_SOCKET, SO_BUSY_POLL, "SO_BUSY_POLL", false},
    {0, SOL_SOCKET, SO_GET_FILTER, "a socket filter (SO_ATTACH_FILTER)", false},
    {AF_INET, IPPROTO_IP, IP_TOS, "IP_TOS", false},
    {AF_INET, IPPROTO_IP, IP_TTL, "IP_TTL", false},
    {AF_INET, IPPROTO_IP, IP_MTU_DISCOVER, "IP_MTU_DISCOVER", false},
    {AF_INET, IPPROTO_IP, IP_MINTTL, "IP_MINTTL", false},
    {AF_INET, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, "IP_BIND_ADDRESS_NO_PORT", false},
    {AF_INET6, IPPROTO_IPV6, IPV6_TCLASS, "IPV6_TCLASS", false},
    {AF_INET6, IPPROTO_IPV6, IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS", false},
    {AF_INET6, IPPROTO_IPV6, IPV6_MTU_DISCOVER, "IPV6_MTU_DISCOVER", false},
    {0, IPPROTO_TCP, TCP_CORK, "TCP_CORK", false},
    {0, IPPROTO_TCP, TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT", false},
    {0, IPPROTO_TCP, TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", false},
    {0, IPPROTO_TCP, TCP_DEFER_ACCEPT, "TCP_DEFER_ACCEPT", false},
    {0, IPPROTO_TCP, TCP_FASTOPEN, "TCP_FASTOPEN", false},
    {0, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, "TCP_FASTOPEN_CONNECT", false},
    {0, IPPROTO_TCP, TCP_SYNCNT, "TCP_SYNCNT", false},
    {0, IPPROTO_TCP, TCP_LINGER2, "TCP_LINGER2", false},
    {0, IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, "TCP_THIN_LINEAR_TIMEOUTS", false},
    {0, IPPROTO_TCP, TCP_INQ, "TCP_INQ", false},
    {0, IPPROTO_TCP, TCP_SAVE_SYN, "TCP_SAVE_SYN", false},
    {0, IPPROTO_TCP, TCP_TX_DELAY, "TCP_TX_DELAY", false},
    {0, IPPROTO_TCP, TCP_CONGESTION, "TCP_CONGESTION", false},
    {0, IPPROTO_TCP, TCP_ULP, "an upper layer protocol (TCP_ULP, e.g. kernel TLS)", false},
    {0, IPPROTO_TCP, TCP_MAXSEG, "TCP_MAXSEG", true},
};

// The raw value of an option (empty when it cannot be read).
std::string raw_opt(int sock, int level, int name) {
  char buf[64] = {};
  socklen_t len = sizeof buf;
  if (level == SOL_SOCKET && name == SO_GET_FILTER) len = 0;  // the filter's length only
  int r = ::getsockopt(sock, level, name, buf, &len);
  if (r < 0) return {};
  if (level == SOL_SOCKET && name == SO_GET_FILTER) return std::to_string(r == 0 ? len : 0);
  return std::string(buf, std::min<size_t>(len, sizeof buf));
}

std::string shown(const std::string& raw) {
  if (raw.size() == 4) {
    int v;
    std::memcpy(&v, raw.data(), 4);
    return std::to_string(v);
  }
  if (raw.empty()) return "unreadable";
  bool text = true;
  for (char c : raw) text &= c >= 0x20 && c < 0x7f;
  if (text) return cat("\"", raw, "\"");
  std::string hex;
  for (unsigned char c : raw) hex += cat("0123456789abcdef"[c >> 4], "0123456789abcdef"[c & 15]);
  return cat("0x", hex);
}

// "TCP_CORK set (1; a new socket has 0)", or "" when every option is as on a new socket.
std::string tcp_unrestored_option(int sock, int family, bool connection) {
  UniqueFd fresh(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fresh) return {};
  for (const auto& u : kTcpUnrestored) {
    if ((u.family != 0 && u.family != family) || (u.unconnected_only && connection)) continue;
    std::string have = raw_opt(sock, u.level, u.name);
    std::string base = raw_opt(fresh.get(), u.level, u.name);
    if (u.level == IPPROTO_TCP && (u.name == TCP_CONGESTION || u.name == TCP_ULP)) {
      have = have.substr(0, have.find('\0'));
      base = base.substr(0, base.find('\0'));
    }
    // The ECN bits of the traffic class are the connection's (set when ECN was negotiated).
    if (((u.level == IPPROTO_IP && u.name == IP_TOS) ||
         (u.level == IPPROTO_IPV6 && u.name == IPV6_TCLASS)) &&
        have.size() == 4 && base.size() == 4) {
      have[0] = static_cast<char>(have[0] & ~3);
      base[0] = static_cast<char>(base[0] & ~3);
    }
    if (have != base)
      return cat(u.text, " set (", shown(have), "; a new socket has ", shown(base), ")");
  }
  return {};
}

// SO_PEEK_OFF belongs to the socket, which the target shares: put its value back.
class PeekOffset {
 public:
  explicit PeekOffset(int fd) : fd_(fd) { old_ = int_opt(fd, SOL_SOCKET, SO_PEEK_OFF); }
  ~PeekOffset() {
    if (changed_ && ::setsockopt(fd_, SOL_SOCKET, SO_PEEK_OFF, &old_, sizeof old_) != 0)
      log::warn("cannot put SO_PEEK_OFF of a UDP socket back to ", old_, ": ",
                std::strerror(errno));
  }
  void set(int off) {
    changed_ = true;
    if (::setsockopt(fd_, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off) != 0)
      fail_errno("setsockopt(SO_PEEK_OFF, ", off, ") on a UDP socket");
  }

 private:
  int fd_;
  int old_ = -1;
  bool changed_ = false;
};

// The datagrams queued at a UDP socket, oldest first, left in place: one MSG_PEEK each, at a
// peek offset just past the ones before (UDP honours SO_PEEK_OFF: whole datagrams are skipped).
void peek_datagrams(int sock, google::protobuf::RepeatedPtrField<InetDatagram>& out,
                    const std::string& what) {
  PeekOffset peek_off(sock);
  std::vector<char> buf(kMaxUdp6Payload + 1);
  uint64_t total = 0;
  int off = 0;
  for (size_t count = 0;; count++) {
    if (count >= image::kMaxSocketQueued)
      fail(what, ": more than ", image::kMaxSocketQueued, " datagrams queued");
    peek_off.set(off);
    sockaddr_storage from{};
    iovec iov{buf.data(), buf.size()};
    msghdr msg{};
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    ssize_t n;
    do {
      n = ::recvmsg(sock, &msg, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) fail_errno("MSG_PEEK on ", what);
    if (static_cast<size_t>(n) > buf.size()) fail(what, ": a queued datagram of ", n, " bytes");
    InetDatagram* d = out.Add();
    d->set_data(buf.data(), static_cast<size_t>(n));
    uint32_t port = 0;
    if (!split_inet_address(from, *d->mutable_source_addr(), port, nullptr))
      fail(what, ": a queued datagram without an IPv4 or IPv6 source address");
    d->set_source_port(port);
    total += static_cast<uint64_t>(n);
    if (total > image::kMaxSocketQueuedBytes)
      fail(what, ": more than ", image::kMaxSocketQueuedBytes, " bytes queued");
    off += static_cast<int>(n);
  }
}

uint32_t sum16(const void* data, size_t len, uint32_t sum) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i + 1 < len; i += 2) sum += static_cast<uint32_t>(p[i] << 8 | p[i + 1]);
  if (len & 1) sum += static_cast<uint32_t>(p[len - 1] << 8);
  return sum;
}

uint16_t fold(uint32_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  uint16_t c = static_cast<uint16_t>(~sum & 0xffff);
  return c == 0 ? 0xffff : c;  // 0 means "no checksum" in UDP
}

bool v4_mapped(const std::string& a) {
  static const char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\xff', '\xff'};
  return a.size() == 16 && std::memcmp(a.data(), prefix, 12) == 0;
}

bool all_zero(const std::string& a) {
  for (char c : a)
    if (c != 0) return false;
  return true;
}

// Sends each queued datagram to the socket (local address `to_v4` / `to_v6`, port `port`) from
// its recorded source, as a raw IP packet written whole (IP_HDRINCL, IPv6 raw IPPROTO_RAW): the
// kernel delivers it over loopback to the socket as if the source had sent it.
class Injector {
 public:
  Injector(const std::string& what, uint32_t port) : what_(what), port_(port) {}

  void send(const InetDatagram& d, const std::string& dst) {
    bool v4 = d.source_addr().size() == 4 || v4_mapped(d.source_addr());
    std::string src = d.source_addr();
    if (v4_mapped(src)) src = src.substr(12);
    std::string to = dst;
    if (v4 && v4_mapped(to)) to = to.substr(12);
    if (v4 && to.size() != 4) to = std::string("\x7f\0\0\x01", 4);  // a v6 socket bound to ::
    if (!v4 && to.size() != 16) fail(what_, ": an IPv6 datagram queued at an IPv4 socket");
    udphdr u{};
    u.source = htons(static_cast<uint16_t>(d.source_port()));
    u.dest = htons(static_cast<uint16_t>(port_));
    const size_t ulen = sizeof u + d.data().size();
    u.len = htons(static_cast<uint16_t>(ulen));
    // Pseudo-header, header, payload.
    uint32_t sum = sum16(src.data(), src.size(), 0);
    sum = sum16(to.data(), to.size(), sum);
    sum += IPPROTO_UDP + static_cast<uint32_t>(ulen);
    sum = sum16(&u, sizeof u, sum);
    sum = sum16(d.data().data(), d.data().size(), sum);
    u.check = htons(fold(sum));
    std::string pkt;
    sockaddr_storage ss;
    socklen_t sslen;
    if (v4) {
      iphdr ip{};
      ip.ihl = 5;
      ip.version = 4;
      ip.ttl = 64;
      ip.protocol = IPPROTO_UDP;
      ip.tot_len = htons(static_cast<uint16_t>(sizeof ip + ulen));
      std::memcpy(&ip.saddr, src.data(), 4);
      std::memcpy(&ip.daddr, to.data(), 4);
      pkt.append(reinterpret_cast<const char*>(&ip), sizeof ip);
      sslen = join(AF_INET, to, 0, 0, ss);
    } else {
      ip6_hdr ip{};
      ip.ip6_flow = htonl(6u << 28);
      ip.ip6_plen = htons(static_cast<uint16_t>(ulen));
      ip.ip6_nxt = IPPROTO_UDP;
      ip.ip6_hlim = 64;
      std::memcpy(&ip.ip6_src, src.data(), 16);
      std::memcpy(&ip.ip6_dst, to.data(), 16);
      pkt.append(reinterpret_cast<const char*>(&ip), sizeof ip);
      sslen = join(AF_INET6, to, 0, 0, ss);
    }
    pkt.append(reinterpret_cast<const char*>(&u), sizeof u);
    pkt.append(d.data());
    UniqueFd& raw = v4 ? raw4_ : raw6_;
    if (!raw) {
      raw.reset(::socket(v4 ? AF_INET : AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW));
      if (!raw)
        fail_errno(what_, ": socket(", v4 ? "AF_INET" : "AF_INET6",
                   ", SOCK_RAW, IPPROTO_RAW) to put its queued datagrams back");
    }
    ssize_t n =
        ::sendto(raw.get(), pkt.data(), pkt.size(), 0, reinterpret_cast<sockaddr*>(&ss), sslen);
    if (n != static_cast<ssize_t>(pkt.size()))
      fail_errno(what_, ": sending a queued datagram of ", d.data().size(), " bytes from ",
                 addr_text(0, d.source_addr(), d.source_port()), " through a raw socket");
  }

 private:
  std::string what_;
  uint32_t port_;
  UniqueFd raw4_, raw6_;
};

// The calling thread on one CPU while it runs: packets looped back from one CPU are delivered
// in the order sent.
class PinHere {
 public:
  PinHere() {
    if (::sched_getaffinity(0, sizeof old_, &old_) != 0) return;
    int cpu = ::sched_getcpu();
    if (cpu < 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = ::sched_setaffinity(0, sizeof one, &one) == 0;
  }
  ~PinHere() {
    if (pinned_) ::sched_setaffinity(0, sizeof old_, &old_);
  }

 private:
  cpu_set_t old_;
  bool pinned_ = false;
};

uint64_t now_ms() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}

void set_int(int fd, int level, int name, int v, const std::string& what, const char* text) {
  if (::setsockopt(fd, level, name, &v, sizeof v) != 0)
    fail_errno(what, ": setsockopt(", text, ", ", v, ")");
}

// A buffer size as read back (the kernel doubles what is set): set only where the program had
// changed it, so that an untouched socket keeps the defaults of where it is restored.
void set_buf(int fd, int name, int force, uint32_t want, const std::string& what,
             const char* text) {
  if (want == 0 || static_cast<uint32_t>(int_opt(fd, SOL_SOCKET, name)) == want) return;
  int half = static_cast<int>(want / 2);
  if (::setsockopt(fd, SOL_SOCKET, force, &half, sizeof half) != 0 &&
      ::setsockopt(fd, SOL_SOCKET, name, &half, sizeof half) != 0)
    fail_errno(what, ": setsockopt(", text, ", ", half, ")");
}

}  // namespace

bool split_inet_address(const sockaddr_storage& ss, std::string& addr, uint32_t& port,
                        uint32_t* scope) {
  if (ss.ss_family == AF_INET) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(ss);
    addr.assign(reinterpret_cast<const char*>(&a.sin_addr), 4);
    port = ntohs(a.sin_port);
    return true;
  }
  if (ss.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(ss);
    addr.assign(reinterpret_cast<const char*>(&a.sin6_addr), 16);
    port = ntohs(a.sin6_port);
    if (scope) *scope = a.sin6_scope_id;
    return true;
  }
  return false;
}

std::string describe_inet_address(int family, const std::string& raw, uint32_t port) {
  return addr_text(family, raw, port);
}

bool is_inet_socket(int sock) {
  int domain = int_opt(sock, SOL_SOCKET, SO_DOMAIN);
  return domain == AF_INET || domain == AF_INET6;
}

std::string describe_inet_socket(const InetSocket& s) {
  std::string kind = cat(s.type() == SOCK_STREAM ? "TCP" : "UDP", "/",
                         s.family() == AF_INET ? "IPv4" : "IPv6", " socket");
  std::string local = addr_text(s.family(), s.local_addr(), s.local_port());
  std::string out;
  if (s.has_tcp())
    out = describe_tcp_connection(s);
  else if (s.listening())
    out = cat(kind, " listening on ", local, " (backlog ", s.backlog(),
              s.accept_queue() ? cat(", ", s.accept_queue(), " connection(s) not accepted yet")
                               : std::string(),
              ")");
  else if (!s.peer_addr().empty())
    out =
        cat(kind, " ", local, " connected to ", addr_text(s.family(), s.peer_addr(), s.peer_port()),
            s.pending_accept() ? " (queued there, not accepted yet)" : "");
  else if (s.local_port() != 0)
    out = cat(kind, " bound to ", local);
  else
    out = cat(kind, ", not bound");
  if (s.queued_size() > 0) out += cat(" (", s.queued_size(), " datagrams queued)");
  return out;
}

bool dump_inet_socket(int sock, uint64_t inode, InetSocket& out, std::string& why) {
  const std::string what = cat("socket:[", inode, "]");
  const int family = int_opt(sock, SOL_SOCKET, SO_DOMAIN);
  const int type = int_opt(sock, SOL_SOCKET, SO_TYPE);
  const int protocol = int_opt(sock, SOL_SOCKET, SO_PROTOCOL);
  const char* fam = family == AF_INET ? "IPv4" : "IPv6";
  const bool tcp = type == SOCK_STREAM && protocol == IPPROTO_TCP;
  const bool udp = type == SOCK_DGRAM && protocol == IPPROTO_UDP;
  if (!tcp && !udp) {
    why = cat(what, " is an ", fam, " socket of type ", type, " and protocol ", protocol,
              ", not TCP or UDP");
    return false;
  }
  out.set_inode(inode);
  out.set_family(family);
  out.set_type(type);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(sock, reinterpret_cast<sockaddr*>(&ss), &len) != 0)
    fail_errno("getsockname of ", what);
  uint32_t scope = 0, port = 0;
  split_inet_address(ss, *out.mutable_local_addr(), port, &scope);
  out.set_local_port(port);
  out.set_scope_id(scope);
  std::string peer_addr;
  uint32_t peer_port = 0;
  len = sizeof ss;
  bool connected = ::getpeername(sock, reinterpret_cast<sockaddr*>(&ss), &len) == 0 &&
                   split_inet_address(ss, peer_addr, peer_port, nullptr);
  const std::string local = addr_text(family, out.local_addr(), out.local_port());
  const std::string kind = cat(tcp ? "TCP" : "UDP", "/", fam, " socket");
  if (tcp) {
    tcp_info ti{};
    len = sizeof ti;
    if (::getsockopt(sock, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
      fail_errno("getsockopt(TCP_INFO) of ", what);
    if (out.has_tcp()) {
      // A connection, its state already in out.tcp (objects/tcp_connection.h).
    } else if (out.pending_accept() && ti.tcpi_state == kTcpEstablished && connected) {
      // A client queued at a listener of the tree (objects/tcp_pending.h): connected again.
      out.set_peer_addr(peer_addr);
      out.set_peer_port(peer_port);
    } else if (ti.tcpi_state == kTcpEstablished) {
      why =
          cat("established TCP connection ", local, " -> ", addr_text(family, peer_addr, peer_port),
              ": needs --tcp-established, not supported yet");
      return false;
    } else if (ti.tcpi_state == kTcpListen) {
      // For a listener TCP_INFO reports the accept queue in tcpi_unacked and the backlog in
      // tcpi_sacked (tcp_get_info).
      if (ti.tcpi_unacked != out.accept_queue()) {
        why = cat(kind, " listening on ", local, " has ", ti.tcpi_unacked,
                  " connection(s) in its accept queue not accepted yet (the kernel gives no "
                  "descriptor of a queued connection but through accept(), which would take it "
                  "from the program; --tcp-established restores accepted connections only)");
        return false;
      }
      out.set_listening(true);
      out.set_backlog(ti.tcpi_sacked);
    } else if (ti.tcpi_state != kTcpClose) {
      why = cat(kind, " ", local, " in TCP state ", tcp_state_name(ti.tcpi_state),
                connected ? cat(" with ", addr_text(family, peer_addr, peer_port)) : "",
                ": needs --tcp-established, not supported yet");
      return false;
    }
    out.set_nodelay(int_opt(sock, IPPROTO_TCP, TCP_NODELAY) != 0);
    out.set_keepidle(static_cast<uint32_t>(int_opt(sock, IPPROTO_TCP, TCP_KEEPIDLE)));
    out.set_keepintvl(static_cast<uint32_t>(int_opt(sock, IPPROTO_TCP, TCP_KEEPINTVL)));
    out.set_keepcnt(static_cast<uint32_t>(int_opt(sock, IPPROTO_TCP, TCP_KEEPCNT)));
  } else if (connected) {
    out.set_peer_addr(peer_addr);
    out.set_peer_port(peer_port);
  }
  for (const auto& u : kUnrestored) {
    if (u.family != 0 && u.family != family) continue;
    bool ok;
    if (int_opt(sock, u.level, u.name, ok) != 0 && ok) {
      why = cat(kind, " ", local, " has ", u.text, " set, which lazycr does not restore yet");
      return false;
    }
  }
  if (tcp) {
    std::string opt = tcp_unrestored_option(sock, family, out.has_tcp() || out.pending_accept());
    if (!opt.empty()) {
      why = cat(out.has_tcp() ? describe_tcp_connection(out) : cat(kind, " ", local), " has ", opt,
                ", which lazycr does not restore");
      return false;
    }
  }
  char dev[64] = "";
  len = sizeof dev;
  if (::getsockopt(sock, SOL_SOCKET, SO_BINDTODEVICE, dev, &len) == 0 && len > 0 && dev[0]) {
    why = cat(kind, " ", local, " is bound to device ", dev,
              " (SO_BINDTODEVICE), which lazycr does not restore yet");
    return false;
  }
  if (scope != 0) {
    why = cat(kind, " ", local, " has a link-local address (scope ", scope,
              "), which lazycr does not restore yet");
    return false;
  }
  // A connection's was read before repair mode (which forces reuse): tcp_connection.cc.
  if (!out.has_tcp()) out.set_reuseaddr(int_opt(sock, SOL_SOCKET, SO_REUSEADDR) != 0);
  out.set_reuseport(int_opt(sock, SOL_SOCKET, SO_REUSEPORT) != 0);
  if (family == AF_INET6) out.set_v6only(int_opt(sock, IPPROTO_IPV6, IPV6_V6ONLY) != 0);
  out.set_keepalive(int_opt(sock, SOL_SOCKET, SO_KEEPALIVE) != 0);
  out.set_sndbuf(static_cast<uint32_t>(int_opt(sock, SOL_SOCKET, SO_SNDBUF)));
  out.set_rcvbuf(static_cast<uint32_t>(int_opt(sock, SOL_SOCKET, SO_RCVBUF)));
  if (udp) peek_datagrams(sock, *out.mutable_queued(), cat(what, " (", kind, " ", local, ")"));
  return true;
}

void validate_inet_socket(const InetSocket& s) {
  const std::string what = cat("socket:[", s.inode(), "]");
  if (s.inode() == 0) fail("an IPv4/IPv6 socket has inode 0");
  if (s.family() != AF_INET && s.family() != AF_INET6)
    fail(what, ": family ", s.family(), " is not AF_INET or AF_INET6");
  if (s.type() != SOCK_STREAM && s.type() != SOCK_DGRAM)
    fail(what, ": type ", s.type(), " is not SOCK_STREAM (TCP) or SOCK_DGRAM (UDP)");
  const size_t alen = s.family() == AF_INET ? 4 : 16;
  if (s.local_addr().size() != alen && !s.local_addr().empty())
    fail(what, ": local address of ", s.local_addr().size(), " bytes (", alen, " expected)");
  if (!s.peer_addr().empty() && s.peer_addr().size() != alen)
    fail(what, ": peer address of ", s.peer_addr().size(), " bytes (", alen, " expected)");
  if (s.local_port() > 65535 || s.peer_port() > 65535)
    fail(what, ": port ", std::max(s.local_port(), s.peer_port()), " is out of range");
  if (!s.peer_addr().empty() && ((s.type() != SOCK_DGRAM && !s.pending_accept()) ||
                                 s.peer_port() == 0 || s.peer_addr().size() != alen))
    fail(what,
         ": a peer address on a socket that is neither a connected UDP socket nor a TCP client "
         "queued at a listener");
  if (s.pending_accept() && (s.type() != SOCK_STREAM || s.peer_addr().empty()))
    fail(what, ": a queued TCP client without a peer");
  if (s.listening() && (s.type() != SOCK_STREAM || s.local_port() == 0))
    fail(what, ": listening but not a bound TCP socket");
  if (s.backlog() > kMaxBacklog) fail(what, ": backlog ", s.backlog(), " exceeds ", kMaxBacklog);
  if (s.v6only() && s.family() != AF_INET6) fail(what, ": IPV6_V6ONLY on an IPv4 socket");
  if (s.scope_id() != 0) fail(what, ": a link-local scope, which lazycr does not restore");
  if (s.sndbuf() > INT32_MAX || s.rcvbuf() > INT32_MAX)
    fail(what, ": buffer sizes ", s.sndbuf(), "/", s.rcvbuf(), " exceed INT_MAX");
  if (s.keepidle() > 32767 || s.keepintvl() > 32767 || s.keepcnt() > 127)
    fail(what, ": keepalive ", s.keepidle(), "/", s.keepintvl(), "/", s.keepcnt(),
         " out of range (TCP_KEEPIDLE, TCP_KEEPINTVL <= 32767, TCP_KEEPCNT <= 127)");
  if (s.type() == SOCK_STREAM &&
      (s.queued_size() > 0 || s.keepidle() == 0 || s.keepintvl() == 0 || s.keepcnt() == 0))
    fail(what, ": a TCP socket with queued datagrams or a zero keepalive setting");
  if (s.queued_size() > image::kMaxSocketQueued)
    fail(what, ": ", s.queued_size(), " queued datagrams exceeds the bound ",
         image::kMaxSocketQueued);
  if (s.queued_size() > 0 && s.local_port() == 0)
    fail(what, ": datagrams queued at a socket that is not bound");
  uint64_t bytes = 0;
  for (const InetDatagram& d : s.queued()) {
    const size_t max = s.family() == AF_INET ? kMaxUdp4Payload : kMaxUdp6Payload;
    if (d.data().size() > max) fail(what, ": a queued datagram of ", d.data().size(), " bytes");
    bytes += d.data().size();
    const size_t sl = d.source_addr().size();
    if (sl != alen || d.source_port() == 0 || d.source_port() > 65535)
      fail(what, ": a queued datagram's source (", sl, " address bytes, port ", d.source_port(),
           ") is not a ", s.family() == AF_INET ? "IPv4" : "IPv6", " address and port");
    if (all_zero(d.source_addr())) fail(what, ": a queued datagram from the any-address");
  }
  if (bytes > image::kMaxSocketQueuedBytes)
    fail(what, ": ", bytes, " bytes queued exceeds the bound ", image::kMaxSocketQueuedBytes);
}

UniqueFd create_inet_socket(const InetSocket& s, const std::string& who) {
  const std::string what = cat(describe_inet_socket(s), " (", who, ")");
  const int family = s.family();
  UniqueFd fd(::socket(family, s.type() | SOCK_CLOEXEC, 0));
  if (!fd) fail_errno(what, ": socket");
  const int f = fd.get();
  if (family == AF_INET6) set_int(f, IPPROTO_IPV6, IPV6_V6ONLY, s.v6only(), what, "IPV6_V6ONLY");
  // On for the bind whatever the image says (as CRIU does): connections the original's death
  // left in TIME_WAIT on its port must not stop the listener; the image's value comes after.
  set_int(f, SOL_SOCKET, SO_REUSEADDR, 1, what, "SO_REUSEADDR");
  if (s.reuseport()) set_int(f, SOL_SOCKET, SO_REUSEPORT, 1, what, "SO_REUSEPORT");
  if (s.keepalive()) set_int(f, SOL_SOCKET, SO_KEEPALIVE, 1, what, "SO_KEEPALIVE");
  if (s.type() == SOCK_STREAM) {
    if (s.nodelay()) set_int(f, IPPROTO_TCP, TCP_NODELAY, 1, what, "TCP_NODELAY");
    // Set only where they differ from this namespace's defaults, as the program left them.
    if (static_cast<uint32_t>(int_opt(f, IPPROTO_TCP, TCP_KEEPIDLE)) != s.keepidle())
      set_int(f, IPPROTO_TCP, TCP_KEEPIDLE, static_cast<int>(s.keepidle()), what, "TCP_KEEPIDLE");
    if (static_cast<uint32_t>(int_opt(f, IPPROTO_TCP, TCP_KEEPINTVL)) != s.keepintvl())
      set_int(f, IPPROTO_TCP, TCP_KEEPINTVL, static_cast<int>(s.keepintvl()), what,
              "TCP_KEEPINTVL");
    if (static_cast<uint32_t>(int_opt(f, IPPROTO_TCP, TCP_KEEPCNT)) != s.keepcnt())
      set_int(f, IPPROTO_TCP, TCP_KEEPCNT, static_cast<int>(s.keepcnt()), what, "TCP_KEEPCNT");
  }
  set_buf(f, SO_SNDBUF, SO_SNDBUFFORCE, s.sndbuf(), what, "SO_SNDBUF");
  // Before the bind: repair mode lets a connection share the port of a listener of the tree.
  if (s.has_tcp()) enter_repair(f, what);
  if (s.local_port() != 0) {
    sockaddr_storage ss;
    socklen_t len = join(family, s.local_addr(), s.local_port(), 0, ss);
    if (::bind(f, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
      if (errno == EADDRINUSE)
        fail(what, ": ", addr_text(family, s.local_addr(), s.local_port()),
             " is in use in this network namespace (bind: EADDRINUSE); restore --netns puts "
             "the tree in a fresh one");
      fail_errno(what, ": bind to ", addr_text(family, s.local_addr(), s.local_port()));
    }
  }
  if (s.listening() && ::listen(f, static_cast<int>(s.backlog())) != 0)
    fail_errno(what, ": listen(", s.backlog(), ")");
  if (!s.reuseaddr()) set_int(f, SOL_SOCKET, SO_REUSEADDR, 0, what, "SO_REUSEADDR");
  if (s.queued_size() > 0) {
    // Room for every datagram while they go in, whatever the recorded size; then the image's.
    set_int(f, SOL_SOCKET, SO_RCVBUFFORCE, 1 << 30, what, "SO_RCVBUFFORCE");
    std::string dst = s.local_addr();
    if (all_zero(dst))
      dst = family == AF_INET ? std::string("\x7f\0\0\x01", 4)
                              : std::string(15, '\0') + '\x01';  // 127.0.0.1, ::1
    {
      PinHere pin;
      Injector inj(what, s.local_port());
      for (const InetDatagram& d : s.queued()) inj.send(d, dst);
    }
    // Delivery over loopback normally completes within sendto (the receive softirq runs when
    // the sender re-enables bottom halves), but may be deferred to ksoftirqd: wait, bounded.
    google::protobuf::RepeatedPtrField<InetDatagram> got;
    const uint64_t deadline = now_ms() + 5000;
    for (;;) {
      got.Clear();
      peek_datagrams(f, got, what);
      if (got.size() >= s.queued_size() || now_ms() > deadline) break;
      ::sched_yield();
    }
    if (got.size() != s.queued_size())
      fail(what, ": ", got.size(), " of its ", s.queued_size(),
           " queued datagrams arrived when put back");
    for (int i = 0; i < got.size(); i++) {
      const InetDatagram& a = got[i];
      const InetDatagram& b = s.queued(i);
      if (a.data() != b.data() || a.source_addr() != b.source_addr() ||
          a.source_port() != b.source_port())
        fail(what, ": queued datagram ", i, " came back as ", a.data().size(), " bytes from ",
             addr_text(family, a.source_addr(), a.source_port()), " instead of ", b.data().size(),
             " bytes from ", addr_text(family, b.source_addr(), b.source_port()));
    }
  }
  set_buf(f, SO_RCVBUF, SO_RCVBUFFORCE, s.rcvbuf(), what, "SO_RCVBUF");
  // A TCP client queued at a listener connects once every socket exists (tcp_pending.h).
  if (!s.peer_addr().empty() && !s.pending_accept()) {
    sockaddr_storage ss;
    socklen_t len = join(family, s.peer_addr(), s.peer_port(), 0, ss);
    if (::connect(f, reinterpret_cast<sockaddr*>(&ss), len) != 0)
      fail_errno(what, ": connect to ", addr_text(family, s.peer_addr(), s.peer_port()));
  }
  if (s.has_tcp()) finish_in_repair(f, s, what);
  return fd;
}

}  // namespace lazycr::objects
