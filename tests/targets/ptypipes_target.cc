// Pipes with a closed end and pseudo-terminal pairs (objects/pty.h), verified from inside after
// a restore. Prints "ready pid=P ..." and, on SIGUSR1, checks itself and prints one line
// "<who> verified ok" or "<who> verify FAILED: why"; exits 0 or 1.
//   --closed-pipe: fd 40 reads a pipe whose writer closed with bytes still buffered (the reader
//     must get them, then EOF); fd 41 writes a pipe whose reader closed (EPIPE).
//   --hold-stdin: keeps fd 0 and a dup of it at fd 40, for a pipe whose writer lives outside
//     (the dump must refuse fd 40); waits for SIGUSR1, then says "held" and exits.
//   --hold-stdin-only: the same without the dup (fd 0 becomes lazycr's with --shell-job).
//   --pty: opens a pty pair; a child becomes a session leader with the slave as its controlling
//     terminal, sets raw-ish termios, makes a grandchild's group the foreground, writes bytes to
//     the slave that the master leaves unread; the parent sets the window size, packet mode and
//     the lock, and writes bytes to the master that the slave leaves unread. After the restore
//     the parent ("master") checks window size, packet mode, lock, termios and reads its bytes;
//     the child ("slave") checks termios, window size, its controlling terminal (TIOCGSID on the
//     slave), the foreground group, and reads its bytes.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

void wait_for_verify() {
  while (!g_verify) {
    timespec ts{0, 2 * 1000 * 1000};
    nanosleep(&ts, nullptr);
  }
}

void say(const std::string& line) {
  std::string l = line + "\n";
  if (write(1, l.data(), l.size()) < 0) _exit(3);
}

int verdict(const std::string& who, const std::string& why) {
  say(why.empty() ? who + " verified ok" : who + " verify FAILED: " + why);
  return why.empty() ? 0 : 1;
}

// Reads until EOF or `want` bytes (poll with a deadline, so a missing EOF is a verdict, not a
// hang); sets eof when read() returned 0.
std::string read_some(int fd, size_t want, bool& eof, int timeout_ms = 20000) {
  std::string out;
  eof = false;
  char buf[4096];
  while (out.size() < want) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) break;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      eof = n == 0;
      break;
    }
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

const std::string kPipeData = std::string("left behind by a finished writer\n") + '\0' + "\x01\xff";

int closed_pipe() {
  int a[2], b[2];
  if (pipe(a) != 0 || pipe(b) != 0) return 2;
  if (write(a[1], kPipeData.data(), kPipeData.size()) != static_cast<ssize_t>(kPipeData.size()))
    return 2;
  close(a[1]);
  close(b[0]);
  if (dup2(a[0], 40) != 40 || dup2(b[1], 41) != 41) return 2;
  close(a[0]);
  close(b[1]);
  signal(SIGPIPE, SIG_IGN);
  say("ready pid=" + std::to_string(getpid()));
  wait_for_verify();
  std::string why;
  bool eof = false;
  std::string got = read_some(40, kPipeData.size() + 1, eof);
  if (got != kPipeData)
    why = "fd 40 gave " + std::to_string(got.size()) + " bytes, not the " +
          std::to_string(kPipeData.size()) + " buffered";
  else if (!eof)
    why = "fd 40 gave no EOF after its data (a writer is open)";
  if (why.empty() && (write(41, "x", 1) != -1 || errno != EPIPE))
    why = "fd 41 did not fail with EPIPE (a reader is open)";
  return verdict("pipes", why);
}

int hold_stdin(bool dup_it) {
  if (dup_it && dup2(0, 40) != 40) return 2;
  say("ready pid=" + std::to_string(getpid()));
  wait_for_verify();
  say("held");
  return 0;
}

const char kToMaster[] = "from the slave\n";
const char kToSlave[] = "typed at the master";

bool same_termios(const termios& a, const termios& b) {
  return a.c_iflag == b.c_iflag && a.c_oflag == b.c_oflag && a.c_cflag == b.c_cflag &&
         a.c_lflag == b.c_lflag && std::memcmp(a.c_cc, b.c_cc, sizeof a.c_cc) == 0;
}

void wait_queued(int fd, int want) {
  for (;;) {
    int n = 0;
    if (ioctl(fd, FIONREAD, &n) == 0 && n >= want) return;
    timespec ts{0, 1000 * 1000};
    nanosleep(&ts, nullptr);
  }
}

