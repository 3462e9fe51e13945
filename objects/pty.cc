#include "objects/pty.h"

#include <asm/termbits.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

#include "common/error.h"
#include "common/proc.h"

namespace lazycr::objects::pty {
namespace {

static_assert(sizeof(termios2) == kTermiosSize);

// The line discipline's buffer (N_TTY_BUF_SIZE) less one: what TIOCSTI can put back. More
// unread data than this may also sit in the pty's flip buffers, out of sight.
constexpr size_t kLdiscRoom = 4095;

termios2 get_termios(int fd, const std::string& what) {
  termios2 t;
  if (::ioctl(fd, TCGETS2, &t) != 0) fail_errno(what, ": ioctl(TCGETS2)");
  return t;
}

void set_termios(int fd, const termios2& t, const std::string& what) {
  // TCSETS2, not TCSETSW2: it must not wait for output to drain.
  if (::ioctl(fd, TCSETS2, &t) != 0) fail_errno(what, ": ioctl(TCSETS2)");
}

termios2 termios_of(const std::string& bytes, const std::string& what) {
  if (bytes.size() != sizeof(termios2))
    fail(what, ": termios of ", bytes.size(), " bytes, not ", sizeof(termios2));
  termios2 t;
  std::memcpy(&t, bytes.data(), sizeof t);
  return t;
}

std::string bytes_of(const termios2& t) {
  return std::string(reinterpret_cast<const char*>(&t), sizeof t);
}

// The description's status flags with O_NONBLOCK for the lifetime of this object (the tree is
// frozen: it never sees them), so that reading what is queued never waits.
class NonBlocking {
 public:
  NonBlocking(int fd, const std::string& what) : fd_(fd) {
    old_ = ::fcntl(fd, F_GETFL);
    if (old_ < 0 || ::fcntl(fd, F_SETFL, old_ | O_NONBLOCK) != 0)
      fail_errno(what, ": fcntl(O_NONBLOCK)");
  }
  ~NonBlocking() { ::fcntl(fd_, F_SETFL, old_); }
  NonBlocking(const NonBlocking&) = delete;
  NonBlocking& operator=(const NonBlocking&) = delete;

