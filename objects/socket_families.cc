#include "objects/socket_families.h"

namespace lazycr::objects {
namespace {

// Every socket family lazycr restores. UNIX first: it takes the sockets sock_diag lists in
// lazycr's network namespace, which the others need not look at.
const SocketFamily* const kSocketFamilies[] = {&kUnixSocketFamily, &kInetSocketFamily};

}  // namespace

std::span<const SocketFamily* const> socket_families() {
  return kSocketFamilies;
}

}  // namespace lazycr::objects
