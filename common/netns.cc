#include "common/netns.h"

#include <fcntl.h>
#include <net/if.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace lazycr {
namespace {

UniqueFd own_netns() {
  UniqueFd fd(::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
  if (!fd) fail_errno("open /proc/thread-self/ns/net");
  return fd;
}

void go_back(int old) {
  if (::setns(old, CLONE_NEWNET) != 0) {
    // Going on in the wrong namespace would put lazycr's later sockets there.
    std::fprintf(stderr, "lazycr: setns back to lazycr's network namespace failed: %s\n",
                 std::strerror(errno));
    std::abort();
  }
}

}  // namespace

UniqueFd make_network_namespace() {
  UniqueFd old = own_netns();
  if (::unshare(CLONE_NEWNET) != 0) fail_errno("unshare(CLONE_NEWNET) for --netns");
  UniqueFd made;
  try {
    made = own_netns();
    UniqueFd s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!s) fail_errno("socket in the new network namespace");
    ifreq ifr{};
    std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    if (::ioctl(s.get(), SIOCGIFFLAGS, &ifr) != 0)
      fail_errno("SIOCGIFFLAGS of lo in the new network namespace");
    ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);
    if (::ioctl(s.get(), SIOCSIFFLAGS, &ifr) != 0)
      fail_errno("bringing lo up in the new network namespace (SIOCSIFFLAGS)");
  } catch (...) {
    go_back(old.get());
    throw;
  }
  go_back(old.get());
  return made;
}

InNetworkNamespace::InNetworkNamespace(int ns) {
  if (ns < 0) return;
  old_ = own_netns();
  if (::setns(ns, CLONE_NEWNET) != 0) fail_errno("setns into the restore's network namespace");
}

InNetworkNamespace::~InNetworkNamespace() {
  if (old_) go_back(old_.get());
}

}  // namespace lazycr
