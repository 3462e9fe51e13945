#include "objects/tcp_connection.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "image-format/image_dir.h"
#include "objects/inet_socket.h"

namespace lazycr::objects {
namespace {

using image::InetSocket;
using image::TcpConnection;

constexpr int kTcpEstablished = 1, kTcpClose = 7, kTcpListen = 10;
constexpr uint32_t kMaxWscale = 14;  // RFC 7323
// Room for the queues while they are put back; the image's buffer sizes come after.
constexpr int kRefillBuffer = 64 << 20;

const char* state_name(int st) {
  static const char* const names[] = {
      "?",     "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",   "TIME_WAIT",
      "CLOSE", "CLOSE_WAIT",  "LAST_ACK", "LISTEN",   "CLOSING",   "NEW_SYN_RECV"};
  return st >= 0 && st < static_cast<int>(std::size(names)) ? names[st] : "?";
}

int get_int(int sock, int level, int name, const std::string& what, const char* text) {
  int v = 0;
  socklen_t len = sizeof v;
  if (::getsockopt(sock, level, name, &v, &len) != 0) fail_errno(what, ": getsockopt(", text, ")");
  return v;
}

void set_int(int sock, int level, int name, int v, const std::string& what, const char* text) {
  if (::setsockopt(sock, level, name, &v, sizeof v) != 0)
    fail_errno(what, ": setsockopt(", text, ", ", v, ")");
}

int ioctl_int(int sock, unsigned long req, const std::string& what, const char* text) {
  int v = 0;
  if (::ioctl(sock, req, &v) != 0) fail_errno(what, ": ioctl(", text, ")");
  return v;
}

std::string local_text(int sock) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  std::string addr;
  uint32_t port = 0;
  if (::getsockname(sock, reinterpret_cast<sockaddr*>(&ss), &len) != 0 ||
      !split_inet_address(ss, addr, port))
    return "?";
  return describe_inet_address(ss.ss_family, addr, port);
}

// Everything of a connection's queues read in one pass, in repair mode.
struct QueueSnapshot {
  uint32_t write_seq = 0, rcv_nxt = 0;
  int outq = 0, notsent = 0, inq = 0;
  std::string sendq, recvq;
  bool operator==(const QueueSnapshot& o) const {
    return write_seq == o.write_seq && rcv_nxt == o.rcv_nxt && outq == o.outq &&
           notsent == o.notsent && inq == o.inq;
  }
};

uint32_t queue_seq(int sock, int queue, const std::string& what) {
  set_int(sock, IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, what, "TCP_REPAIR_QUEUE");
  return static_cast<uint32_t>(get_int(sock, IPPROTO_TCP, TCP_QUEUE_SEQ, what, "TCP_QUEUE_SEQ"));
}

// The queue selected by TCP_REPAIR_QUEUE, `len` bytes, peeked (nothing consumed).
std::string peek_queue(int sock, int queue, int len, const std::string& what, const char* name) {
  if (len <= 0) return {};
  set_int(sock, IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, what, "TCP_REPAIR_QUEUE");
  std::string buf(static_cast<size_t>(len) + 1, '\0');
  ssize_t n;
  do {
    n = ::recv(sock, buf.data(), buf.size(), MSG_PEEK | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) fail_errno(what, ": peeking its ", name, " queue in repair mode");
  buf.resize(static_cast<size_t>(n));
  return buf;
}

QueueSnapshot read_queues(int sock, const std::string& what) {
  QueueSnapshot q;
  q.write_seq = queue_seq(sock, TCP_SEND_QUEUE, what);
  q.rcv_nxt = queue_seq(sock, TCP_RECV_QUEUE, what);
  q.outq = ioctl_int(sock, SIOCOUTQ, what, "SIOCOUTQ");
  q.notsent = ioctl_int(sock, SIOCOUTQNSD, what, "SIOCOUTQNSD");
  q.inq = ioctl_int(sock, SIOCINQ, what, "SIOCINQ");
  if (q.outq < 0 || q.notsent < 0 || q.inq < 0 || q.notsent > q.outq)
    fail(what, ": queue sizes out of step (SIOCOUTQ ", q.outq, ", SIOCOUTQNSD ", q.notsent,
         ", SIOCINQ ", q.inq, ")");
  if (static_cast<uint64_t>(q.outq) + static_cast<uint64_t>(q.inq) > image::kMaxSocketQueuedBytes)
    fail(what, ": ", q.outq, " bytes unacknowledged and ", q.inq, " unread exceed the bound of ",
         image::kMaxSocketQueuedBytes, " bytes per socket");
  q.sendq = peek_queue(sock, TCP_SEND_QUEUE, q.outq, what, "send");
  q.recvq = peek_queue(sock, TCP_RECV_QUEUE, q.inq, what, "receive");
  set_int(sock, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, what, "TCP_REPAIR_QUEUE");
  return q;
}

// Writes `data` to the queue selected in repair mode (send: as sent, not acknowledged;
// receive: as received), in as many calls as the kernel takes.
void refill(int fd, int queue, const std::string& data, const std::string& what, const char* name) {
  if (data.empty()) return;
  set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, what, "TCP_REPAIR_QUEUE");
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      fail_errno(what, ": putting back its ", name, " queue (", done, " of ", data.size(),
                 " bytes in)");
    done += static_cast<size_t>(n);
  }
  set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, what, "TCP_REPAIR_QUEUE");
}

