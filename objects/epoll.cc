#include "objects/epoll.h"

#include <fcntl.h>
#include <linux/kcmp.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <map>
#include <sstream>

#include "common/error.h"
#include "common/log.h"
#include "common/proc.h"

namespace lazycr::objects::epoll {
namespace {

using image::FileDescriptor;

// What the kernel keeps of a fired EPOLLONESHOT registration (EP_PRIVATE_BITS).
constexpr uint32_t kPrivateBits = EPOLLWAKEUP | EPOLLONESHOT | EPOLLET | EPOLLEXCLUSIVE;
// Every readiness bit: a disarmed registration is re-fired with these (see arm_and_fire).
constexpr uint32_t kAllReadiness = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLERR | EPOLLHUP |
                                   EPOLLRDNORM | EPOLLRDBAND | EPOLLWRNORM | EPOLLWRBAND |
                                   EPOLLMSG | EPOLLRDHUP;

bool disarmed(const image::EpollTarget& t) {
  return (t.events() & EPOLLONESHOT) && (t.events() & ~kPrivateBits) == 0;
}

// struct epoll_event as the x86_64 kernel reads it (packed: 12 bytes).
struct __attribute__((packed)) KernelEpollEvent {
  uint32_t events;
  uint64_t data;
};
static_assert(sizeof(KernelEpollEvent) == 12);

class Builder {
 public:
  Builder(RemoteProcess& p, const image::Process& proc) : p_(p), proc_(proc) {
    for (const auto& f : proc.fds()) by_fd_[f.fd()] = &f;
  }

  void build_all() {
    for (const auto& f : proc_.fds())
      if (f.kind() == FileDescriptor::EPOLL) ensure(f.fd());
  }

 private:
  enum class State { kBuilding, kDone };

  void ensure(int num) {
    auto [it, fresh] = state_.emplace(num, State::kBuilding);
    if (!fresh) {
      if (it->second == State::kDone) return;
      fail("epoll fd ", num, " is nested in itself (a cycle of epoll instances)");
    }
    const FileDescriptor& f = *by_fd_.at(num);
    const image::Epoll& e = f.epoll();
    if (e.made_in_pid() == proc_.pid() && e.made_at_fd() == num) {
      make(f);
    } else if (e.made_in_pid() == proc_.pid()) {
      ensure(e.made_at_fd());
      place(dup_of(e.made_at_fd()), f);
    } else {
      place(pull(e), f);
    }
    it->second = State::kDone;
  }

  long dup_of(int fd) {
    return p_.call(0, cat("F_DUPFD_CLOEXEC of epoll fd ", fd), SYS_fcntl, static_cast<uint64_t>(fd),
                   F_DUPFD_CLOEXEC, 0);
  }

  // The description made in an earlier process of the tree, taken from it inside this one
  // (no transport is needed, and in a new PID namespace the image pid is the right name).
  long pull(const image::Epoll& e) {
    const std::string from =
        cat("epoll fd ", e.made_at_fd(), " of pid ", e.made_in_pid(), " (made there first)");
    const long pidfd = p_.call(0, cat("pidfd_open of pid ", e.made_in_pid(), " to take ", from),
                               SYS_pidfd_open, static_cast<uint64_t>(e.made_in_pid()), 0);
    long got = -1;
    try {
      got = p_.call(0, cat("pidfd_getfd of ", from), SYS_pidfd_getfd, static_cast<uint64_t>(pidfd),
                    static_cast<uint64_t>(e.made_at_fd()), 0);
    } catch (...) {
      p_.call(0, "close of a pidfd", SYS_close, static_cast<uint64_t>(pidfd));
      throw;
    }
    p_.call(0, "close of a pidfd", SYS_close, static_cast<uint64_t>(pidfd));
    return got;
  }

  // Moves descriptor `got` (close-on-exec) of the process to f's number with f's flag.
  void place(long got, const FileDescriptor& f) {
    const uint64_t num = static_cast<uint64_t>(f.fd());
    if (got == f.fd()) {
      p_.call(0, cat("fcntl(", num, ", F_SETFD)"), SYS_fcntl, num, F_SETFD,
              f.cloexec() ? FD_CLOEXEC : 0);
      return;
    }
    p_.call(0, cat("dup3(", got, ", ", num, ")"), SYS_dup3, static_cast<uint64_t>(got), num,
            f.cloexec() ? O_CLOEXEC : 0);
    p_.call(0, cat("close(", got, ")"), SYS_close, static_cast<uint64_t>(got));
  }

