// `lazycr template` and `lazycr clone` (issue 13): a held template answering clone requests on
// a UNIX socket (SOCK_SEQPACKET, one message per request or answer):
//   request "clone <request_ns> <fg> <netns> <shell_job>" (with shell_job=1, the client's fds
//                                         0-2 come with it, SCM_RIGHTS)
//                                       -> "ok <pid> <image_pid> <reaper> <first_ns>
//   <threads>
//                                         <template_rss_kb> <template_anon_huge_kb>"
//                                         or "error <one line>"; with fg=1, "exit <status>"
//                                         follows when the clone exits
//   request "stop"                     -> "ok", then the template exits
// request_ns and first_ns are CLOCK_MONOTONIC (steady clock) readings: the clone's first
// instruction is first_ns - request_ns after the request.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <list>
#include <sstream>
#include <string>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/json.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/signals.h"
#include "restore/clone.h"
#include "restore/huge_collapse.h"
#include "restore/restoree.h"
#include "tools/commands.h"

namespace lazycr::cli {
namespace {

sockaddr_un socket_address(const std::string& path) {
  sockaddr_un a;
  std::memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof a.sun_path)
    fail("--socket ", path, ": not a usable UNIX socket path (1..", sizeof a.sun_path - 1,
         " bytes)");
  std::memcpy(a.sun_path, path.c_str(), path.size());
  return a;
}

UniqueFd connect_to(const std::string& path, int* err) {
  sockaddr_un a = socket_address(path);
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd) fail_errno("socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    *err = errno;
    return UniqueFd();
  }
  return fd;
}

// The listening socket, mode 0600. An existing path is taken over only if it is a stale socket
// of ours (nothing answers there).
UniqueFd listen_at(const std::string& path) {
  sockaddr_un a = socket_address(path);
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) fail("--socket ", path, ": exists and is not a socket");
    if (st.st_uid != ::getuid())
      fail("--socket ", path, ": owned by uid ", st.st_uid, ", not by us (uid ", ::getuid(), ")");
    int err = 0;
    if (connect_to(path, &err)) fail("--socket ", path, ": a template already answers there");
    if (::unlink(path.c_str()) != 0)
      fail_errno("--socket ", path, ": cannot remove the stale socket");
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) fail_errno("socket");
  mode_t old = ::umask(077);
  int rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a);
  int err = errno;
  ::umask(old);
  if (rc != 0) fail_errno_value(err, cat("--socket ", path, ": bind"));
  if (::chmod(path.c_str(), 0600) != 0) fail_errno("--socket ", path, ": chmod 0600");
  if (::listen(fd.get(), 64) != 0) fail_errno("--socket ", path, ": listen");
  return fd;
}

void send_line(int fd, const std::string& s) {
  (void)::send(fd, s.data(), s.size(), MSG_NOSIGNAL);
}

// A request and the descriptors sent with it (clone --shell-job: its fds 0-2).
std::string recv_request(int fd, std::vector<UniqueFd>& fds) {
  char buf[512];
  alignas(cmsghdr) char control[CMSG_SPACE(3 * sizeof(int))];
  iovec iov{buf, sizeof buf - 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) return std::string();
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int got;
      std::memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
      fds.emplace_back(got);
    }
  }
  return std::string(buf, static_cast<size_t>(n));
}

