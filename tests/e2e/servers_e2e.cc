// Real, unmodified servers from Debian (node, nginx, memcached, redis-server), each dumped
// while serving and restored eagerly and lazily: they answer correctly afterwards, from state
// built before the dump. A server restored with --netns beside its still-running original:
// both answer on the same port; without --netns the clash is refused before any process exists.
// Established client connections and UNIX listeners are left out here (other units' tests).
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/lazy_helpers.h"
#include "tests/e2e/nginx_setup.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/socket_helpers.h"

namespace lazycr::test {
namespace {

// Ports of this file (21000-21999 belong to it on the shared test machines).
constexpr int kNodePort = 21001;
constexpr int kNginxPort = 21002;
constexpr int kMemcachedPort = 21003;
constexpr int kMemcachedUdpPort = 21004;
constexpr int kRedisPort = 21005;
constexpr int kNetnsPort = 21006;

// Connects to 127.0.0.1:port, sends `request`, and reads until `done(reply)` or until the
// server closes. Empty when nobody listens.
std::string ask(int port, const std::string& request,
                const std::function<bool(const std::string&)>& done, pid_t netns_of = 0) {
  return tcp_exchange(AF_INET, "127.0.0.1", port, request, netns_of, done);
}

std::string http_get(int port, const std::string& path, pid_t netns_of = 0) {
  return ask(
      port, "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n",
      [](const std::string&) { return false; }, netns_of);
}

// One redis command in inline form; the reply up to its end (one line, or a bulk string).
std::string redis(int port, const std::string& command, pid_t netns_of = 0) {
  auto complete = [](const std::string& r) {
    size_t eol = r.find("\r\n");
    if (eol == std::string::npos) return false;
    if (r[0] != '$') return true;
    long len = std::atol(r.c_str() + 1);
    return len < 0 || r.size() >= eol + 2 + static_cast<size_t>(len) + 2;
  };
  return ask(port, command + "\r\n", complete, netns_of);
}

// A memcached text-protocol exchange that ends with "END\r\n", "STORED\r\n" or an error.
std::string memcached(int port, const std::string& request) {
  auto complete = [](const std::string& r) {
    return r.ends_with("END\r\n") || r.ends_with("STORED\r\n") || r.ends_with("ERROR\r\n");
  };
  return ask(port, request, complete);
}

// Waits (bounded, no assertion on time) until `ok()` holds while `alive()`.
bool eventually(const std::function<bool()>& ok, const std::function<bool()>& alive) {
  for (int i = 0; i < 15000; i++) {
    if (ok()) return true;
    if (!alive()) return ok();
    usleep(2000);
  }
  return false;
}

bool installed(const std::string& path) {
  return access(path.c_str(), X_OK) == 0;
}

// A server still finishing a connection its client just closed (CLOSE_WAIT, a closed socket
// not yet released, a descriptor still in flight to a worker) is refused by the dump, which
// leaves it running as it was: try again once it has settled, as a user would. Any other
// refusal fails at once.
void dump_settled(Child& server, const std::string& dir) {
  const std::vector<std::string> args{"dump", "-t", std::to_string(server.pid()), "-D", dir};
  for (int attempt = 0;; ++attempt) {
    auto d = lazycr(args);
    if (d.exit_code == 0) break;
    const bool settling = d.err.find(" is in state ") != std::string::npos ||
                          d.err.find("TCP_MAXSEG") != std::string::npos ||
                          d.err.find("in flight") != std::string::npos;
    ASSERT_TRUE(settling && attempt < 20) << d.err;
    ASSERT_TRUE(server.running()) << "a refused dump must leave the server running: " << d.err;
    ::usleep(100'000);
  }
  EXPECT_EQ(server.wait(30), 128 + SIGKILL);
}

std::unique_ptr<Child> restore_in_foreground(const std::string& dir, bool lazy) {
  return std::make_unique<Child>(restore_argv(dir, lazy));
}

// Ends a restored server (its root pid) and the foreground restore that waits for it.
void stop(pid_t pid, Child& restore) {
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  EXPECT_EQ(restore.wait(60), 128 + SIGKILL);
}

// ---- node: an http server answering from a counter and a large object built before the dump,
// with a setInterval ticking.
const char kNodeScript[] = R"(
const http = require('http');
let ticks = 0, hits = 0;
const big = new Map();
for (let i = 0; i < 200000; i++) big.set('k' + i, {i, s: 'value-' + i});
let sum = 0;
for (const [, o] of big) sum += o.i;
setInterval(() => { ticks++; }, 5);
http.createServer((req, res) => {
  hits++;
  let s = 0;
  for (const [, o] of big) s += o.i;
  const t = ticks;
  setTimeout(() => res.end(`hits=${hits} sum=${s} of ${sum} key=${big.get('k4321').s} ` +
                           `ticking=${ticks > t}\n`), 20);
}).listen(+process.argv[2], '127.0.0.1', () => console.log('listening'));
)";

void node_round_trip(bool lazy) {
  if (!installed("/usr/bin/node")) GTEST_SKIP() << "node is not installed (tools/setup.sh)";
  TempDir work;
  std::ofstream(work / "server.js") << kNodeScript;
  Child server({"/usr/bin/node", work / "server.js", std::to_string(kNodePort)});
  ASSERT_EQ(server.wait_for("listening"), "listening");
  const std::string sum = "sum=19999900000 of 19999900000 key=value-4321 ticking=true";
  std::string before = http_get(kNodePort, "/");
  ASSERT_NE(before.find("hits=1 " + sum), std::string::npos) << before;
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_settled(server, images / "img"));
  auto restore = restore_in_foreground(images / "img", lazy);
  std::string after;
  EXPECT_TRUE(eventually([&] { return !(after = http_get(kNodePort, "/")).empty(); },
                         [&] { return restore->running(); }));
  EXPECT_NE(after.find("200 OK"), std::string::npos) << after;
  EXPECT_NE(after.find("hits=2 " + sum), std::string::npos) << after;
  after = http_get(kNodePort, "/");
  EXPECT_NE(after.find("hits=3 " + sum), std::string::npos) << after;
  stop(server.pid(), *restore);
}

TEST(Servers, NodeHttpServerAnswersFromItsStateEager) {
  node_round_trip(false);
}
TEST(Servers, NodeHttpServerAnswersFromItsStateLazy) {
  node_round_trip(true);
}

// ---- nginx: master and two workers sharing the listening socket, serving a static file.

std::vector<pid_t> children_of(pid_t pid) {
  try {
    return proc::list_children(pid);
  } catch (const std::exception&) {
    return {};  // gone
  }
}

// Ends a restored nginx: the master stopped first (it would respawn its workers), its workers
// killed, then the master; the workers, re-parented to this subreaper, are reaped.
void stop_nginx(pid_t master, Child& restore) {
  ASSERT_TRUE(send_signal(master, SIGSTOP));
  std::vector<pid_t> workers = children_of(master);
  for (pid_t w : workers) send_signal(w, SIGKILL);
  stop(master, restore);
  for (pid_t w : workers) waitpid(w, nullptr, 0);
}

// Whatever happens in a test, no worker outlives it (a worker keeps the port).
struct NginxWorkersGuard {
  pid_t master;
  std::vector<pid_t> seen;
  ~NginxWorkersGuard() {
    for (pid_t w : seen)
      if (proc::exists(w) && send_signal(w, SIGKILL)) waitpid(w, nullptr, 0);
  }
};

void nginx_round_trip(bool lazy) {
  if (!installed("/usr/sbin/nginx")) GTEST_SKIP() << "nginx is not installed (tools/setup.sh)";
  NginxSetup setup(kNginxPort);
  Child server({"/usr/sbin/nginx", "-c", setup.conf, "-p", setup.dir.path()});
  NginxWorkersGuard guard{server.pid(), {}};
  std::string before;
  ASSERT_TRUE(eventually(
      [&] {
        before = http_get(kNginxPort, "/index.html");
        return children_of(server.pid()).size() == 2 && !before.empty();
      },
      [&] { return server.running(); }));
  ASSERT_NE(before.find("served by a restored nginx"), std::string::npos) << before;
  std::vector<pid_t> workers = children_of(server.pid());
  guard.seen = workers;
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_settled(server, images / "img"));
  // The killed workers, re-parented to this subreaper: reaped, their pids free again.
  for (pid_t w : workers) EXPECT_EQ(reap(w), 128 + SIGKILL);

