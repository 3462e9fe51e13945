// Established TCP connections (objects/tcp_connection.h, dump and restore --tcp-established),
// eager and lazy: both ends in the tree with bytes queued both ways (IPv4, IPv6, and a
// dual-stack listener's v4-mapped end), verified from inside; a peer outside the tree (this
// test) that sees no reset and no lost bytes across a dump --leave-running, and across a dump
// (tree killed) and a restore; refusals without the flag; redis-server with 20,000 keys and
// this test's client connection open across the checkpoint.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <regex>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "image-format/image_dir.h"
#include "image-format/shared.pb.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/socket_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// Ports of this file: 20100-20199.
constexpr int kPeerPort = 20101;
constexpr int kRedisPort = 20102;
constexpr int kHttpPort = 23001;
constexpr int kGapPeerPort = 23002;

char pattern(long i) {
  return static_cast<char>('a' + (i * 7 + i / 251) % 26);
}

void pair_round_trip(const std::string& mode, bool lazy) {
  Child target({target_bin("tcp_target"), "pair", mode});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  ASSERT_GT(info.first("sent"), 0u);
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img", {"--tcp-established"}));
  auto show = lazycr({"show", images / "img"});
  const std::string fam = mode == "4" ? "IPv4" : "IPv6";
  EXPECT_NE(show.out.find("TCP/" + fam + " connection"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("1000 bytes unread"), std::string::npos) << show.out;
  // The client's writes were partly never sent (the accepted end's window closed).
  EXPECT_TRUE(std::regex_search(show.out, std::regex(" [1-9][0-9]* unsent\\)"))) << show.out;
  auto json = lazycr({"show", "--json", images / "img"});
  EXPECT_NE(json.out.find("\"tcp\""), std::string::npos) << json.out;

  Child restore(restore_argv(images / "img", lazy, {"--tcp-established"}));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "tcp_target"));
  expect_verified(restore, pid);
}

TEST(Tcp, PairWithQueuesBothWaysIPv4Eager) {
  pair_round_trip("4", false);
}
TEST(Tcp, PairWithQueuesBothWaysIPv4Lazy) {
  pair_round_trip("4", true);
}
TEST(Tcp, PairWithQueuesBothWaysIPv6Eager) {
  pair_round_trip("6", false);
}
TEST(Tcp, PairWithQueuesBothWaysIPv6Lazy) {
  pair_round_trip("6", true);
}
TEST(Tcp, PairWithQueuesBothWaysDualStackEager) {
  pair_round_trip("ds", false);
}
TEST(Tcp, PairWithQueuesBothWaysDualStackLazy) {
  pair_round_trip("ds", true);
}

// dump --leave-running, restore --netns: the clone's connections (both ends in the tree) are
// made beside the original's, same addresses, in a fresh network namespace; both verify.
TEST(Tcp, PairClonedBesideTheRunningOriginalWithNetns) {
  Child target({target_bin("tcp_target"), "pair", "6"});
  target.wait_for("ready");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img",
                   "--tcp-established", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  Child restore({lazycr_bin(), "restore", "-D", images / "img", "--shell-job", "--pidns", "--netns",
                 "--tcp-established", "--pidfile", images / "pid"});
  pid_t pid = wait_for_pidfile(restore, images / "pid");
  ASSERT_GT(pid, 0);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "tcp_target"));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
  EXPECT_EQ(target.wait(60), 0);
}

