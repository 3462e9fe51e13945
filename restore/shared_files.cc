// Creating shared open file descriptions, pipes, FIFOs, ptys and sockets in lazycr.
#include "restore/shared_files.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "common/error.h"
#include "common/file_type.h"
#include "common/proc.h"
#include "objects/fd_kinds.h"
#include "objects/pty.h"
#include "objects/socket_families.h"
#include "restore/ghost_files.h"
#include "restore/open_files.h"

namespace lazycr::restore {
namespace {

using image::FileDescriptor;
using image::Pipe;
using image::SharedObjects;

// What F_SETFL changes; O_ASYNC is left out: it needs an owner (F_SETOWN) the image lacks.
constexpr uint32_t kStatusFlags = O_APPEND | O_NONBLOCK | O_DIRECT | O_NOATIME;

struct User {
  int pid;
  const FileDescriptor* f;
};

std::string where(const User& u) {
  return cat("pid ", u.pid, " fd ", u.f->fd());
}

// One open file description of the image and the descriptors that hold it.
struct Description {
  uint64_t id = 0;  // file_id; 0 only for a descriptor of an image without ids (never shared)
  std::vector<User> users;
  const FileDescriptor& f() const { return *users.front().f; }
  std::string who() const {
    std::string s = where(users.front());
    if (users.size() > 1) s += cat(" and ", users.size() - 1, " more");
    return s;
  }
};

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}

bool is_tty(const FileDescriptor& f) {
  return f.kind() == FileDescriptor::CHARDEV &&
         (starts_with(f.target(), "/dev/pts/") || starts_with(f.target(), "/dev/tty") ||
          f.target() == "/dev/console");
}

bool reads(const FileDescriptor& f) {
  int acc = static_cast<int>(f.flags()) & O_ACCMODE;
  return acc == O_RDONLY || acc == O_RDWR;
}

bool writes(const FileDescriptor& f) {
  int acc = static_cast<int>(f.flags()) & O_ACCMODE;
  return acc == O_WRONLY || acc == O_RDWR;
}

// The description's status flags become the image's (flags as recorded in fdinfo).
void set_status_flags(int fd, uint32_t flags, const std::string& what) {
  int cur = ::fcntl(fd, F_GETFL);
  if (cur < 0) fail_errno(what, ": fcntl(F_GETFL)");
  int want =
      static_cast<int>((static_cast<uint32_t>(cur) & ~kStatusFlags) | (flags & kStatusFlags));
  if (want != cur && ::fcntl(fd, F_SETFL, want) != 0)
    fail_errno(what, ": fcntl(F_SETFL, ", want, ")");
}

UniqueFd reopen(int fd, uint32_t flags, const std::string& what) {
  // Non-blocking: a FIFO opened for writing alone would otherwise wait for a reader.
  int got = ::open(cat("/proc/self/fd/", fd).c_str(),
                   static_cast<int>(flags & O_ACCMODE) | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (got < 0) fail_errno(what, ": opening another description of it through /proc/self/fd");
  return UniqueFd(got);
}

void set_capacity(int fd, const Pipe& p, const std::string& what) {
  int cur = ::fcntl(fd, F_GETPIPE_SZ);
  if (cur < 0) fail_errno(what, ": fcntl(F_GETPIPE_SZ)");
  if (p.capacity() == 0 || static_cast<uint32_t>(cur) == p.capacity()) return;
  if (::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(p.capacity())) < 0) {
    int err = errno;
    auto max = proc::try_read_file("/proc/sys/fs/pipe-max-size");
    std::string limit = max ? cat(" (fs.pipe-max-size ", max->substr(0, max->find('\n')), ")") : "";
    fail_errno_value(err, cat(what, ": fcntl(F_SETPIPE_SZ, ", p.capacity(), ")", limit));
  }
}

// Writes the pipe's buffered data through fd (non-blocking: it must all fit now).
void write_data(int fd, const Pipe& p, const std::string& what) {
  const std::string& d = p.data();
  if (p.capacity() != 0 && d.size() > p.capacity())
    fail(what, ": its ", d.size(), " bytes of data exceed its capacity of ", p.capacity(),
         " bytes");
  if (d.empty()) return;
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) fail_errno(what, ": fcntl(O_NONBLOCK)");
  size_t off = 0;
  while (off < d.size()) {
    ssize_t n = ::write(fd, d.data() + off, d.size() - off);
    if (n > 0) {
      off += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      fail(what, ": only ", off, " of its ", d.size(), " bytes of data fit (pipe size ",
           ::fcntl(fd, F_GETPIPE_SZ), " bytes)");
    } else {
      fail_errno(what, ": writing its ", d.size(), " bytes of data");
    }
  }
}

