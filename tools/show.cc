// `lazycr show`: an image directory decoded for people (aligned text) and scripts (JSON).
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/json.h"
#include "image-format/image_dir.h"
#include "objects/epoll.h"
#include "objects/inet_socket.h"
#include "objects/unix_socket.h"
#include "tools/commands.h"
#include "tools/show_chain.h"
#include "tools/show_timers.h"
#include "tools/show_working_set.h"

namespace lazycr::cli {
namespace {

using image::ImageReader;
using image::kPageSize;

std::string prot_string(uint32_t prot, bool shared) {
  std::string s = "---p";
  if (prot & PROT_READ) s[0] = 'r';
  if (prot & PROT_WRITE) s[1] = 'w';
  if (prot & PROT_EXEC) s[2] = 'x';
  if (shared) s[3] = 's';
  return s;
}

std::string area_kind(image::MemoryArea::Kind k) {
  std::string name = image::MemoryArea::Kind_Name(k);
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

std::string fd_kind(image::FileDescriptor::Kind k) {
  std::string name = image::FileDescriptor::Kind_Name(k);
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

std::string human_bytes(uint64_t bytes) {
  char buf[32];
  if (bytes >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(1ull << 30));
  else if (bytes >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / double(1ull << 20));
  else if (bytes >= 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  return buf;
}

std::string utc_time(uint64_t unix_ns) {
  time_t t = static_cast<time_t>(unix_ns / 1000000000ull);
  struct tm tm;
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string hex_bytes(const std::string& b) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : b) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

const char* signal_name(int signo) {
  const char* abbrev = sigabbrev_np(signo);
  return abbrev != nullptr ? abbrev : "RT";
}

struct StoreSummary {
  uint64_t data_pages, zero_pages, ref_pages, frames, raw_frames, file_bytes;
  double ratio;  // uncompressed data / file bytes
  std::vector<int32_t> ref_pids;
  // "sha256": every frame is checked against its digest in the index when read; "none": a
  // store written before frame digests.
  const char* frame_digests;
};

// --compress as recorded; images from before the option were zstd at their level.
std::string compression_text(const image::Inventory& inv) {
  if (!inv.options().compression().empty()) return inv.options().compression();
  return cat("zstd:", inv.options().compression_level());
}

StoreSummary summarize(const image::PageStoreReader& store) {
  const auto& idx = store.index();
  StoreSummary s{idx.data_pages(),
                 idx.zero_pages(),
                 store.ref_pages(),
                 store.frame_count(),
                 store.raw_frame_count(),
                 store.file_size(),
                 0,
                 store.ref_pids(),
                 store.has_frame_digests() ? "sha256" : "none"};
  s.ratio = s.file_bytes > 0 ? double(s.data_pages * kPageSize) / double(s.file_bytes) : 0;
  return s;
}

const char* run_kind(image::PageRun::Kind k) {
  switch (k) {
    case image::PageRun::DATA:
      return "data";
    case image::PageRun::ZERO:
      return "zero";
    case image::PageRun::PARENT:
      return "parent";
    default:
      return "ref";
  }
}

// A wait status as people read it: "exited 3", "killed by SIGKILL (core dumped)".
std::string wait_status(int status) {
  if (WIFEXITED(status)) return cat("exited ", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return cat("killed by SIG", signal_name(WTERMSIG(status)),
               WCOREDUMP(status) ? " (core dumped)" : "");
  return cat("wait status ", hex(static_cast<uint32_t>(status)));
}

const char* socket_type(int type) {
  switch (type) {
    case SOCK_STREAM:
      return "stream";
    case SOCK_DGRAM:
      return "dgram";
    case SOCK_SEQPACKET:
      return "seqpacket";
    default:
      return "?";
  }
}

uint64_t queued_bytes(const image::UnixSocket& u) {
  uint64_t n = 0;
  for (const auto& q : u.queued()) n += q.size();
  return n;
}

// Who holds each pipe and socket: "pid/fd" of every descriptor naming it.
struct Holders {
  std::map<uint64_t, std::vector<std::string>> pipes, sockets;
  explicit Holders(const ImageReader& img) {
    for (const auto& p : img.processes())
      for (const auto& f : p.fds()) {
        if (f.object_inode() == 0) continue;
        std::string who = cat(p.pid(), "/", f.fd());
        if (f.kind() == image::FileDescriptor::SOCKET)
          sockets[f.object_inode()].push_back(who);
        else if (f.kind() == image::FileDescriptor::PIPE || f.kind() == image::FileDescriptor::FIFO)
          pipes[f.object_inode()].push_back(who);
      }
  }
  static std::string list(const std::map<uint64_t, std::vector<std::string>>& m, uint64_t inode) {
    auto it = m.find(inode);
    if (it == m.end()) return "-";
    std::string out;
    for (const auto& w : it->second) out += (out.empty() ? "" : " ") + w;
    return out;
  }
};

// The processes in tree order (root first, each parent before its children) with their depth.
// The reader checked that children form one tree rooted at the inventory's root.
std::vector<std::pair<const image::Process*, int>> tree_order(const ImageReader& img) {
  std::vector<std::pair<const image::Process*, int>> out;
  std::function<void(int, int)> walk = [&](int pid, int depth) {
    const image::Process& p = img.process(pid);
    out.emplace_back(&p, depth);
    for (int c : p.children()) walk(c, depth + 1);
  };
  walk(img.inventory().root_pid(), 0);
  return out;
}

// "POSIX write 10+5", "OFD read 50+EOF", "flock write".
std::string lock_text(const image::FileLock& l) {
  std::string kind = l.kind() == image::FileLock::POSIX ? "POSIX"
                     : l.kind() == image::FileLock::OFD ? "OFD"
                                                        : "flock";
  std::string s = kind + (l.write() ? " write" : " read");
  if (l.kind() == image::FileLock::FLOCK) return s;
  return s + " " + std::to_string(l.start()) + "+" +
         (l.length() == 0 ? std::string("EOF") : std::to_string(l.length()));
}

// The recorded state of a descriptor kind of objects/fd_kinds.h, one line; "" for other kinds.
std::string fd_state_text(const image::FileDescriptor& f) {
  if (f.has_eventfd())
    return cat("eventfd count ", f.eventfd().count(), f.eventfd().semaphore() ? " semaphore" : "");
  if (f.has_timerfd()) {
    const auto& t = f.timerfd();
    return cat("timerfd clock ", t.clockid(), " ticks ", t.ticks(), " flags ", t.settime_flags(),
               " left ", t.value_ns(), " ns interval ", t.interval_ns(), " ns",
               t.expires_ns() != 0 ? cat(" expires ", t.expires_ns(), " ns") : "");
  }
  if (f.has_signalfd()) return cat("signalfd mask ", hex(f.signalfd().mask()));
  if (f.has_inotify()) {
    std::string s = cat("inotify ", f.inotify().watches_size(), " watches");
    for (const auto& w : f.inotify().watches())
      s += cat("; wd ", w.wd(), " mask ", hex(w.mask()), " ", w.path());
    return s;
  }
  if (f.has_pidfd()) return cat("pidfd of pid ", f.pidfd().pid());
  if (f.has_mqueue()) {
    const auto& q = f.mqueue();
    size_t bytes = 0;
    for (const auto& m : q.messages()) bytes += m.data().size();
    return cat("mqueue ", q.name(), q.unlinked() ? " (unlinked)" : "", " mode 0", std::oct,
               q.mode(), std::dec, " ", q.max_messages(), " x ", q.message_size(), " bytes, ",
               q.messages_size(), " queued (", bytes, " bytes)");
  }
  return "";
}

// "filters 2 (shared 1: 8 insns; own: 4 insns log)" for one thread.
std::string seccomp_text(const image::Process& p, const image::Thread& t) {
  if (t.seccomp_mode() == 0) return "none";
  if (t.seccomp_mode() == 1) return "strict";
  auto one = [](const image::SeccompFilter& f) {
    return std::to_string(f.program().size() / 8) + " insns" + ((f.flags() & 2) ? " log" : "");
  };
  std::string s =
      "filters " + std::to_string(p.seccomp_shared_size() + t.seccomp_filters_size()) + " (shared:";
  for (const auto& f : p.seccomp_shared()) s += " " + one(f) + ";";
  s += " own:";
  for (const auto& f : t.seccomp_filters()) s += " " + one(f) + ";";
  return s + ")";
}

void print_ghosts(std::ostream& o, const ImageReader& img);

void print_text(const ImageReader& img, const ShowOptions& opts) {
  const auto& inv = img.inventory();
  std::ostream& o = std::cout;
  char line[512];
  o << "Image " << img.dir() << "  (format " << inv.format_version() << ", lazycr "
    << inv.tool_version() << ", created " << utc_time(inv.created_unix_ns()) << ")\n";
  o << "Kernel " << inv.kernel().release() << "  vdso "
    << (inv.kernel().vdso_build_id().empty()
            ? hex(inv.kernel().vdso_hash())
            : "build-id " + hex_bytes(inv.kernel().vdso_build_id()))
    << "  xsave " << inv.cpu().xsave_size() << " bytes (features "
    << hex(inv.cpu().xsave_features()) << ")\n";
  std::snprintf(line, sizeof line,
                "Dump: frozen %.1f ms, total %.1f ms, compression %s, frame %s, %s%s\n",
                inv.frozen_ns() / 1e6, inv.dump_ns() / 1e6, compression_text(inv).c_str(),
                human_bytes(inv.options().frame_size()).c_str(),
                inv.options().leave_running() ? "left running" : "killed after dump",
                inv.options().tcp_established() ? ", TCP connections recorded" : "");
  o << line;
  print_chain_text(o, img);
  if (inv.options().ext_unix_sk())
    o << "  --ext-unix-sk: datagram UNIX sockets connected outside the tree (restore needs it)\n";
  o << "Processes: " << inv.pids_size() << " (root " << inv.root_pid() << ")\n";
  for (const auto& [p, depth] : tree_order(img)) {
    uint64_t refs = p->zombie() ? 0 : img.pages(p->pid()).ref_pages();
    std::string indent(2 + 2 * static_cast<size_t>(depth), ' ');
    o << indent << p->pid() << " \"" << p->comm() << "\"  ppid " << p->ppid() << "  pgid "
      << p->pgid() << "  sid " << p->sid();
    if (p->zombie()) o << "  zombie, " << wait_status(p->exit_status());
    if (p->stop_signo() != 0) o << "  stopped by SIG" << signal_name(p->stop_signo());
    if (p->ctty_pty() != 0)
      o << "  controlling terminal pty " << p->ctty_pty() - 1 << " (foreground group "
        << p->ctty_fg_pgrp() << ")";
    if (refs > 0) o << "  " << refs << " pages shared with earlier processes (REF)";
    o << "\n";
  }

  for (const auto& p : img.processes()) {
    o << "\nProcess " << p.pid() << "  comm \"" << p.comm() << "\"  ppid " << p.ppid() << "  pgid "
      << p.pgid() << "  sid " << p.sid()
      << (p.zombie() ? "  (zombie, " + wait_status(p.exit_status()) + ")" : "") << "\n";
    if (p.children_size() > 0) {
      o << "  children";
      for (int c : p.children()) o << " " << c;
      o << "\n";
    }
    std::snprintf(line, sizeof line, "  exe %s  cwd %s  root %s  umask %03o\n",
                  p.exe().path().c_str(), p.cwd().c_str(), p.root().c_str(), p.umask());
    o << line;
    if (p.creds().uids_size() == 4 && p.creds().gids_size() == 4)
      o << "  uid " << p.creds().uids(0) << "/" << p.creds().uids(1) << "/" << p.creds().uids(2)
        << "/" << p.creds().uids(3) << "  gid " << p.creds().gids(0) << "/" << p.creds().gids(1)
        << "/" << p.creds().gids(2) << "/" << p.creds().gids(3) << "  cap_eff "
        << hex(p.creds().cap_effective()) << "\n";
    o << "  brk " << hex(p.mm().start_brk()) << "-" << hex(p.mm().brk()) << "  stack "
      << hex(p.mm().start_stack()) << "  personality " << hex(p.personality());
    if (p.mdwe() != 0) o << "  memory-deny-write-execute " << p.mdwe();
    o << "\n";

    o << "  Threads (" << p.threads_size() << "):\n";
    std::snprintf(line, sizeof line, "    %-8s %-16s %-18s %-18s %-18s %s\n", "TID", "COMM", "RIP",
                  "RSP", "SIGMASK", "RSEQ");
    o << line;
    for (const auto& t : p.threads()) {
      std::snprintf(line, sizeof line, "    %-8d %-16s %-18s %-18s %-18s %s%s\n", t.tid(),
                    t.comm().c_str(), hex(t.regs().rip()).c_str(), hex(t.regs().rsp()).c_str(),
                    hex(t.blocked()).c_str(),
                    t.rseq().rseq_abi_pointer() ? hex(t.rseq().rseq_abi_pointer()).c_str() : "-",
                    t.interrupted_syscall() ? "  (was in a syscall)" : "");
      o << line;
    }
    for (const auto& t : p.threads())
      if (t.seccomp_mode() != 0)
        o << "  Seccomp (thread " << t.tid() << "): " << seccomp_text(p, t) << "\n";
    print_timers_text(o, p);

    int handlers = 0;
    for (const auto& a : p.sigactions())
      if (a.handler() != 0) handlers++;
    o << "  Signal handlers (" << handlers << " not default):\n";
    for (const auto& a : p.sigactions()) {
      if (a.handler() == 0) continue;
      std::string h = a.handler() == 1 ? "SIG_IGN" : hex(a.handler());
      std::snprintf(line, sizeof line, "    %-3d SIG%-8s %-18s flags %-12s mask %s\n", a.signo(),
                    signal_name(a.signo()), h.c_str(), hex(a.flags()).c_str(),
                    hex(a.mask()).c_str());
      o << line;
    }
    for (const auto& s : p.shared_pending())
      o << "  Pending (process): " << s.signo() << " SIG" << signal_name(s.signo()) << "\n";
    for (const auto& t : p.threads())
      for (const auto& s : t.pending())
        o << "  Pending (thread " << t.tid() << "): " << s.signo() << " SIG"
          << signal_name(s.signo()) << "\n";

    uint64_t total = 0, stored = 0;
    for (const auto& a : p.areas()) {
      total += a.end() - a.start();
      stored += a.stored_pages();
    }
    o << "  Memory areas (" << p.areas_size() << ", " << human_bytes(total) << ", " << stored
      << " pages stored):\n";
    std::snprintf(line, sizeof line, "    %-33s %10s %-4s %-12s %8s %s\n", "RANGE", "SIZE", "PROT",
                  "KIND", "STORED", "NAME");
    o << line;
    for (const auto& a : p.areas()) {
      std::string range = hex(a.start()) + "-" + hex(a.end());
      std::snprintf(line, sizeof line, "    %-33s %10s %-4s %-12s %8llu %s\n", range.c_str(),
                    human_bytes(a.end() - a.start()).c_str(),
                    prot_string(a.prot(), a.shared()).c_str(), area_kind(a.kind()).c_str(),
                    static_cast<unsigned long long>(a.stored_pages()), a.name().c_str());
      o << line;
    }

    o << "  File descriptors (" << p.fds_size() << "):\n";
    for (const auto& f : p.fds()) {
      std::string object = f.object_inode() != 0 ? cat("  inode ", f.object_inode()) : "";
      if (f.pty_end() != image::FileDescriptor::NOT_PTY_PAIR)
        object = cat(f.pty_end() == image::FileDescriptor::PTY_MASTER ? "  master" : "  slave",
                     " of pty ", f.pty_index());
      std::snprintf(line, sizeof line, "    %-4d %-10s flags 0%-8o pos %-10llu id %-5llu %s%s%s\n",
                    f.fd(), fd_kind(f.kind()).c_str(), f.flags(),
                    static_cast<unsigned long long>(f.pos()),
                    static_cast<unsigned long long>(f.file_id()), f.target().c_str(),
                    object.c_str(), f.restorable() ? "" : "  (not restorable)");
      o << line;
      for (const auto& l : f.locks()) o << "         lock " << lock_text(l) << "\n";
      if (f.has_epoll() && (f.epoll().made_in_pid() != p.pid() || f.epoll().made_at_fd() != f.fd()))
        o << "         epoll made at fd " << f.epoll().made_at_fd() << " of pid "
          << f.epoll().made_in_pid() << "\n";
      for (const auto& t : f.epoll().targets())
        o << "         epoll fd " << t.fd() << " events " << objects::epoll::events_name(t.events())
          << " data 0x" << std::hex << t.data() << std::dec << "\n";
      if (std::string st = fd_state_text(f); !st.empty()) o << "         " << st << "\n";
    }

    if (p.zombie()) continue;
    const auto& store = img.pages(p.pid());
    auto s = summarize(store);
    std::snprintf(
        line, sizeof line,
        "  Page store: %llu data pages (%s), %llu zero pages, %llu ref pages, %llu "
        "frames (%llu raw, digests: %s), file %s, ratio %.2f\n",
        static_cast<unsigned long long>(s.data_pages),
        human_bytes(s.data_pages * kPageSize).c_str(),
        static_cast<unsigned long long>(s.zero_pages), static_cast<unsigned long long>(s.ref_pages),
        static_cast<unsigned long long>(s.frames), static_cast<unsigned long long>(s.raw_frames),
        s.frame_digests, human_bytes(s.file_bytes).c_str(), s.ratio);
    o << line;
    if (store.parent_pages() > 0)
      o << "    " << store.parent_pages() << " pages unchanged since the parent image (PARENT)\n";
    if (!s.ref_pids.empty()) {
      o << "    ref pages are stored by pid";
      for (int32_t pid : s.ref_pids) o << " " << pid;
      o << "\n";
    }
    if (opts.pages) {
      for (const auto& r : store.index().runs()) {
        std::snprintf(line, sizeof line, "    %s-%s %8llu pages %s", hex(r.start()).c_str(),
                      hex(r.start() + r.pages() * kPageSize).c_str(),
                      static_cast<unsigned long long>(r.pages()), run_kind(r.kind()));
        o << line;
        if (r.kind() == image::PageRun::DATA) o << " from stream page " << r.first_page();
        if (r.kind() == image::PageRun::REF)
          o << " to pid " << r.ref_pid() << " at " << hex(r.ref_addr());
        o << "\n";
      }
    }
  }

  const auto& sh = img.shared();
  print_ghosts(o, img);
  for (const auto& t : sh.ptys())
    o << "\nPty " << t.index() << ": " << t.rows() << "x" << t.cols() << " (" << t.xpixel() << "x"
      << t.ypixel() << " px), packet mode " << (t.packet_mode() ? "on" : "off") << ", "
      << (t.locked() ? "locked" : "unlocked") << ", " << t.to_master().size()
      << " bytes unread at the master, " << t.to_slave().size() << " at the slave\n";
  if (sh.sysv_shm_size() > 0) o << "\nSysV shared memory: " << sh.sysv_shm_size() << " segments\n";
  print_working_set_text(o, img);
  for (const auto& m : sh.sysv_shm()) {
    std::snprintf(line, sizeof line,
                  "  SysV segment id %d key %#x mode %04o size %llu uid %u gid %u cuid %u cgid "
                  "%u%s%s\n",
                  m.id(), static_cast<unsigned>(m.key()), m.mode() & 0777,
                  static_cast<unsigned long long>(m.size()), m.uid(), m.gid(), m.cuid(), m.cgid(),
                  (m.mode() & 01000) ? " marked for removal" : "",
                  (m.mode() & 02000) ? " locked" : "");
    o << line;
  }
  if (sh.pipes_size() == 0 && sh.sockets_size() == 0 && sh.inet_sockets_size() == 0) return;
  Holders holders(img);
  o << "\nShared objects: " << sh.pipes_size() << " pipes, " << sh.sockets_size() << " sockets, "
    << sh.inet_sockets_size() << " IPv4/IPv6 sockets (holders as pid/fd)\n";
  for (const auto& pipe : sh.pipes()) {
    std::string name =
        pipe.fifo() ? cat("FIFO inode ", pipe.inode()) : cat("pipe:[", pipe.inode(), "]");
    std::string closed = pipe.no_writers()   ? " (no writer)"
                         : pipe.no_readers() ? " (no reader)"
                                             : "";
    std::snprintf(line, sizeof line, "  %-24s %8zu bytes buffered of %-9s  %s%s\n", name.c_str(),
                  pipe.data().size(), human_bytes(pipe.capacity()).c_str(),
                  Holders::list(holders.pipes, pipe.inode()).c_str(), closed.c_str());
    o << line;
  }
  for (const auto& u : sh.sockets()) {
    // A pair is shown once, from its lower inode.
    if (u.peer_inode() != 0 && u.peer_inode() < u.inode()) continue;
    const image::UnixSocket* peer = nullptr;
    for (const auto& v : sh.sockets())
      if (u.peer_inode() != 0 && v.inode() == u.peer_inode()) peer = &v;
    auto end = [&](const image::UnixSocket& e) {
      std::string shut = e.shutdown_read() && e.shutdown_write() ? ", shut down"
                         : e.shutdown_read()                     ? ", shut for reading"
                         : e.shutdown_write()                    ? ", shut for writing"
                                                                 : "";
      return cat("socket:[", e.inode(), "] ", e.queued_size(), " queued (",
                 human_bytes(queued_bytes(e)), shut, ") held by ",
                 Holders::list(holders.sockets, e.inode()));
    };
    o << "  unix " << socket_type(u.type()) << "  " << end(u);
    if (u.listening() || !u.name().empty() || u.external_peer() || u.connected_by_name() ||
        u.passcred())
      o << "\n    " << objects::describe_unix_socket(u);
    for (uint64_t c : u.pending()) o << "\n    pending connection from socket:[" << c << "]";
    if (peer != nullptr) o << "\n    <-> " << end(*peer);
    o << "\n";
  }
  for (const auto& s : sh.inet_sockets()) {
    o << "  socket:[" << s.inode() << "] " << objects::describe_inet_socket(s);
    if (s.type() == SOCK_STREAM)
      o << (s.nodelay() ? " nodelay" : "") << " keepalive " << (s.keepalive() ? "on " : "off ")
        << s.keepidle() << "/" << s.keepintvl() << "/" << s.keepcnt();
    o << (s.reuseaddr() ? " reuseaddr" : "") << (s.reuseport() ? " reuseport" : "")
      << (s.v6only() ? " v6only" : "") << " buffers " << s.sndbuf() << "/" << s.rcvbuf()
      << " held by " << Holders::list(holders.sockets, s.inode()) << "\n";
    for (const auto& d : s.queued())
      o << "    " << d.data().size() << " bytes from "
        << objects::describe_inet_address(s.family(), d.source_addr(), d.source_port()) << "\n";
  }
}

// What refers to each ghost file: "pid/fd N", "pid area A", "pid exe", "pid cwd".
std::map<uint64_t, std::vector<std::string>> ghost_refs(const ImageReader& img) {
  std::map<uint64_t, std::vector<std::string>> out;
  for (const auto& p : img.processes()) {
    if (p.exe_ghost_id() != 0) out[p.exe_ghost_id()].push_back(cat(p.pid(), " exe"));
    if (p.cwd_ghost_id() != 0) out[p.cwd_ghost_id()].push_back(cat(p.pid(), " cwd"));
    for (const auto& f : p.fds())
      if (f.ghost_id() != 0) out[f.ghost_id()].push_back(cat(p.pid(), "/", f.fd()));
    for (const auto& a : p.areas())
      if (a.ghost_id() != 0) out[a.ghost_id()].push_back(cat(p.pid(), " area ", hex(a.start())));
  }
  return out;
}

std::string ghost_name(const image::GhostFile& g) {
  return g.kind() == image::GhostFile::MEMFD ? cat("memfd:", g.name()) : g.path();
}

void print_ghosts(std::ostream& o, const ImageReader& img) {
  const auto& ghosts = img.shared().ghosts();
  if (ghosts.empty()) return;
  auto refs = ghost_refs(img);
  o << "\nGhost files (deleted files, memfds, directories; contents stored): " << ghosts.size()
    << "\n";
  for (const auto& g : ghosts) {
    std::string used;
    for (const auto& r : refs[g.id()]) used += cat(used.empty() ? "" : ", ", r);
    o << "  ghost " << g.id() << "  " << image::GhostFile::Kind_Name(g.kind()) << " "
      << ghost_name(g) << "  mode " << std::oct << g.mode() << std::dec << ", " << g.size()
      << " bytes (" << g.data().size() << " stored)";
    if (g.kind() == image::GhostFile::MEMFD) o << ", seals " << hex(g.seals());
    o << "  used by " << (used.empty() ? "nothing" : used) << "\n";
  }
}

void print_json(const ImageReader& img, const ShowOptions& opts) {
  const auto& inv = img.inventory();
  JsonWriter j(std::cout);
  j.begin_object();
  j.field("dir", img.dir());
  j.field("format_version", inv.format_version());
  j.field("tool_version", inv.tool_version());
  j.field("created_unix_ns", inv.created_unix_ns());
  j.field("frozen_ns", inv.frozen_ns());
  j.field("dump_ns", inv.dump_ns());
  chain_json(j, img);
  j.key("kernel");
  j.begin_object();
  j.field("release", inv.kernel().release());
  j.field("vdso_build_id", hex_bytes(inv.kernel().vdso_build_id()));
  j.hex_field("vdso_hash", inv.kernel().vdso_hash());
  j.end_object();
  j.key("cpu");
  j.begin_object();
  j.field("xsave_size", inv.cpu().xsave_size());
  j.hex_field("xsave_features", inv.cpu().xsave_features());
  j.end_object();
  j.key("options");
  j.begin_object();
  j.field("leave_running", inv.options().leave_running());
  j.field("compression_level", inv.options().compression_level());
  j.field("compression", compression_text(inv));
  j.field("frame_size", inv.options().frame_size());
  j.field("tcp_established", inv.options().tcp_established());
  j.field("ext_unix_sk", inv.options().ext_unix_sk());
  j.end_object();
  j.field("root_pid", inv.root_pid());
  j.key("processes");
  j.begin_array();
  for (const auto& p : img.processes()) {
    j.begin_object();
    j.field("pid", p.pid());
    j.field("ppid", p.ppid());
    j.field("pgid", p.pgid());
    j.field("sid", p.sid());
    j.field("comm", p.comm());
    j.field("zombie", p.zombie());
    j.field("stop_signo", p.stop_signo());
    j.field("mdwe", p.mdwe());
    j.field("ctty_pty", p.ctty_pty() == 0 ? int64_t{-1} : int64_t{p.ctty_pty()} - 1);
    j.field("ctty_fg_pgrp", p.ctty_fg_pgrp());
    if (p.zombie()) {
      j.field("exit_status", p.exit_status());
      j.field("exit", wait_status(p.exit_status()));
    }
    j.key("children");
    j.begin_array();
    for (int c : p.children()) j.value(c);
    j.end_array();
    j.field("exe", p.exe().path());
    j.field("cwd", p.cwd());
    j.field("umask", p.umask());
    j.hex_field("brk", p.mm().brk());
    j.hex_field("start_brk", p.mm().start_brk());
    j.key("threads");
    j.begin_array();
    for (const auto& t : p.threads()) {
      j.begin_object();
      j.field("tid", t.tid());
      j.field("comm", t.comm());
      j.hex_field("rip", t.regs().rip());
      j.hex_field("rsp", t.regs().rsp());
      j.hex_field("sigmask", t.blocked());
      j.hex_field("rseq", t.rseq().rseq_abi_pointer());
      j.hex_field("clear_child_tid", t.clear_child_tid());
      j.hex_field("robust_list", t.robust_list());
      j.field("xsave_bytes", static_cast<uint64_t>(t.xsave().size()));
      j.field("interrupted_syscall", t.interrupted_syscall());
      j.field("seccomp_mode", t.seccomp_mode());
      j.key("seccomp_filters");
      j.begin_array();
      for (const auto& f : t.seccomp_filters()) {
        j.begin_object();
        j.field("instructions", static_cast<uint64_t>(f.program().size() / 8));
        j.hex_field("flags", f.flags());
        j.end_object();
      }
      j.end_array();
      j.key("pending");
      j.begin_array();
      for (const auto& s : t.pending()) j.value(s.signo());
      j.end_array();
      thread_sched_json(j, t);
      j.end_object();
    }
    j.end_array();
    j.key("seccomp_shared");
    j.begin_array();
    for (const auto& f : p.seccomp_shared()) {
      j.begin_object();
      j.field("instructions", static_cast<uint64_t>(f.program().size() / 8));
      j.hex_field("flags", f.flags());
      j.end_object();
    }
    j.end_array();
    timers_json(j, p);
    j.key("sigactions");
    j.begin_array();
    for (const auto& a : p.sigactions()) {
      if (a.handler() == 0) continue;
      j.begin_object();
      j.field("signo", a.signo());
      j.hex_field("handler", a.handler());
      j.hex_field("flags", a.flags());
      j.hex_field("mask", a.mask());
      j.end_object();
    }
    j.end_array();
    j.key("pending");
    j.begin_array();
    for (const auto& s : p.shared_pending()) j.value(s.signo());
    j.end_array();
    j.key("areas");
    j.begin_array();
    for (const auto& a : p.areas()) {
      j.begin_object();
      j.hex_field("start", a.start());
      j.hex_field("end", a.end());
      j.field("size", a.end() - a.start());
      j.field("prot", prot_string(a.prot(), a.shared()));
      j.field("kind", area_kind(a.kind()));
      j.field("name", a.name());
      j.field("stored_pages", a.stored_pages());
      j.field("sysv_shm", a.sysv_shm());
      j.end_object();
    }
    j.end_array();
    j.key("fds");
    j.begin_array();
    for (const auto& f : p.fds()) {
      j.begin_object();
      j.field("fd", f.fd());
      j.field("kind", fd_kind(f.kind()));
      j.field("target", f.target());
      if (f.ghost_id() != 0) j.field("ghost_id", f.ghost_id());
      j.field("flags", f.flags());
      j.field("pos", f.pos());
      j.field("file_id", f.file_id());
      j.field("object_inode", f.object_inode());
      j.field("restorable", f.restorable());
      j.field("pty_end", image::FileDescriptor::PtyEnd_Name(f.pty_end()));
      j.field("pty_index", f.pty_index());
      j.key("locks");
      j.begin_array();
      for (const auto& l : f.locks()) j.value(lock_text(l));
      j.end_array();
      if (f.has_epoll()) {
        j.key("epoll");
        j.begin_object();
        j.field("made_in_pid", f.epoll().made_in_pid());
        j.field("made_at_fd", f.epoll().made_at_fd());
        j.key("targets");
        j.begin_array();
        for (const auto& t : f.epoll().targets()) {
          j.begin_object();
          j.field("fd", t.fd());
          j.hex_field("events", t.events());
          j.field("events_names", objects::epoll::events_name(t.events()));
          j.hex_field("data", t.data());
          j.end_object();
        }
        j.end_array();
        j.end_object();
      }
      if (std::string st = fd_state_text(f); !st.empty()) j.field("state", st);
      j.end_object();
    }
    j.end_array();
    if (!p.zombie()) {
      const auto& store = img.pages(p.pid());
      auto s = summarize(store);
      j.key("pages");
      j.begin_object();
      j.field("data_pages", s.data_pages);
      j.field("zero_pages", s.zero_pages);
      j.field("ref_pages", s.ref_pages);
      j.key("ref_pids");
      j.begin_array();
      for (int32_t pid : s.ref_pids) j.value(pid);
      j.end_array();
      j.field("frames", s.frames);
      j.field("raw_frames", s.raw_frames);
      j.field("frame_digests", s.frame_digests);
      j.field("file_bytes", s.file_bytes);
      j.field("ratio", s.ratio);
      if (opts.pages) {
        j.key("runs");
        j.begin_array();
        for (const auto& r : store.index().runs()) {
          j.begin_object();
          j.hex_field("start", r.start());
          j.field("pages", r.pages());
          j.field("kind", run_kind(r.kind()));
          if (r.kind() == image::PageRun::DATA) j.field("first_page", r.first_page());
          if (r.kind() == image::PageRun::REF) {
            j.field("ref_pid", r.ref_pid());
            j.hex_field("ref_addr", r.ref_addr());
          }
          j.end_object();
        }
        j.end_array();
      }
      j.end_object();
    }
    j.end_object();
  }
  j.end_array();

  Holders holders(img);
  auto holder_array = [&](const std::map<uint64_t, std::vector<std::string>>& m, uint64_t inode) {
    j.key("holders");
    j.begin_array();
    auto it = m.find(inode);
    if (it != m.end())
      for (const auto& w : it->second) j.value(w);
    j.end_array();
  };
  j.key("shared");
  j.begin_object();
  j.key("pipes");
  j.begin_array();
  for (const auto& pipe : img.shared().pipes()) {
    j.begin_object();
    j.field("inode", pipe.inode());
    j.field("fifo", pipe.fifo());
    j.field("capacity", pipe.capacity());
    j.field("bytes", static_cast<uint64_t>(pipe.data().size()));
    j.field("no_writers", pipe.no_writers());
    j.field("no_readers", pipe.no_readers());
    holder_array(holders.pipes, pipe.inode());
    j.end_object();
  }
  j.end_array();
  j.key("ptys");
  j.begin_array();
  for (const auto& t : img.shared().ptys()) {
    j.begin_object();
    j.field("index", t.index());
    j.field("rows", t.rows());
    j.field("cols", t.cols());
    j.field("xpixel", t.xpixel());
    j.field("ypixel", t.ypixel());
    j.field("packet_mode", t.packet_mode());
    j.field("locked", t.locked());
    j.field("unread_at_master", static_cast<uint64_t>(t.to_master().size()));
    j.field("unread_at_slave", static_cast<uint64_t>(t.to_slave().size()));
    j.end_object();
  }
  j.end_array();
  j.key("sockets");
  j.begin_array();
  for (const auto& u : img.shared().sockets()) {
    j.begin_object();
    j.field("inode", u.inode());
    j.field("peer_inode", u.peer_inode());
    j.field("type", socket_type(u.type()));
    j.field("queued_messages", u.queued_size());
    j.field("queued_bytes", queued_bytes(u));
    j.field("shutdown_read", u.shutdown_read());
    j.field("shutdown_write", u.shutdown_write());
    j.field("name", u.name().empty() ? std::string() : objects::unix_name_text(u.name()));
    j.field("listening", u.listening());
    j.field("backlog", u.backlog());
    j.field("passcred", u.passcred());
    if (!u.name().empty() && u.name()[0] != '\0') {
      j.field("file_mode", u.file_mode());
      j.field("file_uid", u.file_uid());
      j.field("file_gid", u.file_gid());
    }
    j.key("pending");
    j.begin_array();
    for (uint64_t c : u.pending()) j.value(c);
    j.end_array();
    j.field("external_peer", u.external_peer());
    if (u.external_peer()) j.field("peer_name", objects::unix_name_text(u.peer_name()));
    j.field("connected_by_name", u.connected_by_name());
    holder_array(holders.sockets, u.inode());
    j.end_object();
  }
  j.end_array();
  j.key("ghosts");
  j.begin_array();
  auto refs = ghost_refs(img);
  for (const auto& g : img.shared().ghosts()) {
    j.begin_object();
    j.field("id", g.id());
    j.field("kind", image::GhostFile::Kind_Name(g.kind()));
    j.field("name", ghost_name(g));
    j.field("mode", g.mode());
    j.field("size", g.size());
    j.field("stored_bytes", static_cast<uint64_t>(g.data().size()));
    j.field("seals", g.seals());
    j.key("used_by");
    j.begin_array();
    for (const auto& r : refs[g.id()]) j.value(r);
    j.end_array();
    j.end_object();
  }
  j.end_array();
  j.key("inet_sockets");
  j.begin_array();
  for (const auto& s : img.shared().inet_sockets()) {
    j.begin_object();
    j.field("inode", s.inode());
    j.field("family", s.family() == AF_INET ? "IPv4" : "IPv6");
    j.field("protocol", s.type() == SOCK_STREAM ? "TCP" : "UDP");
    j.field("local", objects::describe_inet_address(s.family(), s.local_addr(), s.local_port()));
    if (!s.peer_addr().empty())
      j.field("peer", objects::describe_inet_address(s.family(), s.peer_addr(), s.peer_port()));
    j.field("listening", s.listening());
    j.field("backlog", s.backlog());
    j.field("accept_queue", s.accept_queue());      // connections not accepted yet
    j.field("pending_accept", s.pending_accept());  // a client queued at a listener
    j.field("reuseaddr", s.reuseaddr());
    j.field("reuseport", s.reuseport());
    j.field("v6only", s.v6only());
    j.field("nodelay", s.nodelay());
    j.field("keepalive", s.keepalive());
    j.field("keepidle", s.keepidle());
    j.field("keepintvl", s.keepintvl());
    j.field("keepcnt", s.keepcnt());
    j.field("sndbuf", s.sndbuf());
    j.field("rcvbuf", s.rcvbuf());
    j.key("queued");
    j.begin_array();
    for (const auto& d : s.queued()) {
      j.begin_object();
      j.field("bytes", static_cast<uint64_t>(d.data().size()));
      j.field("from", objects::describe_inet_address(s.family(), d.source_addr(), d.source_port()));
      j.end_object();
    }
    j.end_array();
    if (s.has_tcp()) {
      const auto& t = s.tcp();
      j.key("tcp");
      j.begin_object();
      j.field("peer", objects::describe_inet_address(s.family(), t.peer_addr(), t.peer_port()));
      j.field("state", t.state());
      j.field("send_seq", t.send_seq());
      j.field("recv_seq", t.recv_seq());
      j.field("unacked_bytes", static_cast<uint64_t>(t.send_queue().size() - t.unsent()));
      j.field("unsent_bytes", t.unsent());
      j.field("unread_bytes", static_cast<uint64_t>(t.recv_queue().size()));
      j.field("mss", t.mss());
      j.field("sack", t.sack());
      j.field("timestamps", t.timestamps());
      j.field("wscale", t.wscale());
      j.field("snd_wscale", t.snd_wscale());
      j.field("rcv_wscale", t.rcv_wscale());
      j.field("snd_wnd", t.snd_wnd());
      j.field("rcv_wnd", t.rcv_wnd());
      j.end_object();
    }
    holder_array(holders.sockets, s.inode());
    j.end_object();
  }
  j.end_array();
  j.key("sysv_shm");
  j.begin_array();
  for (const auto& m : img.shared().sysv_shm()) {
    j.begin_object();
    j.field("id", static_cast<int64_t>(m.id()));
    j.field("key", static_cast<int64_t>(m.key()));
    j.field("mode", m.mode());
    j.field("size", m.size());
    j.field("uid", m.uid());
    j.field("gid", m.gid());
    j.field("cuid", m.cuid());
    j.field("cgid", m.cgid());
    j.end_object();
  }
  j.end_array();
  j.end_object();
  working_set_json(j, img);
  j.end_object();
}

}  // namespace

int run_show(const ShowOptions& opts) {
  ImageReader img(opts.dir);
  if (opts.verify)
    for (const auto& p : img.processes())
      if (!p.zombie()) img.pages(p.pid()).verify_all();
  if (opts.verify) verify_parents(img);
  if (opts.json)
    print_json(img, opts);
  else
    print_text(img, opts);
  return 0;
}

}  // namespace lazycr::cli
