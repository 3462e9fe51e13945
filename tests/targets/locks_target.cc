// File locks a restore must give back, of the three kinds, in --workdir DIR:
//   posix: fcntl F_SETLK write lock on bytes 10..14 and read lock on 100..EOF of DIR/posix;
//   ofd:   F_OFD_SETLK write lock on byte 0 and read lock on 50..59 of DIR/ofd, through a
//          descriptor that is also dup'ed (one description, two descriptors);
//   flock: flock(LOCK_EX) on DIR/flock.
// It prints "ready pid=P" and, on SIGUSR1, checks from inside that it still holds each of
// them: a child it forks (another lock owner, with its own descriptions) must find each lock
// in its way (F_GETLK, F_OFD_GETLK, flock LOCK_NB) and the bytes next to them free. Prints
// "verified ok" or "verify FAILED: why" and exits 0 or 1.
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

bool set_lock(int fd, int cmd, short type, off_t start, off_t len) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  return fcntl(fd, cmd, &fl) == 0;
}

// What a write lock request on [start, start+len) would meet ("free" if nothing).
std::string probe(int fd, int cmd, off_t start, off_t len) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  if (fcntl(fd, cmd, &fl) != 0) return std::string("error ") + std::strerror(errno);
  if (fl.l_type == F_UNLCK) return "free";
  return std::string(fl.l_type == F_WRLCK ? "write " : "read ") + std::to_string(fl.l_start) + "+" +
         std::to_string(fl.l_len);
}

std::string expect(const std::string& what, const std::string& got, const std::string& want) {
  return got == want ? "" : what + ": " + got + " (want " + want + ")";
}

// Runs in a child: a different POSIX owner with descriptions of its own.
std::string check_from_outside(const std::string& dir) {
  int p = open((dir + "/posix").c_str(), O_RDWR);
  int o = open((dir + "/ofd").c_str(), O_RDWR);
  int f = open((dir + "/flock").c_str(), O_RDWR);
  if (p < 0 || o < 0 || f < 0) return "cannot open the files";
  std::string why;
  auto add = [&](const std::string& w) {
    if (why.empty()) why = w;
  };
  add(expect("posix 10..14", probe(p, F_GETLK, 10, 5), "write 10+5"));
  add(expect("posix 15..99", probe(p, F_GETLK, 15, 85), "free"));
  add(expect("posix 100..EOF", probe(p, F_GETLK, 100, 0), "read 100+0"));
  add(expect("ofd byte 0", probe(o, F_OFD_GETLK, 0, 1), "write 0+1"));
  add(expect("ofd 1..49", probe(o, F_OFD_GETLK, 1, 49), "free"));
  add(expect("ofd 50..59", probe(o, F_OFD_GETLK, 50, 10), "read 50+10"));
  if (flock(f, LOCK_SH | LOCK_NB) == 0) add("flock: a shared lock was granted beside LOCK_EX");
  return why;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = ".";
  for (int i = 1; i + 1 < argc; i++)
    if (std::string(argv[i]) == "--workdir") dir = argv[i + 1];
  signal(SIGUSR1, on_usr1);
  int p = open((dir + "/posix").c_str(), O_RDWR | O_CREAT, 0644);
  int o = open((dir + "/ofd").c_str(), O_RDWR | O_CREAT, 0644);
  int f = open((dir + "/flock").c_str(), O_RDWR | O_CREAT, 0644);
  if (p < 0 || o < 0 || f < 0) {
    perror("open");
    return 2;
  }
  if (!set_lock(p, F_SETLK, F_WRLCK, 10, 5) || !set_lock(p, F_SETLK, F_RDLCK, 100, 0) ||
      !set_lock(o, F_OFD_SETLK, F_WRLCK, 0, 1) || !set_lock(o, F_OFD_SETLK, F_RDLCK, 50, 10) ||
      flock(f, LOCK_EX | LOCK_NB) != 0 || dup2(o, 20) != 20) {
    perror("lock");
    return 2;
  }
  std::printf("ready pid=%d\n", getpid());
  std::fflush(stdout);
  // Not pause(): a SIGUSR1 landing between the check and pause() would be slept through (the
  // classic lost wake-up; a restore widens the window: the pause() it hands back to the kernel
  // is restarted right after a handler that runs first).
  while (!g_verify) {
    timespec ts{0, 5000000};
    nanosleep(&ts, nullptr);
  }

  int out[2];
  if (pipe(out) != 0) return 2;
  pid_t c = fork();
  if (c == 0) {
    std::string why = check_from_outside(dir);
    (void)!write(out[1], why.data(), why.size());
    _exit(0);
  }
  close(out[1]);
  char buf[512];
  ssize_t n = read(out[0], buf, sizeof buf);
  int st;
  waitpid(c, &st, 0);
  std::string why = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
