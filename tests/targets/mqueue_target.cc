// POSIX message queues: a named queue and an unlinked one, each with messages of several
// priorities queued. Prints "ready pid=P name=/NAME" and, on SIGUSR1, checks from inside that
// each descriptor is the queue it was (name, attributes, O_NONBLOCK, mode) and holds the same
// messages in the same order; prints "verified ok" or "verify failed: ..." and exits 0 or 1.
#include <fcntl.h>
#include <mqueue.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

std::string failure;
void check(bool ok, const std::string& what) {
  if (!ok && failure.empty()) failure = what;
}

std::string link_of(int fd) {
  char buf[256];
  ssize_t n = readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof buf);
  return n < 0 ? std::string() : std::string(buf, static_cast<size_t>(n));
}

using Messages = std::vector<std::pair<unsigned, std::string>>;

mqd_t make(const std::string& name, int flags, long maxmsg, long msgsize, const Messages& msgs) {
  struct mq_attr a = {};
  a.mq_maxmsg = maxmsg;
  a.mq_msgsize = msgsize;
  mqd_t q = mq_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | flags, 0640, &a);
  if (q < 0) {
    std::perror("mq_open");
    std::exit(2);
  }
  for (const auto& [prio, m] : msgs)
    if (mq_send(q, m.data(), m.size(), prio) != 0) {
      std::perror("mq_send");
      std::exit(2);
    }
  return q;
}

void expect_queue(mqd_t q, const std::string& what, const std::string& link, long maxmsg,
                  long msgsize, bool nonblock, const Messages& order) {
  check(link_of(q) == link, what + ": /proc/self/fd names '" + link_of(q) + "'");
  struct mq_attr a;
  check(mq_getattr(q, &a) == 0, what + ": mq_getattr");
  check(a.mq_maxmsg == maxmsg && a.mq_msgsize == msgsize, what + ": attributes differ");
  check(((a.mq_flags & O_NONBLOCK) != 0) == nonblock, what + ": O_NONBLOCK differs");
  check(a.mq_curmsgs == static_cast<long>(order.size()),
        what + ": " + std::to_string(a.mq_curmsgs) + " messages queued, expected " +
            std::to_string(order.size()));
  struct stat st;
  check(fstat(q, &st) == 0 && (st.st_mode & 07777) == 0640, what + ": mode differs");
  std::vector<char> buf(static_cast<size_t>(msgsize));
  const struct timespec now = {0, 0};
  for (const auto& [prio, m] : order) {
    unsigned got_prio = 0;
    ssize_t n = mq_timedreceive(q, buf.data(), buf.size(), &got_prio, &now);
    check(n >= 0 && std::string(buf.data(), static_cast<size_t>(n)) == m && got_prio == prio,
          what + ": expected message '" + m + "' of priority " + std::to_string(prio));
  }
  unsigned prio;
  check(mq_timedreceive(q, buf.data(), buf.size(), &prio, &now) < 0,
        what + ": more messages than were queued");
}

}  // namespace

int main() {
  signal(SIGUSR1, on_usr1);
  const std::string name = "/lazycr-mq-" + std::to_string(getpid());
  const std::string gone = name + "-unlinked";
  mqd_t named =
      make(name, O_NONBLOCK, 8, 64, {{1, "alpha"}, {5, "beta"}, {1, "gamma"}, {5, "delta"}});
  mqd_t unlinked = make(gone, 0, 4, 16, {{0, "x"}, {3, "yy"}});
  mq_unlink(gone.c_str());
  std::printf("ready pid=%d name=%s\n", getpid(), name.c_str());
  std::fflush(stdout);
  // A flag and nanosleep, not pause(): a SIGUSR1 between the check and pause() is lost.
  while (!g_verify) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, nullptr);
  }
  expect_queue(named, "named queue", name, 8, 64, true,
               {{5, "beta"}, {5, "delta"}, {1, "alpha"}, {1, "gamma"}});
  expect_queue(unlinked, "unlinked queue", gone + " (deleted)", 4, 16, false,
               {{3, "yy"}, {0, "x"}});
  mq_unlink(name.c_str());
  if (!failure.empty()) {
    std::printf("verify failed: %s\n", failure.c_str());
    return 1;
  }
  std::printf("verified ok\n");
  return 0;
}
