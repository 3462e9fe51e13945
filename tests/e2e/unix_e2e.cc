// AF_UNIX sockets beyond connected pairs (objects/unix_socket.h), eager and lazy: listeners
// bound to a path and to an abstract name come back with their connections not accepted yet
// (client ends in the target), a bound datagram socket with its queue, options kept; the
// stale socket files the dump leaves are replaced, a live one or another file refuses the
// restore by name; a datagram socket connected outside the tree is refused without
// --ext-unix-sk and connected again with it; a tmux server with a job running is dumped and
// restored, and answers send-keys and capture-pane afterwards.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/socket_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// Connects to the stream socket at `path`, sends `line`, returns what comes back until EOF.
std::string echo(const std::string& path, const std::string& line) {
  sockaddr_storage a;
  socklen_t len = unix_address(path, a);
  return exchange(socket_in(AF_UNIX, SOCK_STREAM), a, len, line);
}

void listeners_round_trip(bool lazy) {
  TempDir dir;  // the socket files live here: /tmp/... (harness temp dirs are under /tmp)
  Child target({target_bin("unix_target"), "listen", dir.path()});
  target.wait_for("ready");
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("stream socket listening on " + (dir / "unixsk-listen.sock") +
                          " (backlog 7, 2 pending, SO_PASSCRED)"),
            std::string::npos)
      << show.out;
  EXPECT_NE(show.out.find("seqpacket socket listening on @unixsk-" + std::to_string(pid) +
                          " (backlog 5, 1 pending)"),
            std::string::npos)
      << show.out;
  auto json = lazycr({"show", "--json", images / "img"});
  EXPECT_NE(json.out.find("\"listening\": true"), std::string::npos) << json.out;

  // The killed target left its socket files behind: stale, replaced by the restore.
  struct stat st;
  ASSERT_EQ(::stat((dir / "unixsk-listen.sock").c_str(), &st), 0);
  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "unix_target"));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(echo(dir / "unixsk-listen.sock", "hello after\n"), "hello after\n");
  EXPECT_EQ(restore.read_line(), "served 1");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(Unix, ListenersWithPendingConnectionsAndDatagramsComeBackEager) {
  listeners_round_trip(false);
}
TEST(Unix, ListenersWithPendingConnectionsAndDatagramsComeBackLazy) {
  listeners_round_trip(true);
}

// A path someone listens on (the original, left running) and a path that is not a socket both
// refuse the restore by name, before any process exists.
TEST(Unix, LivePathAndNonSocketFileAreRefusedByName) {
  TempDir dir;
  Child target({target_bin("unix_target"), "listen", dir.path()});
  target.wait_for("ready");
  pid_t pid = target.pid();
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  auto live = lazycr({"restore", "-D", images / "img", "--shell-job", "--pidns"}, 60);
  EXPECT_EQ(live.exit_code, 1);
  EXPECT_NE(live.err.find(dir / "unixsk-listen.sock"), std::string::npos) << live.err;
  EXPECT_NE(live.err.find("is in use"), std::string::npos) << live.err;
  // The original runs on untouched and still verifies.
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(echo(dir / "unixsk-listen.sock", "x\n"), "x\n");
  EXPECT_EQ(target.wait(60), 0);  // it removed its socket files

  std::ofstream(dir / "unixsk-listen.sock") << "not a socket\n";
  auto file = lazycr({"restore", "-D", images / "img", "--shell-job", "--pidns"}, 60);
  EXPECT_EQ(file.exit_code, 1);
  EXPECT_NE(file.err.find(dir / "unixsk-listen.sock" + " exists and is a regular file"),
            std::string::npos)
      << file.err;
  std::ifstream in(dir / "unixsk-listen.sock");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "not a socket");
}

// A datagram socket connected to a bound socket outside the tree: refused by name without
// --ext-unix-sk; with it on dump and restore, connected to that path again.
void ext_round_trip(bool lazy) {
  TempDir dir;
  std::string peer = dir / "unixsk-ext.sock";
  int rx = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_storage a;
  socklen_t len = unix_address(peer, a);
  ASSERT_EQ(::bind(rx, reinterpret_cast<sockaddr*>(&a), len), 0);
  Child target({target_bin("unix_target"), "ext", peer});
  target.wait_for("ready");
  pid_t pid = target.pid();
  TempDir images;
  auto refused = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "no"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.err.find("outside the tree; dump and restore --ext-unix-sk"), std::string::npos)
      << refused.err;
  EXPECT_TRUE(target.running());
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img", "--ext-unix-sk"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  auto no_flag = lazycr({"restore", "-D", images / "img", "--shell-job"}, 60);
  EXPECT_EQ(no_flag.exit_code, 1);
  EXPECT_NE(no_flag.err.find("restore --ext-unix-sk connects it again"), std::string::npos)
      << no_flag.err;

  Child restore(restore_argv(images / "img", lazy, {"--ext-unix-sk"}));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "unix_target"));
  expect_verified(restore, pid);
  char buf[64];
  EXPECT_EQ(::recv(rx, buf, sizeof buf, MSG_DONTWAIT), 10);  // "ext-before", sent before the dump
  ssize_t n = ::recv(rx, buf, sizeof buf, MSG_DONTWAIT);
  EXPECT_EQ(std::string(buf, n > 0 ? static_cast<size_t>(n) : 0), "ext-after");
  ::close(rx);
}

