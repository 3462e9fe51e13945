#include "tests/e2e/socket_helpers.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace lazycr::test {

int socket_in(int family, int type, pid_t netns_of) {
  int old = -1;
  if (netns_of > 0) {
    old = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    int ns =
        ::open(("/proc/" + std::to_string(netns_of) + "/ns/net").c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0 || ::setns(ns, CLONE_NEWNET) != 0) {
      ADD_FAILURE() << "setns into the network namespace of pid " << netns_of << ": "
                    << strerror(errno);
      if (ns >= 0) ::close(ns);
      ::close(old);
      return -1;
    }
    ::close(ns);
  }
  int fd = ::socket(family, type | SOCK_CLOEXEC, 0);
  if (old >= 0) {
    if (::setns(old, CLONE_NEWNET) != 0) ADD_FAILURE() << "setns back: " << strerror(errno);
    ::close(old);
  }
  return fd;
}

socklen_t inet_address(int family, const std::string& ip, int port, sockaddr_storage& ss) {
  ss = {};
  if (family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(static_cast<uint16_t>(port));
    ::inet_pton(AF_INET, ip.c_str(), &a->sin_addr);
    return sizeof *a;
  }
  auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
  a->sin6_family = AF_INET6;
  a->sin6_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET6, ip.c_str(), &a->sin6_addr);
  return sizeof *a;
}

socklen_t unix_address(const std::string& path, sockaddr_storage& ss) {
  ss = {};
  auto* a = reinterpret_cast<sockaddr_un*>(&ss);
  a->sun_family = AF_UNIX;
  std::memcpy(a->sun_path, path.data(), std::min(path.size(), sizeof a->sun_path - 1));
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
}

std::string exchange(int fd, const sockaddr_storage& addr, socklen_t len,
                     const std::string& request,
                     const std::function<bool(const std::string&)>& done) {
  if (fd < 0) return "";
  std::string got;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0) {
    size_t off = 0;
    while (off < request.size()) {
      ssize_t n = ::write(fd, request.data() + off, request.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    char buf[65536];
    ssize_t n;
    while (!(done && done(got)) && (n = ::read(fd, buf, sizeof buf)) > 0)
      got.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return got;
}

std::string tcp_exchange(int family, const std::string& ip, int port, const std::string& request,
                         pid_t netns_of, const std::function<bool(const std::string&)>& done) {
  sockaddr_storage ss;
  socklen_t len = inet_address(family, ip, port, ss);
  return exchange(socket_in(family, SOCK_STREAM, netns_of), ss, len, request, done);
}

int connect_when_listening(int port, int tries) {
  sockaddr_storage a;
  socklen_t len = inet_address(AF_INET, "127.0.0.1", port, a);
  for (int i = 0; i < tries; i++) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), len) == 0) return fd;
    ::close(fd);
    ::usleep(10000);
  }
  return -1;
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

}  // namespace lazycr::test
