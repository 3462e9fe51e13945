// AF_UNIX sockets as the kernel's sock_diag interface (NETLINK_SOCK_DIAG, UNIX_DIAG) reports
// them: type, state, bound name, peer, queue lengths, shutdown state. It sees the sockets of
// lazycr's own network namespace only.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lazycr::sockdiag {

struct UnixSocket {
  uint64_t inode = 0;
  int type = 0;                 // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
  int state = 0;                // TCP_ESTABLISHED (1), TCP_CLOSE (7), TCP_LISTEN (10)
  std::string name;             // bound address: a path, or '\0' + abstract name; "" if unbound
  uint64_t peer = 0;            // inode of the connected peer, 0 if none
  uint32_t rqueue = 0;          // listening: pending connections; else bytes readable (a DGRAM
                                // socket reports the first datagram only)
  uint32_t wqueue = 0;          // listening: backlog; else bytes sent not yet read by the peer
  bool shutdown_read = false;   // RCV_SHUTDOWN
  bool shutdown_write = false;  // SEND_SHUTDOWN
  std::vector<uint64_t> icons;  // listening: inodes of connections not accepted yet
  uint64_t vfs_dev = 0;         // bound to a path: the socket file's device and inode
  uint64_t vfs_ino = 0;         // (UNIX_DIAG_VFS), 0 otherwise
};

// Every AF_UNIX socket of the current network namespace, by inode. Throws Error if the
// netlink query fails.
std::map<uint64_t, UnixSocket> unix_sockets();

// Pure parser for tests and the fuzzer: one netlink message payload (struct unix_diag_msg
// followed by attributes). Throws on a malformed message.
UnixSocket parse_unix_diag_msg(const void* data, size_t len);

}  // namespace lazycr::sockdiag
