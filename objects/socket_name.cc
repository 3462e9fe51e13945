#include "objects/socket_name.h"

#include <arpa/inet.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>

#include "common/error.h"

namespace lazycr::objects {
namespace {

// Every socket type lazycr names, both ways.
struct SocketTypeName {
  int type;
  const char* text;      // "a stream socket"
  const char* constant;  // "socket(AF_UNIX, SOCK_STREAM)"
};
constexpr SocketTypeName kSocketTypeNames[] = {
    {SOCK_STREAM, "stream", "SOCK_STREAM"},
    {SOCK_DGRAM, "datagram", "SOCK_DGRAM"},
    {SOCK_SEQPACKET, "seqpacket", "SOCK_SEQPACKET"},
    {SOCK_RAW, "raw", "SOCK_RAW"},
};

int sockopt(int sock, int name) {
  int v = -1;
  socklen_t len = sizeof v;
  if (::getsockopt(sock, SOL_SOCKET, name, &v, &len) != 0) return -1;
  return v;
}

std::string family_name(int domain) {
  switch (domain) {
    case AF_UNIX:
      return "UNIX";
    case AF_INET:
      return "IPv4";
    case AF_INET6:
      return "IPv6";
    case AF_NETLINK:
      return "netlink";
    case AF_PACKET:
      return "packet";
    default:
      return cat("family ", domain);
  }
}

std::string type_name(int domain, int type, int protocol) {
  if (domain == AF_INET || domain == AF_INET6) {
    if (type == SOCK_STREAM && (protocol == IPPROTO_TCP || protocol == 0)) return "TCP";
    if (type == SOCK_DGRAM && (protocol == IPPROTO_UDP || protocol == 0)) return "UDP";
    if (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6) return "ICMP";
    if (type == SOCK_RAW) return cat("raw (protocol ", protocol, ")");
    if (protocol == IPPROTO_SCTP) return "SCTP";
  }
  return socket_type_text(type);
}

std::string netlink_protocol(int protocol) {
  switch (protocol) {
    case NETLINK_ROUTE:
      return "NETLINK_ROUTE";
    case NETLINK_SOCK_DIAG:
      return "NETLINK_SOCK_DIAG";
    case NETLINK_AUDIT:
      return "NETLINK_AUDIT";
    case NETLINK_KOBJECT_UEVENT:
      return "NETLINK_KOBJECT_UEVENT";
    case NETLINK_GENERIC:
      return "NETLINK_GENERIC";
    default:
      return cat("netlink protocol ", protocol);
  }
}

// "" when the address is unset (unbound, unconnected).
std::string address(const sockaddr_storage& ss, socklen_t len) {
  char text[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_INET && len >= sizeof(sockaddr_in)) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(ss);
    if (a.sin_port == 0 && a.sin_addr.s_addr == 0) return "";
    ::inet_ntop(AF_INET, &a.sin_addr, text, sizeof text);
    return cat(text, ":", ntohs(a.sin_port));
  }
  if (ss.ss_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(ss);
    if (a.sin6_port == 0 && IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) return "";
    ::inet_ntop(AF_INET6, &a.sin6_addr, text, sizeof text);
    return cat("[", text, "]:", ntohs(a.sin6_port));
  }
  if (ss.ss_family == AF_UNIX) {
    const auto& a = reinterpret_cast<const sockaddr_un&>(ss);
    size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    if (n == 0) return "";
    if (a.sun_path[0] == '\0') return cat("@", std::string(a.sun_path + 1, n - 1));
    return std::string(a.sun_path, ::strnlen(a.sun_path, n));
  }
  if (ss.ss_family == AF_NETLINK) {
    const auto& a = reinterpret_cast<const sockaddr_nl&>(ss);
    return a.nl_pid == 0 ? "" : cat("port id ", a.nl_pid);
  }
  return "";
}

}  // namespace

std::string socket_type_text(int type) {
  for (const SocketTypeName& t : kSocketTypeNames)
    if (t.type == type) return t.text;
  return cat("type ", type);
}

std::string socket_type_constant(int type) {
  for (const SocketTypeName& t : kSocketTypeNames)
    if (t.type == type) return t.constant;
  return cat("type ", type);
}

std::string describe_socket(int sock) {
  int domain = sockopt(sock, SO_DOMAIN), type = sockopt(sock, SO_TYPE);
  int protocol = sockopt(sock, SO_PROTOCOL);
  if (domain < 0 || type < 0) return "socket";
  std::string what = domain == AF_NETLINK ? cat("netlink socket (", netlink_protocol(protocol), ")")
                                          : cat(type_name(domain, type, protocol), "/",
                                                family_name(domain), " socket");
  sockaddr_storage local{}, peer{};
  socklen_t llen = sizeof local, plen = sizeof peer;
  std::string here = ::getsockname(sock, reinterpret_cast<sockaddr*>(&local), &llen) == 0
                         ? address(local, llen)
                         : "";
  std::string there = ::getpeername(sock, reinterpret_cast<sockaddr*>(&peer), &plen) == 0
                          ? address(peer, plen)
                          : "";
  if (sockopt(sock, SO_ACCEPTCONN) == 1)
    return cat(what, " listening on ", here.empty() ? "an unnamed address" : here);
  if (!there.empty())
    return cat(what, " connected", here.empty() ? "" : cat(" from ", here), " to ", there);
  if (!here.empty()) return cat(what, " bound to ", here);
  return cat(what, " (unbound)");
}

}  // namespace lazycr::objects
