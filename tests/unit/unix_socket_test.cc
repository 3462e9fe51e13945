// objects/unix_socket: hostile image values refused by name (validate_unix_socket,
// create_unix_sockets' checks across sockets), and what sock_diag tells of a listener with
// connections not accepted yet (the client ends' inodes, the socket file's inode).
#include "objects/unix_socket.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <string>

#include "common/error.h"
#include "common/fd.h"
#include "common/sock_diag.h"

namespace lazycr::objects {
namespace {

std::string refusal(const image::UnixSocket& s) {
  try {
    validate_unix_socket(s);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

image::UnixSocket listener() {
  image::UnixSocket s;
  s.set_inode(9);
  s.set_type(SOCK_STREAM);
  s.set_name("/tmp/unixsk-unit.sock");
  s.set_listening(true);
  s.set_backlog(4);
  s.set_file_mode(0600);
  return s;
}

TEST(UnixSocketValidate, HostileValuesAreRefusedByName) {
  EXPECT_EQ(refusal(listener()), "");
  auto s = listener();
  s.set_name(std::string(108, 'a').replace(0, 1, "/"));
  EXPECT_NE(refusal(s).find("socket inode 9: name path of 108 bytes"), std::string::npos);
  s = listener();
  s.set_name("relative.sock");
  EXPECT_NE(refusal(s).find("is not absolute"), std::string::npos);
  s = listener();
  s.set_name(std::string("/tmp/a\0b", 8));
  EXPECT_NE(refusal(s).find("holds a NUL byte"), std::string::npos);
  s = listener();
  s.set_name(std::string(1, '\0'));
  s.clear_file_mode();
  EXPECT_NE(refusal(s).find("abstract name of 0 bytes"), std::string::npos);
  s.set_name(std::string(109, '\0'));
  EXPECT_NE(refusal(s).find("abstract name of 108 bytes"), std::string::npos);
  s = listener();
  s.set_backlog(1u << 21);
  EXPECT_NE(refusal(s).find("backlog 2097152"), std::string::npos);
  s = listener();
  for (int i = 0; i < 6; i++) s.add_pending(100 + i);
  EXPECT_NE(refusal(s).find("6 pending connections for a backlog of 4"), std::string::npos);
  s = listener();
  s.set_type(SOCK_DGRAM);
  EXPECT_NE(refusal(s).find("a datagram socket cannot listen"), std::string::npos);
  s = listener();
  s.set_file_mode(010000);
  EXPECT_NE(refusal(s).find("file mode 4096 beyond 07777"), std::string::npos);
  s = listener();
  s.set_type(7);
  EXPECT_NE(refusal(s).find("type 7 is not a type lazycr restores"), std::string::npos);
  image::UnixSocket e;
  e.set_inode(10);
  e.set_type(SOCK_STREAM);
  e.set_external_peer(true);
  e.set_peer_name("/tmp/x");
  EXPECT_NE(refusal(e).find("an external peer for a SOCK_STREAM"), std::string::npos);
  e.set_type(SOCK_DGRAM);
  EXPECT_EQ(refusal(e), "");
  e.set_peer_inode(3);
  EXPECT_NE(refusal(e).find("an external peer and a peer inode"), std::string::npos);
  image::UnixSocket p;
  p.set_inode(11);
  p.set_type(SOCK_DGRAM);
  p.set_peer_name("/tmp/x");
  EXPECT_NE(refusal(p).find("peer_name without external_peer"), std::string::npos);
  p.clear_peer_name();
  p.set_backlog(3);
  EXPECT_NE(refusal(p).find("backlog or pending connections without listening"), std::string::npos);
}

TEST(UnixSocketCreate, RelationsAcrossSocketsAreCheckedFirst) {
  image::UnixSocket l = listener(), c;
  l.add_pending(20);
  c.set_inode(20);
  c.set_type(SOCK_SEQPACKET);  // not the listener's type
  UnixRestore in;
  in.held[9] = {&l, "pid 1 fd 3"};
  in.held[20] = {&c, "pid 1 fd 4"};
  in.as_holder = [](uint64_t, const std::function<void()>& f) { f(); };
  try {
    create_unix_sockets(in);
    ADD_FAILURE() << "made";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is not a fresh client socket of the same type"),
              std::string::npos)
        << e.what();
  }
  struct stat st;
  EXPECT_NE(::stat(l.name().c_str(), &st), 0) << "nothing was bound";
  image::UnixSocket x;
  x.set_inode(30);
  x.set_type(SOCK_DGRAM);
  x.set_external_peer(true);
  x.set_peer_name("/tmp/unixsk-nowhere.sock");
  UnixRestore ext;
  ext.held[30] = {&x, "pid 1 fd 5"};
  try {
    create_unix_sockets(ext);
    ADD_FAILURE() << "made without --ext-unix-sk";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("restore --ext-unix-sk connects it again"),
              std::string::npos)
        << e.what();
  }
}

TEST(UnixSocketDiag, ListenerListsTheClientEndsOfPendingConnections) {
  std::string path = "/tmp/unixsk-unit-" + std::to_string(::getpid()) + ".sock";
  ::unlink(path.c_str());
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), path.size());
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  UniqueFd l(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::bind(l.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  ASSERT_EQ(::listen(l.get(), 3), 0);
  UniqueFd c(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  struct stat lst, cst, fst;
  ASSERT_EQ(::fstat(l.get(), &lst), 0);
  ASSERT_EQ(::fstat(c.get(), &cst), 0);
  ASSERT_EQ(::stat(path.c_str(), &fst), 0);
  auto all = sockdiag::unix_sockets();
  ASSERT_TRUE(all.count(lst.st_ino) && all.count(cst.st_ino));
  const auto& ld = all[lst.st_ino];
  EXPECT_EQ(ld.state, 10);
  EXPECT_EQ(ld.wqueue, 3u) << "a listener's wqueue is its backlog";
  ASSERT_EQ(ld.icons.size(), 1u);
  EXPECT_EQ(ld.icons[0], cst.st_ino) << "icons name the client ends";
  EXPECT_EQ(ld.vfs_ino, fst.st_ino);
  EXPECT_EQ(all[cst.st_ino].peer, 0u) << "the embryo has no inode yet";
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace lazycr::objects