int slave_side(const char* name, int sync_w) {
  if (setsid() < 0) return 2;
  int s = open(name, O_RDWR);  // no O_NOCTTY: the session's controlling terminal
  if (s < 0) return 2;
  if (dup2(s, 50) != 50) return 2;
  close(s);
  s = 50;
  termios t;
  tcgetattr(s, &t);
  t.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO | IEXTEN);
  t.c_iflag &= ~static_cast<tcflag_t>(ICRNL | IXON);
  t.c_oflag &= ~static_cast<tcflag_t>(OPOST);
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  t.c_cc[VINTR] = 0x07;
  if (tcsetattr(s, TCSANOW, &t) != 0) return 2;
  tcgetattr(s, &t);
  pid_t gc = fork();
  if (gc == 0) {
    setpgid(0, 0);
    for (;;) {  // killed by its parent
      timespec ts{1, 0};
      nanosleep(&ts, nullptr);
    }
  }
  setpgid(gc, gc);
  signal(SIGTTOU, SIG_IGN);
  if (tcsetpgrp(s, gc) != 0) return 2;
  if (write(s, kToMaster, sizeof kToMaster - 1) != sizeof kToMaster - 1) return 2;
  wait_queued(s, sizeof kToSlave - 1);  // what the master wrote has reached this side
  if (write(sync_w, "S", 1) != 1) return 2;
  close(sync_w);
  winsize ws0;
  ioctl(s, TIOCGWINSZ, &ws0);
  wait_for_verify();

  std::string why;
  termios now;
  winsize ws;
  if (tcgetattr(s, &now) != 0 || !same_termios(now, t)) why = "termios differ";
  if (why.empty() && (ioctl(s, TIOCGWINSZ, &ws) != 0 || ws.ws_row != ws0.ws_row ||
                      ws.ws_col != ws0.ws_col || ws.ws_xpixel != ws0.ws_xpixel))
    why = "window size differs";
  // TIOCGSID answers only on the caller's controlling terminal (/dev/tty itself cannot be
  // opened: the parent locked the pty, and the kernel reopens the slave for it).
  pid_t sid = 0;
  if (why.empty() && ioctl(s, TIOCGSID, &sid) != 0)
    why =
        std::string("the slave is not its controlling terminal: TIOCGSID: ") + std::strerror(errno);
  if (why.empty() && sid != getsid(0))
    why = "the slave is the terminal of session " + std::to_string(sid);
  if (why.empty() && tcgetpgrp(s) != gc)
    why = "foreground group " + std::to_string(tcgetpgrp(s)) + ", not " + std::to_string(gc);
  if (why.empty() && tcsetpgrp(s, getpgrp()) != 0)
    why = std::string("tcsetpgrp back: ") + std::strerror(errno);
  bool eof = false;
  std::string got = why.empty() ? read_some(s, sizeof kToSlave - 1, eof) : "";
  if (why.empty() && got != kToSlave) why = "read '" + got + "' from the slave";
  kill(gc, SIGKILL);
  waitpid(gc, nullptr, 0);
  return verdict("slave", why);
}

int pty_pair() {
  int m = posix_openpt(O_RDWR | O_NOCTTY);
  if (m < 0 || grantpt(m) != 0 || unlockpt(m) != 0) return 2;
  if (dup2(m, 60) != 60) return 2;
  close(m);
  m = 60;
  winsize ws{37, 111, 5, 7};
  if (ioctl(m, TIOCSWINSZ, &ws) != 0) return 2;
  std::string name = ptsname(m);
  int sync[2];
  if (pipe(sync) != 0) return 2;
  pid_t child = fork();
  if (child == 0) {
    close(sync[0]);
    _exit(slave_side(name.c_str(), sync[1]));
  }
  close(sync[1]);
  wait_queued(m, sizeof kToMaster - 1);  // the child set its termios, then wrote
  if (write(m, kToSlave, sizeof kToSlave - 1) != sizeof kToSlave - 1) return 2;
  char c;
  if (read(sync[0], &c, 1) != 1) return 2;
  close(sync[0]);
  int one = 1;
  if (ioctl(m, TIOCPKT, &one) != 0 || ioctl(m, TIOCSPTLCK, &one) != 0) return 2;
  termios mt;
  tcgetattr(m, &mt);
  say("ready pid=" + std::to_string(getpid()) + " child=" + std::to_string(child));
  wait_for_verify();

  std::string why;
  winsize now{};
  int pkt = 0, lck = 0;
  termios t;
  if (ioctl(m, TIOCGWINSZ, &now) != 0 || now.ws_row != 37 || now.ws_col != 111 ||
      now.ws_xpixel != 5 || now.ws_ypixel != 7)
    why = "window size " + std::to_string(now.ws_row) + "x" + std::to_string(now.ws_col);
  if (why.empty() && (ioctl(m, TIOCGPKT, &pkt) != 0 || pkt != 1)) why = "packet mode is off";
  if (why.empty() && (ioctl(m, TIOCGPTLCK, &lck) != 0 || lck != 1)) why = "the pty is unlocked";
  if (why.empty() && (tcgetattr(m, &t) != 0 || !same_termios(t, mt))) why = "termios differ";
  bool eof = false;
  // Packet mode: one TIOCPKT_DATA byte before the data.
  std::string got = why.empty() ? read_some(m, sizeof kToMaster, eof) : "";
  if (why.empty() && got != std::string(1, '\0') + kToMaster)
    why = "read " + std::to_string(got.size()) + " bytes '" + got + "' from the master";
  int st = 0;
  waitpid(child, &st, 0);
  int rc = verdict("master", why);
  return rc != 0 ? rc : (WIFEXITED(st) ? WEXITSTATUS(st) : 1);
}

}  // namespace

int main(int argc, char** argv) {
  struct sigaction sa {};
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, nullptr);
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--closed-pipe") return closed_pipe();
  if (mode == "--hold-stdin") return hold_stdin(true);
  if (mode == "--hold-stdin-only") return hold_stdin(false);
  if (mode == "--pty") return pty_pair();
  std::fprintf(stderr, "usage: ptypipes_target --closed-pipe|--hold-stdin|--pty\n");
  return 2;
}
