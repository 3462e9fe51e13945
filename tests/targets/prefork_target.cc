// A pre-fork server: the parent fills --mib MiB (default 256) with a pattern, opens a file and
// maps a shared anonymous area, then forks --workers workers (default 4). Each worker
// - dirties its own part of the inherited memory (part i of 2W equal parts; the parent rewrites
//   part W after the forks, which the workers must still see as it was at fork time),
// - writes its slot of the shared area (one object: the parent reads what workers wrote),
// - moves the position of the inherited file by 10 (one open file description),
// - has a pipe each way, a stream socketpair and a datagram socketpair with the parent, and
//   both sides leave data queued in all of them, unread until the verify request.
// Then the parent prints
//   ready pid=P workers=W0,W1,.. mib=M parts=2W pgid=G sid=S
// and every task waits for the file named by --verify-file. On it each task
// - reads the queued data: exactly what was queued, in order, datagram boundaries included,
//   then the end marker its peer sends now (pipes: EOF, as the writer closes; datagrams: "END";
//   stream: one 'R'),
// - checks its pid, ppid (workers: the parent's pid), pgid and sid against those it had,
// - compares every byte of its memory with what it must hold and the shared area's contents,
// - then, parent and worker in turn: each sees the other's move of the shared file position,
//   and each sees what the other writes to the shared area now,
// prints one line "VERIFY <parent|workerN> pid=P ok" (or "... FAILED: <first wrong thing>"),
// and exits 0 or 1; the parent reaps its workers first and fails if one failed.
// Options: --mib N, --workers N, --verify-file F, --workdir D (the shared file goes there),
// --setsid (the parent becomes a session leader first), --selftest (the parent asks itself to
// verify at once: no checkpoint), --flip ROLE (ROLE flips one byte of its memory before
// verifying: its verdict must catch it), --max-wait S (give up waiting after S seconds).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tests/targets/tree_util.h"