// This test's end of a connection to a target: a listener on kPeerPort with a small receive
// buffer (inherited by the accepted end), so that the target's writes stay partly unsent.
struct Peer {
  int listener = -1, conn = -1;
  Peer() : Peer(kPeerPort, true) {}
  Peer(int port, bool) {
    listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1, small = 8192;
    ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    ::setsockopt(listener, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    sockaddr_storage a;
    socklen_t len = inet_address(AF_INET, "127.0.0.1", port, a);
    EXPECT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&a), len), 0) << strerror(errno);
    EXPECT_EQ(::listen(listener, 4), 0);
  }
  // A connection made elsewhere, without a listener.
  explicit Peer(int connected) : conn(connected) {}
  ~Peer() {
    if (conn >= 0) ::close(conn);
    if (listener >= 0) ::close(listener);
  }
  void accept() { conn = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC); }
  // The connection as the kernel sees it here: no error, no hangup, still ESTABLISHED.
  void expect_healthy() {
    int err = -1;
    socklen_t len = sizeof err;
    ASSERT_EQ(::getsockopt(conn, SOL_SOCKET, SO_ERROR, &err, &len), 0);
    EXPECT_EQ(err, 0) << strerror(err);
    tcp_info ti{};
    len = sizeof ti;
    ASSERT_EQ(::getsockopt(conn, IPPROTO_TCP, TCP_INFO, &ti, &len), 0);
    EXPECT_EQ(ti.tcpi_state, 1) << "not ESTABLISHED";
    pollfd p{conn, POLLIN, 0};
    ::poll(&p, 1, 0);
    EXPECT_EQ(p.revents & (POLLHUP | POLLERR | POLLRDHUP), 0) << p.revents;
  }
  void write(const std::string& s) {
    ASSERT_EQ(::write(conn, s.data(), s.size()), static_cast<ssize_t>(s.size()));
  }
  std::string read(size_t n) {
    std::string got;
    char buf[65536];
    while (got.size() < n) {
      pollfd p{conn, POLLIN, 0};
      if (::poll(&p, 1, 30000) != 1) break;
      ssize_t r = ::read(conn, buf, std::min(sizeof buf, n - got.size()));
      if (r <= 0) {
        ADD_FAILURE() << "read: " << (r == 0 ? "EOF" : strerror(errno)) << " after " << got.size()
                      << " of " << n << " bytes";
        break;
      }
      got.append(buf, static_cast<size_t>(r));
    }
    return got;
  }
  void expect_pattern(long count) {
    std::string got = read(static_cast<size_t>(count));
    ASSERT_EQ(got.size(), static_cast<size_t>(count));
    for (long i = 0; i < count; i++)
      ASSERT_EQ(got[static_cast<size_t>(i)], pattern(i)) << "byte " << i;
  }
};

// The exchange after the dump (and restore): what the target had queued arrives whole, the
// question queued at the target is answered, and the connection keeps working.
void talk(Peer& peer, Child& out, long sent, pid_t pid) {
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  peer.expect_pattern(sent);
  EXPECT_EQ(peer.read(7), "answer\n");
  peer.write("more\n");
  EXPECT_EQ(peer.read(10), "echo more\n");
  ASSERT_EQ(::shutdown(peer.conn, SHUT_WR), 0);
  EXPECT_EQ(out.wait(60), 0);
}

TEST(Tcp, PeerOutsideSeesNothingAcrossLeaveRunningDump) {
  Peer peer;
  Child target({target_bin("tcp_target"), "peer", std::to_string(kPeerPort)});
  peer.accept();
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  peer.write("question\n");  // unread at the target when dumped
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img",
                   "--leave-running", "--tcp-established"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  peer.expect_healthy();
  talk(peer, target, static_cast<long>(info.first("sent")), target.pid());
}

// A dump that fails after the connection was read in repair mode leaves it as it was.
TEST(Tcp, PeerOutsideUnharmedByAFailedDump) {
  Peer peer;
  Child target({target_bin("tcp_target"), "peer", std::to_string(kPeerPort)});
  peer.accept();
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  peer.write("question\n");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img",
                   "--tcp-established", "--fault-inject", "commit"});
  ASSERT_EQ(d.exit_code, 1) << d.err;
  peer.expect_healthy();
  talk(peer, target, static_cast<long>(info.first("sent")), target.pid());
}

void peer_across_restore(bool lazy) {
  Peer peer;
  Child target({target_bin("tcp_target"), "peer", std::to_string(kPeerPort)});
  peer.accept();
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  peer.write("question\n");
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img", {"--tcp-established"}));
  // The tree is dead and its socket closed: in repair mode, silently (no FIN, no RST).
  peer.expect_healthy();
  Child restore(restore_argv(images / "img", lazy, {"--tcp-established"}));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "tcp_target"));
  peer.expect_healthy();
  talk(peer, restore, static_cast<long>(info.first("sent")), pid);
}