socklen_t sockaddr_of(int family, const std::string& addr, uint32_t port, sockaddr_storage& ss) {
  std::memset(&ss, 0, sizeof ss);
  if (family == AF_INET) {
    auto& a = reinterpret_cast<sockaddr_in&>(ss);
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    std::memcpy(&a.sin_addr, addr.data(), 4);
    return sizeof a;
  }
  auto& a = reinterpret_cast<sockaddr_in6&>(ss);
  a.sin6_family = AF_INET6;
  a.sin6_port = htons(static_cast<uint16_t>(port));
  std::memcpy(&a.sin6_addr, addr.data(), 16);
  return sizeof a;
}

// A buffer size as the image has it (the kernel's doubled value), forced.
void set_buffer(int fd, int name, int force, uint32_t want, const std::string& what,
                const char* text) {
  if (want == 0) return;
  int cur = 0;
  socklen_t len = sizeof cur;
  if (::getsockopt(fd, SOL_SOCKET, name, &cur, &len) == 0 && static_cast<uint32_t>(cur) == want)
    return;
  set_int(fd, SOL_SOCKET, force, static_cast<int>(want / 2), what, text);
}

}  // namespace

TcpRepairHold::~TcpRepairHold() {
  resume();
}

void TcpRepairHold::add(UniqueFd sock, std::string what, bool reuseaddr) {
  socks_.push_back({std::move(sock), std::move(what), reuseaddr});
}

void TcpRepairHold::resume() {
  for (auto& [fd, what, reuseaddr] : socks_) {
    int off = TCP_REPAIR_OFF;
    if (::setsockopt(fd.get(), IPPROTO_TCP, TCP_REPAIR, &off, sizeof off) != 0)
      log::warn(what, ": cannot turn repair mode off: ", std::strerror(errno));
    int reuse = reuseaddr ? 1 : 0;
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof reuse) != 0)
      log::warn(what, ": cannot put SO_REUSEADDR back to ", reuse, ": ", std::strerror(errno));
  }
  socks_.clear();
}

void TcpRepairHold::close_silently() {
  socks_.clear();
}