class Builder {
 public:
  Builder(const std::vector<image::Process>& processes, const SharedObjects& shared, bool shell_job,
          bool ext_unix_sk, const GhostFiles* ghosts, std::map<std::pair<int, int>, FdPlan>& plans,
          std::map<uint64_t, UniqueFd>& out)
      : shared_(shared),
        shell_job_(shell_job),
        ext_unix_sk_(ext_unix_sk),
        ghosts_(ghosts),
        plans_(plans),
        out_(out) {
    objects::SocketOptions opts;
    opts.ext_unix_sk = ext_unix_sk;
    for (const objects::SocketFamily* fam : objects::socket_families())
      families_.push_back(fam->restore(shared, opts));
    index(processes);
  }

  void build() {
    std::map<uint64_t, std::vector<const Description*>> pipes, sockets;  // object inode
    std::map<uint32_t, std::vector<const Description*>> ptys;            // pty index
    std::vector<const Description*> files, kinds;
    for (const auto& d : descs_) {
      if (shell_job_ && leads_outside(d)) {
        give_std(d);
        continue;
      }
      const FileDescriptor& f = d.f();
      if (!f.restorable())
        fail(where(d.users.front()), " (", f.target(), ") is a ",
             FileDescriptor::Kind_Name(f.kind()), " that lazycr cannot restore",
             !shell_job_ && f.fd() <= 2 ? "; --shell-job gives the process lazycr's fds 0-2 instead"
                                        : "");
      switch (f.kind()) {
        case FileDescriptor::EPOLL:
          for (const User& u : d.users) plans_[{u.pid, u.f->fd()}] = FdPlan{FdPlan::kObjects, -1};
          break;
        case FileDescriptor::PIPE:
        case FileDescriptor::FIFO:
          pipes[f.object_inode()].push_back(&d);
          break;
        case FileDescriptor::SOCKET:
          sockets[f.object_inode()].push_back(&d);
          break;
        default:
          if (f.pty_end() != FileDescriptor::NOT_PTY_PAIR)
            ptys[f.pty_index()].push_back(&d);
          else if (f.ghost_id() != 0)
            open_ghost(d);
          else if (objects::fd_kind(f.kind()) != nullptr)
            kinds.push_back(&d);
          else if (d.users.size() > 1)
            files.push_back(&d);
          else
            plans_[{d.users.front().pid, f.fd()}] = FdPlan{FdPlan::kOpenInside, -1};
      }
    }
    for (const auto& [inode, ds] : pipes) make_pipe(inode, ds);
    for (const auto& [index, ds] : ptys) make_pty(index, ds);
    make_sockets(sockets);
    for (const Description* d : files) open_file(*d);
    for (const Description* d : kinds) make_kind(*d);
    temporaries_.clear();  // ends no descriptor holds: readers see EOF, writers EPIPE
  }

