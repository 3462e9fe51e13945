// Pseudo-terminal pairs held whole by the tree (objects/pty.h): a master (/dev/ptmx, its index
// by TIOCGPTN) and a slave of the same devpts and index. Its descriptors are marked as ends of
// the pair and its state captured; a master whose slave the tree does not hold is refused (a
// new /dev/ptmx opened by path would be another terminal). A slave without its master in the
// tree is a terminal from outside, reopened by path (or lazycr's with --shell-job) as before.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "objects/pty.h"

namespace lazycr::checkpoint {
namespace {

using image::FileDescriptor;

struct Ref {
  size_t proc;
  int index;
};

}  // namespace

void collect_ptys(std::vector<TreeFiles>& procs, SharedCollection& result) {
  auto fd_at = [&](const Ref& r) -> FileDescriptor& {
    return *procs[r.proc].process->mutable_fds(r.index);
  };
  auto who = [&](const Ref& r) {
    return cat("pid ", procs[r.proc].process->pid(), " fd ", fd_at(r).fd());
  };
  // Slave identity: (devpts st_dev, st_rdev).
  using Key = std::pair<uint64_t, uint64_t>;
  std::map<Key, std::vector<Ref>> masters, slaves;
  std::map<Key, int> index_of;
  for (size_t p = 0; p < procs.size(); p++)
    for (int i = 0; i < procs[p].process->fds_size(); i++) {
      Ref ref{p, i};
      FileDescriptor& f = fd_at(ref);
      if (f.kind() != FileDescriptor::CHARDEV) continue;
      if (objects::pty::is_slave_rdev(f.rdev())) {
        slaves[{f.file().dev(), f.rdev()}].push_back(ref);
        continue;
      }
      if (f.rdev() != makedev(5, 2)) continue;  // not /dev/ptmx
      UniqueFd m = copy_of_fd(procs[p], f.fd());
      int index = objects::pty::master_index(m.get());
      // O_PATH opens nothing: the slave's identity without opening the terminal.
      int s = index < 0 ? -1 : ::ioctl(m.get(), TIOCGPTPEER, O_PATH | O_CLOEXEC);
      struct stat st;
      if (s < 0 || ::fstat(UniqueFd(s).get(), &st) != 0) {
        f.set_restorable(false);
        result.why_not[{procs[p].process->pid(), f.fd()}] =
            cat("a pty master (", f.target(), ") whose slave lazycr cannot find");
        continue;
      }
      Key key{st.st_dev, st.st_rdev};
      masters[key].push_back(ref);
      index_of[key] = index;
    }

  for (const auto& [key, mrefs] : masters) {
    const int index = index_of.at(key);
    std::string what = cat("pty /dev/pts/", index, " (master at ", who(mrefs.front()), ")");
    auto it = slaves.find(key);
    const Ref* reader = nullptr;
    if (it != slaves.end())
      for (const Ref& r : it->second)
        if (fd_reads(fd_at(r)) && reader == nullptr) reader = &r;
    if (reader == nullptr) {
      std::string why = it == slaves.end()
                            ? cat(what, ": no process of the tree holds its slave")
                            : cat(what, ": the tree holds its slave only for writing");
      for (const Ref& r : mrefs) {
        fd_at(r).set_restorable(false);
        result.why_not[{procs[r.proc].process->pid(), fd_at(r).fd()}] = why;
      }
      continue;
    }
    UniqueFd m = copy_of_fd(procs[mrefs.front().proc], fd_at(mrefs.front()).fd());
    UniqueFd s = copy_of_fd(procs[reader->proc], fd_at(*reader).fd());
    image::Pty pty = objects::pty::capture(m.get(), s.get(), static_cast<uint32_t>(index), what);
    auto mark = [&](const Ref& r, FileDescriptor::PtyEnd end) {
      fd_at(r).set_pty_end(end);
      fd_at(r).set_pty_index(static_cast<uint32_t>(index));
    };
    for (const Ref& r : mrefs) mark(r, FileDescriptor::PTY_MASTER);
    for (const Ref& r : it->second) mark(r, FileDescriptor::PTY_SLAVE);
    log::debug(what, ": ", pty.to_master().size(), " bytes unread at the master, ",
               pty.to_slave().size(), " at the slave");
    *result.objects.add_ptys() = std::move(pty);
  }
  auto& ptys = *result.objects.mutable_ptys();
  std::sort(ptys.begin(), ptys.end(),
            [](const image::Pty& a, const image::Pty& b) { return a.index() < b.index(); });
  for (int i = 1; i < ptys.size(); i++)
    if (ptys[i].index() == ptys[i - 1].index())
      fail("two pty pairs of the tree have index ", ptys[i].index(),
           " (in two devpts instances); lazycr cannot record both");
}

}  // namespace lazycr::checkpoint
