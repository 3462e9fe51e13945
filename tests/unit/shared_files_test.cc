// SharedFiles: descriptions built by hand in image messages, created on the real kernel, then
// checked through the descriptors plan() hands out.
#include "restore/shared_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common/error.h"
#include "common/proc.h"

namespace lazycr::restore {
namespace {

using image::FileDescriptor;
using image::Process;
using image::SharedObjects;

FileDescriptor* add_fd(Process& p, int fd, FileDescriptor::Kind kind, uint32_t flags,
                       uint64_t file_id, uint64_t inode = 0) {
  FileDescriptor* f = p.add_fds();
  f->set_fd(fd);
  f->set_kind(kind);
  f->set_flags(flags);
  f->set_file_id(file_id);
  f->set_object_inode(inode);
  f->set_restorable(true);
  if (kind == FileDescriptor::PIPE) f->set_target(cat("pipe:[", inode, "]"));
  if (kind == FileDescriptor::SOCKET) f->set_target(cat("socket:[", inode, "]"));
  return f;
}

// A process of the test's own user (descriptions are opened with its credentials).
Process proc(int pid) {
  Process p;
  p.set_pid(pid);
  proc::Status me = proc::read_status(::getpid());
  auto* c = p.mutable_creds();
  for (uint32_t u : me.uids) c->add_uids(u);
  for (uint32_t g : me.gids) c->add_gids(g);
  for (uint32_t g : me.groups) c->add_groups(g);
  c->set_cap_effective(me.cap_eff);
  c->set_cap_permitted(me.cap_prm);
  c->set_cap_inheritable(me.cap_inh);
  return p;
}

image::Pipe* add_pipe(SharedObjects& s, uint64_t inode, const std::string& data,
                      uint32_t capacity = 65536) {
  image::Pipe* p = s.add_pipes();
  p->set_inode(inode);
  p->set_capacity(capacity);
  p->set_data(data);
  return p;
}

image::UnixSocket* add_socket(SharedObjects& s, uint64_t inode, uint64_t peer, int type,
                              std::vector<std::string> queued = {}) {
  image::UnixSocket* u = s.add_sockets();
  u->set_inode(inode);
  u->set_peer_inode(peer);
  u->set_type(type);
  for (auto& q : queued) u->add_queued(q);
  return u;
}

int shared_fd(const SharedFiles& sf, const Process& p, int fd) {
  for (const auto& f : p.fds())
    if (f.fd() == fd) {
      FdPlan pl = sf.plan(p.pid(), f);
      EXPECT_EQ(pl.source, FdPlan::kShared) << "pid " << p.pid() << " fd " << fd;
      EXPECT_GE(pl.fd, 0);
      return pl.fd;
    }
  ADD_FAILURE() << "no fd " << fd;
  return -1;
}

FdPlan plan_of(const SharedFiles& sf, const Process& p, int fd) {
  for (const auto& f : p.fds())
    if (f.fd() == fd) return sf.plan(p.pid(), f);
  ADD_FAILURE() << "no fd " << fd;
  return {};
}

short revents(int fd, short events) {
  pollfd pf{fd, events, 0};
  EXPECT_GE(::poll(&pf, 1, 0), 0);
  return pf.revents;
}

// Everything readable now (without blocking), and whether EOF follows it.
std::string drain(int fd, bool* eof = nullptr) {
  std::string out;
  char buf[65536];
  while (true) {
    short ev = revents(fd, POLLIN);
    if (!(ev & (POLLIN | POLLHUP))) break;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      ADD_FAILURE() << "read: " << errno;
      break;
    }
    if (n == 0) {
      if (eof) *eof = true;
      return out;
    }
    out.append(buf, static_cast<size_t>(n));
  }
  if (eof) *eof = false;
  return out;
}

int count_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (::readdir(d)) n++;
  ::closedir(d);
  return n;
}

std::string error_of(const std::vector<Process>& ps, const SharedObjects& s, bool shell_job) {
  try {
    SharedFiles sf(ps, s, shell_job);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/shared_files_test.XXXXXX";
    path = ::mkdtemp(t);
  }
  ~TempDir() { std::system(cat("rm -rf '", path, "'").c_str()); }
};