  auto restore = restore_in_foreground(images / "img", lazy);
  // Enough requests that both workers (same pids as before) take some.
  for (int i = 0; i < 6; i++) {
    std::string after;
    EXPECT_TRUE(eventually([&] { return !(after = http_get(kNginxPort, "/index.html")).empty(); },
                           [&] { return restore->running(); }));
    EXPECT_NE(after.find("200 OK"), std::string::npos) << after;
    EXPECT_NE(after.find("served by a restored nginx"), std::string::npos) << after;
  }
  auto now = children_of(server.pid());
  std::sort(now.begin(), now.end());
  std::sort(workers.begin(), workers.end());
  EXPECT_EQ(now, workers) << "the workers are not the original's";
  stop_nginx(server.pid(), *restore);
}

TEST(Servers, NginxMasterAndWorkersServeAStaticFileEager) {
  nginx_round_trip(false);
}
TEST(Servers, NginxMasterAndWorkersServeAStaticFileLazy) {
  nginx_round_trip(true);
}

// ---- memcached: a key set before the dump is got after the restore (TCP, and UDP when on).
std::string memcached_udp_get(int port, const std::string& key) {
  int fd = socket_in(AF_INET, SOCK_DGRAM);
  sockaddr_storage a;
  socklen_t len = inet_address(AF_INET, "127.0.0.1", port, a);
  // The UDP frame header: request id, sequence number, datagram count, reserved.
  std::string req("\x00\x07\x00\x00\x00\x01\x00\x00", 8);
  req += "get " + key + "\r\n";
  std::string got;
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::sendto(fd, req.data(), req.size(), 0, reinterpret_cast<sockaddr*>(&a), len) > 0) {
    char buf[2048];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 8) got.assign(buf + 8, static_cast<size_t>(n - 8));
  }
  ::close(fd);
  return got;
}

