// AF_INET and AF_INET6 sockets that are not established connections: TCP listening, bound or
// fresh; UDP bound or connected, with the datagrams queued for reading and their source
// addresses. One unit for the family, both halves: the dump reads a socket through lazycr's
// own descriptor of it (pidfd_getfd, the tree frozen) into an image::InetSocket (shared.pb,
// keyed by inode like the UNIX sockets); the restore makes it again in lazycr, before any
// process exists, and restore/shared_files.cc hands it to every holder. Registered, with the
// TCP parts, as kInetSocketFamily (objects/inet_family.cc, objects/socket_families.h).
//
// Everything is read with getsockopt on the socket itself (TCP_INFO gives a listener's state,
// backlog and accept queue), so it works in any network namespace; nothing goes through
// sock_diag.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <string>

#include "common/fd.h"
#include "image-format/shared.pb.h"

namespace lazycr::objects {

// True for an AF_INET or AF_INET6 socket (`sock`: lazycr's descriptor of it).
bool is_inet_socket(int sock);

// Dump: fills `out` (the queue of a UDP socket is peeked, nothing is consumed) and returns true,
// or returns false with `why` saying what lazycr cannot restore (a connection without
// --tcp-established, a listener with connections not accepted yet, an option lazycr does not
// restore: "... has TCP_CORK set (1; a new socket has 0), which lazycr does not restore").
// The caller sets beforehand what objects/tcp_connection.h and objects/tcp_pending.h found:
// `out.tcp` for a connection, `out.accept_queue` for a listener whose queued connections are
// all made again, `out.pending_accept` for one of their clients.
bool dump_inet_socket(int sock, uint64_t inode, image::InetSocket& out, std::string& why);

// Restore: throws naming the field of `s` that is out of bounds.
void validate_inet_socket(const image::InetSocket& s);

// Restore: the socket made again in lazycr's current network namespace, close-on-exec, blocking
// (the caller sets the status flags); `who` names the holders for messages ("pid 7 fd 3").
// A UDP queue is put back with the recorded source addresses through a raw socket
// (IP_HDRINCL) over loopback, then read back (peeked) and compared; any difference fails.
UniqueFd create_inet_socket(const image::InetSocket& s, const std::string& who);

// "TCP/IPv4 socket listening on 127.0.0.1:8080", "UDP/IPv6 socket bound to [::]:5353 (3
// datagrams queued)": for messages and `lazycr show`.
std::string describe_inet_socket(const image::InetSocket& s);
// A sockaddr's address bytes (4 or 16) and port, and the IPv6 scope when `scope` is given;
// false for another family.
bool split_inet_address(const sockaddr_storage& ss, std::string& addr, uint32_t& port,
                        uint32_t* scope = nullptr);
// "127.0.0.1:8080", "[::1]:53" (raw: 4 or 16 address bytes; empty: the family's any-address).
std::string describe_inet_address(int family, const std::string& raw, uint32_t port);

}  // namespace lazycr::objects