// Sends `line` with lazycr's fds 0-2.
void send_with_std_fds(int fd, const std::string& line) {
  alignas(cmsghdr) char control[CMSG_SPACE(3 * sizeof(int))] = {};
  iovec iov{const_cast<char*>(line.data()), line.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(3 * sizeof(int));
  const int std_fds[3] = {0, 1, 2};
  std::memcpy(CMSG_DATA(c), std_fds, sizeof std_fds);
  if (::sendmsg(fd, &msg, MSG_NOSIGNAL) < 0) fail_errno("sending the clone request with fds 0-2");
}

std::string recv_line(int fd) {
  char buf[512];
  ssize_t n;
  do {
    n = ::recv(fd, buf, sizeof buf - 1, 0);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) return std::string();
  return std::string(buf, static_cast<size_t>(n));
}

uint64_t rollup_kb(pid_t pid, const char* key) {
  const auto text = proc::try_read_file(cat("/proc/", pid, "/smaps_rollup"));
  if (!text) return 0;
  const auto at = text->find(key);
  return at == std::string::npos
             ? 0
             : std::strtoull(text->c_str() + at + std::strlen(key), nullptr, 10);
}

std::string rollup(pid_t pid) {
  std::string text;
  try {
    text = proc::read_file(cat("/proc/", pid, "/smaps_rollup"));
  } catch (const Error&) {
    return "?";
  }
  std::string out;
  for (const char* key : {"Rss:", "Pss:"}) {
    auto pos = text.find(key);
    if (pos == std::string::npos) continue;
    std::istringstream in(text.substr(pos + std::strlen(key)));
    uint64_t kb = 0;
    in >> kb;
    out += cat(out.empty() ? "" : ", ", std::string(key, std::strlen(key) - 1), " ", kb / 1024,
               " MiB");
  }
  return out;
}

struct Live {
  restore::Clone clone;
  UniqueFd client;  // foreground: told the exit status
};

// The template's event loop: runs until SIGTERM/SIGINT/SIGHUP or a "stop" request.
void serve(restore::HeldTemplate& held, int listen_fd, int ready_fd, bool small_pages) {
  sigset_t mask;
  sigemptyset(&mask);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&mask, s);
  UniqueFd sfd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sfd) fail_errno("signalfd");
  pid_t tpl = held.root.pid();
  if (!small_pages) {
    const uint64_t t0 = now_ns();
    const restore::CollapseStats cs = restore::collapse_huge_pages(held);
    log::info("template: ", cs.candidate_bytes >> 20, " MiB fully populated in 2 MiB-aligned ",
              "private anonymous ranges; ", cs.huge_bytes >> 20, " MiB now in huge pages",
              cs.refused_calls ? cat(" (the kernel refused ", cs.refused_calls,
                                     " range(s): ", std::strerror(cs.last_errno), ")")
                               : std::string(),
              " in ", (now_ns() - t0) / 1000000, " ms");
  }
  log::info("template of ", held.opts.dir, " held as pid ", tpl, " (", rollup(tpl), ")");
  // The template's memory, told with every clone (read once: it changes only if the template
  // ran, which it never does).
  const uint64_t tpl_rss_kb = rollup_kb(tpl, "Rss:");
  const uint64_t tpl_huge_kb = restore::anon_huge_bytes(tpl) / 1024;
  if (ready_fd >= 0) {
    send_line(ready_fd, cat("ok ", ::getpid()));
    ::close(ready_fd);
  }
  std::list<Live> live;
  restore::PreparedNs next_ns;
  for (;;) {
    if (!next_ns) {  // the next clone's namespace, made while nobody waits
      try {
        next_ns = restore::prepare_clone_namespace(held);
      } catch (const std::exception& e) {
        log::warn("template: preparing the next clone's namespace: ", e.what());
      }
    }
    std::vector<pollfd> pf;
    pf.push_back({sfd.get(), POLLIN, 0});
    pf.push_back({listen_fd, POLLIN, 0});
    for (auto& l : live) {
      pf.push_back({l.clone.pidfd.get(), POLLIN, 0});
      pf.push_back({l.clone.reaper_pidfd.get(), POLLIN, 0});
    }
    if (::poll(pf.data(), pf.size(), -1) < 0) {
      if (errno == EINTR) continue;
      fail_errno("poll");
    }
    if (pf[0].revents) {
      signalfd_siginfo si;
      if (::read(sfd.get(), &si, sizeof si) > 0) {
        log::info("template: signal ", si.ssi_signo, ": exiting, ", live.size(),
                  " clone(s) left running");
        return;
      }
    }
    size_t k = 2;
    for (auto it = live.begin(); it != live.end(); k += 2) {
      Live& l = *it;
      if (pf[k].revents && l.clone.pid > 0) {
        siginfo_t info;
        std::memset(&info, 0, sizeof info);
        if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(l.clone.pidfd.get()), &info,
                     WEXITED | WNOHANG) == 0 &&
            info.si_pid != 0) {
          int code = info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
          log::info("clone pid ", l.clone.pid, " exited with status ", code);
          if (l.client) send_line(l.client.get(), cat("exit ", code));
          l.client.reset();
          l.clone.pid = 0;
        }
      }
      if (pf[k + 1].revents && l.clone.reaper > 0) {
        int status;
        if (::waitpid(l.clone.reaper, &status, WNOHANG) == l.clone.reaper) l.clone.reaper = 0;
      }
      if (l.clone.pid == 0 && l.clone.reaper == 0)
        it = live.erase(it);
      else
        ++it;
    }
    if (!pf[1].revents) continue;
    UniqueFd client(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!client) continue;
    std::vector<UniqueFd> sent;
    std::string req = recv_request(client.get(), sent);
    if (req == "stop") {
      send_line(client.get(), "ok");
      log::info("template: stop requested: exiting, ", live.size(), " clone(s) left running");
      return;
    }
    std::istringstream in(req);
    std::string verb;
    uint64_t request_ns = 0;
    int fg = 0, netns = 0, shell_job = 0;
    in >> verb >> request_ns >> fg >> netns >> shell_job;
    if (verb != "clone") {
      send_line(client.get(), "error unknown request");
      continue;
    }
    if (request_ns == 0) request_ns = now_ns();
    try {
      restore::CloneRequest creq;
      creq.netns = netns != 0;
      if (shell_job) {
        if (sent.size() != 3) fail("clone --shell-job: the request came without fds 0-2");
        for (int i = 0; i < 3; i++) creq.std_fds[i] = sent[static_cast<size_t>(i)].get();
      }
      restore::Clone c = restore::make_clone(held, creq, std::move(next_ns));
      const uint64_t first = c.running_ns - request_ns;
      log::info("clone pid ", c.pid, " (pid ", c.image_pid, " in its namespace, reaper ", c.reaper,
                "): ", c.threads, " thread(s), first instruction ", first / 1000,
                " us after the request");
      send_line(client.get(), cat("ok ", c.pid, " ", c.image_pid, " ", c.reaper, " ", c.running_ns,
                                  " ", c.threads, " ", tpl_rss_kb, " ", tpl_huge_kb));
      Live l;
      l.clone = std::move(c);
      if (fg) l.client = std::move(client);
      live.push_back(std::move(l));
    } catch (const std::exception& e) {
      log::warn(e.what());
      send_line(client.get(), cat("error ", e.what()));
    }
  }
}

}  // namespace