// The network lock (objects/net_lock.h): the peer outside the tree sends while the tree is
// dead (between the dump and the restore); its kernel gets no reset (the packets are dropped
// and retransmitted), and the bytes reach the restored target.
void peer_sends_in_the_gap(bool lazy) {
  Peer peer(kGapPeerPort, true);
  Child target({target_bin("tcp_target"), "peer", std::to_string(kGapPeerPort)});
  peer.accept();
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img", {"--tcp-established"}));
  peer.write("question\n");  // no socket at the other end now
  peer.expect_healthy();
  int unacked = -1;
  ASSERT_EQ(::ioctl(peer.conn, SIOCOUTQ, &unacked), 0);
  EXPECT_EQ(unacked, 9) << "the bytes sent in the gap should wait, unacknowledged";
  Child restore(restore_argv(images / "img", lazy, {"--tcp-established"}));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "tcp_target"));
  talk(peer, restore, static_cast<long>(info.first("sent")), pid);
}

TEST(Tcp, PeerSendingBetweenDumpAndRestoreGetsNoResetEager) {
  peer_sends_in_the_gap(false);
}
TEST(Tcp, PeerSendingBetweenDumpAndRestoreGetsNoResetLazy) {
  peer_sends_in_the_gap(true);
}

// The lock of a dump that killed the tree, held in this network namespace, goes away when the
// image is restored with --netns (its connections live in the new namespace): it must not drop
// those 4-tuples here for ever.
TEST(Tcp, NetworkLockIsTakenByTheDumpAndRemovedByARestoreWithNetns) {
  Child target({target_bin("tcp_target"), "pair", "4"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  const std::string port = " . " + std::to_string(info.first("port"));
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img", {"--tcp-established"}));
  auto locked = run({"/usr/sbin/nft", "list", "set", "inet", "lazycr", "conns4"});
  EXPECT_NE(locked.out.find(port), std::string::npos) << locked.out;
  Child restore({lazycr_bin(), "restore", "-D", images / "img", "--shell-job", "--pidns", "--netns",
                 "--tcp-established", "--pidfile", images / "pid"});
  pid_t restored = wait_for_pidfile(restore, images / "pid");
  ASSERT_GT(restored, 0);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {restored}, "tcp_target"));
  auto after = run({"/usr/sbin/nft", "list", "set", "inet", "lazycr", "conns4"});
  EXPECT_EQ(after.out.find(port), std::string::npos) << after.out;
  expect_verified(restore, restored);
}

// A dump that must lock connections, on a machine without the nftables library: refused with
// one line naming the library; the target, left as it was, still verifies.
TEST(Tcp, DumpWithoutTheNftablesLibraryNamesItAndLeavesTheTargetWhole) {
  const std::string lib = nftables_library();
  if (lib.empty()) GTEST_SKIP() << "no libnftables.so.1 on this machine";
  Child target({target_bin("tcp_target"), "pair", "4"});
  target.wait_for("ready");
  TempDir images;
  auto d = lazycr_without(
      lib, {"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--tcp-established"});
  EXPECT_EQ(d.exit_code, 1) << d.err;
  EXPECT_NE(d.err.find("network lock: cannot load libnftables.so.1"), std::string::npos) << d.err;
  EXPECT_TRUE(target.running());
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
}

TEST(Tcp, PeerOutsideKeepsTheConnectionAcrossDumpAndRestoreEager) {
  peer_across_restore(false);
}
TEST(Tcp, PeerOutsideKeepsTheConnectionAcrossDumpAndRestoreLazy) {
  peer_across_restore(true);
}

