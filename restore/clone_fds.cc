#include "restore/clone_fds.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/netns.h"
#include "objects/objects.h"
#include "restore/calls.h"
#include "restore/fd_passing.h"
#include "restore/ghost_files.h"
#include "restore/open_files.h"
#include "restore/shared_files.h"

namespace lazycr::restore {
namespace {

// A listening socket of lazycr's in the abstract namespace, named after lazycr's pid and a
// counter, that the clone connects to once; the connection is checked to come from the clone.
struct Transport {
  UniqueFd ours;
  long theirs = -1;  // the clone's end, a number the image does not use
};

// `netns` >= 0: the clone's network namespace (abstract names are per namespace), else ours.
Transport connect_transport(Restoree& c, int netns) {
  static std::atomic<uint64_t> counter{0};
  sockaddr_un a;
  std::memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  const std::string name = cat("lazycr-clone-", ::getpid(), "-", counter++);
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  const socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  UniqueFd listener;
  {
    InNetworkNamespace in(netns);
    listener.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  }
  if (!listener) fail_errno("socket for the clone's descriptor transport");
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), len) != 0)
    fail_errno("bind of the descriptor transport @", name);
  if (::listen(listener.get(), 1) != 0) fail_errno("listen on @", name);
  Transport t;
  c.reset_arena();
  const uint64_t addr = c.push(&a, len);
  t.theirs = c.inject("socket for the descriptor transport", SYS_socket, AF_UNIX,
                      SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  const long rc = c.inject_raw(SYS_connect, static_cast<uint64_t>(t.theirs), addr, len);
  if (rc != 0) {
    c.inject("close of the descriptor transport", SYS_close, static_cast<uint64_t>(t.theirs));
    fail_errno_value(static_cast<int>(-rc), cat("connect to the descriptor transport @", name));
  }
  t.ours.reset(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
  if (!t.ours) fail_errno("accept on the descriptor transport @", name);
  ucred cred{};
  socklen_t cl = sizeof cred;
  if (::getsockopt(t.ours.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || cred.pid != c.pid())
    fail("the descriptor transport @", name, " was connected by pid ", cred.pid,
         ", not by the clone ", c.pid());
  return t;
}

}  // namespace

void check_clone_fd(const image::Process& p, const image::FileDescriptor& f,
                    const image::SharedObjects& shared, bool shell_job) {
  const std::string where = cat("pid ", p.pid(), " fd ", f.fd(), " (", f.target(), ")");
  if (f.locks_size() != 0) fail(where, " holds locks: every clone would hold them");
  if (f.pty_end() != image::FileDescriptor::NOT_PTY_PAIR)
    fail(where, " is a pseudo-terminal: not made afresh per clone yet");
  if (!f.restorable() && !(shell_job && f.fd() <= 2))
    fail(where, " cannot be restored",
         f.fd() <= 2 ? " (template --shell-job gives clones the requester's)" : "");
  if (f.kind() == image::FileDescriptor::SOCKET)
    for (const auto& s : shared.inet_sockets())
      if (s.inode() == f.object_inode() && s.has_tcp())
        fail(where, " is an established TCP connection: clones cannot each have it");
}

CloneFiles::CloneFiles(const image::ImageReader& img, int sockets_netns, bool shell_job,
                       bool ghosts_always) {
  // Ghost files (deleted files, memfds) are recreated from the image's contents for this clone
  // alone: its descriptors get their own file, as a restore of its own would; lazycr's
  // references go with this object (the clone holds the descriptions by then).
  bool has_ghost_fd = ghosts_always;
  for (const auto& q : img.processes())
    for (const auto& f : q.fds()) has_ghost_fd |= f.ghost_id() != 0;
  if (has_ghost_fd) ghosts = std::make_unique<GhostFiles>(img.processes(), img.shared());
  InNetworkNamespace in(sockets_netns);
  shared = std::make_unique<SharedFiles>(img.processes(), img.shared(), shell_job, ghosts.get());
}

CloneFiles::~CloneFiles() = default;

int replace_clone_fds(Restoree& c, const image::Process& p, const CloneFiles& files, int netns,
                      int transport_netns, const int (&std_fds)[3]) {
  const SharedFiles* shared = files.shared.get();
  std::vector<const image::FileDescriptor*> passed, opened;
  std::vector<OpenRequest> reqs;
  std::vector<int> mine;
  for (const auto& f : p.fds()) {
    const FdPlan plan = shared->plan(p.pid(), f);
    switch (plan.source) {
      case FdPlan::kShared:
        passed.push_back(&f);
        mine.push_back(plan.fd);
        break;
      case FdPlan::kOpenInside:
        reqs.push_back(request_for_fd(f));
        opened.push_back(&f);
        break;
      case FdPlan::kObjects:  // epoll sets: made inside below
        break;
      case FdPlan::kLazycrStd:
        if (plan.fd < 0 || plan.fd > 2 || std_fds[plan.fd] < 0)
          fail("fd ", f.fd(), ": leads outside the image; clone --shell-job gives it yours");
        passed.push_back(&f);
        mine.push_back(std_fds[plan.fd]);
        break;
    }
  }
  if (netns >= 0) mine.push_back(netns);
  int netns_there = -1;
  std::vector<Call> calls;
  if (!mine.empty()) {
    Transport t = connect_transport(c, transport_netns);
    // Every image number is open in the clone (it has the template's table): what arrives
    // lands on other numbers, and each dup3 drops the clone's reference to the template's
    // description at that number.
    std::vector<int> got;
    for (size_t i = 0; i < mine.size(); i += kFdsPerMessage) {
      std::vector<int> part(
          mine.begin() + static_cast<long>(i),
          mine.begin() + static_cast<long>(std::min(mine.size(), i + kFdsPerMessage)));
      send_fds(t.ours.get(), part);
      std::vector<int> there = receive_fds(c, static_cast<int>(t.theirs), part.size());
      got.insert(got.end(), there.begin(), there.end());
    }
    c.reset_arena();
    for (size_t k = 0; k < passed.size(); k++) {
      const auto& f = *passed[k];
      const uint64_t num = static_cast<uint64_t>(f.fd());
      calls.push_back(make_call(cat("dup3 of the new description to fd ", num), SYS_dup3,
                                static_cast<uint64_t>(got[k]), num, f.cloexec() ? O_CLOEXEC : 0));
      calls.push_back(
          make_call(cat("close(", got[k], ")"), SYS_close, static_cast<uint64_t>(got[k])));
    }
    calls.push_back(
        make_call("close of the descriptor transport", SYS_close, static_cast<uint64_t>(t.theirs)));
    c.batch(calls);
    calls.clear();
    if (netns >= 0) netns_there = got.back();
  }
  if (!reqs.empty()) {
    int min_fd = 3;
    for (const auto& f : p.fds()) min_fd = std::max(min_fd, f.fd() + 1);
    if (netns_there >= 0) min_fd = std::max(min_fd, netns_there + 1);
    std::vector<long> fds = open_as_process(c, p.creds(), reqs, min_fd);
    c.reset_arena();
    push_place_fds(opened, fds, calls);
    c.batch(calls);
    calls.clear();
  }
  {  // Epoll sets and the kinds made inside (their stand-ins were passed above).
    RestoreeRemote remote(c);
    objects::restore_objects(objects::RestorePoint::kFilesInPlace, remote, p);
  }
  return netns_there;
}

}  // namespace lazycr::restore
