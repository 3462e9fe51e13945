// `lazycr dump` of process trees (python3 parents with children, grandchildren and a zombie,
// sharing pipes, socket pairs, a FIFO and memory): the image describes the whole tree at one
// moment, the data buffered between processes is captured and left in place, fork-shared
// pages are stored once, and a failure leaves every process running as it was.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "common/fd.h"
#include "common/proc.h"
#include "common/signals.h"
#include "image-format/image_dir.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

using image::FileDescriptor;
using image::MemoryArea;

// The tree: the parent fills memory and a shared mapping, buffers data in a pipe, both ends of
// a stream socketpair, a datagram socketpair and a FIFO, then forks a child that exits (a
// zombie, status 7), a child that only sleeps (c1, which also opens /dev/null itself) and a
// child with a grandchild (c2, gc). On SIGUSR1 the parent reads every buffered byte and says
// whether each is what it wrote, checks its memory, kills and reaps its children, and exits.
const char kTreeScript[] = R"PY(
import ctypes, mmap, os, signal, socket, struct, sys, time
workdir = sys.argv[1]
extra = sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
def die_with_parent():
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
BIG = 8 << 20
big = bytearray(BIG)
for i in range(0, BIG, 4096):
    big[i:i + 8] = struct.pack('<Q', (i * 2654435761 + 1) % (1 << 64))
big_addr = ctypes.addressof((ctypes.c_char * BIG).from_buffer(big))
SHM = 1 << 20
shm = mmap.mmap(-1, SHM, flags=mmap.MAP_SHARED)
for i in range(0, SHM, 4096):
    shm[i:i + 8] = struct.pack('<Q', i + 12345)
shm_addr = ctypes.addressof(ctypes.c_char.from_buffer(shm))

PIPE_DATA = bytes(range(256)) * 40 + b'tail'
STREAM_A = b'A' * 5000 + b'end-of-a'
STREAM_B = b'from-s2'
DGRAMS = [b'first', b'', b'x' * 3000, b'last']
FIFO_DATA = b'through the fifo'
r, w = os.pipe()
os.write(w, PIPE_DATA)
dup_r = os.dup(r)
s1, s2 = socket.socketpair()
s1.sendall(STREAM_A)
s2.sendall(STREAM_B)
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for d in DGRAMS:
    d1.send(d)
fifo = os.path.join(workdir, 'fifo')
os.mkfifo(fifo)
fr = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
fw = os.open(fifo, os.O_WRONLY)
os.write(fw, FIFO_DATA)
null = os.open('/dev/null', os.O_RDONLY)
unsupported = ''
if 'unsupported' in extra:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(os.path.join(workdir, 'listen'))
    lsock.listen(4)
    # A connection not accepted yet whose client end is closed: not restorable.
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gone.connect(os.path.join(workdir, 'listen'))
    gone.close()
    out_w = os.dup(1)  # the writing end of the test's pipe: its reader is outside the tree
    unsupported = f' listen={lsock.fileno()} out_w={out_w}'

zombie = os.fork()
if zombie == 0:
    os._exit(7)
c1 = os.fork()
if c1 == 0:
    die_with_parent()
    own_null = os.open('/dev/null', os.O_RDONLY)
    while True:
        time.sleep(1000)
rr, ww = os.pipe()
c2 = os.fork()
if c2 == 0:
    die_with_parent()
    gc = os.fork()
    if gc == 0:
        die_with_parent()
        while True:
            time.sleep(1000)
    os.write(ww, str(gc).encode())
    while True:
        time.sleep(1000)