TEST(Tcp, RefusedByNameWithoutTheFlag) {
  Child target({target_bin("tcp_target"), "pair", "4"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  EXPECT_EQ(d.exit_code, 1);
  EXPECT_NE(d.err.find("TCP/IPv4 connection 127.0.0.1:"), std::string::npos) << d.err;
  EXPECT_NE(d.err.find("needs --tcp-established"), std::string::npos) << d.err;
  EXPECT_TRUE(target.running());

  // An image with connections, restored without the flag.
  d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img2",
              "--tcp-established", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  auto r = lazycr({"restore", "-D", images / "img2", "--shell-job", "--pidns", "--netns"}, 60);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("is an established TCP connection: restoring it needs --tcp-established"),
            std::string::npos)
      << r.err;
  // The original, left running, is whole.
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
  (void)info;
}

// Connections half shut down are refused by name (state, addresses), the target unharmed.
// The dump --tcp-established of `tcp_target pair MODE` refuses the connection by name, saying
// `says`; the target is left running.
void expect_pair_dump_refused(const std::string& mode, const std::string& says) {
  SCOPED_TRACE(mode);
  Child target({target_bin("tcp_target"), "pair", mode});
  target.wait_for("ready");
  TempDir images;
  auto d = lazycr(
      {"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--tcp-established"});
  EXPECT_EQ(d.exit_code, 1);
  EXPECT_NE(d.err.find(says), std::string::npos) << d.err;
  EXPECT_NE(d.err.find("TCP/IPv4 connection 127.0.0.1:"), std::string::npos) << d.err;
  EXPECT_TRUE(target.running());
}

TEST(Tcp, HalfClosedConnectionsAreRefusedByName) {
  for (auto [mode, says] : std::vector<std::pair<std::string, std::string>>{
           {"4-rd", "was shut down for reading (shutdown SHUT_RD)"},
           {"4-wr", "is in state FIN_WAIT"}})
    expect_pair_dump_refused(mode, says);
}

// Urgent data and options lazycr does not restore: refused by name, never dropped silently.
TEST(Tcp, UrgentDataAndUnrestoredOptionsAreRefusedByName) {
  for (auto [mode, says] : std::vector<std::pair<std::string, std::string>>{
           {"4-oob", "has an urgent byte (MSG_OOB) not read yet, which lazycr does not restore"},
           {"4-uto",
            "has TCP_USER_TIMEOUT set (12345; a new socket has 0), which lazycr does not "
            "restore"}})
    expect_pair_dump_refused(mode, says);
}

// The image at `dir` with `edit` applied to each inet socket of `good` (its shared objects),
// re-signed, is refused by `restore --pidns --netns` and `extra`, saying `says`.
void expect_restore_refused(const std::string& dir, const image::SharedObjects& good,
                            const std::vector<std::string>& extra, const std::string& says,
                            const std::function<void(image::InetSocket&)>& edit) {
  SCOPED_TRACE(says);
  image::SharedObjects bad = good;
  for (auto& s : *bad.mutable_inet_sockets()) edit(s);
  image::write_message_file(dir + "/shared.pb", image::kSharedMagic, bad);
  sign_test_image(dir);
  std::vector<std::string> args{"restore", "-D", dir, "--shell-job", "--pidns", "--netns"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = lazycr(args, 60);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find(says), std::string::npos) << r.err;
}

// Hostile connection fields in a re-signed image: each refused by name before anything is made.
TEST(Tcp, HostileConnectionFieldsAreRefusedByName) {
  Child target({target_bin("tcp_target"), "pair", "4"});
  target.wait_for("ready");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img",
                   "--tcp-established", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  image::SharedObjects good;
  image::read_message_file(images / "img/shared.pb", image::kSharedMagic, &good);
  using Edit = std::function<void(image::TcpConnection&)>;
  const std::vector<std::pair<Edit, std::string>> cases = {
      {[](auto& t) { t.set_mss(0); }, "MSS 0 is out of range"},
      {[](auto& t) { t.set_snd_wscale(15); }, "window scale 15/"},
      {[](auto& t) { t.set_peer_port(70000); }, "peer port 70000 is out of range"},
      {[](auto& t) { t.set_peer_addr("abc"); }, "peer address of 3 bytes"},
      {[](auto& t) { t.set_state(4); }, "(FIN_WAIT1) is not ESTABLISHED"},
      {[](auto& t) { t.set_unsent(static_cast<uint32_t>(t.send_queue().size()) + 1); },
       "unsent bytes of a send queue"},
      {[](auto& t) { t.set_rcv_wnd(0xffffffffu); }, "window "},
      {[](auto& t) { t.set_recv_queue(std::string(17 << 20, 'x')); }, "exceed the bound"},
  };
  for (const auto& [edit, says] : cases)
    expect_restore_refused(images / "img", good, {"--tcp-established"}, says,
                           [&edit](image::InetSocket& s) {
                             if (s.has_tcp()) edit(*s.mutable_tcp());
                           });
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
}

// A listener with two connections not accepted yet from clients of the same tree
// (objects/tcp_pending.h): the restore connects the clients again, the restored program accepts
// both and talks on them. No --tcp-established: nothing is restored through repair mode.
void pending_round_trip(const std::string& mode, bool lazy) {
  Child target({target_bin("tcp_target"), "pending", mode});
  target.wait_for("ready");
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("2 connection(s) not accepted yet"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("(queued there, not accepted yet)"), std::string::npos) << show.out;
  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "tcp_target"));
  expect_verified(restore, pid);
}

