// Client ends of sockets for the end-to-end tests (tcp_e2e, unix_e2e, inet_e2e, servers_e2e):
// a socket made in another process's network namespace, addresses, and one request/reply
// exchange with a server of a target.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <functional>
#include <string>

namespace lazycr::test {

// A socket of `family` and `type`, close-on-exec, made in the network namespace of
// `netns_of` (ours when 0); -1 and a test failure when that namespace cannot be entered.
int socket_in(int family, int type, pid_t netns_of = 0);

// ip:port of `family` (AF_INET, AF_INET6) in `ss`; returns its length.
socklen_t inet_address(int family, const std::string& ip, int port, sockaddr_storage& ss);
// The AF_UNIX address of `path` in `ss`; returns its length.
socklen_t unix_address(const std::string& path, sockaddr_storage& ss);

// Connects `fd` (closed on return) to `addr`, writes `request`, and reads until
// `done(reply so far)` holds or until the server closes. Empty when the connection fails.
std::string exchange(int fd, const sockaddr_storage& addr, socklen_t len,
                     const std::string& request,
                     const std::function<bool(const std::string&)>& done = nullptr);

// exchange() over TCP with ip:port, from the network namespace of `netns_of` (ours when 0).
std::string tcp_exchange(int family, const std::string& ip, int port, const std::string& request,
                         pid_t netns_of = 0,
                         const std::function<bool(const std::string&)>& done = nullptr);

// A TCP connection to 127.0.0.1:port, tried every 10 ms up to `tries` times while nobody
// listens there (a server starting); -1 when it never connects.
int connect_when_listening(int port, int tries);

// A loopback port nobody uses now (the kernel's pick for a socket bound to port 0, released).
int free_port();

}  // namespace lazycr::test