TEST(Unix, ExternalPeerRefusedWithoutFlagAndReconnectedWithItEager) {
  ext_round_trip(false);
}
TEST(Unix, ExternalPeerRefusedWithoutFlagAndReconnectedWithItLazy) {
  ext_round_trip(true);
}

// The highest N of the "count-N" lines in `pane`, or 0.
int highest_count(const std::string& pane) {
  int best = 0;
  for (size_t at = pane.find("count-"); at != std::string::npos; at = pane.find("count-", at + 1))
    best = std::max(best, std::atoi(pane.c_str() + at + 6));
  return best;
}

// A real program: Debian's tmux server with a session whose shell runs a job printing a
// counter. The server (and the pane's shell and job) are dumped, which leaves the socket file
// behind, stale; restored in a new PID namespace (the server's pid may still be a zombie of
// ours), the server answers new clients: send-keys runs a command in the pane, capture-pane
// shows its output, and the job counts on. The clients are outside the tree, connected only
// while a command runs.
void tmux_round_trip(bool lazy) {
  std::string sock = "/tmp/unixsk-tmux-" + std::to_string(::getpid()) + ".sock";
  ::unlink(sock.c_str());
  auto tmux = [&](std::vector<std::string> args) {
    std::vector<std::string> argv{"/usr/bin/tmux", "-S", sock};
    argv.insert(argv.end(), args.begin(), args.end());
    return run(argv, 30);
  };
  auto pane = [&] { return tmux({"capture-pane", "-p", "-t", "t", "-S", "-1000"}).out; };
  auto wait_pane = [&](const std::function<bool(const std::string&)>& ok) {
    for (int i = 0; i < 1000; i++) {
      if (ok(pane())) return true;
      usleep(20000);
    }
    return false;
  };
  ASSERT_EQ(tmux({"new-session", "-d", "-s", "t", "-x", "80", "-y", "24",
                  "env PS1='$ ' bash --norc --noprofile"})
                .exit_code,
            0);
  ASSERT_EQ(tmux({"send-keys", "-t", "t",
                  "i=0; while :; do i=$((i+1)); echo count-$i; sleep 0.2; done &", "Enter"})
                .exit_code,
            0);
  ASSERT_TRUE(wait_pane([](const std::string& p) { return highest_count(p) >= 3; })) << pane();
  auto shown = tmux({"display", "-p", "#{pid}"});
  pid_t server = std::atoi(shown.out.c_str());
  ASSERT_GT(server, 0) << shown.out << shown.err;

  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(server), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  struct stat st;
  EXPECT_EQ(::stat(sock.c_str(), &st), 0) << "the dump should leave the socket file, stale";
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("stream socket listening on " + sock), std::string::npos) << show.out;

  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", images / "img", "--pidns"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  bool answers = false;
  for (int i = 0; i < 1500 && restore.running() && !answers; i++) {
    answers = tmux({"has-session", "-t", "t"}).exit_code == 0;
    if (!answers) usleep(20000);
  }
  ASSERT_TRUE(answers) << "the restored tmux server does not answer";
  int before = highest_count(pane());
  ASSERT_EQ(tmux({"send-keys", "-t", "t", "echo hello-$((6*7))-after", "Enter"}).exit_code, 0);
  // The command line shows "$((6*7))"; only its output shows "hello-42-after".
  EXPECT_TRUE(wait_pane([](const std::string& p) {
    return p.find("\nhello-42-after") != std::string::npos;
  })) << pane();
  EXPECT_TRUE(wait_pane([&](const std::string& p) { return highest_count(p) > before + 2; }))
      << "the job stopped counting at " << before << ":\n"
      << pane();
  EXPECT_EQ(tmux({"kill-server"}).exit_code, 0);
  EXPECT_EQ(restore.wait(60), 0);
  ::unlink(sock.c_str());
}

TEST(Unix, TmuxServerAnswersAfterRestoreEager) {
  tmux_round_trip(false);
}
TEST(Unix, TmuxServerAnswersAfterRestoreLazy) {
  tmux_round_trip(true);
}

}  // namespace
}  // namespace lazycr::test