 private:
  void index(const std::vector<image::Process>& processes) {
    std::map<uint64_t, size_t> by_id;
    for (const auto& p : processes) {
      creds_[p.pid()] = &p.creds();
      for (const auto& f : p.fds()) {
        User u{p.pid(), &f};
        if (!plans_.emplace(std::make_pair(p.pid(), f.fd()), FdPlan{}).second)
          fail(where(u), " appears twice in the image");
        bool object = f.kind() == FileDescriptor::PIPE || f.kind() == FileDescriptor::FIFO ||
                      f.kind() == FileDescriptor::SOCKET;
        if (object && f.restorable() && f.object_inode() == 0)
          fail(where(u), " (", f.target(), ") has no object inode (an image older than format 2)");
        if (f.file_id() == 0) {
          if (object && f.restorable())
            fail(where(u), " (", f.target(), ") has no file id (an image older than format 2)");
          descs_.push_back(Description{0, {u}});
          continue;
        }
        auto [it, fresh] = by_id.emplace(f.file_id(), descs_.size());
        if (fresh) {
          descs_.push_back(Description{f.file_id(), {u}});
          continue;
        }
        Description& d = descs_[it->second];
        const FileDescriptor& g = d.f();
        if (g.kind() != f.kind() || g.object_inode() != f.object_inode() ||
            g.restorable() != f.restorable())
          fail("file id ", f.file_id(), " is a ", FileDescriptor::Kind_Name(g.kind()), " (",
               g.target(), ") at ", where(d.users.front()), " but a ",
               FileDescriptor::Kind_Name(f.kind()), " (", f.target(), ") at ", where(u));
        d.users.push_back(u);
      }
    }
    for (const auto& p : shared_.pipes()) pipes_[p.inode()] = &p;
    for (const auto& d : descs_) {
      const FileDescriptor& f = d.f();
      if (!f.restorable()) continue;
      if (f.kind() == FileDescriptor::PIPE || f.kind() == FileDescriptor::FIFO) {
        // An end no process had open at dump time is complete as it is: closed.
        auto it = pipes_.find(f.object_inode());
        bool closed_r = it != pipes_.end() && it->second->no_readers();
        bool closed_w = it != pipes_.end() && it->second->no_writers();
        auto& ends = pipe_ends_[f.object_inode()];
        ends.first |= reads(f) || closed_r;
        ends.second |= writes(f) || closed_w;
      } else if (f.kind() == FileDescriptor::SOCKET) {
        held_sockets_.insert(f.object_inode());
      }
    }
  }

  // Held at 0-2 somewhere and leading outside the tree (only asked with --shell-job).
  bool leads_outside(const Description& d) const {
    bool std_fd =
        std::any_of(d.users.begin(), d.users.end(), [](const User& u) { return u.f->fd() <= 2; });
    if (!std_fd) return false;
    const FileDescriptor& f = d.f();
    if (f.restorable() && f.pty_end() != FileDescriptor::NOT_PTY_PAIR) return false;
    if (!f.restorable() || is_tty(f)) return true;
    if (f.kind() == FileDescriptor::PIPE) {
      auto it = pipe_ends_.find(f.object_inode());
      return !(it->second.first && it->second.second);
    }
    if (f.kind() == FileDescriptor::SOCKET) {
      objects::SocketRestore* fam = family_of(f.object_inode());
      // None: refused, with the reason, when it is made.
      return fam != nullptr && fam->leads_outside(f.object_inode(), held_sockets_);
    }
    return false;
  }

  // Each descriptor gets lazycr's standard descriptor of the same number; a dup of it at
  // another number the one its process holds it at (or, failing that, any process).
  void give_std(const Description& d) {
    for (const User& u : d.users) {
      int own = -1, any = -1;
      for (const User& v : d.users) {
        if (v.f->fd() > 2) continue;
        if (v.pid == u.pid && (own < 0 || v.f->fd() < own)) own = v.f->fd();
        if (any < 0 || v.f->fd() < any) any = v.f->fd();
      }
      int num = u.f->fd() <= 2 ? u.f->fd() : own >= 0 ? own : any;
      plans_[{u.pid, u.f->fd()}] = FdPlan{FdPlan::kLazycrStd, num};
    }
  }

  void hand_out(const Description& d, UniqueFd fd) {
    for (const User& u : d.users) plans_[{u.pid, u.f->fd()}] = FdPlan{FdPlan::kShared, fd.get()};
    out_[d.id] = std::move(fd);
  }