bool is_tcp_connection(int sock) {
  int type = 0, protocol = 0;
  socklen_t len = sizeof type;
  if (::getsockopt(sock, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
    return false;
  len = sizeof protocol;
  if (::getsockopt(sock, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) != 0 || protocol != IPPROTO_TCP)
    return false;
  tcp_info ti{};
  len = sizeof ti;
  if (::getsockopt(sock, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return false;
  return ti.tcpi_state != kTcpListen && ti.tcpi_state != kTcpClose;
}

bool dump_tcp_connection(int sock, uint64_t inode, bool allowed, InetSocket& out, std::string& why,
                         TcpRepairHold& hold) {
  const int family = get_int(sock, SOL_SOCKET, SO_DOMAIN, cat("socket:[", inode, "]"), "SO_DOMAIN");
  const char* fam = family == AF_INET ? "IPv4" : "IPv6";
  TcpConnection& t = *out.mutable_tcp();
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  uint32_t peer_port = 0;
  if (::getpeername(sock, reinterpret_cast<sockaddr*>(&ss), &len) == 0)
    split_inet_address(ss, *t.mutable_peer_addr(), peer_port);
  t.set_peer_port(peer_port);
  const std::string conn =
      cat("TCP/", fam, " connection ", local_text(sock), " <-> ",
          describe_inet_address(family, t.peer_addr(), peer_port), " (socket:[", inode, "])");
  tcp_info ti{};
  len = sizeof ti;
  if (::getsockopt(sock, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
    fail_errno("getsockopt(TCP_INFO) of ", conn);
  if (ti.tcpi_state != kTcpEstablished) {
    why = cat(conn, " is in state ", state_name(ti.tcpi_state),
              ", which lazycr does not restore (ESTABLISHED connections only)");
    return false;
  }
  if (!allowed) {
    why = cat(conn,
              " is established: checkpointing it needs --tcp-established (on dump and on "
              "restore)");
    return false;
  }
  // shutdown(SHUT_RD) leaves the state ESTABLISHED; only poll tells (RCV_SHUTDOWN: POLLRDHUP).
  pollfd p{sock, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) < 0) fail_errno(conn, ": poll");
  if (p.revents & POLLRDHUP) {
    why = cat(conn,
              " was shut down for reading (shutdown SHUT_RD), which lazycr does not "
              "restore");
    return false;
  }
  // Urgent data: the repair queues carry no urgent pointer, so a pending urgent byte (read by
  // recv(MSG_OOB)) or a mark the program tests with SIOCATMARK would vanish. MSG_OOB comes
  // before the repair check in tcp_recvmsg, and MSG_PEEK leaves it unread.
  char urgent = 0;
  ssize_t got = ::recv(sock, &urgent, 1, MSG_OOB | MSG_PEEK | MSG_DONTWAIT);
  if (got == 1 || (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) {
    why = cat(conn,
              got == 1 ? " has an urgent byte (MSG_OOB) not read yet"
                       : " was told of urgent data (MSG_OOB) that has not arrived yet",
              ", which lazycr does not restore");
    return false;
  }
  if (ioctl_int(sock, SIOCATMARK, conn, "SIOCATMARK") != 0) {
    why = cat(conn,
              " is at its urgent mark (SIOCATMARK), which lazycr does not restore (urgent data)");
    return false;
  }
  int peek_off = get_int(sock, SOL_SOCKET, SO_PEEK_OFF, conn, "SO_PEEK_OFF");
  if (peek_off >= 0) {
    why = cat(conn, " has SO_PEEK_OFF set (", peek_off, "), which lazycr does not restore");
    return false;
  }
  const bool reuseaddr = get_int(sock, SOL_SOCKET, SO_REUSEADDR, conn, "SO_REUSEADDR") != 0;
  out.set_reuseaddr(reuseaddr);
  int on = TCP_REPAIR_ON;
  if (::setsockopt(sock, IPPROTO_TCP, TCP_REPAIR, &on, sizeof on) != 0) {
    why = cat(conn, ": TCP_REPAIR refused (", std::strerror(errno),
              "; it needs CAP_NET_ADMIN in the socket's network namespace)");
    return false;
  }
  UniqueFd copy(::fcntl(sock, F_DUPFD_CLOEXEC, 0));
  if (!copy) {
    int off = TCP_REPAIR_OFF;
    ::setsockopt(sock, IPPROTO_TCP, TCP_REPAIR, &off, sizeof off);
    fail_errno(conn, ": dup");
  }
  hold.add(std::move(copy), conn, reuseaddr);

  // Packets may still arrive (the peer is not frozen): read until two passes agree.
  QueueSnapshot q = read_queues(sock, conn);
  for (int i = 0;; i++) {
    QueueSnapshot again = read_queues(sock, conn);
    if (again == q && again.sendq == q.sendq && again.recvq == q.recvq) break;
    if (i == 20) fail(conn, ": its queues kept changing while read (the peer is busy)");
    q = std::move(again);
  }
  if (q.sendq.size() != static_cast<size_t>(q.outq) || q.recvq.size() != static_cast<size_t>(q.inq))
    fail(conn, ": peeked ", q.sendq.size(), "/", q.recvq.size(),
         " bytes of its send/receive "
         "queues where the kernel reports ",
         q.outq, "/", q.inq);
  t.set_state(kTcpEstablished);
  t.set_send_seq(q.write_seq - static_cast<uint32_t>(q.outq));
  t.set_recv_seq(q.rcv_nxt - static_cast<uint32_t>(q.inq));
  t.set_send_queue(std::move(q.sendq));
  t.set_unsent(static_cast<uint32_t>(q.notsent));
  t.set_recv_queue(std::move(q.recvq));
  t.set_mss(static_cast<uint32_t>(get_int(sock, IPPROTO_TCP, TCP_MAXSEG, conn, "TCP_MAXSEG")));
  t.set_sack(ti.tcpi_options & TCPI_OPT_SACK);
  t.set_timestamps(ti.tcpi_options & TCPI_OPT_TIMESTAMPS);
  t.set_wscale(ti.tcpi_options & TCPI_OPT_WSCALE);
  if (t.wscale()) {
    t.set_snd_wscale(ti.tcpi_snd_wscale);
    t.set_rcv_wscale(ti.tcpi_rcv_wscale);
  }
  if (t.timestamps())
    t.set_timestamp(
        static_cast<uint32_t>(get_int(sock, IPPROTO_TCP, TCP_TIMESTAMP, conn, "TCP_TIMESTAMP")));
  tcp_repair_window w{};
  len = sizeof w;
  if (::getsockopt(sock, IPPROTO_TCP, TCP_REPAIR_WINDOW, &w, &len) != 0)
    fail_errno(conn, ": getsockopt(TCP_REPAIR_WINDOW)");
  t.set_snd_wl1(w.snd_wl1);
  t.set_snd_wnd(w.snd_wnd);
  t.set_max_window(w.max_window);
  t.set_rcv_wnd(w.rcv_wnd);
  t.set_rcv_wup(w.rcv_wup);
  return true;
}

void validate_tcp_connection(const InetSocket& s, bool allowed) {
  const TcpConnection& t = s.tcp();
  const std::string what = cat("socket:[", s.inode(), "] (TCP connection)");
  if (s.type() != SOCK_STREAM || s.listening() || s.local_port() == 0 || s.queued_size() > 0 ||
      !s.peer_addr().empty())
    fail(what, ": a connection must be a bound TCP socket, not listening, with no datagrams");
  const size_t alen = s.family() == AF_INET ? 4 : 16;
  if (s.local_addr().size() != alen)
    fail(what, ": local address of ", s.local_addr().size(), " bytes (", alen, " expected)");
  if (t.peer_addr().size() != alen)
    fail(what, ": peer address of ", t.peer_addr().size(), " bytes (", alen, " expected)");
  if (t.peer_port() == 0 || t.peer_port() > 65535)
    fail(what, ": peer port ", t.peer_port(), " is out of range");
  if (t.state() != kTcpEstablished)
    fail(what, ": state ", t.state(), " (", state_name(t.state()), ") is not ESTABLISHED");
  if (t.send_queue().size() + t.recv_queue().size() > image::kMaxSocketQueuedBytes)
    fail(what, ": ", t.send_queue().size(), " + ", t.recv_queue().size(),
         " queued bytes exceed the bound ", image::kMaxSocketQueuedBytes);
  if (t.unsent() > t.send_queue().size())
    fail(what, ": ", t.unsent(), " unsent bytes of a send queue of ", t.send_queue().size());
  if (t.mss() == 0 || t.mss() > 65535) fail(what, ": MSS ", t.mss(), " is out of range");
  if (!t.wscale() && (t.snd_wscale() != 0 || t.rcv_wscale() != 0))
    fail(what, ": window scales without window scaling");
  if (t.snd_wscale() > kMaxWscale || t.rcv_wscale() > kMaxWscale)
    fail(what, ": window scale ", t.snd_wscale(), "/", t.rcv_wscale(), " exceeds ", kMaxWscale);
  if (!t.timestamps() && t.timestamp() != 0) fail(what, ": a timestamp without timestamps");
  const uint32_t max_wnd = 65535u << kMaxWscale;
  if (t.snd_wnd() > max_wnd || t.rcv_wnd() > max_wnd || t.max_window() > max_wnd)
    fail(what, ": window ", t.snd_wnd(), "/", t.rcv_wnd(), "/", t.max_window(), " exceeds ",
         max_wnd);
  if (!allowed)
    fail(describe_tcp_connection(s), " (socket:[", s.inode(),
         "]) is an established TCP connection: restoring it needs --tcp-established");
}

void enter_repair(int fd, const std::string& what) {
  set_int(fd, IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON, what, "TCP_REPAIR");
}

void finish_in_repair(int fd, const InetSocket& s, const std::string& what) {
  const TcpConnection& t = s.tcp();
  set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, what, "TCP_REPAIR_QUEUE");
  set_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, static_cast<int>(t.send_seq()), what, "TCP_QUEUE_SEQ");
  set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, what, "TCP_REPAIR_QUEUE");
  set_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, static_cast<int>(t.recv_seq()), what, "TCP_QUEUE_SEQ");
  set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, what, "TCP_REPAIR_QUEUE");
  sockaddr_storage ss;
  socklen_t len = sockaddr_of(s.family(), t.peer_addr(), t.peer_port(), ss);
  // In repair mode connect sends nothing: the socket is ESTABLISHED at once.
  if (::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    if (errno == EADDRNOTAVAIL || errno == EADDRINUSE)
      fail(what, ": the same connection still exists in this network namespace (connect: ",
           std::strerror(errno),
           "); is the original still running? restore --netns puts the "
           "tree in a fresh one");
    fail_errno(what, ": connect in repair mode");
  }
  std::vector<tcp_repair_opt> opts;
  opts.push_back({TCPOPT_MAXSEG, t.mss()});
  if (t.wscale()) opts.push_back({TCPOPT_WINDOW, t.snd_wscale() | (t.rcv_wscale() << 16)});
  if (t.sack()) opts.push_back({TCPOPT_SACK_PERMITTED, 0});
  if (t.timestamps()) opts.push_back({TCPOPT_TIMESTAMP, 0});
  if (::setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts.data(),
                   static_cast<socklen_t>(opts.size() * sizeof(tcp_repair_opt))) != 0)
    fail_errno(what, ": setsockopt(TCP_REPAIR_OPTIONS)");
  if (t.timestamps())
    set_int(fd, IPPROTO_TCP, TCP_TIMESTAMP, static_cast<int>(t.timestamp()), what, "TCP_TIMESTAMP");
  // Room for both queues whatever the image's sizes (TcpRestoreBatch::finish sets them).
  set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE, kRefillBuffer, what, "SO_SNDBUFFORCE");
  set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE, kRefillBuffer, what, "SO_RCVBUFFORCE");
  // The sent part of the send queue as sent, not acknowledged (retransmitted if the peer does
  // not acknowledge it); the unsent part goes out once repair is off.
  const size_t sent = t.send_queue().size() - t.unsent();
  refill(fd, TCP_SEND_QUEUE, t.send_queue().substr(0, sent), what, "send");
  refill(fd, TCP_RECV_QUEUE, t.recv_queue(), what, "receive");
  // The window last: the kernel checks it against rcv_nxt, which the receive queue moved.
  tcp_repair_window w{};
  w.snd_wl1 = t.snd_wl1();
  w.snd_wnd = t.snd_wnd();
  w.max_window = t.max_window();
  w.rcv_wnd = t.rcv_wnd();
  w.rcv_wup = t.rcv_wup();
  if (::setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &w, sizeof w) != 0)
    fail_errno(what, ": setsockopt(TCP_REPAIR_WINDOW) (snd_wl1 ", w.snd_wl1, ", snd_wnd ",
               w.snd_wnd, ", max_window ", w.max_window, ", rcv_wnd ", w.rcv_wnd, ", rcv_wup ",
               w.rcv_wup, ")");
}