int run_template(const TemplateOptions& opts) {
  {  // A damaged or unclonable image fails here, before anything exists.
    image::ImageReader img(opts.dir);
    restore::check_clonable(img, opts.shell_job);
  }
  UniqueFd ready_rd, ready_wr;
  if (opts.detach) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) fail_errno("socketpair");
    ready_rd.reset(sv[0]);
    ready_wr.reset(sv[1]);
    pid_t child = ::fork();
    if (child < 0) fail_errno("fork");
    if (child > 0) {
      ready_wr.reset();
      std::string msg = recv_line(ready_rd.get());
      if (msg.rfind("ok ", 0) == 0) {
        std::printf("%s\n", msg.substr(3).c_str());
        std::fflush(stdout);
        return 0;
      }
      int status;
      ::waitpid(child, &status, 0);
      if (msg.rfind("error ", 0) == 0) fail(msg.substr(6));
      fail("the template process exited before it was ready");
    }
    ready_rd.reset();
    ::setsid();
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      if (log::output_fd() == 2) ::dup2(null, 2);
      ::close(null);
    }
  }
  try {
    // Signals that end the template are taken through a signalfd in serve(); blocked from
    // here on so that one arriving while the template is built is not lost (it then ends
    // the template as soon as it is held). Clones get the image's mask.
    sigset_t mask;
    sigemptyset(&mask);
    for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&mask, s);
    ::sigprocmask(SIG_BLOCK, &mask, nullptr);
    ::signal(SIGPIPE, SIG_IGN);
    UniqueFd listen_fd = listen_at(opts.socket);
    struct Unlink {
      std::string path;
      ~Unlink() { ::unlink(path.c_str()); }
    } unlink_socket{opts.socket};
    restore::RestoreOptions ropts;
    ropts.dir = opts.dir;
    ropts.start_ns = opts.start_ns;
    ropts.shell_job = opts.shell_job;
    ropts.netns = opts.netns;
    int ready = ready_wr.get();
    ropts.hold = [&](restore::HeldTemplate& held) {
      serve(held, listen_fd.get(), ready, opts.small_pages);
    };
    restore::restore(ropts);
    ready_wr.release();  // closed by serve()
  } catch (const std::exception& e) {
    if (ready_wr) {
      send_line(ready_wr.get(), cat("error ", e.what()));
      _exit(1);
    }
    throw;
  }
  if (opts.detach) _exit(0);
  return 0;
}