  void ctl(int efd, int op, const image::EpollTarget& t, uint32_t events) {
    KernelEpollEvent ev{events, t.data()};
    const uint64_t addr = p_.put(&ev, sizeof ev);
    const char* name = op == EPOLL_CTL_ADD ? "EPOLL_CTL_ADD" : "EPOLL_CTL_MOD";
    p_.call(0,
            cat(name, " of fd ", t.fd(), " to epoll fd ", efd, " (events ", events_name(events),
                ", data 0x", std::hex, t.data(), std::dec, ")"),
            SYS_epoll_ctl, static_cast<uint64_t>(efd), static_cast<uint64_t>(op),
            static_cast<uint64_t>(t.fd()), addr);
  }

  // A fired EPOLLONESHOT registration keeps only its flag bits, which EPOLL_CTL_ADD cannot
  // express (it adds EPOLLERR | EPOLLHUP): it is added armed for every readiness and fired
  // at once by an epoll_wait inside the process, which leaves it exactly as it was. This
  // runs before any other registration exists, so nothing else is consumed. A target ready
  // for nothing cannot fire: it is left with EPOLLERR | EPOLLHUP only (silent until an
  // error or hang-up, or EPOLL_CTL_MOD).
  void arm_and_fire(int efd, const image::EpollTarget& t) {
    ctl(efd, EPOLL_CTL_ADD, t, t.events() | kAllReadiness);
    KernelEpollEvent out{};
    const uint64_t addr = p_.put(&out, sizeof out);
    const long n = p_.call(0, cat("epoll_wait on epoll fd ", efd, " to disarm fd ", t.fd()),
                           SYS_epoll_wait, static_cast<uint64_t>(efd), addr, 1, 0);
    if (n == 0) {
      ctl(efd, EPOLL_CTL_MOD, t, t.events());
      log::debug("pid ", proc_.pid(), " epoll fd ", efd, ": the fired EPOLLONESHOT of fd ", t.fd(),
                 " is ready for nothing now; left armed for EPOLLERR|EPOLLHUP only");
      return;
    }
    p_.read(addr, &out, sizeof out);
    if (out.data != t.data())
      fail("epoll fd ", efd, ": disarming fd ", t.fd(), " fired data 0x", std::hex, out.data,
           ", not 0x", t.data());
  }

  void make(const FileDescriptor& f) {
    const int num = f.fd();
    const image::Epoll& e = f.epoll();
    for (const auto& t : e.targets()) {
      auto it = by_fd_.find(t.fd());
      if (it != by_fd_.end() && it->second->kind() == FileDescriptor::EPOLL) ensure(t.fd());
    }
    const long got =
        p_.call(0, cat("epoll_create1 for fd ", num), SYS_epoll_create1, EPOLL_CLOEXEC);
    place(got, f);
    if (f.flags() & O_NONBLOCK)
      p_.call(0, cat("fcntl(", num, ", F_SETFL, O_NONBLOCK)"), SYS_fcntl,
              static_cast<uint64_t>(num), F_SETFL, O_NONBLOCK);
    for (const auto& t : e.targets())
      if (disarmed(t)) arm_and_fire(num, t);
    for (const auto& t : e.targets())
      if (!disarmed(t)) ctl(num, EPOLL_CTL_ADD, t, t.events());
  }

