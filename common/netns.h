// Network namespaces for `restore --netns`: lazycr makes a fresh one with loopback up and
// enters it only for a moment, on the calling thread, to create sockets in it and to clone
// the restored tree's first process into it; lazycr itself stays where it was.
#pragma once

#include "common/fd.h"

namespace lazycr {

// A new network namespace with `lo` up; the calling thread is back in its own on return.
// Throws Error (unshare needs CAP_SYS_ADMIN).
UniqueFd make_network_namespace();

// The calling thread in network namespace `ns` for the object's lifetime, then back in the
// one it was in (if it cannot get back, lazycr must not go on: it aborts). `ns` < 0: nothing.
class InNetworkNamespace {
 public:
  explicit InNetworkNamespace(int ns);
  ~InNetworkNamespace();
  InNetworkNamespace(const InNetworkNamespace&) = delete;
  InNetworkNamespace& operator=(const InNetworkNamespace&) = delete;

 private:
  UniqueFd old_;
};

}  // namespace lazycr