TEST(Tcp, ListenerWithConnectionsNotAcceptedIPv4Eager) {
  pending_round_trip("4", false);
}
TEST(Tcp, ListenerWithConnectionsNotAcceptedIPv4Lazy) {
  pending_round_trip("4", true);
}
TEST(Tcp, ListenerWithConnectionsNotAcceptedIPv6Eager) {
  pending_round_trip("6", false);
}
TEST(Tcp, ListenerWithConnectionsNotAcceptedIPv6Lazy) {
  pending_round_trip("6", true);
}

// A queued connection that carries bytes, or whose client is outside the tree, is refused by
// name; the target is left as it was.
TEST(Tcp, QueuedConnectionsThatCannotBeMadeAgainAreRefusedByName) {
  {
    Child target({target_bin("tcp_target"), "pending", "4", "send"});
    target.wait_for("ready");
    TempDir images;
    auto d = lazycr(
        {"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--tcp-established"});
    EXPECT_EQ(d.exit_code, 1);
    EXPECT_NE(d.err.find("connection(s) in its accept queue not accepted yet"), std::string::npos)
        << d.err;
    EXPECT_NE(d.err.find("has sent 5 byte(s)"), std::string::npos) << d.err;
    EXPECT_TRUE(target.running());
  }
  Child target({target_bin("tcp_target"), "pending", "4"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_storage a;
  socklen_t len = inet_address(AF_INET, "127.0.0.1", static_cast<int>(info.first("port")), a);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), len), 0) << strerror(errno);
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  EXPECT_EQ(d.exit_code, 1);
  EXPECT_NE(d.err.find("has 3 connection(s) in its accept queue not accepted yet, 1 of them from "
                       "clients outside the tree"),
            std::string::npos)
      << d.err;
  EXPECT_TRUE(target.running());
  ::close(fd);
}

// Hostile queued-client fields in a re-signed image: refused by name before anything is made.
TEST(Tcp, HostileQueuedClientFieldsAreRefusedByName) {
  Child target({target_bin("tcp_target"), "pending", "4"});
  target.wait_for("ready");
  TempDir images;
  auto d =
      lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  image::SharedObjects good;
  image::read_message_file(images / "img/shared.pb", image::kSharedMagic, &good);
  using Edit = std::function<void(image::InetSocket&)>;
  const std::vector<std::pair<Edit, std::string>> cases = {
      {[](auto& s) {
         if (s.pending_accept()) s.set_peer_port(s.peer_port() == 1 ? 2 : 1);
       },
       "is not a listener of the image"},
      {[](auto& s) {
         if (s.listening()) s.set_accept_queue(3);
       },
       "an accept queue of 3 connection(s) but 2 queued client(s)"},
      {[](auto& s) {
         if (s.pending_accept()) s.set_peer_addr("abc");
       },
       "peer address of 3 bytes"},
      {[](auto& s) {
         if (s.listening()) s.set_pending_accept(true);
       },
       "a queued TCP client without a peer"},
      {[](auto& s) {
         if (s.listening()) s.set_backlog(0);
       },
       "an accept queue of 2 connection(s) exceeds its backlog of 0"},
  };
  for (const auto& [edit, says] : cases)
    expect_restore_refused(images / "img", good, {}, says, edit);
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
}

// A RESP command.
std::string resp(const std::vector<std::string>& args) {
  std::string out = "*" + std::to_string(args.size()) + "\r\n";
  for (const auto& a : args) out += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
  return out;
}