gc = int(os.read(rr, 32))
os.close(rr)
os.close(ww)
while open(f'/proc/{zombie}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z':
    time.sleep(0.01)
print(f'ready pid={os.getpid()} c1={c1} c2={c2} gc={gc} zombie={zombie} r={r} w={w} '
      f'dup_r={dup_r} s1={s1.fileno()} s2={s2.fileno()} d1={d1.fileno()} d2={d2.fileno()} '
      f'fr={fr} fw={fw} null={null} big={big_addr}:{BIG} shm={shm_addr}:{SHM}{unsupported}',
      flush=True)

signal.sigwait({signal.SIGUSR1})
def drain_fd(fd):
    os.set_blocking(fd, False)
    out = b''
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk
def drain_sock(s):
    s.setblocking(False)
    out = []
    while True:
        try:
            out.append(s.recv(65536))
        except BlockingIOError:
            return out
big_ok = all(big[i:i + 8] == struct.pack('<Q', (i * 2654435761 + 1) % (1 << 64))
             for i in range(0, BIG, 4096))
shm_ok = all(shm[i:i + 8] == struct.pack('<Q', i + 12345) for i in range(0, SHM, 4096))
res = {
    'pipe': drain_fd(r) == PIPE_DATA,
    'stream_a': b''.join(drain_sock(s2)) == STREAM_A,
    'stream_b': b''.join(drain_sock(s1)) == STREAM_B,
    'dgram': drain_sock(d2) == DGRAMS,
    'fifo': drain_fd(fr) == FIFO_DATA,
    'big': big_ok,
    'shm': shm_ok,
}
print('result ' + ' '.join(f'{k}={int(v)}' for k, v in res.items()), flush=True)
for c in (c1, c2):
    os.kill(c, signal.SIGKILL)
    os.waitpid(c, 0)
print(f'zombie_status={os.waitpid(zombie, 0)[1]}', flush=True)
)PY";

const char kAllGood[] = "result pipe=1 stream_a=1 stream_b=1 dgram=1 fifo=1 big=1 shm=1";

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), {}};
}

std::string proc_file(pid_t pid, const char* what) {
  return slurp("/proc/" + std::to_string(pid) + "/" + what);
}

// State letter from /proc/PID/stat ('\0' if the process is gone).
char state_of(pid_t pid) {
  auto text = proc::try_read_file("/proc/" + std::to_string(pid) + "/stat");
  if (!text) return '\0';
  return proc::parse_stat(*text).state;
}

// The python3 tree; kills and reaps what is left of it on destruction (its processes come to
// us, the harness being a subreaper, once their parents are gone).
struct PyTree {
  TempDir work;
  Child child;
  TargetInfo info;
  std::vector<pid_t> pids;           // parent, c1, c2, gc (the live ones)
  std::map<pid_t, UniqueFd> pidfds;  // kill through these: never a reused pid