void memcached_round_trip(bool lazy) {
  if (!installed("/usr/bin/memcached")) GTEST_SKIP() << "memcached is not installed";
  Child server({"/usr/bin/memcached", "-p", std::to_string(kMemcachedPort), "-U",
                std::to_string(kMemcachedUdpPort), "-u", "root", "-l", "127.0.0.1", "-t", "2"});
  const std::string value(3000, 'm');
  std::string stored;
  ASSERT_TRUE(eventually(
      [&] {
        stored = memcached(kMemcachedPort, "set before 0 0 " + std::to_string(value.size()) +
                                               "\r\n" + value + "\r\n");
        return !stored.empty();
      },
      [&] { return server.running(); }));
  ASSERT_EQ(stored, "STORED\r\n");
  const std::string want =
      "VALUE before 0 " + std::to_string(value.size()) + "\r\n" + value + "\r\nEND\r\n";
  ASSERT_TRUE(memcached(kMemcachedPort, "get before\r\n") == want);
  // A reply over UDP fits one datagram (memcached splits larger ones).
  ASSERT_EQ(memcached(kMemcachedPort, "set small 0 0 5\r\nudp-1\r\n"), "STORED\r\n");
  const std::string small = "VALUE small 0 5\r\nudp-1\r\nEND\r\n";
  ASSERT_EQ(memcached_udp_get(kMemcachedUdpPort, "small"), small);
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_settled(server, images / "img"));
  auto restore = restore_in_foreground(images / "img", lazy);
  std::string after;
  EXPECT_TRUE(
      eventually([&] { return !(after = memcached(kMemcachedPort, "get before\r\n")).empty(); },
                 [&] { return restore->running(); }));
  EXPECT_TRUE(after == want) << "got " << after.size() << " bytes: " << after.substr(0, 80);
  EXPECT_EQ(memcached_udp_get(kMemcachedUdpPort, "small"), small);
  EXPECT_EQ(memcached(kMemcachedPort, "set after 0 0 2\r\nok\r\n"), "STORED\r\n");
  EXPECT_EQ(memcached(kMemcachedPort, "get after\r\n"), "VALUE after 0 2\r\nok\r\nEND\r\n");
  stop(server.pid(), *restore);
}

TEST(Servers, MemcachedGetsAKeySetBeforeTheDumpEager) {
  memcached_round_trip(false);
}
TEST(Servers, MemcachedGetsAKeySetBeforeTheDumpLazy) {
  memcached_round_trip(true);
}

// ---- redis: 20,000 keys, DBSIZE and GETs right after the restore (a new client connection).
constexpr int kRedisKeys = 20000;

std::unique_ptr<Child> start_redis(int port) {
  auto server = std::make_unique<Child>(std::vector<std::string>{
      "/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
      "--appendonly", "no", "--daemonize", "no", "--unixsocket", "", "--dir", "/tmp"});
  std::string pong;
  bool up = eventually([&] { return (pong = redis(port, "PING")) == "+PONG\r\n"; },
                       [&] { return server->running(); });
  EXPECT_TRUE(up) << pong;
  // 20,000 SETs pipelined on one connection; the replies counted.
  std::string sets;
  for (int i = 0; i < kRedisKeys; i++)
    sets += "SET key:" + std::to_string(i) + " value-" + std::to_string(i * 7) + "\r\n";
  std::string replies = ask(port, sets, [](const std::string& r) {
    return r.size() >= static_cast<size_t>(kRedisKeys) * 5;  // "+OK\r\n" each
  });
  EXPECT_EQ(replies, [] {
    std::string s;
    for (int i = 0; i < kRedisKeys; i++) s += "+OK\r\n";
    return s;
  }());
  return server;
}