// This test's client connection to a redis-server (Debian's) with 20,000 keys stays open across
// the dump (redis killed) and the restore, and keeps working: same socket, right answers.
void redis_round_trip(bool lazy) {
  Child server({"/usr/bin/redis-server", "--port", std::to_string(kRedisPort), "--bind",
                "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"});
  server.wait_for("", 60);
  Peer client;  // only its connection is used
  int fd = connect_when_listening(kRedisPort, 500);
  ASSERT_GE(fd, 0) << "redis-server does not answer on port " << kRedisPort;
  client.conn = fd;
  constexpr int kKeys = 20000;
  std::string batch;
  for (int i = 0; i < kKeys; i++)
    batch += resp({"SET", "key:" + std::to_string(i), "value-" + std::to_string(i * 7)});
  client.write(batch);
  std::string oks = client.read(5 * kKeys);
  ASSERT_EQ(oks.size(), 5u * kKeys);
  EXPECT_EQ(oks.find_first_not_of("+OK\r\n"), std::string::npos);
  client.write(resp({"DBSIZE"}));
  ASSERT_EQ(client.read(8), ":20000\r\n");

  pid_t pid = server.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(server, images / "img", {"--tcp-established"}));
  client.expect_healthy();
  Child restore(restore_argv(images / "img", lazy, {"--tcp-established"}));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "redis-server"));
  // The same connection.
  client.write(resp({"DBSIZE"}));
  EXPECT_EQ(client.read(8), ":20000\r\n");
  for (int i : {0, 1, 12345, kKeys - 1}) {
    const std::string v = "value-" + std::to_string(i * 7);
    client.write(resp({"GET", "key:" + std::to_string(i)}));
    const std::string want = "$" + std::to_string(v.size()) + "\r\n" + v + "\r\n";
    EXPECT_EQ(client.read(want.size()), want) << "key:" << i;
  }
  client.write(resp({"SET", "after", "restore"}));
  EXPECT_EQ(client.read(5), "+OK\r\n");
  client.write(resp({"DBSIZE"}));
  EXPECT_EQ(client.read(8), ":20001\r\n");
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  EXPECT_EQ(restore.wait(60), 128 + SIGKILL);
}

// One HTTP/1.1 GET on `client`'s connection: the status line and the body (Content-Length).
std::string http_get(Peer& client, const std::string& path) {
  client.write("GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n");
  std::string head;
  while (head.size() < 4 || head.compare(head.size() - 4, 4, "\r\n\r\n") != 0) {
    std::string c = client.read(1);
    if (c.empty()) return "no answer: " + head;
    head += c;
  }
  std::smatch m;
  if (!std::regex_search(head, m, std::regex("Content-Length: ([0-9]+)\r\n")))
    return "no Content-Length: " + head;
  if (head.find("Connection: close") != std::string::npos) return "closes: " + head;
  std::string status = head.substr(0, head.find("\r\n"));
  return status + "|" + client.read(std::stoul(m[1]));
}

// `python3 -m http.server` (HTTP/1.1, threaded: one thread per connection) with this test's
// keep-alive connection: one request answered before the dump, the connection idle across the
// dump (python killed) and the restore, then a second request on the same connection.
void http_server_round_trip(bool lazy) {
  TempDir www;
  {
    std::ofstream f(www / "hello.txt");
    f << "hello from before the checkpoint\n";
  }
  Child server({"/usr/bin/python3", "-m", "http.server", "--protocol", "HTTP/1.1", "--bind",
                "127.0.0.1", "--directory", www.path(), std::to_string(kHttpPort)});
  int fd = connect_when_listening(kHttpPort, 1000);
  ASSERT_GE(fd, 0) << "python3 -m http.server does not answer on port " << kHttpPort;
  Peer client(fd);
  const std::string want = "HTTP/1.1 200 OK|hello from before the checkpoint\n";
  ASSERT_EQ(http_get(client, "/hello.txt"), want);

  pid_t pid = server.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(server, images / "img", {"--tcp-established"}));
  client.expect_healthy();
  {
    std::ofstream f(www / "after.txt");
    f << "written during the checkpoint\n";
  }
  Child restore(restore_argv(images / "img", lazy, {"--tcp-established"}));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "python3"));
  // The same connection, twice more.
  EXPECT_EQ(http_get(client, "/hello.txt"), want);
  EXPECT_EQ(http_get(client, "/after.txt"), "HTTP/1.1 200 OK|written during the checkpoint\n");
  client.expect_healthy();
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  EXPECT_EQ(restore.wait(60), 128 + SIGKILL);
}

TEST(Tcp, PythonHttpServerKeepAliveConnectionAcrossRestoreEager) {
  http_server_round_trip(false);
}
TEST(Tcp, PythonHttpServerKeepAliveConnectionAcrossRestoreLazy) {
  http_server_round_trip(true);
}

TEST(Tcp, RedisClientConnectionKeepsWorkingAcrossRestoreEager) {
  redis_round_trip(false);
}
TEST(Tcp, RedisClientConnectionKeepsWorkingAcrossRestoreLazy) {
  redis_round_trip(true);
}

}  // namespace
}  // namespace lazycr::test