namespace {

using tree::Verdict;

constexpr size_t kPipeBytes = 20000;    // under the 64 KiB pipe capacity: the writer never blocks
constexpr size_t kStreamBytes = 30000;  // far under the socket buffer
constexpr size_t kDgramSizes[] = {1, 100, 4000, 17, 9000};  // net.unix.max_dgram_qlen is 10 here
constexpr size_t kShmDataPages = 16;
constexpr size_t kShmSlotPages = 1 + kShmDataPages;  // a mailbox page, then data
constexpr uint64_t kParentAfterFork = 100;           // seed of the part the parent rewrites
constexpr off_t kFirstPos = 100;
constexpr int kDeadlineS = 120;

enum Kind { kPipe = 0, kStream = 1, kDgram = 2 };
enum Dir { kToWorker = 0, kToParent = 1 };

uint64_t channel_seed(int worker, Kind kind, Dir dir) {
  return 0x5000 + worker * 16 + kind * 2 + dir;
}

struct Worker {
  pid_t pid = 0;
  int p2w[2] = {-1, -1};     // pipe: worker reads [0], parent writes [1]
  int w2p[2] = {-1, -1};     // pipe: parent reads [0], worker writes [1]
  int stream[2] = {-1, -1};  // socketpair: [0] the parent's end, [1] the worker's
  int dgram[2] = {-1, -1};
};

// Messages on the stream socket after the queued data (the fd / shared-area handshake).
struct Msg {
  uint64_t tag, value;
};

struct Tree {
  size_t mib = 256;
  int workers = 4;
  tree::CommonOptions opt;
  unsigned char* buf = nullptr;
  size_t pages = 0, part_pages = 0;
  unsigned char* shm = nullptr;
  int shared_fd = -1;
  std::vector<Worker> w;
  pid_t root = 0;
};

Tree g;

uint64_t* mailbox(int slot) {
  return reinterpret_cast<uint64_t*>(g.shm + slot * kShmSlotPages * tree::kPage);
}
unsigned char* shm_data(int slot, size_t page) {
  return g.shm + (slot * kShmSlotPages + 1 + page) * tree::kPage;
}
uint64_t shm_seed(int slot) {
  return 1000 + slot;
}

// Which pattern page p of the big buffer holds in `task` (-1: the parent, else a worker).
uint64_t expected_seed(int task, size_t p) {
  size_t part = p / g.part_pages;
  if (part >= static_cast<size_t>(2 * g.workers)) return 0;  // the tail after the last part
  if (task < 0) return part == static_cast<size_t>(g.workers) ? kParentAfterFork : 0;
  return part == static_cast<size_t>(task) ? 1 + task : 0;
}

void fill_part(size_t part, uint64_t seed) {
  for (size_t p = part * g.part_pages; p < (part + 1) * g.part_pages; p++)
    tree::fill_page(g.buf + p * tree::kPage, seed, p);
}

void check_memory(int task, Verdict& v) {
  for (size_t p = 0; p < g.pages && v.ok(); p++) {
    uint64_t seed = expected_seed(task, p);
    long off = tree::page_mismatch(g.buf + p * tree::kPage, seed, p);
    if (off >= 0)
      v.fail("memory page %zu (part %zu) byte %ld is 0x%02x, not pattern %llu's", p,
             p / g.part_pages, off, g.buf[p * tree::kPage + off],
             static_cast<unsigned long long>(seed));
  }
  for (int s = 0; s <= g.workers && v.ok(); s++)
    for (size_t p = 0; p < kShmDataPages && v.ok(); p++) {
      long off = tree::page_mismatch(shm_data(s, p), shm_seed(s), p);
      if (off >= 0) v.fail("shared area slot %d page %zu byte %ld", s, p, off);
    }
}

// Flips one byte of an inherited page nobody wrote since the fork (the verdict must see it).
void maybe_flip(const std::string& role) {
  if (g.opt.flip != role) return;
  g.buf[(g.pages - 1) * tree::kPage + 1234] ^= 0x01;
}

// Queues what `worker`'s side `dir` sends: a pipe in three writes, the stream in three, and
// the datagrams.
bool queue_out(int pipe_w, int stream, int dgram, int worker, Dir dir) {
  std::vector<unsigned char> data(kStreamBytes);
  tree::fill_bytes(data.data(), kPipeBytes, channel_seed(worker, kPipe, dir), 0);
  size_t at = 0;
  for (size_t n : {7000, 5000, 8000}) {
    if (!tree::write_all(pipe_w, data.data() + at, n)) return false;
    at += n;
  }
  tree::fill_bytes(data.data(), kStreamBytes, channel_seed(worker, kStream, dir), 0);
  for (at = 0; at < kStreamBytes; at += 10000)
    if (!tree::write_all(stream, data.data() + at, 10000)) return false;
  uint64_t off = 0;
  for (size_t n : kDgramSizes) {
    tree::fill_bytes(data.data(), n, channel_seed(worker, kDgram, dir), off);
    if (send(dgram, data.data(), n, 0) != static_cast<ssize_t>(n)) return false;
    off += n;
  }
  return true;
}

// The end markers `worker`'s side sends on the verify request: the reader of each channel then
// knows that nothing more than the queued data was there.
void send_end(int& pipe_w, int stream, int dgram, Verdict& v) {
  close(pipe_w);
  pipe_w = -1;
  if (send(dgram, "END", 3, 0) != 3) v.fail("send END datagram: %s", std::strerror(errno));
  if (!tree::write_all(stream, "R", 1)) v.fail("write R on stream: %s", std::strerror(errno));
}

const char* dir_name(Dir d) {
  return d == kToWorker ? "from the parent" : "from the worker";
}

// Reads what the other side queued before the dump plus its end marker; checks every byte.
void check_in(int pipe_r, int stream, int dgram, int worker, Dir dir, uint64_t deadline,
              Verdict& v) {
  std::vector<unsigned char> got(kStreamBytes + 16), want(kStreamBytes + 16);
  auto first_diff = [&](size_t n) {
    for (size_t i = 0; i < n; i++)
      if (got[i] != want[i]) return static_cast<long>(i);
    return -1L;
  };
  // Pipe: the queued bytes, then EOF (the writer closed its end).
  ssize_t n = tree::read_exact(pipe_r, got.data(), kPipeBytes + 1, deadline);
  tree::fill_bytes(want.data(), kPipeBytes, channel_seed(worker, kPipe, dir), 0);
  if (n < 0)
    v.fail("worker %d pipe %s: read: %s", worker, dir_name(dir), std::strerror(errno));
  else if (static_cast<size_t>(n) != kPipeBytes)
    v.fail("worker %d pipe %s: %zd bytes before EOF, %zu queued", worker, dir_name(dir), n,
           kPipeBytes);
  else if (long d = first_diff(kPipeBytes); d >= 0)
    v.fail("worker %d pipe %s: byte %ld is 0x%02x, expected 0x%02x", worker, dir_name(dir), d,
           got[d], want[d]);
  // Datagrams: each with its size and bytes, in order, then "END".
  uint64_t off = 0;
  int i = 0;
  for (size_t size : kDgramSizes) {
    ssize_t r = tree::recv_one(dgram, got.data(), got.size(), deadline);
    tree::fill_bytes(want.data(), size, channel_seed(worker, kDgram, dir), off);
    if (r < 0)
      v.fail("worker %d datagram %d %s: recv: %s", worker, i, dir_name(dir), std::strerror(errno));
    else if (static_cast<size_t>(r) != size)
      v.fail("worker %d datagram %d %s: %zd bytes, expected %zu", worker, i, dir_name(dir), r,
             size);
    else if (long d = first_diff(size); d >= 0)
      v.fail("worker %d datagram %d %s: byte %ld wrong", worker, i, dir_name(dir), d);
    off += size;
    i++;
  }
  ssize_t r = tree::recv_one(dgram, got.data(), got.size(), deadline);
  if (r != 3 || std::memcmp(got.data(), "END", 3) != 0)
    v.fail("worker %d datagrams %s: %zd-byte datagram after the queued ones, not END", worker,
           dir_name(dir), r);
  // Stream: the queued bytes, then 'R'.
  n = tree::read_exact(stream, got.data(), kStreamBytes + 1, deadline);
  tree::fill_bytes(want.data(), kStreamBytes, channel_seed(worker, kStream, dir), 0);
  want[kStreamBytes] = 'R';
  if (n < 0)
    v.fail("worker %d stream %s: read: %s", worker, dir_name(dir), std::strerror(errno));
  else if (static_cast<size_t>(n) != kStreamBytes + 1)
    v.fail("worker %d stream %s: %zd bytes then EOF, expected %zu and R", worker, dir_name(dir), n,
           kStreamBytes);
  else if (long d = first_diff(kStreamBytes + 1); d >= 0)
    v.fail("worker %d stream %s: byte %ld is 0x%02x, expected 0x%02x%s", worker, dir_name(dir), d,
           got[d], want[d], d == static_cast<long>(kStreamBytes) ? " (the R after the data)" : "");
}

bool send_msg(int fd, uint64_t tag, uint64_t value) {
  Msg m{tag, value};
  return tree::write_all(fd, &m, sizeof m);
}
bool recv_msg(int fd, uint64_t tag, uint64_t* value, uint64_t deadline) {
  Msg m{};
  if (tree::read_exact(fd, &m, sizeof m, deadline) != sizeof m || m.tag != tag) return false;
  *value = m.value;
  return true;
}

uint64_t token_from_parent(int i) {
  return tree::splitmix(0xfeed0000 + i);
}
uint64_t token_from_worker(int i) {
  return tree::splitmix(0xbeef0000 + i);
}

struct Ids {
  pid_t pid, ppid, pgid, sid;
  static Ids now() { return {getpid(), getppid(), getpgrp(), getsid(0)}; }
};

void check_ids(const Ids& before, bool check_ppid, Verdict& v) {
  Ids now = Ids::now();
  if (now.pid != before.pid) v.fail("pid %d, was %d", now.pid, before.pid);
  if (check_ppid && now.ppid != before.ppid) v.fail("ppid %d, was %d", now.ppid, before.ppid);
  if (now.pgid != before.pgid) v.fail("pgid %d, was %d", now.pgid, before.pgid);
  if (now.sid != before.sid) v.fail("sid %d, was %d", now.sid, before.sid);
}

[[noreturn]] void worker_main(int i) {
  Worker& me = g.w[i];
  tree::die_with_parent(g.root);
  Ids ids = Ids::now();
  // Only this worker's ends stay open: a copy of the parent's write end would hold the pipe
  // open past the parent's close.
  for (int j = 0; j < i; j++) {
    close(g.w[j].p2w[1]);
    close(g.w[j].w2p[0]);
    close(g.w[j].stream[0]);
    close(g.w[j].dgram[0]);
  }
  close(me.p2w[1]);
  close(me.w2p[0]);
  close(me.stream[0]);
  close(me.dgram[0]);
  int pipe_r = me.p2w[0], pipe_w = me.w2p[1], stream = me.stream[1], dgram = me.dgram[1];

  fill_part(i, 1 + i);
  for (size_t p = 0; p < kShmDataPages; p++) tree::fill_page(shm_data(i, p), shm_seed(i), p);
  lseek(g.shared_fd, 10, SEEK_CUR);
  if (!queue_out(pipe_w, stream, dgram, i, kToParent)) {
    std::perror("worker: queue");
    _exit(3);
  }
  __atomic_store_n(&mailbox(i)[0], 1, __ATOMIC_RELEASE);

  if (!tree::wait_for_file(g.opt.verify_file, g.opt.max_wait_s)) _exit(3);
  std::string role = "worker" + std::to_string(i);
  Verdict v;
  uint64_t deadline = tree::now_ms() + kDeadlineS * 1000;
  send_end(pipe_w, stream, dgram, v);
  maybe_flip(role);
  check_in(pipe_r, stream, dgram, i, kToWorker, deadline, v);
  check_ids(ids, true, v);
  if (ids.ppid != g.root) v.fail("ppid was %d at start, not the parent %d", ids.ppid, g.root);
  check_memory(i, v);
  // The handshake: the parent's move of the file position and its word in the shared area are
  // seen here; ours are seen there.
  uint64_t pos = 0, done = 0;
  if (!recv_msg(stream, 'P', &pos, deadline)) {
    v.fail("no position message from the parent");
  } else {
    off_t here = lseek(g.shared_fd, 0, SEEK_CUR);
    if (here != static_cast<off_t>(pos))
      v.fail("shared file at %lld, the parent moved it to %llu (not one open file description)",
             static_cast<long long>(here), static_cast<unsigned long long>(pos));
    uint64_t word = __atomic_load_n(&mailbox(i)[1], __ATOMIC_ACQUIRE);
    if (word != token_from_parent(i))
      v.fail("shared area: the parent's word is %llx, not %llx (not one object)",
             static_cast<unsigned long long>(word),
             static_cast<unsigned long long>(token_from_parent(i)));
    __atomic_store_n(&mailbox(i)[2], token_from_worker(i), __ATOMIC_RELEASE);
    off_t moved = lseek(g.shared_fd, 1 + i, SEEK_CUR);
    if (!send_msg(stream, 'W', static_cast<uint64_t>(moved)))
      v.fail("send position: %s", std::strerror(errno));
    else if (!recv_msg(stream, 'D', &done, deadline))
      v.fail("no done message from the parent");
  }
  tree::report(role, v);
  _exit(v.ok() ? 0 : 1);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (g.opt.parse(argc, argv, i)) continue;
    if ((a == "--mib" || a == "--workers") && i + 1 < argc) {
      long n = std::atol(argv[++i]);
      if (a == "--mib")
        g.mib = static_cast<size_t>(n);
      else
        g.workers = static_cast<int>(n);
      continue;
    }
    std::fprintf(stderr, "unknown option %s\n", a.c_str());
    return 2;
  }
  if (g.workers < 1 || g.workers > 64 || g.mib < 1) {
    std::fprintf(stderr, "--workers 1..64 and --mib >= 1\n");
    return 2;
  }
  if (g.opt.setsid) tree::become_session_leader();
  g.root = getpid();
  if (g.opt.verify_file.empty()) {
    if (!g.opt.selftest) {
      std::fprintf(stderr, "--verify-file F or --selftest\n");
      return 2;
    }
    g.opt.verify_file = g.opt.workdir + "/prefork_target." + std::to_string(g.root) + ".verify";
  }
  Ids ids = Ids::now();

