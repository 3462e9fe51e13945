// collect_shared() over this test process's own descriptors: open file descriptions, pipes and
// UNIX socket queues captured without consuming anything, SO_PEEK_OFF put back.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "checkpoint/collect.h"
#include "common/fd.h"

namespace lazycr::checkpoint {
namespace {

struct Self {
  image::Process proc;
  UniqueFd pidfd{static_cast<int>(::syscall(SYS_pidfd_open, getpid(), 0))};
  SharedCollection shared;

  void collect() {
    proc.Clear();
    proc.set_pid(getpid());
    for (auto& f : collect_fds(getpid())) *proc.add_fds() = std::move(f);
    std::vector<TreeFiles> files{{&proc, pidfd.get()}};
    shared = collect_shared(files);
  }
  const image::FileDescriptor& fd(int n) const {
    for (const auto& f : proc.fds())
      if (f.fd() == n) return f;
    ADD_FAILURE() << "fd " << n << " not collected";
    return proc.fds(0);
  }
  const image::UnixSocket* socket(uint64_t inode) const {
    for (const auto& s : shared.objects.sockets())
      if (s.inode() == inode) return &s;
    return nullptr;
  }
  const image::Pipe* pipe(uint64_t inode) const {
    for (const auto& p : shared.objects.pipes())
      if (p.inode() == inode) return &p;
    return nullptr;
  }
};

std::string read_all(int fd) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && errno == ENOTSOCK) n = read(fd, buf, sizeof buf);
    if (n <= 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

TEST(TreeFiles, PipeDataIsCapturedAndLeftInPlace) {
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
  UniqueFd r(p[0]), w(p[1]);
  UniqueFd r2(dup(r.get()));
  std::string data;
  for (int i = 0; i < 3000; i++) data += std::to_string(i) + ",";
  ASSERT_EQ(write(w.get(), data.data(), data.size()), static_cast<ssize_t>(data.size()));
  Self s;
  s.collect();
  const auto& fr = s.fd(r.get());
  EXPECT_EQ(fr.kind(), image::FileDescriptor::PIPE);
  EXPECT_TRUE(fr.restorable());
  EXPECT_EQ(fr.file_id(), s.fd(r2.get()).file_id()) << "dup: one description";
  EXPECT_NE(fr.file_id(), s.fd(w.get()).file_id());
  const auto* pipe = s.pipe(fr.object_inode());
  ASSERT_NE(pipe, nullptr);
  EXPECT_EQ(pipe->data(), data);
  EXPECT_EQ(pipe->capacity(), 65536u);
  EXPECT_EQ(read_all(r.get()), data) << "nothing consumed";
}

TEST(TreeFiles, SocketQueuesAreCapturedAndPeekOffsetPutBack) {
  int sv[2], dv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, dv), 0);
  UniqueFd a(sv[0]), b(sv[1]), c(dv[0]), d(dv[1]);
  ASSERT_EQ(send(a.get(), "hello ", 6, 0), 6);
  ASSERT_EQ(send(a.get(), "world", 5, 0), 5);
  ASSERT_EQ(shutdown(a.get(), SHUT_WR), 0);
  // Datagrams, one empty and one larger than the capture's first buffer.
  int big_buf = 4 << 20;
  ASSERT_EQ(setsockopt(c.get(), SOL_SOCKET, SO_SNDBUF, &big_buf, sizeof big_buf), 0);
  ASSERT_EQ(setsockopt(d.get(), SOL_SOCKET, SO_RCVBUF, &big_buf, sizeof big_buf), 0);
  std::string large(300 * 1024, 'L');
  std::vector<std::string> dgrams{"one", "", large, "four"};
  for (const auto& g : dgrams)
    ASSERT_EQ(send(c.get(), g.data(), g.size(), 0), static_cast<ssize_t>(g.size()));
  int off = 3;  // the process's own peek offset, to be found as it was
  ASSERT_EQ(setsockopt(d.get(), SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off), 0);