image::FileIdentity identity_of(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0);
  image::FileIdentity id;
  id.set_path(path);
  id.set_dev(st.st_dev);
  id.set_inode(st.st_ino);
  id.set_mode(st.st_mode);
  return id;
}

TEST(SharedFilesPipe, DataThenEofWhenNoWriterHeld) {
  Process p = proc(100);
  add_fd(p, 3, FileDescriptor::PIPE, O_RDONLY, 1, 5000);
  SharedObjects s;
  add_pipe(s, 5000, "hello world");
  SharedFiles sf({p}, s, false);
  int fd = shared_fd(sf, p, 3);
  EXPECT_EQ(::fcntl(fd, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_RDONLY);
  EXPECT_EQ(::fcntl(fd, F_GETFD), FD_CLOEXEC);
  bool eof = false;
  EXPECT_EQ(drain(fd, &eof), "hello world");
  EXPECT_TRUE(eof);
  EXPECT_EQ(sf.size(), 1u);
}

TEST(SharedFilesPipe, BothEndsHeldKeepsDataAndNoEof) {
  Process a = proc(100), b = proc(101);
  add_fd(a, 4, FileDescriptor::PIPE, O_WRONLY, 2, 5001);
  add_fd(b, 0, FileDescriptor::PIPE, O_RDONLY, 3, 5001);
  SharedObjects s;
  add_pipe(s, 5001, "abc");
  for (bool shell_job : {false, true}) {
    SharedFiles sf({a, b}, s, shell_job);
    int w = shared_fd(sf, a, 4), r = shared_fd(sf, b, 0);
    bool eof = true;
    EXPECT_EQ(drain(r, &eof), "abc");
    EXPECT_FALSE(eof);
    EXPECT_EQ(::write(w, "d", 1), 1);
    EXPECT_EQ(drain(r, &eof), "d");
    EXPECT_FALSE(eof);
    EXPECT_EQ(::fcntl(w, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_WRONLY);
  }
}

TEST(SharedFilesPipe, NonblockAndSharedAcrossProcesses) {
  Process a = proc(100), b = proc(101);
  // One write end inherited at fork (same file id), non-blocking; a blocking read end.
  add_fd(a, 5, FileDescriptor::PIPE, O_WRONLY | O_NONBLOCK, 7, 5002);
  add_fd(b, 5, FileDescriptor::PIPE, O_WRONLY | O_NONBLOCK, 7, 5002);
  add_fd(b, 6, FileDescriptor::PIPE, O_RDONLY, 8, 5002);
  SharedObjects s;
  add_pipe(s, 5002, "");
  SharedFiles sf({a, b}, s, false);
  int wa = shared_fd(sf, a, 5), wb = shared_fd(sf, b, 5), r = shared_fd(sf, b, 6);
  EXPECT_EQ(wa, wb);
  EXPECT_EQ(::fcntl(wa, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_WRONLY | O_NONBLOCK);
  EXPECT_EQ(::fcntl(r, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_RDONLY);
  EXPECT_EQ(sf.size(), 2u);
}

TEST(SharedFilesPipe, BigPipe) {
  Process p = proc(100);
  add_fd(p, 3, FileDescriptor::PIPE, O_RDONLY, 1, 5003);
  add_fd(p, 4, FileDescriptor::PIPE, O_WRONLY, 2, 5003);
  SharedObjects s;
  std::string data(900 * 1024, '\0');
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>(i * 2654435761u >> 13);
  add_pipe(s, 5003, data, 1 << 20);
  SharedFiles sf({p}, s, false);
  int r = shared_fd(sf, p, 3);
  EXPECT_EQ(::fcntl(r, F_GETPIPE_SZ), 1 << 20);
  bool eof = true;
  EXPECT_TRUE(drain(r, &eof) == data);
  EXPECT_FALSE(eof);
}

TEST(SharedFilesPipe, SecondDescriptionOfOneEnd) {
  Process p = proc(100);
  add_fd(p, 3, FileDescriptor::PIPE, O_RDONLY, 1, 5004);
  add_fd(p, 4, FileDescriptor::PIPE, O_RDONLY | O_NONBLOCK, 2, 5004);  // reopened
  add_fd(p, 5, FileDescriptor::PIPE, O_WRONLY, 3, 5004);
  SharedObjects s;
  add_pipe(s, 5004, "xy");
  SharedFiles sf({p}, s, false);
  int r1 = shared_fd(sf, p, 3), r2 = shared_fd(sf, p, 4), w = shared_fd(sf, p, 5);
  EXPECT_NE(r1, r2);
  EXPECT_EQ(::fcntl(r1, F_GETFL) & O_NONBLOCK, 0);
  EXPECT_EQ(::fcntl(r2, F_GETFL) & O_NONBLOCK, O_NONBLOCK);
  EXPECT_EQ(drain(r2), "xy");
  EXPECT_EQ(::write(w, "z", 1), 1);
  EXPECT_EQ(drain(r1), "z");
}

TEST(SharedFilesPipe, WriterWithoutReaderGetsEpipe) {
  Process p = proc(100);
  add_fd(p, 7, FileDescriptor::PIPE, O_WRONLY, 1, 5005);
  SharedObjects s;
  add_pipe(s, 5005, "unread");
  SharedFiles sf({p}, s, false);
  int w = shared_fd(sf, p, 7);
  EXPECT_TRUE(revents(w, POLLOUT) & POLLERR);
  sighandler_t old = ::signal(SIGPIPE, SIG_IGN);
  EXPECT_EQ(::write(w, "x", 1), -1);
  EXPECT_EQ(errno, EPIPE);
  ::signal(SIGPIPE, old);
}

TEST(SharedFilesPipe, Errors) {
  Process p = proc(100);
  add_fd(p, 3, FileDescriptor::PIPE, O_RDONLY, 1, 5006);
  SharedObjects s;
  add_pipe(s, 5006, std::string(65537, 'x'), 65536);
  std::string e = error_of({p}, s, false);
  EXPECT_NE(e.find("pipe inode 5006"), std::string::npos) << e;
  EXPECT_NE(e.find("65537 bytes"), std::string::npos) << e;

  // Above fs.pipe-max-size: no CAP_SYS_RESOURCE here.
  SharedObjects big;
  add_pipe(big, 5006, "x", 64 << 20);
  e = error_of({p}, big, false);
  EXPECT_NE(e.find("pipe inode 5006"), std::string::npos) << e;
  EXPECT_NE(e.find("F_SETPIPE_SZ"), std::string::npos) << e;

  SharedObjects none;
  e = error_of({p}, none, false);
  EXPECT_NE(e.find("pipe inode 5006"), std::string::npos) << e;
  EXPECT_NE(e.find("not in the image's shared objects"), std::string::npos) << e;
}

TEST(SharedFilesFifo, DataAndDescriptionsByAccessMode) {
  TempDir dir;
  std::string path = dir.path + "/fifo";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  image::FileIdentity id = identity_of(path);
  Process a = proc(100), b = proc(101);
  add_fd(a, 3, FileDescriptor::FIFO, O_RDONLY, 1, id.inode())->mutable_file()->CopyFrom(id);
  add_fd(b, 4, FileDescriptor::FIFO, O_WRONLY | O_NONBLOCK, 2, id.inode())
      ->mutable_file()
      ->CopyFrom(id);
  SharedObjects s;
  add_pipe(s, id.inode(), "fifo data")->set_fifo(true);
  SharedFiles sf({a, b}, s, false);
  int r = shared_fd(sf, a, 3), w = shared_fd(sf, b, 4);
  EXPECT_EQ(::fcntl(r, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_RDONLY);
  EXPECT_EQ(::fcntl(w, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_WRONLY | O_NONBLOCK);
  char link[256] = {};
  ASSERT_GT(::readlink(cat("/proc/self/fd/", r).c_str(), link, sizeof link - 1), 0);
  EXPECT_EQ(std::string(link), path);
  bool eof = true;
  EXPECT_EQ(drain(r, &eof), "fifo data");
  EXPECT_FALSE(eof);
  EXPECT_EQ(::write(w, "!", 1), 1);
  EXPECT_EQ(drain(r, &eof), "!");
}

TEST(SharedFilesFifo, ReaderAloneSeesEof) {
  TempDir dir;
  std::string path = dir.path + "/fifo";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  image::FileIdentity id = identity_of(path);
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::FIFO, O_RDONLY, 1, id.inode())->mutable_file()->CopyFrom(id);
  SharedObjects s;
  add_pipe(s, id.inode(), "last words")->set_fifo(true);
  SharedFiles sf({a}, s, false);
  bool eof = false;
  EXPECT_EQ(drain(shared_fd(sf, a, 3), &eof), "last words");
  EXPECT_TRUE(eof);
}

TEST(SharedFilesFifo, PathNowARegularFile) {
  TempDir dir;
  std::string path = dir.path + "/fifo";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  image::FileIdentity id = identity_of(path);
  ASSERT_EQ(::unlink(path.c_str()), 0);
  UniqueFd reg(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  ASSERT_TRUE(reg);
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::FIFO, O_RDONLY, 1, id.inode())->mutable_file()->CopyFrom(id);
  SharedObjects s;
  add_pipe(s, id.inode(), "x")->set_fifo(true);
  std::string e = error_of({a}, s, false);
  EXPECT_NE(e.find("FIFO " + path), std::string::npos) << e;
  EXPECT_NE(e.find("not a FIFO any more (now a regular file)"), std::string::npos) << e;

  // Another FIFO at the path: a different inode.
  ASSERT_EQ(::unlink(path.c_str()), 0);
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  if (identity_of(path).inode() != id.inode()) {
    e = error_of({a}, s, false);
    EXPECT_NE(e.find("changed since the dump"), std::string::npos) << e;
  }
}

// Two messages' worth of bytes in each direction of one pair.
class SharedFilesSocket : public ::testing::TestWithParam<int> {};

TEST_P(SharedFilesSocket, QueuedBothWaysInOrder) {
  int type = GetParam();
  Process a = proc(100), b = proc(101);
  add_fd(a, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  add_fd(b, 4, FileDescriptor::SOCKET, O_RDWR | O_NONBLOCK, 2, 7002);
  SharedObjects s;
  std::vector<std::string> to_a = {"a", "bb", "", "cccc"}, to_b = {"1", "22"};
  if (type == SOCK_STREAM) to_a = {"abbcccc"}, to_b = {"122"};
  // Enough messages to overflow the default buffers (~1 MiB in truesize), and a big record.
  if (type != SOCK_STREAM) {
    for (int i = 0; i < 600; i++)
      to_b.push_back(std::string(1000, static_cast<char>('a' + i % 26)));
    to_b.push_back(std::string(300 * 1024, 'Z'));
  } else {
    to_b[0] += std::string(3 << 20, 'S');
  }
  add_socket(s, 7001, 7002, type, to_a);
  add_socket(s, 7002, 7001, type, to_b);
  SharedFiles sf({a, b}, s, false);
  int fa = shared_fd(sf, a, 3), fb = shared_fd(sf, b, 4);
  int got_type = 0;
  socklen_t len = sizeof got_type;
  ASSERT_EQ(::getsockopt(fa, SOL_SOCKET, SO_TYPE, &got_type, &len), 0);
  EXPECT_EQ(got_type, type);
  EXPECT_EQ(::fcntl(fa, F_GETFL) & O_NONBLOCK, 0);
  EXPECT_EQ(::fcntl(fb, F_GETFL) & O_NONBLOCK, O_NONBLOCK);
  std::vector<char> buf(4 << 20);
  auto receive_all = [&](int fd, const std::vector<std::string>& want) {
    if (type == SOCK_STREAM) {
      std::string got;
      ssize_t n;
      while ((n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT)) > 0)
        got.append(buf.data(), static_cast<size_t>(n));
      EXPECT_TRUE(got == want[0]) << got.size() << " vs " << want[0].size();
    } else {
      for (size_t i = 0; i < want.size(); i++) {
        ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
        ASSERT_EQ(n, static_cast<ssize_t>(want[i].size())) << "message " << i;
        EXPECT_EQ(std::string(buf.data(), static_cast<size_t>(n)), want[i]) << "message " << i;
      }
    }
    EXPECT_EQ(::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT), -1);
    EXPECT_EQ(errno, EAGAIN);
  };
  receive_all(fa, to_a);
  receive_all(fb, to_b);
  // Still connected, both ways.
  EXPECT_EQ(::send(fa, "ping", 4, MSG_NOSIGNAL), 4);
  EXPECT_EQ(::recv(fb, buf.data(), buf.size(), MSG_DONTWAIT), 4);
  EXPECT_EQ(::send(fb, "pong", 4, MSG_NOSIGNAL), 4);
  EXPECT_EQ(::recv(fa, buf.data(), buf.size(), MSG_DONTWAIT), 4);
}

INSTANTIATE_TEST_SUITE_P(Types, SharedFilesSocket,
                         ::testing::Values(SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET),
                         [](const auto& info) {
                           return info.param == SOCK_STREAM  ? std::string("Stream")
                                  : info.param == SOCK_DGRAM ? std::string("Dgram")
                                                             : std::string("Seqpacket");
                         });

TEST(SharedFilesSockets, BufferSizesAsRecorded) {
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  add_fd(a, 4, FileDescriptor::SOCKET, O_RDWR, 2, 7002);
  SharedObjects s;
  auto* u = add_socket(s, 7001, 7002, SOCK_DGRAM, {std::string(500000, 'q')});
  u->set_sndbuf(65536);
  u->set_rcvbuf(32768);
  add_socket(s, 7002, 7001, SOCK_DGRAM);
  SharedFiles sf({a}, s, false);
  int fa = shared_fd(sf, a, 3), fb = shared_fd(sf, a, 4);
  auto opt = [](int fd, int o) {
    int v = 0;
    socklen_t len = sizeof v;
    EXPECT_EQ(::getsockopt(fd, SOL_SOCKET, o, &v, &len), 0);
    return v;
  };
  EXPECT_EQ(opt(fa, SO_SNDBUF), 65536);
  EXPECT_EQ(opt(fa, SO_RCVBUF), 32768);
  // The peer's are what a new socket gets, although they were raised for the big datagram.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv), 0);
  EXPECT_EQ(opt(fb, SO_SNDBUF), opt(sv[0], SO_SNDBUF));
  EXPECT_EQ(opt(fb, SO_RCVBUF), opt(sv[0], SO_RCVBUF));
  ::close(sv[0]);
  ::close(sv[1]);
  std::vector<char> buf(1 << 20);
  EXPECT_EQ(::recv(fa, buf.data(), buf.size(), MSG_DONTWAIT), 500000);
}

TEST(SharedFilesSockets, ShutdownStates) {
  Process a = proc(100), b = proc(101);
  add_fd(a, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  add_fd(b, 3, FileDescriptor::SOCKET, O_RDWR, 2, 7002);
  SharedObjects s;
  // a shut its writing side after sending "bye": b reads it, then EOF; a cannot send.
  add_socket(s, 7001, 7002, SOCK_STREAM)->set_shutdown_write(true);
  add_socket(s, 7002, 7001, SOCK_STREAM, {"bye"})->set_shutdown_read(false);
  SharedFiles sf({a, b}, s, false);
  int fa = shared_fd(sf, a, 3), fb = shared_fd(sf, b, 3);
  bool eof = false;
  EXPECT_EQ(drain(fb, &eof), "bye");
  EXPECT_TRUE(eof);
  EXPECT_EQ(::send(fa, "x", 1, MSG_NOSIGNAL), -1);
  EXPECT_EQ(errno, EPIPE);
  EXPECT_EQ(::send(fb, "back", 4, MSG_NOSIGNAL), 4);
  EXPECT_EQ(drain(fa, &eof), "back");
  EXPECT_FALSE(eof);
}

TEST(SharedFilesSockets, PeerHeldByNoDescriptor) {
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  SharedObjects s;
  add_socket(s, 7001, 7002, SOCK_STREAM, {"left over"});
  SharedFiles sf({a}, s, false);
  int fa = shared_fd(sf, a, 3);
  bool eof = false;
  EXPECT_EQ(drain(fa, &eof), "left over");
  EXPECT_TRUE(eof);
  EXPECT_EQ(::send(fa, "x", 1, MSG_NOSIGNAL), -1);
  EXPECT_EQ(errno, EPIPE);
}

TEST(SharedFilesSockets, Peerless) {
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  add_fd(a, 4, FileDescriptor::SOCKET, O_RDWR, 2, 7002);
  add_fd(a, 5, FileDescriptor::SOCKET, O_RDWR, 3, 7003);
  SharedObjects s;
  add_socket(s, 7001, 0, SOCK_DGRAM);                           // unconnected
  add_socket(s, 7002, 0, SOCK_DGRAM, {"d1", "d2"});             // its peer closed
  auto* gone = add_socket(s, 7003, 0, SOCK_SEQPACKET, {"r1"});  // its peer closed
  gone->set_shutdown_read(true);
  gone->set_shutdown_write(true);
  SharedFiles sf({a}, s, false);
  int f1 = shared_fd(sf, a, 3), f2 = shared_fd(sf, a, 4), f3 = shared_fd(sf, a, 5);
  int type = 0;
  socklen_t len = sizeof type;
  ASSERT_EQ(::getsockopt(f1, SOL_SOCKET, SO_TYPE, &type, &len), 0);
  EXPECT_EQ(type, SOCK_DGRAM);
  char buf[16];
  EXPECT_EQ(::recv(f2, buf, sizeof buf, MSG_DONTWAIT), 2);
  EXPECT_EQ(::recv(f2, buf, sizeof buf, MSG_DONTWAIT), 2);
  EXPECT_EQ(::recv(f3, buf, sizeof buf, MSG_DONTWAIT), 2);
  EXPECT_EQ(::recv(f3, buf, sizeof buf, MSG_DONTWAIT), 0);

  // A stream socket with no peer and no sign of one that closed: a fresh socket (socket(2),
  // neither bound nor connected), made again as one (objects/unix_socket.h).
  Process c = proc(100);
  add_fd(c, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7004);
  SharedObjects t;
  add_socket(t, 7004, 0, SOCK_STREAM);
  SharedFiles fresh({c}, t, false);
  int f4 = shared_fd(fresh, c, 3);
  ASSERT_EQ(::getsockopt(f4, SOL_SOCKET, SO_TYPE, &type, &len), 0);
  EXPECT_EQ(type, SOCK_STREAM);
  sockaddr_storage peer;
  socklen_t plen = sizeof peer;
  EXPECT_NE(::getpeername(f4, reinterpret_cast<sockaddr*>(&peer), &plen), 0);
}

TEST(SharedFilesSockets, Errors) {
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  SharedObjects none;
  std::string e = error_of({a}, none, false);
  EXPECT_NE(e.find("socket inode 7001 (pid 100 fd 3): not in the image's shared objects"),
            std::string::npos)
      << e;

  // Two descriptions of one socket.
  Process b = proc(100);
  add_fd(b, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  add_fd(b, 4, FileDescriptor::SOCKET, O_RDWR, 2, 7001);
  SharedObjects s;
  add_socket(s, 7001, 0, SOCK_DGRAM);
  e = error_of({b}, s, false);
  EXPECT_NE(e.find("socket inode 7001 is held by two open file descriptions"), std::string::npos)
      << e;

  // Peers that disagree.
  Process c = proc(100);
  add_fd(c, 3, FileDescriptor::SOCKET, O_RDWR, 1, 7001);
  add_fd(c, 4, FileDescriptor::SOCKET, O_RDWR, 2, 7002);
  SharedObjects t;
  add_socket(t, 7001, 7002, SOCK_STREAM);
  add_socket(t, 7002, 7009, SOCK_STREAM);
  e = error_of({c}, t, false);
  EXPECT_NE(e.find("socket inode 7001"), std::string::npos) << e;
  EXPECT_NE(e.find("connected to socket inode 7009"), std::string::npos) << e;
}

TEST(SharedFilesRegular, OneDescriptionSharedAtItsPosition) {
  TempDir dir;
  std::string path = dir.path + "/file";
  {
    UniqueFd f(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
    ASSERT_EQ(::write(f.get(), std::string(100, 'r').data(), 100), 100);
  }
  image::FileIdentity id = identity_of(path);
  Process a = proc(100), b = proc(101);
  for (Process* p : {&a, &b}) {
    FileDescriptor* f = add_fd(*p, p == &a ? 3 : 5, FileDescriptor::REGULAR,
                               O_RDWR | O_APPEND | O_CREAT | O_TRUNC, 40);
    f->mutable_file()->CopyFrom(id);
    f->set_target(path);
    f->set_pos(10);
  }
  FileDescriptor* alone = add_fd(a, 4, FileDescriptor::REGULAR, O_RDONLY, 41);
  alone->mutable_file()->CopyFrom(id);
  alone->set_target(path);
  SharedObjects s;
  SharedFiles sf({a, b}, s, false);
  int fa = shared_fd(sf, a, 3), fb = shared_fd(sf, b, 5);
  EXPECT_EQ(fa, fb);
  EXPECT_EQ(::lseek(fa, 0, SEEK_CUR), 10);
  EXPECT_EQ(::fcntl(fa, F_GETFL) & (O_ACCMODE | O_APPEND), O_RDWR | O_APPEND);
  EXPECT_EQ(::fcntl(fa, F_GETFD), FD_CLOEXEC);
  ASSERT_EQ(::lseek(fa, 20, SEEK_SET), 20);
  EXPECT_EQ(::lseek(fb, 0, SEEK_CUR), 20);
  struct stat st;
  ASSERT_EQ(::fstat(fa, &st), 0);
  EXPECT_EQ(st.st_size, 100);  // not truncated
  EXPECT_EQ(plan_of(sf, a, 4).source, FdPlan::kOpenInside);
  EXPECT_EQ(sf.size(), 1u);

  // The file replaced since: refused.
  ASSERT_EQ(::unlink(path.c_str()), 0);
  UniqueFd other(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  std::string e = error_of({a, b}, s, false);
  EXPECT_NE(e.find("file id 40 (" + path + ", pid 100 fd 3 and 1 more)"), std::string::npos) << e;
}

TEST(SharedFilesShellJob, StandardDescriptorsLeadingOutside) {
  Process a = proc(100), b = proc(101);
  // The caller's pipe on fd 1 of both, its read end nowhere in the image; a dup of it at 7.
  add_fd(a, 1, FileDescriptor::PIPE, O_WRONLY, 50, 8000);
  add_fd(a, 7, FileDescriptor::PIPE, O_WRONLY, 50, 8000);
  add_fd(b, 1, FileDescriptor::PIPE, O_WRONLY, 50, 8000);
  // A terminal on fd 0, something not restorable on fd 2.
  for (Process* p : {&a, &b}) {
    FileDescriptor* t = add_fd(*p, 0, FileDescriptor::CHARDEV, O_RDWR, p == &a ? 51 : 52);
    t->set_target("/dev/pts/9");
    FileDescriptor* u = add_fd(*p, 2, FileDescriptor::EVENTFD, O_RDWR, p == &a ? 53 : 54);
    u->set_target("anon_inode:[eventfd]");
    u->set_restorable(false);
  }
  // A pipe inside the tree on b's fd 0... of another process: c reads what a writes on fd 9.
  Process c = proc(102);
  add_fd(a, 9, FileDescriptor::PIPE, O_WRONLY, 60, 8001);
  add_fd(c, 0, FileDescriptor::PIPE, O_RDONLY, 61, 8001);
  SharedObjects s;
  add_pipe(s, 8000, "");
  add_pipe(s, 8001, "to c");

  SharedFiles sf({a, b, c}, s, true);
  for (const Process* p : {&a, &b})
    for (int fd : {0, 1, 2}) {
      FdPlan pl = plan_of(sf, *p, fd);
      EXPECT_EQ(pl.source, FdPlan::kLazycrStd) << "pid " << p->pid() << " fd " << fd;
      EXPECT_EQ(pl.fd, fd);
    }
  FdPlan dup = plan_of(sf, a, 7);
  EXPECT_EQ(dup.source, FdPlan::kLazycrStd);
  EXPECT_EQ(dup.fd, 1);
  bool eof = true;
  EXPECT_EQ(drain(shared_fd(sf, c, 0), &eof), "to c");
  EXPECT_FALSE(eof);
  EXPECT_EQ(sf.size(), 2u);

  // Without --shell-job: the caller's pipe is made (a reader-less pipe), the terminal is
  // opened inside, the eventfd is refused.
  std::string e = error_of({a, b, c}, s, false);
  EXPECT_NE(e.find("pid 100 fd 2 (anon_inode:[eventfd]) is a EVENTFD that lazycr cannot restore"),
            std::string::npos)
      << e;
  for (Process* p : {&a, &b}) {  // without the eventfds
    auto* fds = p->mutable_fds();
    for (auto it = fds->begin(); it != fds->end(); ++it)
      if (it->fd() == 2) {
        fds->erase(it);
        break;
      }
  }
  SharedFiles plain({a, b, c}, s, false);
  int w = shared_fd(plain, a, 1);
  EXPECT_EQ(w, shared_fd(plain, a, 7));
  EXPECT_EQ(w, shared_fd(plain, b, 1));
  EXPECT_TRUE(revents(w, POLLOUT) & POLLERR);
  EXPECT_EQ(plan_of(plain, a, 0).source, FdPlan::kOpenInside);
}

TEST(SharedFilesShellJob, SharedFileOnStdoutStaysShared) {
  TempDir dir;
  std::string path = dir.path + "/out.log";
  UniqueFd f(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  image::FileIdentity id = identity_of(path);
  Process a = proc(100), b = proc(101);
  for (Process* p : {&a, &b}) {
    FileDescriptor* d = add_fd(*p, 1, FileDescriptor::REGULAR, O_WRONLY | O_APPEND, 70);
    d->mutable_file()->CopyFrom(id);
    d->set_target(path);
  }
  SharedFiles sf({a, b}, image::SharedObjects{}, true);
  EXPECT_EQ(shared_fd(sf, a, 1), shared_fd(sf, b, 1));
}

TEST(SharedFilesTest, NothingLeaks) {
  int before = count_fds();
  {
    Process a = proc(100), b = proc(101);
    add_fd(a, 3, FileDescriptor::PIPE, O_RDONLY, 1, 5000);
    add_fd(b, 3, FileDescriptor::PIPE, O_WRONLY, 2, 5000);
    add_fd(a, 4, FileDescriptor::SOCKET, O_RDWR, 3, 7001);
    add_fd(b, 4, FileDescriptor::SOCKET, O_RDWR, 4, 7002);
    add_fd(b, 5, FileDescriptor::SOCKET, O_RDWR, 5, 7003);
    SharedObjects s;
    add_pipe(s, 5000, "data");
    add_socket(s, 7001, 7002, SOCK_STREAM, {"q"});
    add_socket(s, 7002, 7001, SOCK_STREAM);
    add_socket(s, 7003, 7004, SOCK_DGRAM, {"x"});
    { SharedFiles sf({a, b}, s, false); }
    EXPECT_EQ(count_fds(), before);
    // The last socket fails after the pipe and the first pair exist.
    s.mutable_sockets()->RemoveLast();
    EXPECT_NE(error_of({a, b}, s, false).find("socket inode 7003"), std::string::npos);
  }
  EXPECT_EQ(count_fds(), before);
}

TEST(SharedFilesTest, UnknownDescriptor) {
  Process a = proc(100);
  add_fd(a, 3, FileDescriptor::REGULAR, O_RDONLY, 1)->set_target("/etc/hostname");
  SharedFiles sf({a}, image::SharedObjects{}, false);
  FileDescriptor other;
  other.set_fd(9);
  try {
    sf.plan(100, other);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pid 100 fd 9"), std::string::npos) << e.what();
  }
  EXPECT_EQ(sf.plan(100, a.fds(0)).source, FdPlan::kOpenInside);
}

}  // namespace
}  // namespace lazycr::restore
