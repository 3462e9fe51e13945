// Socket families: one unit per family holding both halves (objects/unix_socket.cc,
// objects/inet_socket.cc with its TCP parts), registered in one table (socket_families.cc),
// as objects/fd_kinds.h does for the other descriptor kinds. The dump (checkpoint/shared.cc)
// offers every socket of the tree to each family in turn; the restore
// (restore/validate.cc, restore/shared_files.cc) asks each to check its records, to make its
// sockets and then to finish them. Neither names a family, so adding the next one is adding
// one file and one table entry.
//
// A family works on all its sockets at once, not one socket at a time: its sockets lead to
// each other (a UNIX pair, a listener and its queued clients, two ends of a TCP connection in
// the tree). Restore order: every family's create(), then every family's finish(): what must
// wait until every socket of the image exists (TCP repair turned off for all connections
// together, queued clients connecting to their listener) goes in finish().
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>

#include "common/fd.h"
#include "image-format/shared.pb.h"

namespace lazycr::objects {

class TcpRepairHold;

struct SocketOptions {
  bool tcp_established = false;  // dump/restore --tcp-established
  bool ext_unix_sk = false;      // dump/restore --ext-unix-sk
};

// Dump: one socket held in the tree.
struct HeldSocket {
  pid_t pid = 0;                   // a holder (its root is where a bound path is looked up)
  std::function<UniqueFd()> open;  // lazycr's descriptor of it (throws on failure)
};

// What a family's dump half is given, while the whole tree is frozen, and what it gives back.
struct SocketDump {
  // The tree's sockets no earlier family of the table took, by inode. A family erases the
  // ones it takes, and records each either in `out` (and `restorable`) or in `why_not`.
  std::map<uint64_t, HeldSocket> untaken;
  SocketOptions opts;
  TcpRepairHold* tcp_repair = nullptr;  // connections left in repair mode until the dump ends
  image::SharedObjects* out = nullptr;
  std::set<uint64_t> restorable;
  std::map<uint64_t, std::string> why_not;  // by inode: what lazycr cannot do
};

// A family's restore half, for one restore.
class SocketRestore {
 public:
  virtual ~SocketRestore() = default;
  // Whether the image records socket `inode` in this family.
  virtual bool has(uint64_t inode) const = 0;
  // restore --shell-job: whether socket `inode`, held at 0-2, leads outside the tree
  // (`held`: every socket a descriptor of the image holds).
  virtual bool leads_outside(uint64_t, const std::set<uint64_t>&) const { return false; }
  // Makes the family's sockets held by descriptors (`held`: inode -> who holds it, "pid 7 fd
  // 3"), close-on-exec, blocking (the caller sets the status flags); by inode. `as_holder`
  // runs `f` with the file-system identity of the holder of socket `inode`.
  virtual std::map<uint64_t, UniqueFd> create(
      const std::map<uint64_t, std::string>& held,
      const std::function<void(uint64_t inode, const std::function<void()>& f)>& as_holder) = 0;
  // Once every socket of every family exists.
  virtual void finish() {}
};

struct SocketFamily {
  const char* name;  // for messages: "UNIX", "IPv4/IPv6"
  // Dump: takes this family's sockets of `d.untaken` (see SocketDump).
  void (*dump)(SocketDump& d);
  // Restore: throws naming the record of `shared` that is out of bounds or that the restore
  // was not asked for.
  void (*validate)(const image::SharedObjects& shared, const SocketOptions& opts);
  std::unique_ptr<SocketRestore> (*restore)(const image::SharedObjects& shared,
                                            const SocketOptions& opts);
};

// Every family, in the order the dump offers sockets to them.
std::span<const SocketFamily* const> socket_families();

// Each family, one file each.
extern const SocketFamily kUnixSocketFamily, kInetSocketFamily;

}  // namespace lazycr::objects