int run_clone(const CloneOptions& opts) {
  int err = 0;
  UniqueFd fd = connect_to(opts.socket, &err);
  if (!fd) fail_errno_value(err, cat("clone: no template answers at ", opts.socket));
  if (opts.stop) {
    send_line(fd.get(), "stop");
    if (recv_line(fd.get()) != "ok")
      fail("clone --stop: the template at ", opts.socket, " did not confirm");
    return 0;
  }
  // Blocked before the request: a SIGTERM for the clone is passed on, not lost.
  sigset_t mask;
  sigemptyset(&mask);
  for (int s : {SIGTERM, SIGINT, SIGHUP, SIGQUIT}) sigaddset(&mask, s);
  if (!opts.detach) ::sigprocmask(SIG_BLOCK, &mask, nullptr);
  const uint64_t request_ns = now_ns();
  const std::string request = cat("clone ", request_ns, " ", opts.detach ? 0 : 1, " ",
                                  opts.netns ? 1 : 0, " ", opts.shell_job ? 1 : 0);
  if (opts.shell_job)
    send_with_std_fds(fd.get(), request);
  else
    send_line(fd.get(), request);
  std::string reply = recv_line(fd.get());
  const uint64_t answered_ns = now_ns();
  if (reply.rfind("error ", 0) == 0) fail(reply.substr(6));
  std::istringstream in(reply);
  std::string ok;
  pid_t pid = 0, image_pid = 0, reaper = 0;
  uint64_t running_ns = 0, threads = 0, tpl_rss_kb = 0, tpl_huge_kb = 0;
  in >> ok >> pid >> image_pid >> reaper >> running_ns >> threads >> tpl_rss_kb >> tpl_huge_kb;
  if (ok != "ok" || pid <= 0)
    fail("clone: the template at ", opts.socket, " gave no clone (",
         reply.empty() ? "no answer" : reply, ")");
  const uint64_t first_ns = running_ns - request_ns;
  const uint64_t wall_ns = answered_ns - opts.start_ns;
  log::info("clone pid ", pid, " (pid ", image_pid, " in a new PID namespace, reaper ", reaper,
            "): ", threads, " thread(s); first instruction ", first_ns / 1000,
            " us after the request; command wall time ", wall_ns / 1000, " us; template RSS ",
            tpl_rss_kb / 1024, " MiB (", tpl_huge_kb / 1024, " MiB in huge pages)");
  if (!opts.pidfile.empty()) {
    std::string tmp = cat(opts.pidfile, ".tmp-", ::getpid());
    {
      std::ofstream f(tmp);
      f << pid << "\n";
      if (!f) fail("--pidfile ", opts.pidfile, ": cannot write ", tmp);
    }
    if (::rename(tmp.c_str(), opts.pidfile.c_str()) != 0)
      fail_errno("--pidfile: cannot rename ", tmp, " to ", opts.pidfile);
  }
  if (!opts.stats_file.empty()) {
    std::ofstream f(opts.stats_file);
    JsonWriter j(f);
    j.begin_object();
    j.key("pid");
    j.value(static_cast<int64_t>(pid));
    j.key("image_pid");
    j.value(static_cast<int64_t>(image_pid));
    j.key("threads");
    j.value(threads);
    j.key("request_to_first_instruction_ns");
    j.value(first_ns);
    j.key("command_wall_ns");
    j.value(wall_ns);
    j.key("template_rss_kb");
    j.value(tpl_rss_kb);
    j.key("template_anon_huge_kb");
    j.value(tpl_huge_kb);
    j.end_object();
    f << "\n";
    if (!f) fail("--stats ", opts.stats_file, ": cannot write");
  }
  if (opts.detach) {
    std::printf("%d\n", pid);
    std::fflush(stdout);
    return 0;
  }
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  UniqueFd sfd(::signalfd(-1, &mask, SFD_CLOEXEC));
  for (;;) {
    pollfd pf[2] = {{fd.get(), POLLIN, 0}, {sfd.get(), POLLIN, 0}};
    if (::poll(pf, 2, -1) < 0) {
      if (errno == EINTR) continue;
      fail_errno("poll");
    }
    if (pf[1].revents) {
      signalfd_siginfo si;
      if (::read(sfd.get(), &si, sizeof si) > 0 && pidfd)
        send_signal_pidfd(pidfd.get(), static_cast<int>(si.ssi_signo));
    }
    if (!pf[0].revents) continue;
    std::string msg = recv_line(fd.get());
    if (msg.rfind("exit ", 0) == 0) return std::atoi(msg.c_str() + 5);
    // The template went away first: the clone runs on; wait for it without its status.
    log::warn("clone pid ", pid, ": the template exited; waiting for the clone without its status");
    if (pidfd) {
      pollfd p{pidfd.get(), POLLIN, 0};
      while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
      }
    }
    return 0;
  }
}

}  // namespace lazycr::cli