  RemoteProcess& p_;
  const image::Process& proc_;
  std::map<int, const FileDescriptor*> by_fd_;
  std::map<int, State> state_;
};

}  // namespace

std::string events_name(uint32_t events) {
  static const struct {
    uint32_t bit;
    const char* name;
  } kNames[] = {
      {EPOLLIN, "EPOLLIN"},         {EPOLLPRI, "EPOLLPRI"},
      {EPOLLOUT, "EPOLLOUT"},       {EPOLLERR, "EPOLLERR"},
      {EPOLLHUP, "EPOLLHUP"},       {EPOLLRDNORM, "EPOLLRDNORM"},
      {EPOLLRDBAND, "EPOLLRDBAND"}, {EPOLLWRNORM, "EPOLLWRNORM"},
      {EPOLLWRBAND, "EPOLLWRBAND"}, {EPOLLMSG, "EPOLLMSG"},
      {EPOLLRDHUP, "EPOLLRDHUP"},   {EPOLLEXCLUSIVE, "EPOLLEXCLUSIVE"},
      {EPOLLWAKEUP, "EPOLLWAKEUP"}, {EPOLLONESHOT, "EPOLLONESHOT"},
      {EPOLLET, "EPOLLET"},
  };
  std::string s;
  uint32_t rest = events;
  for (const auto& n : kNames) {
    if (!(events & n.bit)) continue;
    s += cat(s.empty() ? "" : "|", n.name);
    rest &= ~n.bit;
  }
  if (rest != 0) s += cat(s.empty() ? "" : "|", "0x", std::hex, rest);
  return s.empty() ? "0" : s;
}

std::vector<image::EpollTarget> parse_fdinfo_targets(const std::string& fdinfo) {
  std::vector<image::EpollTarget> out;
  std::istringstream in(fdinfo);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("tfd:", 0) != 0) continue;
    int fd = -1, used = 0;
    unsigned events = 0;
    unsigned long long data = 0;
    if (std::sscanf(line.c_str(), "tfd: %d events: %x data: %llx%n", &fd, &events, &data, &used) !=
            3 ||
        used == 0 || fd < 0)
      fail("malformed epoll fdinfo line '", line, "'");
    image::EpollTarget t;
    t.set_fd(fd);
    t.set_events(events);
    t.set_data(data);
    out.push_back(std::move(t));
  }
  return out;
}

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx) {
  std::map<int, const FileDescriptor*> by_fd;
  for (const auto& f : proc.fds()) by_fd[f.fd()] = &f;
  for (auto& fd : *proc.mutable_fds()) {
    if (fd.kind() != FileDescriptor::EPOLL) continue;
    const std::string where = cat("epoll fd ", fd.fd());
    image::Epoll& e = *fd.mutable_epoll();
    std::string& maker = ctx.note(cat("epoll ", fd.file_id()));
    if (!maker.empty()) {
      int pid = 0, at = 0;
      if (std::sscanf(maker.c_str(), "%d %d", &pid, &at) != 2) fail(where, ": bad note ", maker);
      e.set_made_in_pid(pid);
      e.set_made_at_fd(at);
      continue;
    }
    maker = cat(proc.pid(), " ", fd.fd());
    e.set_made_in_pid(proc.pid());
    e.set_made_at_fd(fd.fd());
    if (fd.flags() & ~static_cast<uint32_t>(O_RDWR | O_NONBLOCK))
      fail(where, " has status flags 0", std::oct, fd.flags(), std::dec,
           " beyond O_RDWR and O_NONBLOCK; lazycr cannot restore them");
    const std::string info_path = cat("/proc/", p.pid(), "/fdinfo/", fd.fd());
    auto text = proc::try_read_file(info_path);
    if (!text) fail("cannot read ", info_path);
    std::map<int, unsigned> seen;  // target number -> registrations with it so far (toff)
    for (auto& t : parse_fdinfo_targets(*text)) {
      const std::string reg = cat(where, " registration of fd ", t.fd());
      kcmp_epoll_slot slot{static_cast<uint32_t>(fd.fd()), static_cast<uint32_t>(t.fd()),
                           seen[t.fd()]++};
      const long same = ::syscall(SYS_kcmp, p.pid(), p.pid(), KCMP_EPOLL_TFD, t.fd(), &slot);
      if (same < 0 && errno == EBADF)
        fail(reg, ": fd ", t.fd(),
             " is not open in this process (closed since, or registered by another process "
             "holding this epoll), but its file lives on elsewhere and the kernel keeps it "
             "registered; lazycr cannot restore such a registration");
      if (same < 0) fail_errno("kcmp(KCMP_EPOLL_TFD) of ", reg);
      if (same != 0)
        fail(reg, ": fd ", t.fd(), " now holds another file (", by_fd.at(t.fd())->target(),
             ") than the registered one, which the kernel keeps registered while it lives on "
             "elsewhere; lazycr cannot restore such a registration");
      const FileDescriptor& target = *by_fd.at(t.fd());
      if (!target.restorable() && target.fd() > 2) {
        // Only with --skip-unsupported-fds (else the dump refused it already): /dev/null
        // stands in for the target at restore, which epoll cannot watch.
        log::warn("pid ", proc.pid(), " ", reg, " (", target.target(),
                  ") is dropped: that descriptor is skipped");
        continue;
      }
      *e.add_targets() = std::move(t);
    }
  }
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kFilesInPlace) return;
  Builder(p, proc).build_all();
}

}  // namespace lazycr::objects::epoll