void TcpRestoreBatch::add(int fd, const InetSocket& s, const std::string& what) {
  UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!copy) fail_errno(what, ": dup");
  pending_.push_back({std::move(copy), &s, what});
}

void TcpRestoreBatch::finish() {
  for (Pending& p : pending_) {
    // Repair off sends a window probe: the peer answers with its window.
    set_int(p.fd.get(), IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF, p.what, "TCP_REPAIR");
    // Repair off clears SO_REUSEADDR (repair mode had forced it).
    if (p.s->reuseaddr()) set_int(p.fd.get(), SOL_SOCKET, SO_REUSEADDR, 1, p.what, "SO_REUSEADDR");
  }
  for (Pending& p : pending_) {
    const TcpConnection& t = p.s->tcp();
    const std::string unsent = t.send_queue().substr(t.send_queue().size() - t.unsent());
    size_t done = 0;
    while (done < unsent.size()) {
      ssize_t n = ::send(p.fd.get(), unsent.data() + done, unsent.size() - done,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        fail_errno(p.what, ": queueing its ", unsent.size(), " unsent bytes again (", done, " in)");
      done += static_cast<size_t>(n);
    }
    set_buffer(p.fd.get(), SO_SNDBUF, SO_SNDBUFFORCE, p.s->sndbuf(), p.what, "SO_SNDBUFFORCE");
    set_buffer(p.fd.get(), SO_RCVBUF, SO_RCVBUFFORCE, p.s->rcvbuf(), p.what, "SO_RCVBUFFORCE");
  }
  pending_.clear();
}

std::string describe_tcp_connection(const InetSocket& s) {
  const TcpConnection& t = s.tcp();
  std::string out = cat("TCP/", s.family() == AF_INET ? "IPv4" : "IPv6", " connection ",
                        describe_inet_address(s.family(), s.local_addr(), s.local_port()), " <-> ",
                        describe_inet_address(s.family(), t.peer_addr(), t.peer_port()));
  if (!t.recv_queue().empty() || !t.send_queue().empty())
    out += cat(" (", t.recv_queue().size(), " bytes unread, ", t.send_queue().size() - t.unsent(),
               " unacknowledged, ", t.unsent(), " unsent)");
  return out;
}

}  // namespace lazycr::objects
