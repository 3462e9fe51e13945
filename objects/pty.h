// Pseudo-terminal pairs whose master (/dev/ptmx) and a slave (/dev/pts/N) are both held by the
// tree (tmux, screen, expect, script), and the controlling terminal of the session leaders
// that have such a slave as theirs. Both halves of each live here:
// - a pair (shared.pb Pty): capture() reads its settings (termios of both sides, window size,
//   packet mode, lock) and the unread data of both directions, which it must read to see and
//   so writes back at once (TIOCSTI, before the tree runs again); recreate() makes a new pair
//   in lazycr with the same settings and data, before any process of the restore exists. The
//   slave's number differs after a restore (/dev/pts/N is whatever the kernel gives; CRIU keeps
//   it only inside a devpts of its own).
// - the controlling terminal (objects table kind): the dump records it for a session leader
//   (Process.ctty_pty, ctty_fg_pgrp from /proc/PID/stat tty_nr and tpgid); the restore makes
//   the slave the leader's controlling terminal (TIOCSCTTY) once its descriptors are in place
//   and gives the foreground back to the recorded group (TIOCSPGRP).
// What is not restored exactly: a pending packet-mode status byte (consumed by the read at
// dump), the line boundaries of typed input other than '\n' (a line ended by EOF or EOL is
// restored as the start of an unfinished line), and the controlling terminal of processes that
// existed before their leader got it back (the kernel gives it only at fork): they keep none.
#pragma once

#include <cstdint>
#include <string>

#include "common/fd.h"
#include "image-format/shared.pb.h"
#include "objects/objects.h"

namespace lazycr::objects::pty {

// Unread data the dump moves per direction at most (the line discipline holds 4 KiB, the
// master's flip buffers up to 64 KiB more).
inline constexpr size_t kMaxQueued = 256 * 1024;
inline constexpr size_t kTermiosSize = 44;  // struct termios2

// The pty index of a master (fdinfo "tty-index:" of /dev/ptmx); -1 when not a pty master.
int master_index(int master_fd);
// True for the device number of a /dev/pts/N slave (UNIX98 pty slave majors 136-143).
bool is_slave_rdev(uint64_t rdev);

// Reads the pair's state through lazycr's copies of a master and a slave descriptor of the
// frozen tree and leaves it as it found it (throws naming `what`; on a throw after data was
// read, the data is written back first).
image::Pty capture(int master, int slave, uint32_t index, const std::string& what);

// A new pair with p's settings and data: the master, and slaves opened by open_slave().
class Pair {
 public:
  explicit Pair(const image::Pty& p);
  int master() const { return master_.get(); }
  // Another description of the slave side with the access mode of `flags` (TIOCGPTPEER).
  UniqueFd open_slave(uint32_t flags) const;
  // Packet mode and lock, last: the settings before them would leave a packet status byte.
  void finish();
  // The master, once finished.
  UniqueFd take_master() { return std::move(master_); }

 private:
  const image::Pty& p_;
  UniqueFd master_;
  UniqueFd slave_;  // held until finish() so that data written now is not hung up
};

// The objects-table kind (objects.h): the controlling terminal of a session leader.
void dump_ctty(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore_ctty(RestorePoint point, RemoteProcess& p, const image::Process& proc);

}  // namespace lazycr::objects::pty
