// TCP connections queued at a listener of the tree and not accepted yet, whose client is in
// the tree too. The kernel hands out a queued connection only through accept(), which would take
// it from the program (and change a --leave-running original), so its server end cannot be
// read. When nothing was sent on it either way, the connection holds nothing but its 4-tuple:
// the restore makes it again with a real connect() of the restored client (bound to its own
// address and port) to the restored listener, once every socket exists, and the restored
// program's accept() returns it. Anything else (a client outside the tree, bytes already sent,
// a client shut down or not ESTABLISHED, a client that could belong to two listeners) is
// refused by name.
//
// Records: the client is an image::InetSocket with `pending_accept` and `peer_addr/peer_port`
// naming the listener; the listener has `accept_queue` (shared.proto).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/fd.h"
#include "image-format/shared.pb.h"

namespace lazycr::objects {

// Dump: what the TCP sockets of the tree (`socks`: inode -> lazycr's descriptor of it, the tree
// frozen) say about the listeners' accept queues.
struct PendingAccepts {
  std::map<uint64_t, uint32_t> listeners;  // inode -> its accept queue, all clients of the tree
  std::set<uint64_t> clients;              // inodes of those clients
  // Listeners whose queue cannot be recreated, and their clients of the tree: the reason.
  std::map<uint64_t, std::string> why_not;
};
PendingAccepts find_pending_accepts(const std::map<uint64_t, int>& socks);

// Restore: throws naming the client when `s` (pending_accept) is not a bound TCP client whose
// peer is a listener of `all` (the image's inet sockets), or when a listener's accept_queue is
// not the number of clients that name it.
void validate_pending_accepts(const google::protobuf::RepeatedPtrField<image::InetSocket>& all);

// Restore, once every socket of the image exists: `fd` (the client made by
// create_inet_socket(), bound, not connected) connects to its listener; waits until the
// connection is queued there. Throws naming `what`.
void connect_pending(int fd, const image::InetSocket& s, const std::string& what);

}  // namespace lazycr::objects
