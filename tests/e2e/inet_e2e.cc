// IPv4/IPv6 sockets (objects/inet_socket.h), eager and lazy: TCP listeners with their options
// accept and serve after a restore; UDP queues come back with their source addresses, in
// order; established connections are refused by name; --netns restores a server beside its
// still-running original; python3's http.server serves a file after a restore.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/socket_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// Connects to ip:port (in the network namespace of `netns_of` when > 0), sends `line`, and
// returns what comes back before the server closes.
std::string echo(int family, const std::string& ip, int port, const std::string& line,
                 pid_t netns_of = 0) {
  return tcp_exchange(family, ip, port, line, netns_of);
}

void tcp_round_trip(bool lazy) {
  Child target({target_bin("inet_target"), "tcp"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("TCP/IPv6 socket listening on [::1]:" + info.str("port6")),
            std::string::npos)
      << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "inet_target"));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(echo(AF_INET, "127.0.0.1", static_cast<int>(info.first("port4")), "hello v4\n"),
            "hello v4\n");
  EXPECT_EQ(echo(AF_INET6, "::1", static_cast<int>(info.first("port6")), "hello v6\n"),
            "hello v6\n");
  // An IPv4 client of the dual-stack listener: IPV6_V6ONLY is off again.
  EXPECT_EQ(echo(AF_INET, "127.0.0.1", static_cast<int>(info.first("portds")), "hello ds\n"),
            "hello ds\n");
  EXPECT_EQ(restore.read_line(), "served 3");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(Inet, TcpListenersComeBackWithOptionsAndServeEager) {
  tcp_round_trip(false);
}
TEST(Inet, TcpListenersComeBackWithOptionsAndServeLazy) {
  tcp_round_trip(true);
}

void udp_round_trip(bool lazy) {
  Child target({target_bin("inet_target"), "udp"});
  target.wait_for("ready");
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("3 datagrams queued"), std::string::npos) << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "inet_target"));
  expect_verified(restore, pid);
}

TEST(Inet, UdpQueuesComeBackWithSourcesInOrderEager) {
  udp_round_trip(false);
}
TEST(Inet, UdpQueuesComeBackWithSourcesInOrderLazy) {
  udp_round_trip(true);
}

// The dump peeks: a target left running still reads every datagram (the same check, without
// any restore).
TEST(Inet, UdpDumpLeavesTheQueueInPlace) {
  Child target({target_bin("inet_target"), "udp"});
  target.wait_for("ready");
  TempDir images;
  auto d =
      lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
}

// An established connection is refused by name, and the target runs on.
TEST(Inet, EstablishedConnectionIsRefusedByName) {
  Child target({target_bin("inet_target"), "tcp"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  // A connection waiting in the accept queue of the IPv4 listener.
  int c = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(info.first("port4")));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  EXPECT_EQ(d.exit_code, 1);
  EXPECT_NE(d.err.find("1 connection(s) in its accept queue"), std::string::npos) << d.err;
  EXPECT_NE(d.err.find("--tcp-established"), std::string::npos) << d.err;
  EXPECT_TRUE(target.running());
  ::close(c);
}

// --netns: the image of a server left running restores beside it (same port, same pids in a
// new PID namespace), and both serve.
TEST(Inet, NetnsRestoresBesideTheRunningOriginal) {
  Child target({target_bin("inet_target"), "tcp"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  TempDir images;
  auto d =
      lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;

  // Without --netns the port is taken: a refusal naming the address.
  auto clash = lazycr({"restore", "-D", images / "img", "--shell-job", "--pidns"}, 30);
  EXPECT_EQ(clash.exit_code, 1);
  EXPECT_NE(clash.err.find("127.0.0.1:" + info.str("port4") + " is in use"), std::string::npos)
      << clash.err;

  Child restore({lazycr_bin(), "restore", "-D", images / "img", "--shell-job", "--pidns", "--netns",
                 "--pidfile", images / "pid"});
  pid_t pid = wait_for_pidfile(restore, images / "pid");
  ASSERT_GT(pid, 0);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "inet_target"));
  auto ns_of = [](const std::string& p) {
    char buf[64] = "";
    ssize_t n = ::readlink((p + "/ns/net").c_str(), buf, sizeof buf - 1);
    return std::string(buf, n > 0 ? static_cast<size_t>(n) : 0);
  };
  EXPECT_NE(ns_of("/proc/" + std::to_string(pid)), ns_of("/proc/self"));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  for (auto [family, ip, key] :
       std::vector<std::tuple<int, std::string, std::string>>{{AF_INET, "127.0.0.1", "port4"},
                                                              {AF_INET6, "::1", "port6"},
                                                              {AF_INET, "127.0.0.1", "portds"}}) {
    int port = static_cast<int>(info.first(key));
    EXPECT_EQ(echo(family, ip, port, "original\n"), "original\n") << key;
    EXPECT_EQ(echo(family, ip, port, "restored\n", pid), "restored\n") << key;
  }
  EXPECT_EQ(target.read_line(), "served 3");
  EXPECT_EQ(restore.read_line(), "served 3");
  EXPECT_EQ(target.wait(60), 0);
  EXPECT_EQ(restore.wait(60), 0);
}

// A real server: python3's http.server (socketserver with a poll selector: no epoll) serves a
// file after it is dumped and restored.
void http_server_round_trip(bool lazy) {
  TempDir www;
  std::ofstream(www / "f.txt") << "hello from the restored server\n";
  int port = free_port();
  ASSERT_GT(port, 0);
  Child server({"/usr/bin/python3", "-u", "-m", "http.server", std::to_string(port), "--bind",
                "127.0.0.1", "--directory", www.path()});
  server.wait_for("Serving HTTP");
  const std::string get = "GET /f.txt HTTP/1.0\r\n\r\n";
  EXPECT_NE(echo(AF_INET, "127.0.0.1", port, get).find("hello from the restored server"),
            std::string::npos);
  pid_t pid = server.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(server, images / "img"));
  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "python3"));
  for (int i = 0; i < 2; i++) {
    std::string reply = echo(AF_INET, "127.0.0.1", port, get);
    EXPECT_NE(reply.find("200 OK"), std::string::npos) << reply;
    EXPECT_NE(reply.find("hello from the restored server"), std::string::npos) << reply;
  }
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  EXPECT_EQ(restore.wait(60), 128 + SIGKILL);
}

TEST(Inet, PythonHttpServerServesAfterRestoreEager) {
  http_server_round_trip(false);
}
TEST(Inet, PythonHttpServerServesAfterRestoreLazy) {
  http_server_round_trip(true);
}

}  // namespace
}  // namespace lazycr::test
