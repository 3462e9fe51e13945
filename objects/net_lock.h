// The network lock: between a dump that kills the tree and the restore, no socket exists for
// the tree's established TCP connections, and a peer outside the tree that sends in that gap
// would get a reset from its kernel. As CRIU does, the incoming packets of each connection
// are dropped by netfilter meanwhile; the peer retransmits them, and the restored socket
// receives them once the lock is gone.
//
// nf_tables through libnftables (loaded with dlopen, only when a lock is needed): table `inet
// lazycr` with two sets of 4-tuples (conns4, conns6: source address . source port . destination
// address . destination port of the incoming packets) and one input-hook chain (priority raw) with
// one drop rule per set. A connection is locked by adding its element and unlocked by deleting it,
// so that dumps and restores running at once never take away each other's locks; the table, once
// made, stays (empty, it drops nothing).
#pragma once

#include <string>
#include <vector>

#include "image-format/shared.pb.h"

namespace lazycr::objects {

// Dump: locks the connections of `all` (the InetSockets with `tcp`) in lazycr's network
// namespace; throws naming what nftables refused. Unlocks them again when destroyed, unless
// keep() was called (the tree is dead; the restore unlocks them).
class NetworkLock {
 public:
  explicit NetworkLock(const google::protobuf::RepeatedPtrField<image::InetSocket>& all);
  ~NetworkLock();
  NetworkLock(const NetworkLock&) = delete;
  NetworkLock& operator=(const NetworkLock&) = delete;
  void keep() { elements_.clear(); }
  size_t size() const { return elements_.size(); }

 private:
  std::vector<std::string> elements_;  // "conns4 { a . p . b . q }"
};

// Restore, once the connections are out of repair mode: deletes the lock of each connection of
// `all` in lazycr's current network namespace where there is one (none: restored elsewhere,
// e.g. --netns, or dumped with --leave-running). Never throws; a failure is logged.
void unlock_connections(const google::protobuf::RepeatedPtrField<image::InetSocket>& all);

// For `lazycr check`: whether nftables answers in lazycr's network namespace (a read-only
// listing of its tables); `detail` says what was found or what failed.
bool network_lock_available(std::string& detail);

}  // namespace lazycr::objects
