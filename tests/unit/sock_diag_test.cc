// sock_diag (UNIX_DIAG) against real sockets of this process.
#include "common/sock_diag.h"

#include <gtest/gtest.h>
#include <linux/netlink.h>
#include <linux/unix_diag.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "common/error.h"
#include "common/fd.h"

namespace lazycr::sockdiag {
namespace {

uint64_t inode_of(int fd) {
  struct stat st;
  EXPECT_EQ(fstat(fd, &st), 0);
  return st.st_ino;
}

TEST(SockDiag, SocketPairPeersQueuesAndShutdown) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  ASSERT_EQ(send(a.get(), "hello", 5, 0), 5);
  ASSERT_EQ(shutdown(b.get(), SHUT_WR), 0);
  auto all = unix_sockets();
  uint64_t ia = inode_of(a.get()), ib = inode_of(b.get());
  ASSERT_TRUE(all.count(ia) && all.count(ib));
  const auto& sa = all[ia];
  const auto& sb = all[ib];
  EXPECT_EQ(sa.peer, ib);
  EXPECT_EQ(sb.peer, ia);
  EXPECT_EQ(sa.type, SOCK_STREAM);
  EXPECT_EQ(sa.state, 1);  // TCP_ESTABLISHED
  EXPECT_EQ(sb.rqueue, 5u) << "bytes waiting at b";
  EXPECT_EQ(sa.rqueue, 0u);
  EXPECT_TRUE(sb.shutdown_write);
  EXPECT_FALSE(sb.shutdown_read);
  EXPECT_TRUE(sa.name.empty());
}

TEST(SockDiag, ListeningSocketWithItsNameAndPendingConnection) {
  std::string path = "/tmp/lazycr-sockdiag-" + std::to_string(getpid());
  unlink(path.c_str());
  UniqueFd l(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(bind(l.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(l.get(), 3), 0);
  UniqueFd c(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(connect(c.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  auto all = unix_sockets();
  unlink(path.c_str());
  const auto& s = all.at(inode_of(l.get()));
  EXPECT_EQ(s.state, 10);  // TCP_LISTEN
  EXPECT_EQ(s.name, path);
  EXPECT_EQ(s.rqueue, 1u) << "one connection not accepted";
  EXPECT_EQ(s.wqueue, 3u) << "backlog";
  EXPECT_EQ(s.icons.size(), 1u);
}

TEST(SockDiag, MalformedMessagesAreRefused) {
  char small[4] = {};
  EXPECT_THROW(parse_unix_diag_msg(small, sizeof small), Error);
  struct {
    unix_diag_msg msg;
    nlattr attr;
  } bad{};
  bad.msg.udiag_ino = 42;
  bad.attr.nla_len = 200;  // past the end
  bad.attr.nla_type = UNIX_DIAG_PEER;
  EXPECT_THROW(parse_unix_diag_msg(&bad, sizeof bad), Error);
  bad.attr.nla_len = 2;  // shorter than its header
  EXPECT_THROW(parse_unix_diag_msg(&bad, sizeof bad), Error);
}

}  // namespace
}  // namespace lazycr::sockdiag
