// AF_UNIX sockets: connected pairs (socketpair, or connect/accept inside the tree) with their
// queues; sockets bound to a path or an abstract name, unconnected or listening, with the
// connections waiting in a listener's accept queue whose client ends are in the tree; datagram
// sockets connected to a bound socket (of the tree, or outside it with --ext-unix-sk, as CRIU).
// One unit for the family, both halves: the dump reads each socket through sock_diag and
// lazycr's own descriptor of it (pidfd_getfd, the tree frozen) into an image::UnixSocket
// (shared.pb, keyed by inode); the restore makes them all again in lazycr, before any process
// exists, and restore/shared_files.cc hands them to every holder. Registered as
// kUnixSocketFamily (objects/socket_families.h).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/sock_diag.h"
#include "image-format/shared.pb.h"
#include "objects/socket_families.h"

namespace lazycr::objects {

struct UnixDump {
  std::map<uint64_t, image::UnixSocket> sockets;  // restorable, by inode
  std::map<uint64_t, std::string> why_not;        // refused, by inode: what lazycr cannot do
};

// Dump: every socket of `held` (each one is in `diag`); queues are peeked, nothing consumed.
// `ext_unix_sk`: a datagram socket connected to a bound socket outside the tree is recorded to
// be connected to that name again at restore, instead of being refused.
UnixDump dump_unix_sockets(const std::map<uint64_t, HeldSocket>& held,
                           const std::map<uint64_t, sockdiag::UnixSocket>& diag, bool ext_unix_sk);

// Restore: throws naming the field of `s` that is out of bounds (alone; the relations between
// sockets are checked by create_unix_sockets).
void validate_unix_socket(const image::UnixSocket& s);

// Restore: what create_unix_sockets is given.
struct UnixRestore {
  // The image's sockets held by descriptors, by inode, with who holds each ("pid 7 fd 3").
  std::map<uint64_t, std::pair<const image::UnixSocket*, std::string>> held;
  bool ext_unix_sk = false;  // restore --ext-unix-sk
  // Runs `f` with the file-system identity of the (first) holder of socket `inode`: a path is
  // bound as the process would bind it (its permissions, its ownership).
  std::function<void(uint64_t inode, const std::function<void()>& f)> as_holder;
};

// Restore: every socket of `in.held`, close-on-exec, blocking (the caller sets the status
// flags), by inode. Checks first, before making anything, that every path to bind is free or
// a stale socket nobody listens on (unlinked then); throws naming the socket and why.
// Sockets made only to queue data (the gone peer of a pair) are closed before it returns.
std::map<uint64_t, UniqueFd> create_unix_sockets(const UnixRestore& in);

// "stream socket listening on /tmp/x (backlog 5, 2 pending)", "datagram socket bound to @name",
// for messages and `lazycr show`; "" for a plain connected end.
std::string describe_unix_socket(const image::UnixSocket& s);
// A bound address as text: the path, or "@" + the abstract name.
std::string unix_name_text(const std::string& name);

}  // namespace lazycr::objects