 private:
  int fd_;
  int old_;
};

int queued(int fd, const std::string& what) {
  int n = 0;
  if (::ioctl(fd, FIONREAD, &n) != 0) fail_errno(what, ": ioctl(FIONREAD)");
  return n;
}

// Everything readable now at fd (non-blocking, non-canonical); with packet mode the leading
// status byte of each read is dropped.
std::string drain(int fd, bool packet, const std::string& what) {
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    if (n < 0) fail_errno(what, ": reading its unread data");
    if (n == 0) break;
    size_t skip = packet ? 1 : 0;
    if (static_cast<size_t>(n) > skip) out.append(buf + skip, static_cast<size_t>(n) - skip);
    if (out.size() > kMaxQueued) fail(what, ": more than ", kMaxQueued, " bytes unread");
  }
  return out;
}

void push_raw(int fd, const std::string& data, const std::string& what) {
  for (char c : data)
    if (::ioctl(fd, TIOCSTI, &c) != 0)
      fail_errno(what, ": putting back its ", data.size(),
                 " unread bytes (ioctl(TIOCSTI); it needs CAP_SYS_ADMIN or "
                 "dev.tty.legacy_tiocsti=1)");
}

// Puts `data` into the input queue of a master: its line discipline runs with the driver's raw
// termios, which no ioctl reaches (they all go to the slave), so every byte is stored as is.
void push_master(int master, const std::string& data, const std::string& what) {
  if (data.size() > kLdiscRoom)
    fail(what, ": ", data.size(), " unread bytes do not fit the line discipline's ", kLdiscRoom);
  push_raw(master, data, what);
}

// Puts `data` into the input queue of the slave behind fd (what a read on fd returns next),
// through its own line discipline, byte by byte (TIOCSTI: synchronous, unlike a write from the
// other side, which the kernel hands over later). While it does, the tty's termios is set so
// that the discipline stores every byte as it is: no echo, no signals, no input mapping, and
// in canonical mode line ends at '\n' only (every other editing character is a byte the data
// does not hold); then the termios is put back.
void push(int fd, const std::string& data, const std::string& what) {
  if (data.empty()) return;
  if (data.size() > kLdiscRoom)
    fail(what, ": ", data.size(), " unread bytes do not fit the line discipline's ", kLdiscRoom);
  const termios2 orig = get_termios(fd, what);
  termios2 t = orig;
  // IXON and the start/stop characters stay: changing them sends a packet-mode status byte.
  t.c_iflag &= IXON;
  t.c_lflag &= ICANON;
  if (t.c_iflag & IXON)
    for (char c : data)
      if (static_cast<cc_t>(c) == orig.c_cc[VSTART] || static_cast<cc_t>(c) == orig.c_cc[VSTOP])
        fail(what, ": its unread data holds a flow-control character (IXON)");
  bool used[256] = {};
  for (char c : data) used[static_cast<unsigned char>(c)] = true;
  used['\n'] = used[orig.c_cc[VSTART]] = used[orig.c_cc[VSTOP]] = true;
  int spare = -1;
  for (int c = 1; c < 256 && spare < 0; c++)
    if (!used[c]) spare = c;
  if (spare < 0) fail(what, ": its unread data holds every byte value; lazycr cannot put it back");
  for (int i :
       {VINTR, VQUIT, VERASE, VKILL, VEOF, VEOL, VEOL2, VWERASE, VREPRINT, VLNEXT, VSUSP, VDISCARD})
    t.c_cc[i] = static_cast<cc_t>(spare);
  set_termios(fd, t, what);
  std::string err;
  for (char c : data)
    if (::ioctl(fd, TIOCSTI, &c) != 0) {
      err = std::strerror(errno);
      break;
    }
  set_termios(fd, orig, what);
  if (!err.empty())
    fail(what, ": putting back its ", data.size(), " unread bytes (ioctl(TIOCSTI): ", err,
         "; it needs CAP_SYS_ADMIN or dev.tty.legacy_tiocsti=1)");
}

// What a canonical-mode slave holds, unfinished line included: read with ICANON off (the
// kernel then makes every queued byte readable).
std::string drain_input(int slave, const std::string& what) {
  const termios2 orig = get_termios(slave, what);
  std::string data;
  if (orig.c_lflag & ICANON) {
    termios2 t = orig;
    t.c_lflag &= ~ICANON;
    set_termios(slave, t, what);
    try {
      data = drain(slave, false, what);
    } catch (const Error&) {
      set_termios(slave, orig, what);
      throw;
    }
    set_termios(slave, orig, what);
  } else {
    data = drain(slave, false, what);
  }
  return data;
}

pid_t stat_field(const std::string& stat, int index_after_comm) {
  std::istringstream in(stat.substr(stat.rfind(')') + 2));
  std::string v;
  for (int i = 0; i <= index_after_comm; i++) in >> v;
  return static_cast<pid_t>(std::strtol(v.c_str(), nullptr, 10));
}

}  // namespace

int master_index(int master_fd) {
  unsigned int n = 0;
  if (::ioctl(master_fd, TIOCGPTN, &n) != 0) return -1;
  return static_cast<int>(n);
}

bool is_slave_rdev(uint64_t rdev) {
  unsigned m = major(static_cast<dev_t>(rdev));
  return m >= 136 && m <= 143;
}

image::Pty capture(int master, int slave, uint32_t index, const std::string& what) {
  image::Pty out;
  out.set_index(index);
  const termios2 st = get_termios(slave, what);
  out.set_termios(bytes_of(st));
  winsize ws{};
  if (::ioctl(master, TIOCGWINSZ, &ws) != 0) fail_errno(what, ": ioctl(TIOCGWINSZ)");
  out.set_rows(ws.ws_row);
  out.set_cols(ws.ws_col);
  out.set_xpixel(ws.ws_xpixel);
  out.set_ypixel(ws.ws_ypixel);
  int pkt = 0, locked = 0;
  if (::ioctl(master, TIOCGPKT, &pkt) != 0) fail_errno(what, ": ioctl(TIOCGPKT)");
  if (::ioctl(master, TIOCGPTLCK, &locked) != 0) fail_errno(what, ": ioctl(TIOCGPTLCK)");
  out.set_packet_mode(pkt != 0);
  out.set_locked(locked != 0);
  if ((st.c_lflag & EXTPROC) && pkt)
    fail(what, ": packet mode with EXTPROC (a termios change would be seen by its reader)");
  // Unread data: reading it is the only way to see it, so it goes back at once. More than the
  // line discipline holds may have more behind it in the flip buffers: refused.
  const int out_q = queued(master, what);
  if (static_cast<size_t>(out_q) >= kLdiscRoom - 64)
    fail(what, ": ", out_q, " bytes of output are unread at its master; lazycr restores up to ",
         kLdiscRoom - 64);
  NonBlocking nb_master(master, what);
  NonBlocking nb_slave(slave, what);
  std::string to_master = drain(master, pkt != 0, cat(what, " (master side)"));
  std::string to_slave;
  try {
    to_slave = drain_input(slave, cat(what, " (slave side)"));
    if (to_slave.size() >= kLdiscRoom - 64)
      fail(what, ": ", to_slave.size(), " bytes of input are unread; lazycr restores up to ",
           kLdiscRoom - 64);
  } catch (const Error&) {
    push_master(master, to_master, cat(what, " (master side)"));
    push(slave, to_slave, cat(what, " (slave side)"));
    throw;
  }
  push_master(master, to_master, cat(what, " (master side)"));
  push(slave, to_slave, cat(what, " (slave side)"));
  out.set_to_master(std::move(to_master));
  out.set_to_slave(std::move(to_slave));
  return out;
}