  Self s;
  s.collect();
  const auto* sb = s.socket(s.fd(b.get()).object_inode());
  const auto* sa = s.socket(s.fd(a.get()).object_inode());
  const auto* sd = s.socket(s.fd(d.get()).object_inode());
  ASSERT_TRUE(sa && sb && sd);
  EXPECT_EQ(std::vector<std::string>(sb->queued().begin(), sb->queued().end()),
            std::vector<std::string>{"hello world"});
  EXPECT_TRUE(sa->queued().empty());
  EXPECT_TRUE(sa->shutdown_write());
  EXPECT_EQ(sb->peer_inode(), sa->inode());
  EXPECT_EQ(std::vector<std::string>(sd->queued().begin(), sd->queued().end()), dgrams);
  EXPECT_TRUE(s.fd(d.get()).restorable());

  int got = -1;
  socklen_t len = sizeof got;
  ASSERT_EQ(getsockopt(d.get(), SOL_SOCKET, SO_PEEK_OFF, &got, &len), 0);
  EXPECT_EQ(got, 3);
  ASSERT_EQ(getsockopt(b.get(), SOL_SOCKET, SO_PEEK_OFF, &got, &len), 0);
  EXPECT_EQ(got, -1) << "peeking left disabled as it was";
  EXPECT_EQ(read_all(b.get()), "hello world");
  off = -1;
  ASSERT_EQ(setsockopt(d.get(), SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off), 0);
  std::vector<char> buf(400 * 1024);
  for (const auto& g : dgrams) {
    ssize_t n = recv(d.get(), buf.data(), buf.size(), MSG_DONTWAIT);
    ASSERT_EQ(n, static_cast<ssize_t>(g.size()));
    EXPECT_EQ(std::string(buf.data(), static_cast<size_t>(n)), g);
  }
}

TEST(TreeFiles, DescriptorsInFlightMakeAPairUnrestorable) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  UniqueFd passed(open("/dev/null", O_RDONLY | O_CLOEXEC));
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  char byte = 'x';
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  int pfd = passed.get();
  std::memcpy(CMSG_DATA(c), &pfd, sizeof pfd);
  ASSERT_EQ(sendmsg(a.get(), &msg, 0), 1);
  Self s;
  size_t fds_before = collect_fds(getpid()).size();
  s.collect();
  EXPECT_FALSE(s.fd(a.get()).restorable());
  EXPECT_FALSE(s.fd(b.get()).restorable());
  auto why = s.shared.why_not.find({getpid(), b.get()});
  ASSERT_NE(why, s.shared.why_not.end());
  EXPECT_NE(why->second.find("descriptors in flight"), std::string::npos) << why->second;
  EXPECT_EQ(collect_fds(getpid()).size(), fds_before) << "the peeked descriptor was closed";
  EXPECT_EQ(s.socket(s.fd(a.get()).object_inode()), nullptr);
}

TEST(TreeFiles, AnEndOutsideIsNamedWithItsHolder) {
  int p[2], go[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  ASSERT_EQ(pipe2(go, O_CLOEXEC), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // outside the "tree": holds the writer until told to go
    close(go[1]);
    char c;
    _exit(read(go[0], &c, 1) < 0 ? 1 : 0);
  }
  UniqueFd r(p[0]), stop(go[1]);
  close(p[1]);
  close(go[0]);
  Self s;
  s.collect();
  EXPECT_FALSE(s.fd(r.get()).restorable());
  auto why = s.shared.why_not.find({getpid(), r.get()});
  ASSERT_NE(why, s.shared.why_not.end());
  EXPECT_NE(why->second.find("only the reading end of pipe:["), std::string::npos) << why->second;
  EXPECT_NE(why->second.find("held by pid " + std::to_string(child)), std::string::npos)
      << why->second;
  stop.reset();
  int status;
  waitpid(child, &status, 0);
}

// The writer was closed everywhere: restorable as it is, data then EOF (Pipe.no_writers).
TEST(TreeFiles, AnEndClosedEverywhereIsRestorable) {
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  UniqueFd r(p[0]);
  ASSERT_EQ(write(p[1], "last words", 10), 10);
  close(p[1]);
  Self s;
  s.collect();
  EXPECT_TRUE(s.fd(r.get()).restorable());
  const image::Pipe* pipe = s.pipe(s.fd(r.get()).object_inode());
  ASSERT_NE(pipe, nullptr);
  EXPECT_TRUE(pipe->no_writers());
  EXPECT_FALSE(pipe->no_readers());
  EXPECT_EQ(pipe->data(), "last words");
  char buf[16];
  EXPECT_EQ(read(r.get(), buf, sizeof buf), 10) << "the data was consumed";
}

}  // namespace
}  // namespace lazycr::checkpoint