  void make_pipe(uint64_t inode, const std::vector<const Description*>& ds) {
    const Description& first = *ds.front();
    bool fifo = first.f().kind() == FileDescriptor::FIFO;
    std::string what = cat(fifo ? "FIFO" : "pipe", " inode ", inode);
    auto it = pipes_.find(inode);
    if (it == pipes_.end()) fail(what, " (", first.who(), "): not in the image's shared objects");
    const Pipe& p = *it->second;
    for (const Description* d : ds)
      if ((d->f().kind() == FileDescriptor::FIFO) != p.fifo())
        fail(what, ": ", where(d->users.front()), " is a ",
             FileDescriptor::Kind_Name(d->f().kind()), " but the image's shared objects say ",
             p.fifo() ? "a FIFO" : "an anonymous pipe");
    for (const Description* d : ds)
      if ((p.no_writers() && writes(d->f())) || (p.no_readers() && reads(d->f())))
        fail(what, ": ", where(d->users.front()),
             " holds an end the image says no process had open");
    if (fifo) {
      make_fifo(p, ds);
      return;
    }
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) fail_errno(what, ": pipe2");
    UniqueFd r(fds[0]), w(fds[1]);
    set_capacity(w.get(), p, what);
    write_data(w.get(), p, what);
    // The first reading and the first writing description are pipe2's ends; any other
    // (reopened through /proc/PID/fd at dump time) is opened again the same way.
    const Description* takes_r = nullptr;
    const Description* takes_w = nullptr;
    for (const Description* d : ds) {
      int acc = static_cast<int>(d->f().flags()) & O_ACCMODE;
      if (acc == O_RDONLY && !takes_r)
        takes_r = d;
      else if (acc == O_WRONLY && !takes_w)
        takes_w = d;
    }
    std::vector<std::pair<const Description*, UniqueFd>> made;
    for (const Description* d : ds)
      if (d != takes_r && d != takes_w)
        made.emplace_back(d, reopen(r.get(), d->f().flags(), cat(what, " (", d->who(), ")")));
    if (takes_r) made.emplace_back(takes_r, std::move(r));
    if (takes_w) made.emplace_back(takes_w, std::move(w));
    for (auto& [d, fd] : made) set_status_flags(fd.get(), d->f().flags(), what);
    for (auto& [d, fd] : made) hand_out(*d, std::move(fd));
    if (r) temporaries_.push_back(std::move(r));
    if (w) temporaries_.push_back(std::move(w));
  }

  void make_fifo(const Pipe& p, const std::vector<const Description*>& ds) {
    const FileDescriptor& f = ds.front()->f();
    std::string path = f.file().path().empty() ? f.target() : f.file().path();
    std::string what = cat("FIFO ", path, " (pipe inode ", p.inode(), ")");
    for (const Description* d : ds)
      if (d->f().file().deleted()) fail(what, ": it had been deleted at dump time");
    // The path must still be the FIFO the image's descriptors had open.
    auto check = [&](const struct stat& st) {
      if (!S_ISFIFO(st.st_mode))
        fail(what, " is not a FIFO any more (now ", file_type_name(st.st_mode), ")");
      for (const Description* d : ds) {
        const auto& id = d->f().file();
        if (id.inode() == 0) continue;
        if (st.st_dev != id.dev() || st.st_ino != id.inode())
          fail(what, " changed since the dump (device:inode ", id.dev(), ":", id.inode(), " -> ",
               st.st_dev, ":", st.st_ino, ")");
      }
    };
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) fail_errno(what, ": cannot stat");
    check(st);
    // Read and write: it never blocks, and it keeps the FIFO's pipe alive (holding both ends)
    // while the data goes in and each description is opened.
    UniqueFd hold(::open(path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
    if (!hold) fail_errno(what, ": open");
    if (::fstat(hold.get(), &st) != 0) fail_errno(what, ": fstat");
    check(st);
    if (!p.data().empty()) {
      int queued = 0;
      if (::ioctl(hold.get(), FIONREAD, &queued) != 0) fail_errno(what, ": ioctl(FIONREAD)");
      if (queued > 0)
        fail(what, " already holds ", queued,
             " unread bytes: a process outside the image has it open, and lazycr will not write "
             "its ",
             p.data().size(), " bytes a second time");
    }
    // Nothing goes in before every process of the image is known to be allowed to open it
    // as it had (open_files.h): lazycr's root must not write into a FIFO for them.
    for (const Description* d : ds)
      for (const User& u : d->users) {
        OpenRequest req;
        req.path = path;
        req.flags = static_cast<int>(u.f->flags() & O_ACCMODE) | O_NONBLOCK;
        req.type = S_IFIFO;
        req.id = &u.f->file();
        req.what = where(u);
        open_here_as(*creds_.at(u.pid), req);
      }
    set_capacity(hold.get(), p, what);
    write_data(hold.get(), p, what);
    std::vector<std::pair<const Description*, UniqueFd>> made;
    for (const Description* d : ds) {
      UniqueFd fd = reopen(hold.get(), d->f().flags(), cat(what, " (", d->who(), ")"));
      set_status_flags(fd.get(), d->f().flags(), what);
      made.emplace_back(d, std::move(fd));
    }
    for (auto& [d, fd] : made) hand_out(*d, std::move(fd));
    temporaries_.push_back(std::move(hold));
  }

  // A pty pair, remade in lazycr (objects/pty.h): the master's description and each of the
  // slave's, with their status flags.
  void make_pty(uint32_t index, const std::vector<const Description*>& ds) {
    std::string what = cat("pty ", index, " (", ds.front()->who(), ")");
    const image::Pty* p = nullptr;
    for (const auto& q : shared_.ptys())
      if (q.index() == index) p = &q;
    if (p == nullptr) fail(what, ": not in the image's shared objects");
    objects::pty::Pair pair(*p);
    const Description* master = nullptr;
    std::vector<std::pair<const Description*, UniqueFd>> made;
    for (const Description* d : ds) {
      if (d->f().pty_end() == FileDescriptor::PTY_MASTER) {
        if (master != nullptr)
          fail(what, ": two descriptions of its master (", master->who(), " and ", d->who(), ")");
        master = d;
        continue;
      }
      UniqueFd fd = pair.open_slave(d->f().flags());
      set_status_flags(fd.get(), d->f().flags(), what);
      made.emplace_back(d, std::move(fd));
    }
    if (master == nullptr || made.empty()) fail(what, ": the image does not hold both its ends");
    pair.finish();
    UniqueFd m = pair.take_master();
    set_status_flags(m.get(), master->f().flags(), what);
    made.emplace_back(master, std::move(m));
    for (auto& [d, fd] : made) hand_out(*d, std::move(fd));
  }

  objects::SocketRestore* family_of(uint64_t inode) const {
    for (const auto& fam : families_)
      if (fam->has(inode)) return fam.get();
    return nullptr;
  }

  // Every socket held (objects/socket_families.h), made by its family in lazycr's current
  // network namespace; then each family finishes its sockets, once they all exist.
  void make_sockets(const std::map<uint64_t, std::vector<const Description*>>& held) {
    std::map<objects::SocketRestore*, std::map<uint64_t, std::string>> by_family;
    for (const auto& [inode, ds] : held) {
      objects::SocketRestore* fam = family_of(inode);
      if (fam == nullptr)
        fail("socket inode ", inode, " (", ds.front()->who(),
             "): not in the image's shared objects");
      if (ds.size() > 1)
        fail("socket inode ", inode, " is held by two open file descriptions (file ids ", ds[0]->id,
             " at ", ds[0]->who(), " and ", ds[1]->id, " at ", ds[1]->who(),
             "), which a socket cannot have");
      by_family[fam][inode] = ds.front()->who();
    }
    auto as_holder = [&](uint64_t inode, const std::function<void()>& fn) {
      run_here_as(*creds_.at(held.at(inode).front()->users.front().pid), fn);
    };
    for (const auto& fam : families_) {
      auto it = by_family.find(fam.get());
      if (it == by_family.end()) continue;
      std::map<uint64_t, UniqueFd> made = fam->create(it->second, as_holder);
      for (const auto& [inode, who] : it->second) {
        const Description& d = *held.at(inode).front();
        UniqueFd fd = std::move(made.at(inode));
        set_status_flags(fd.get(), d.f().flags(), cat("socket inode ", inode));
        hand_out(d, std::move(fd));
      }
    }
    for (const auto& fam : families_) fam->finish();
  }

  // A descriptor kind of objects/fd_kinds.h: made here, or a stand-in its kind replaces inside
  // the process once the tree exists.
  void make_kind(const Description& d) {
    const FileDescriptor& f = d.f();
    const objects::FdKind& k = *objects::fd_kind(f.kind());
    std::string what = cat(FileDescriptor::Kind_Name(f.kind()), " at ", d.who());
    if (k.create == nullptr) {
      UniqueFd stand_in(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      if (!stand_in) fail_errno(what, ": opening /dev/null to hold its place");
      hand_out(d, std::move(stand_in));
      return;
    }
    objects::FdCreateContext ctx;
    ctx.open_readable = [&](const std::string& path, bool directory, uint64_t dev, uint64_t inode) {
      image::FileIdentity id;
      id.set_path(path);
      id.set_dev(dev);
      id.set_inode(inode);
      OpenRequest req;
      req.path = path;
      req.flags = O_RDONLY | O_NONBLOCK | (directory ? O_DIRECTORY : 0);
      req.type = directory ? S_IFDIR : S_IFREG;
      req.id = &id;
      req.what = what;
      UniqueFd fd;
      std::set<const image::Credentials*> tried;
      for (const User& u : d.users) {
        const image::Credentials* c = creds_.at(u.pid);
        if (!tried.insert(c).second) continue;
        UniqueFd got = open_here_as(*c, req);
        if (!fd) fd = std::move(got);
      }
      return fd;
    };
    ctx.as_holders = [&](const std::function<void()>& fn) {
      std::set<const image::Credentials*> tried;
      for (const User& u : d.users)
        if (tried.insert(creds_.at(u.pid)).second) run_here_as(*creds_.at(u.pid), fn);
    };
    try {
      hand_out(d, k.create(f, ctx));
    } catch (const Error& e) {
      throw Error(cat(what, ": ", e.what()), e.sys_errno());
    }
  }

  // A description several descriptors share, opened here once by path, at its position, as
  // each process holding it (open_files.h): every one of them must be allowed to.
  void open_ghost(const Description& d) {
    const FileDescriptor& f = d.f();
    std::string what = cat("file id ", d.id, " (", f.target(), ", ", d.who(), ")");
    if (ghosts_ == nullptr) fail(what, ": a ghost file, and no ghost files were made");
    hand_out(d, ghosts_->open_description(f, what));
  }

  void open_file(const Description& d) {
    const FileDescriptor& f = d.f();
    std::string path = f.file().path().empty() ? f.target() : f.file().path();
    std::string what = cat("file id ", d.id, " (", path, ", ", d.who(), ")");
    if (f.file().deleted()) fail(what, ": the file had been deleted at dump time");
    OpenRequest req = request_for_fd(f);
    req.what = what;
    // One holder allowed to open it is enough: a description shared after fork is often one a
    // privileged parent opened before its children dropped privileges (nginx's master opens
    // its logs as root; its workers, nobody, inherit them). The image is trusted to run with
    // each holder's credentials (restore/trust.h), so that holder could have handed it on.
    UniqueFd fd;
    std::optional<Error> denied;
    std::set<const image::Credentials*> tried;
    for (const User& u : d.users) {
      const image::Credentials* c = creds_.at(u.pid);
      if (!tried.insert(c).second) continue;
      try {
        UniqueFd got = open_here_as(*c, req);
        if (!fd) fd = std::move(got);
      } catch (const Error& e) {
        if (e.sys_errno() != EACCES && e.sys_errno() != EPERM) throw;
        if (!denied)
          denied = Error(cat(e.what(), " (as the holder ", where(u), ")"), e.sys_errno());
      }
    }
    if (!fd) throw *denied;
    if ((f.kind() == FileDescriptor::REGULAR || f.kind() == FileDescriptor::BLOCKDEV) &&
        f.pos() != 0 && ::lseek(fd.get(), static_cast<off_t>(f.pos()), SEEK_SET) < 0)
      fail_errno(what, ": lseek to ", f.pos());
    hand_out(d, std::move(fd));
  }

  const SharedObjects& shared_;
  bool shell_job_;
  bool ext_unix_sk_;
  const GhostFiles* ghosts_;
  std::map<std::pair<int, int>, FdPlan>& plans_;
  std::map<uint64_t, UniqueFd>& out_;
  std::vector<Description> descs_;
  std::map<uint64_t, std::pair<bool, bool>> pipe_ends_;  // inode -> (read end held, write end)
  std::set<uint64_t> held_sockets_;
  std::map<uint64_t, const Pipe*> pipes_;
  std::vector<std::unique_ptr<objects::SocketRestore>> families_;  // socket_families() order
  std::vector<UniqueFd> temporaries_;
  std::map<int, const image::Credentials*> creds_;  // by pid
};

}  // namespace

SharedFiles::SharedFiles(const std::vector<image::Process>& processes,
                         const image::SharedObjects& shared, bool shell_job,
                         const GhostFiles* ghosts, bool ext_unix_sk) {
  Builder(processes, shared, shell_job, ext_unix_sk, ghosts, plans_, descriptions_).build();
}

FdPlan SharedFiles::plan(int pid, const image::FileDescriptor& f) const {
  auto it = plans_.find({pid, f.fd()});
  if (it == plans_.end())
    fail("pid ", pid, " fd ", f.fd(), " is not in the image SharedFiles was made from");
  return it->second;
}

}  // namespace lazycr::restore