void expect_redis_keys(int port, pid_t netns_of = 0) {
  EXPECT_EQ(redis(port, "DBSIZE", netns_of), ":" + std::to_string(kRedisKeys) + "\r\n");
  for (int i : {0, 1, 4999, 12345, kRedisKeys - 1}) {
    std::string v = "value-" + std::to_string(i * 7);
    EXPECT_EQ(redis(port, "GET key:" + std::to_string(i), netns_of),
              "$" + std::to_string(v.size()) + "\r\n" + v + "\r\n");
  }
}

void redis_round_trip(bool lazy) {
  if (!installed("/usr/bin/redis-server")) GTEST_SKIP() << "redis-server is not installed";
  auto server = start_redis(kRedisPort);
  ASSERT_NO_FATAL_FAILURE(expect_redis_keys(kRedisPort));
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_settled(*server, images / "img"));
  auto restore = restore_in_foreground(images / "img", lazy);
  std::string pong;
  EXPECT_TRUE(eventually([&] { return !(pong = redis(kRedisPort, "PING")).empty(); },
                         [&] { return restore->running(); }));
  EXPECT_EQ(pong, "+PONG\r\n");
  expect_redis_keys(kRedisPort);
  EXPECT_EQ(redis(kRedisPort, "SET after yes"), "+OK\r\n");
  EXPECT_EQ(redis(kRedisPort, "DBSIZE"), ":" + std::to_string(kRedisKeys + 1) + "\r\n");
  stop(server->pid(), *restore);
}

TEST(Servers, RedisKeepsItsKeysEager) {
  redis_round_trip(false);
}
TEST(Servers, RedisKeepsItsKeysLazy) {
  redis_round_trip(true);
}

// ---- --netns: a clone of a running redis beside it, on the same port.
TEST(Servers, RedisRestoredWithNetnsAnswersBesideItsOriginal) {
  if (!installed("/usr/bin/redis-server")) GTEST_SKIP() << "redis-server is not installed";
  auto server = start_redis(kNetnsPort);
  TempDir images;
  auto d = lazycr(
      {"dump", "-t", std::to_string(server->pid()), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  ASSERT_EQ(redis(kNetnsPort, "SET only-in-the-original 1"), "+OK\r\n");

  // Without --netns: refused by name at the step that makes the sockets, before any process
  // is created; nothing is left behind.
  auto clash = lazycr({"restore", "-D", images / "img", "--shell-job", "--pidns"}, 60);
  EXPECT_EQ(clash.exit_code, 1);
  EXPECT_NE(clash.err.find("restore: files for image"), std::string::npos) << clash.err;
  EXPECT_NE(clash.err.find("127.0.0.1:" + std::to_string(kNetnsPort) + " is in use"),
            std::string::npos)
      << clash.err;
  for (pid_t c : proc::list_children(getpid()))
    EXPECT_EQ(c, server->pid()) << "child " << c << " left behind by the refused restore";
  EXPECT_EQ(redis(kNetnsPort, "DBSIZE"), ":" + std::to_string(kRedisKeys + 1) + "\r\n");

  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    TempDir work;
    std::vector<std::string> a{lazycr_bin(), "restore", "-D",        images / "img", "--shell-job",
                               "--pidns",    "--netns", "--pidfile", work / "pid"};
    if (lazy) a.push_back("--lazy");
    Child restore(a);
    pid_t pid = read_pidfile(work / "pid");
    ASSERT_GT(pid, 0);
    std::string pong;
    EXPECT_TRUE(eventually([&] { return !(pong = redis(kNetnsPort, "PING", pid)).empty(); },
                           [&] { return restore.running(); }));
    EXPECT_EQ(pong, "+PONG\r\n");
    expect_redis_keys(kNetnsPort, pid);  // the clone: the image's 20,000 keys
    EXPECT_EQ(redis(kNetnsPort, "DBSIZE"), ":" + std::to_string(kRedisKeys + 1) + "\r\n");
    EXPECT_EQ(redis(kNetnsPort, "GET only-in-the-original"), "$1\r\n1\r\n");
    stop(pid, restore);
  }
}

}  // namespace
}  // namespace lazycr::test