  g.pages = g.mib * 256;
  g.part_pages = g.pages / (2 * g.workers);
  if (g.part_pages == 0) {
    std::fprintf(stderr, "--mib too small for %d workers\n", g.workers);
    return 2;
  }
  g.buf = static_cast<unsigned char*>(mmap(nullptr, g.pages * tree::kPage, PROT_READ | PROT_WRITE,
                                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  g.shm =
      static_cast<unsigned char*>(mmap(nullptr, (g.workers + 1) * kShmSlotPages * tree::kPage,
                                       PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (g.buf == MAP_FAILED || g.shm == MAP_FAILED) {
    std::perror("mmap");
    return 3;
  }
  for (size_t p = 0; p < g.pages; p++) tree::fill_page(g.buf + p * tree::kPage, 0, p);

  std::string shared_path = g.opt.workdir + "/prefork_target." + std::to_string(g.root) + ".shared";
  g.shared_fd = open(shared_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  std::string content(8192, 's');
  if (g.shared_fd < 0 || !tree::write_all(g.shared_fd, content.data(), content.size()) ||
      lseek(g.shared_fd, kFirstPos, SEEK_SET) != kFirstPos) {
    std::perror(shared_path.c_str());
    return 3;
  }

  g.w.resize(g.workers);
  for (int i = 0; i < g.workers; i++) {
    Worker& w = g.w[i];
    if (pipe(w.p2w) != 0 || pipe(w.w2p) != 0 ||
        socketpair(AF_UNIX, SOCK_STREAM, 0, w.stream) != 0 ||
        socketpair(AF_UNIX, SOCK_DGRAM, 0, w.dgram) != 0) {
      std::perror("pipe/socketpair");
      return 3;
    }
    w.pid = fork();
    if (w.pid < 0) {
      std::perror("fork");
      return 3;
    }
    if (w.pid == 0) worker_main(i);
    close(w.p2w[0]);
    close(w.w2p[1]);
    close(w.stream[1]);
    close(w.dgram[1]);
    // One worker at a time: the file position moves are then in a known order.
    uint64_t deadline = tree::now_ms() + 60000;
    while (__atomic_load_n(&mailbox(i)[0], __ATOMIC_ACQUIRE) != 1) {
      if (tree::now_ms() > deadline) {
        std::fprintf(stderr, "worker %d did not set up within 60 s\n", i);
        return 3;
      }
      tree::sleep_ms(1);
    }
    if (!queue_out(w.p2w[1], w.stream[0], w.dgram[0], i, kToWorker)) {
      std::perror("parent: queue");
      return 3;
    }
  }
  fill_part(g.workers, kParentAfterFork);
  for (size_t p = 0; p < kShmDataPages; p++)
    tree::fill_page(shm_data(g.workers, p), shm_seed(g.workers), p);
  // Before any checkpoint: the workers' moves and writes are already visible here.
  off_t expect_pos = kFirstPos + 10 * g.workers;
  Verdict setup;
  if (lseek(g.shared_fd, 0, SEEK_CUR) != expect_pos)
    setup.fail("shared file at %lld after the workers' moves, expected %lld",
               static_cast<long long>(lseek(g.shared_fd, 0, SEEK_CUR)),
               static_cast<long long>(expect_pos));
  for (int s = 0; s < g.workers; s++)
    for (size_t p = 0; p < kShmDataPages; p++)
      if (tree::page_mismatch(shm_data(s, p), shm_seed(s), p) >= 0)
        setup.fail("shared area slot %d page %zu not as the worker wrote it", s, p);
  if (!setup.ok()) {
    tree::say("setup FAILED: %s", setup.why.c_str());
    return 1;
  }

  std::string list;
  for (const auto& w : g.w) list += (list.empty() ? "" : ",") + std::to_string(w.pid);
  tree::say("ready pid=%d workers=%s mib=%zu parts=%d pgid=%d sid=%d", g.root, list.c_str(), g.mib,
            2 * g.workers, ids.pgid, ids.sid);
  if (g.opt.selftest) close(open(g.opt.verify_file.c_str(), O_WRONLY | O_CREAT, 0644));

  if (!tree::wait_for_file(g.opt.verify_file, g.opt.max_wait_s)) return 3;
  Verdict v;
  uint64_t deadline = tree::now_ms() + kDeadlineS * 1000;
  for (auto& w : g.w) send_end(w.p2w[1], w.stream[0], w.dgram[0], v);
  maybe_flip("parent");
  for (int i = 0; i < g.workers; i++)
    check_in(g.w[i].w2p[0], g.w[i].stream[0], g.w[i].dgram[0], i, kToParent, deadline, v);
  check_ids(ids, false, v);
  check_memory(-1, v);
  for (int i = 0; i < g.workers; i++) {
    int s = g.w[i].stream[0];
    off_t pos = lseek(g.shared_fd, 7, SEEK_CUR);
    if (pos != expect_pos + 7)
      v.fail("shared file at %lld before worker %d's turn, expected %lld",
             static_cast<long long>(pos - 7), i, static_cast<long long>(expect_pos));
    __atomic_store_n(&mailbox(i)[1], token_from_parent(i), __ATOMIC_RELEASE);
    uint64_t moved = 0;
    if (!send_msg(s, 'P', static_cast<uint64_t>(pos)) || !recv_msg(s, 'W', &moved, deadline)) {
      v.fail("worker %d: no answer to the position message", i);
      continue;
    }
    off_t here = lseek(g.shared_fd, 0, SEEK_CUR);
    if (moved != static_cast<uint64_t>(pos + 1 + i) || here != static_cast<off_t>(moved))
      v.fail("worker %d moved the shared file to %llu (expected %lld); here it is at %lld", i,
             static_cast<unsigned long long>(moved), static_cast<long long>(pos + 1 + i),
             static_cast<long long>(here));
    uint64_t word = __atomic_load_n(&mailbox(i)[2], __ATOMIC_ACQUIRE);
    if (word != token_from_worker(i))
      v.fail("shared area: worker %d's word is %llx, not %llx (not one object)", i,
             static_cast<unsigned long long>(word),
             static_cast<unsigned long long>(token_from_worker(i)));
    expect_pos = here;
    send_msg(s, 'D', 0);
  }
  for (int i = 0; i < g.workers; i++) {
    int status = 0;
    if (waitpid(g.w[i].pid, &status, 0) != g.w[i].pid)
      v.fail("waitpid(worker %d, pid %d): %s", i, g.w[i].pid, std::strerror(errno));
    else if (tree::decode(status) != 0)
      v.fail("worker %d exited with %d", i, tree::decode(status));
  }
  tree::report("parent", v);
  // The shared file stays: another restore of the same image opens it again.
  if (g.opt.selftest) unlink(g.opt.verify_file.c_str());
  return v.ok() ? 0 : 1;
}