Pair::Pair(const image::Pty& p) : p_(p) {
  std::string what = cat("pty ", p.index(), " of the image");
  master_ = UniqueFd(::open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC));
  if (!master_) fail_errno(what, ": open /dev/ptmx");
  int zero = 0;
  if (::ioctl(master_.get(), TIOCSPTLCK, &zero) != 0) fail_errno(what, ": unlockpt");
  slave_ = open_slave(O_RDWR);
  set_termios(slave_.get(), termios_of(p.termios(), what), what);
  winsize ws{};
  ws.ws_row = static_cast<unsigned short>(p.rows());
  ws.ws_col = static_cast<unsigned short>(p.cols());
  ws.ws_xpixel = static_cast<unsigned short>(p.xpixel());
  ws.ws_ypixel = static_cast<unsigned short>(p.ypixel());
  if (::ioctl(master_.get(), TIOCSWINSZ, &ws) != 0) fail_errno(what, ": ioctl(TIOCSWINSZ)");
  push_master(master_.get(), p.to_master(), cat(what, " (master side)"));
  push(slave_.get(), p.to_slave(), cat(what, " (slave side)"));
}

UniqueFd Pair::open_slave(uint32_t flags) const {
  int fd = ::ioctl(master_.get(), TIOCGPTPEER,
                   static_cast<int>(flags & O_ACCMODE) | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) fail_errno("pty ", p_.index(), " of the image: opening its slave (TIOCGPTPEER)");
  return UniqueFd(fd);
}

void Pair::finish() {
  std::string what = cat("pty ", p_.index(), " of the image");
  int on = 1;
  if (p_.packet_mode() && ::ioctl(master_.get(), TIOCPKT, &on) != 0)
    fail_errno(what, ": ioctl(TIOCPKT)");
  if (p_.locked() && ::ioctl(master_.get(), TIOCSPTLCK, &on) != 0)
    fail_errno(what, ": ioctl(TIOCSPTLCK)");
  slave_.reset();
}

void dump_ctty(RemoteProcess& p, image::Process& proc, DumpContext&) {
  if (proc.sid() != proc.pid()) return;
  std::string stat = proc::read_file(cat("/proc/", p.pid(), "/stat"));
  // After "(comm) ": state ppid pgrp session tty_nr tpgid.
  const auto tty_nr = static_cast<uint32_t>(stat_field(stat, 4));
  const pid_t tpgid = stat_field(stat, 5);
  if (tty_nr == 0) return;
  const dev_t dev = makedev((tty_nr >> 8) & 0xfff, (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00));
  for (const auto& f : proc.fds())
    if (f.pty_end() == image::FileDescriptor::PTY_SLAVE && f.rdev() == dev) {
      proc.set_ctty_pty(f.pty_index() + 1);
      proc.set_ctty_fg_pgrp(tpgid > 0 ? tpgid : 0);
      return;
    }
}

void restore_ctty(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kFilesInPlace || proc.ctty_pty() == 0) return;
  int fd = -1;
  for (const auto& f : proc.fds())
    if (f.pty_end() == image::FileDescriptor::PTY_SLAVE && f.pty_index() + 1 == proc.ctty_pty())
      fd = f.fd();
  if (fd < 0) fail("no descriptor of its controlling terminal (pty ", proc.ctty_pty() - 1, ")");
  const auto num = static_cast<uint64_t>(fd);
  p.call(0, cat("ioctl(", fd, ", TIOCSCTTY)"), SYS_ioctl, num, TIOCSCTTY, 0);
  if (proc.ctty_fg_pgrp() <= 0) return;
  const int32_t pgrp = proc.ctty_fg_pgrp();
  const uint64_t addr = p.put(&pgrp, sizeof pgrp);
  p.call(0, cat("ioctl(", fd, ", TIOCSPGRP, ", pgrp, ")"), SYS_ioctl, num, TIOCSPGRP, addr);
}

}  // namespace lazycr::objects::pty