  explicit PyTree(std::vector<std::string> extra = {})
      : child([&] {
          std::vector<std::string> argv{"/usr/bin/python3", "-c", kTreeScript, work.path()};
          argv.insert(argv.end(), extra.begin(), extra.end());
          return argv;
        }()) {
    info = TargetInfo::parse(child.wait_for("ready"));
    pids = {pid("pid"), pid("c1"), pid("c2"), pid("gc")};
    for (pid_t p : pids) pidfds[p] = UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, p, 0)));
  }
  ~PyTree() {
    for (auto& [p, fd] : pidfds)
      if (fd) send_signal_pidfd(fd.get(), SIGKILL);
    for (int i = 0; i < 3000 && child.running(); i++)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    // Whatever was re-parented to us: reap it (bounded, it may belong to someone else).
    for (pid_t p : {pid("c1"), pid("c2"), pid("gc"), pid("zombie")}) {
      for (int i = 0; i < 500; i++) {
        int status;
        pid_t r = waitpid(p, &status, WNOHANG);
        if (r == p || (r < 0 && errno == ECHILD && state_of(p) != 'Z')) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }
  pid_t pid(const std::string& key) const { return static_cast<pid_t>(info.first(key)); }
  int fd(const std::string& key) const { return static_cast<int>(info.first(key)); }

  // Asks the parent to read back everything; returns its result line and the zombie's status.
  std::pair<std::string, std::string> finish() {
    send_signal(pid("pid"), SIGUSR1);
    std::string result = child.wait_for("result");
    std::string zombie = child.wait_for("zombie_status");
    EXPECT_EQ(child.wait(30), 0);
    return {result, zombie};
  }

  // Every live process runs on, untraced, and its memory layout is what it was.
  void expect_running_untraced(const std::map<pid_t, std::string>& maps_before = {}) {
    for (pid_t p : pids) {
      SCOPED_TRACE("pid " + std::to_string(p));
      char st = state_of(p);
      EXPECT_TRUE(st == 'S' || st == 'R') << "state " << st;
      std::string status = proc_file(p, "status");
      EXPECT_NE(status.find("TracerPid:\t0\n"), std::string::npos) << status;
      auto it = maps_before.find(p);
      if (it != maps_before.end()) {
        EXPECT_EQ(proc_file(p, "maps"), it->second);
      }
    }
    EXPECT_EQ(state_of(pid("zombie")), 'Z');
  }
};

std::vector<std::string> dump_args(const PyTree& t, const std::string& dir,
                                   std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"dump", "-t", std::to_string(t.pid("pid")), "-D", dir};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

const FileDescriptor* fd_of(const image::Process& p, int fd) {
  for (const auto& f : p.fds())
    if (f.fd() == fd) return &f;
  return nullptr;
}

const image::Pipe* pipe_of(const image::SharedObjects& s, uint64_t inode) {
  for (const auto& p : s.pipes())
    if (p.inode() == inode) return &p;
  return nullptr;
}

const image::UnixSocket* socket_of(const image::SharedObjects& s, uint64_t inode) {
  for (const auto& u : s.sockets())
    if (u.inode() == inode) return &u;
  return nullptr;
}

std::vector<std::string> queued(const image::UnixSocket& u) {
  return {u.queued().begin(), u.queued().end()};
}

uint64_t stored_data_pages(const image::ImageReader& img) {
  uint64_t n = 0;
  for (const auto& p : img.processes())
    if (!p.zombie()) n += img.pages(p.pid()).index().data_pages();
  return n;
}

TEST(TreeDump, ImageHoldsTheWholeTreeAndTheTreeRunsOnWithItsDataUnread) {
  PyTree t;
  TempDir images;
  std::string dir = images / "img";
  auto r = lazycr(dump_args(t, dir, {"--leave-running"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("and 4 process(es) below it (1 zombie(s))"), std::string::npos) << r.err;
  t.expect_running_untraced();

  image::ImageReader img(dir);
  pid_t parent = t.pid("pid"), c1 = t.pid("c1"), c2 = t.pid("c2"), gc = t.pid("gc"),
        zombie = t.pid("zombie");
  // Preorder: root first, every process after its parent.
  std::vector<int> pids(img.inventory().pids().begin(), img.inventory().pids().end());
  ASSERT_EQ(pids.size(), 5u);
  EXPECT_EQ(pids[0], parent);
  EXPECT_EQ(std::set<int>(pids.begin(), pids.end()), (std::set<int>{parent, c1, c2, gc, zombie}));
  auto pos = [&](int p) { return std::find(pids.begin(), pids.end(), p) - pids.begin(); };
  EXPECT_LT(pos(c2), pos(gc));
  const auto& pp = img.process(parent);
  EXPECT_EQ(std::set<int>(pp.children().begin(), pp.children().end()),
            (std::set<int>{c1, c2, zombie}));
  EXPECT_EQ(std::vector<int>(img.process(c2).children().begin(), img.process(c2).children().end()),
            std::vector<int>{gc});
  EXPECT_EQ(img.process(c1).children_size(), 0);
  EXPECT_EQ(img.process(c1).ppid(), parent);
  EXPECT_EQ(img.process(gc).ppid(), c2);
  for (int p : {c1, c2, gc}) {
    EXPECT_EQ(img.process(p).pgid(), pp.pgid());
    EXPECT_EQ(img.process(p).sid(), pp.sid());
    EXPECT_EQ(img.process(p).threads_size(), 1);
    EXPECT_FALSE(img.process(p).zombie());
  }
  const auto& z = img.process(zombie);
  EXPECT_TRUE(z.zombie());
  EXPECT_EQ(z.exit_status(), 7 << 8);
  EXPECT_EQ(z.ppid(), parent);
  EXPECT_EQ(z.comm(), "python3");
  EXPECT_EQ(z.threads_size(), 0);
  EXPECT_EQ(z.areas_size(), 0);
  EXPECT_EQ(z.fds_size(), 0);

  // Open file descriptions: inherited and dup'd descriptors share one id, separately opened
  // files do not.
  const auto* r_parent = fd_of(pp, t.fd("r"));
  const auto* r_dup = fd_of(pp, t.fd("dup_r"));
  const auto* r_child = fd_of(img.process(c1), t.fd("r"));
  const auto* w_parent = fd_of(pp, t.fd("w"));
  ASSERT_TRUE(r_parent && r_dup && r_child && w_parent);
  EXPECT_NE(r_parent->file_id(), 0u);
  EXPECT_EQ(r_parent->file_id(), r_dup->file_id());
  EXPECT_EQ(r_parent->file_id(), r_child->file_id());
  EXPECT_NE(r_parent->file_id(), w_parent->file_id());
  EXPECT_EQ(r_parent->object_inode(), w_parent->object_inode());
  std::vector<const FileDescriptor*> nulls;
  for (const auto& f : img.process(c1).fds())
    if (f.target() == "/dev/null" && f.fd() > 2) nulls.push_back(&f);
  ASSERT_EQ(nulls.size(), 2u) << "inherited and its own";
  const auto* null_parent = fd_of(pp, t.fd("null"));
  ASSERT_NE(null_parent, nullptr);
  int same = 0;
  for (const auto* n : nulls) same += n->file_id() == null_parent->file_id();
  EXPECT_EQ(same, 1) << "the inherited one shares the parent's description, the other does not";
  for (const auto& p : img.processes())
    for (const auto& f : p.fds()) {
      EXPECT_NE(f.file_id(), 0u);
      if (f.fd() > 2) {
        EXPECT_TRUE(f.restorable()) << p.pid() << " fd " << f.fd() << " " << f.target();
      }
    }

  // Buffered data, byte-exact.
  const auto& shared = img.shared();
  const auto* pipe = pipe_of(shared, r_parent->object_inode());
  ASSERT_NE(pipe, nullptr);
  std::string pipe_data;
  for (int i = 0; i < 40; i++)
    for (int b = 0; b < 256; b++) pipe_data.push_back(static_cast<char>(b));
  pipe_data += "tail";
  EXPECT_EQ(pipe->data(), pipe_data);
  EXPECT_EQ(pipe->capacity(), 65536u);
  EXPECT_FALSE(pipe->fifo());
  const auto* fifo_fd = fd_of(pp, t.fd("fr"));
  ASSERT_NE(fifo_fd, nullptr);
  EXPECT_EQ(fifo_fd->kind(), FileDescriptor::FIFO);
  struct stat fst;
  ASSERT_EQ(stat((t.work / "fifo").c_str(), &fst), 0);
  EXPECT_EQ(fifo_fd->object_inode(), fst.st_ino);
  const auto* fifo = pipe_of(shared, fst.st_ino);
  ASSERT_NE(fifo, nullptr);
  EXPECT_TRUE(fifo->fifo());
  EXPECT_EQ(fifo->data(), "through the fifo");

  const auto* s1 = fd_of(pp, t.fd("s1"));
  const auto* s2 = fd_of(pp, t.fd("s2"));
  const auto* d1 = fd_of(pp, t.fd("d1"));
  const auto* d2 = fd_of(pp, t.fd("d2"));
  ASSERT_TRUE(s1 && s2 && d1 && d2);
  const auto* u1 = socket_of(shared, s1->object_inode());
  const auto* u2 = socket_of(shared, s2->object_inode());
  const auto* g1 = socket_of(shared, d1->object_inode());
  const auto* g2 = socket_of(shared, d2->object_inode());
  ASSERT_TRUE(u1 && u2 && g1 && g2);
  EXPECT_EQ(u1->peer_inode(), u2->inode());
  EXPECT_EQ(u2->peer_inode(), u1->inode());
  EXPECT_EQ(u1->type(), SOCK_STREAM);
  EXPECT_EQ(queued(*u2), std::vector<std::string>{std::string(5000, 'A') + "end-of-a"});
  EXPECT_EQ(queued(*u1), std::vector<std::string>{"from-s2"});
  EXPECT_EQ(g1->type(), SOCK_DGRAM);
  EXPECT_EQ(g2->peer_inode(), g1->inode());
  EXPECT_EQ(queued(*g2), (std::vector<std::string>{"first", "", std::string(3000, 'x'), "last"}));
  EXPECT_TRUE(queued(*g1).empty());

  // `show` decodes the tree.
  auto show = lazycr({"show", "--verify", dir});
  EXPECT_EQ(show.exit_code, 0) << show.err;

  // The tree reads everything back: nothing was consumed by the dump.
  auto [result, zstatus] = t.finish();
  EXPECT_EQ(result, kAllGood);
  EXPECT_EQ(zstatus, "zombie_status=" + std::to_string(7 << 8));
}

TEST(TreeDump, ForkSharedPagesAreStoredOnceAndReferred) {
  PyTree t;
  TempDir images;
  auto r = lazycr(dump_args(t, images / "dedup", {"--leave-running"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto n = lazycr(dump_args(t, images / "full", {"--leave-running", "--no-dedup"}));
  ASSERT_EQ(n.exit_code, 0) << n.err;
  EXPECT_NE(n.err.find(" 0 deduped"), std::string::npos) << n.err;
  t.expect_running_untraced();

  image::ImageReader dedup(images / "dedup"), full(images / "full");
  pid_t parent = t.pid("pid"), c1 = t.pid("c1"), gc = t.pid("gc");
  // The buffer's first whole page (malloc puts a header before it).
  uint64_t big = (t.info.first("big") + 4095) & ~4095ull,
           big_pages = t.info.second("big") / 4096 - 1;
  uint64_t shm = t.info.first("shm"), shm_pages = t.info.second("shm") / 4096;
  // The child never wrote its inherited buffer: every page refers to the parent's, at the same
  // address; the grandchild's (inherited twice) too.
  for (pid_t p : {c1, gc}) {
    SCOPED_TRACE("pid " + std::to_string(p));
    const auto& store = dedup.pages(p);
    for (uint64_t i = 0; i < big_pages; i += 97) {
      auto loc = store.find(big + i * 4096);
      ASSERT_TRUE(loc.has_value());
      EXPECT_EQ(loc->kind, image::PageRun::REF);
      EXPECT_EQ(loc->ref_pid, parent);
      EXPECT_EQ(loc->ref_addr, big + i * 4096);
    }
    // The shared mapping's content is stored once, by the parent.
    auto loc = store.find(shm);
    ASSERT_TRUE(loc.has_value());
    EXPECT_EQ(loc->kind, image::PageRun::REF);
    EXPECT_EQ(loc->ref_pid, parent);
    EXPECT_EQ(loc->ref_addr, shm);
    // Read through the reference: the same bytes as the parent's, and as the full image's.
    std::vector<char> a(big_pages * 4096), b(big_pages * 4096);
    store.read(big, big_pages, a.data());
    full.pages(p).read(big, big_pages, b.data());
    EXPECT_TRUE(a == b);
    std::vector<char> sa(shm_pages * 4096), sb(shm_pages * 4096);
    store.read(shm, shm_pages, sa.data());
    full.pages(p).read(shm, shm_pages, sb.data());
    EXPECT_TRUE(sa == sb);
    EXPECT_EQ(full.pages(p).ref_pages(), 0u);
  }
  EXPECT_EQ(dedup.pages(parent).ref_pages(), 0u) << "the root refers to nobody";
  uint64_t stored = stored_data_pages(dedup), stored_full = stored_data_pages(full);
  // 3 processes below the root each hold the 2048-page buffer and the 256-page mapping.
  EXPECT_LT(stored + 3 * (big_pages + shm_pages), stored_full + 64)
      << stored << " pages with dedup, " << stored_full << " without";
  EXPECT_LT(
      boost::filesystem::file_size(images / "dedup" + "/pages-" + std::to_string(c1) + ".lzp"),
      boost::filesystem::file_size(images / "full" + "/pages-" + std::to_string(c1) + ".lzp"));
  EXPECT_NE(r.err.find(" deduped"), std::string::npos) << r.err;

  // Neither dump unshared anything in the live tree: the buffer is still one physical page.
  auto pfn = [&](pid_t p, uint64_t addr) {
    UniqueFd fd(open(("/proc/" + std::to_string(p) + "/pagemap").c_str(), O_RDONLY));
    uint64_t e = 0;
    EXPECT_EQ(pread(fd.get(), &e, 8, static_cast<off_t>(addr / 4096 * 8)), 8);
    return e & ((1ull << 55) - 1);
  };
  EXPECT_EQ(pfn(parent, big + 4096), pfn(c1, big + 4096));
  auto [result, zstatus] = t.finish();
  EXPECT_EQ(result, kAllGood);
}

TEST(TreeDump, WithoutLeaveRunningTheWholeTreeIsKilled) {
  PyTree t;
  TempDir images;
  auto r = lazycr(dump_args(t, images / "img"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("killed"), std::string::npos) << r.err;
  EXPECT_EQ(t.child.wait(30), 128 + SIGKILL);
  // Every process is dead (gone, or a zombie until its new parent reaps it): none is left
  // stopped or traced.
  for (pid_t p : t.pids) {
    char st = state_of(p);
    EXPECT_TRUE(st == '\0' || st == 'Z' || st == 'X') << "pid " << p << " state " << st;
  }
  image::ImageReader img(images / "img");
  EXPECT_EQ(img.inventory().pids_size(), 5);
  EXPECT_FALSE(img.inventory().options().leave_running());
}

TEST(TreeDump, FailureAtEachStepLeavesEveryProcessRunningAsItWas) {
  for (const char* step : {"freeze", "threads", "files", "memory", "commit"}) {
    SCOPED_TRACE(step);
    PyTree t;
    std::map<pid_t, std::string> maps;
    for (pid_t p : t.pids) maps[p] = proc_file(p, "maps");
    TempDir images;
    auto r = lazycr(dump_args(t, images / "img", {"--fault-inject", step}));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find(std::string("injected fault at step ") + step), std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_TRUE(boost::filesystem::is_empty(images.path())) << "no image, no staging directory";
    t.expect_running_untraced(maps);
    auto [result, zstatus] = t.finish();
    EXPECT_EQ(result, kAllGood) << "buffered data still there, memory intact";
  }
}

// Ctrl-C (or SIGTERM) while a call is injected in one of the processes, or while memory is
// read: every process of the tree runs on as it was, with its buffered data, and no image.
TEST(TreeDump, InterruptLeavesEveryProcessRunningAsItWas) {
  for (const char* fault : {"injected:SIGINT", "threads:SIGHUP", "memory:SIGTERM"}) {
    SCOPED_TRACE(fault);
    PyTree t;
    std::map<pid_t, std::string> maps;
    for (pid_t p : t.pids) maps[p] = proc_file(p, "maps");
    TempDir images;
    auto r = lazycr(dump_args(t, images / "img", {"--fault-inject", fault}));
    std::string sig = std::string(fault).substr(std::string(fault).find(':') + 1);
    EXPECT_EQ(r.exit_code, 128 + (sig == "SIGINT" ? SIGINT : sig == "SIGHUP" ? SIGHUP : SIGTERM));
    EXPECT_EQ(r.err, "lazycr: dump interrupted by " + sig + "; pid " +
                         std::to_string(t.pid("pid")) +
                         " and the 3 process(es) below it left running as they were\n");
    EXPECT_TRUE(boost::filesystem::is_empty(images.path())) << "no image, no staging directory";
    t.expect_running_untraced(maps);
    auto [result, zstatus] = t.finish();
    EXPECT_EQ(result, kAllGood) << "buffered data still there, memory intact";
  }
}

TEST(TreeDump, TheRootKilledDuringTheDumpIsACleanError) {
  PyTree t;
  TempDir images;
  // kill-target kills the root while memory is read; its children die with it (PDEATHSIG).
  auto r = lazycr(dump_args(t, images / "img", {"--fault-inject", "kill-target"}));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("exited or was killed during the dump"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
  EXPECT_EQ(t.child.wait(30), 128 + SIGKILL);
}

TEST(TreeDump, DescriptorsLeadingOutsideAreNamedUnlessSkipped) {
  PyTree t({"unsupported"});
  TempDir images;
  auto r = lazycr(dump_args(t, images / "img"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--skip-unsupported-fds"), std::string::npos) << r.err;
  // Every one of them, in one line.
  std::string root = "pid " + std::to_string(t.pid("pid")) + " (python3): ";
  EXPECT_NE(r.err.find(root + "fd " + std::to_string(t.fd("listen")) + " is a SOCKET"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("has a connection not accepted yet whose client end is outside the tree"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("fd " + std::to_string(t.fd("out_w")) + " is a PIPE"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("only the writing end of pipe:["), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
  t.expect_running_untraced();

  r = lazycr(dump_args(t, images / "img", {"--leave-running", "--skip-unsupported-fds"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  image::ImageReader img(images / "img");
  const auto& pp = img.process(t.pid("pid"));
  const auto* l = fd_of(pp, t.fd("listen"));
  const auto* o = fd_of(pp, t.fd("out_w"));
  ASSERT_TRUE(l && o);
  EXPECT_FALSE(l->restorable());
  EXPECT_FALSE(o->restorable());
  EXPECT_EQ(socket_of(img.shared(), l->object_inode()), nullptr);
  EXPECT_EQ(pipe_of(img.shared(), o->object_inode()), nullptr);
  EXPECT_TRUE(fd_of(pp, t.fd("s1"))->restorable()) << "the socketpair still is";
  // The restore refuses them by name, the root's pid said once, and names the flag (out_w, a
  // dup of fd 1, is lazycr's fd 1 with --shell-job).
  r = lazycr({"restore", "--pidns", "--shell-job", "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  std::string pid = std::to_string(t.pid("pid"));
  EXPECT_NE(r.err.find("lazycr: restore: validate for pid " + pid + ": fd " +
                       std::to_string(t.fd("listen")) + " is a SOCKET"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("; pid " + std::to_string(t.pid("c1")) + ": fd "), std::string::npos)
      << "inherited by the children: " << r.err;
  EXPECT_EQ(r.err.find("pid " + pid + ": pid " + pid), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--skip-unsupported-fds opens /dev/null in their places"), std::string::npos)
      << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  auto [result, zstatus] = t.finish();
  EXPECT_EQ(result, kAllGood);
}

// A tree that keeps changing while it is seized: children forked, exiting and reaped in a
// loop, threads started and ending. Every dump must succeed, with the children it met either
// live or as zombies (exit status 3), and leave the tree running.
TEST(TreeDump, ATreeThatKeepsForkingIsDumpedCleanly) {
  Child py({"/usr/bin/python3", "-c",
            "import os, threading, time\n"
            "def spin():\n"
            "    while True:\n"
            "        t = threading.Thread(target=time.sleep, args=(0.001,))\n"
            "        t.start(); t.join()\n"
            "threading.Thread(target=spin, daemon=True).start()\n"
            "print('ready', flush=True)\n"
            "n = 0\n"
            "while True:\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        os._exit(3)\n"
            "    os.waitpid(pid, 0)\n"
            "    n += 1\n"});
  ASSERT_EQ(py.wait_for("ready"), "ready");
  TempDir images;
  int zombies = 0;
  for (int i = 0; i < 8; i++) {
    std::string dir = images / ("img" + std::to_string(i));
    auto r = lazycr({"dump", "--leave-running", "-t", std::to_string(py.pid()), "-D", dir});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    image::ImageReader img(dir);
    EXPECT_EQ(img.inventory().pids(0), py.pid());
    EXPECT_GE(img.process(py.pid()).threads_size(), 1);
    for (const auto& p : img.processes()) {
      if (p.pid() == py.pid()) continue;
      EXPECT_EQ(p.ppid(), py.pid());
      if (p.zombie()) {
        zombies++;
        EXPECT_EQ(p.exit_status(), 3 << 8);
      }
    }
    std::string status = proc_file(py.pid(), "status");
    EXPECT_NE(status.find("TracerPid:\t0\n"), std::string::npos) << status;
  }
  std::cerr << zombies << " zombie(s) met in 8 dumps\n";
  EXPECT_TRUE(py.running());
}

// lazycr in the tree it is asked to dump (here: started by the root) would freeze itself.
TEST(TreeDump, RefusesATreeThatContainsLazycr) {
  Child py({"/usr/bin/python3", "-c",
            "import os, subprocess, sys\n"
            "r = subprocess.run([sys.argv[1], 'dump', '-t', str(os.getpid()), '-D', sys.argv[2]],"
            " capture_output=True, text=True)\n"
            "print('exit', r.returncode, r.stderr.strip().replace('\\n', '|'), flush=True)\n"
            "print('tracer', [l for l in open('/proc/self/status') if l.startswith('TracerPid')]"
            "[0].split()[1], flush=True)\n",
            lazycr_bin(), "/tmp/lazycr-tree-self-test-never-written"});
  std::string line = py.wait_for("exit");
  EXPECT_EQ(line.rfind("exit 1 ", 0), 0u) << line;
  EXPECT_NE(line.find("lazycr itself"), std::string::npos) << line;
  EXPECT_EQ(py.wait_for("tracer"), "tracer 0");
  EXPECT_EQ(py.wait(30), 0);
  EXPECT_FALSE(boost::filesystem::exists("/tmp/lazycr-tree-self-test-never-written"));
}

// A child traced by someone else cannot be seized: refused, and the tree is left alone.
TEST(TreeDump, RefusesAChildTracedBySomeoneElse) {
  PyTree t;
  pid_t c1 = t.pid("c1");
  ASSERT_EQ(ptrace(PTRACE_SEIZE, c1, nullptr, nullptr), 0);
  TempDir images;
  auto r = lazycr(dump_args(t, images / "img"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("already traced by pid " + std::to_string(getpid())), std::string::npos)
      << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
  ASSERT_EQ(ptrace(PTRACE_INTERRUPT, c1, nullptr, nullptr), 0);
  int status = 0;
  ASSERT_EQ(waitpid(c1, &status, __WALL), c1);
  ASSERT_EQ(ptrace(PTRACE_DETACH, c1, nullptr, nullptr), 0);
  t.expect_running_untraced();
  auto [result, zstatus] = t.finish();
  EXPECT_EQ(result, kAllGood);
}

}  // namespace
}  // namespace lazycr::test
