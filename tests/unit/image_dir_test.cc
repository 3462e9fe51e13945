// Image directory: round trip, and refusal of every kind of damage with a clear error.
#include "image-format/image_dir.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>

#include "common/error.h"
#include "image-format/ghost.h"

namespace lazycr::image {
namespace {

namespace fs = boost::filesystem;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/lazycr-unit-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    boost::system::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << data;
}

constexpr uint64_t kArea = 0x7f0000000000;

Inventory sample_inventory(int pid) {
  Inventory inv;
  inv.set_format_version(kFormatVersion);
  inv.set_tool_version("test");
  inv.set_page_size(kPageSize);
  inv.set_root_pid(pid);
  inv.add_pids(pid);
  inv.mutable_cpu()->set_xsave_size(832);
  return inv;
}

Process sample_process(int pid) {
  Process p;
  p.set_pid(pid);
  p.set_ppid(1);
  p.set_comm("sample");
  auto* t = p.add_threads();
  t->set_tid(pid);
  t->set_xsave(std::string(832, '\x11'));
  t->mutable_regs()->set_rip(0x401000);
  auto* a = p.add_areas();
  a->set_start(kArea);
  a->set_end(kArea + 16 * kPageSize);
  a->set_prot(3);
  a->set_kind(MemoryArea::ANON);
  a->set_stored_pages(8);
  auto* s = p.add_sigactions();
  s->set_signo(SIGUSR1);
  s->set_handler(0x401234);
  auto* f = p.add_fds();
  f->set_fd(0);
  f->set_kind(FileDescriptor::CHARDEV);
  f->set_target("/dev/null");
  f->set_file_id(1);
  return p;
}

// A pipe with 5 bytes in it and a connected pair of stream sockets, one with queued bytes.
SharedObjects sample_shared() {
  SharedObjects s;
  auto* pipe = s.add_pipes();
  pipe->set_inode(1000);
  pipe->set_capacity(65536);
  pipe->set_data("hello");
  for (uint64_t inode : {2000, 2001}) {
    auto* u = s.add_sockets();
    u->set_inode(inode);
    u->set_peer_inode(inode == 2000 ? 2001 : 2000);
    u->set_type(SOCK_STREAM);
  }
  s.mutable_sockets(1)->add_queued("queued bytes");
  return s;
}

// Writes a complete small image: 4 data pages then 4 zero pages at kArea.
std::string write_sample(const std::string& root, int pid = 4242) {
  std::string dir = root + "/img";
  ImageWriter w(dir, false);
  {
    PageStoreWriter pages(w.pages_path(pid), PageStoreOptions{});
    std::vector<unsigned char> data(8 * kPageSize, 0);
    for (int i = 0; i < 4 * 4096; i++) data[i] = static_cast<unsigned char>(i * 7 + 1);
    pages.add_pages(kArea, data.data(), 8);
    pages.finish();
  }
  w.write_process(sample_process(pid));
  w.write_inventory(sample_inventory(pid));
  w.write_shared(sample_shared());
  w.commit();
  return dir;
}

std::string error_of(const std::string& dir) {
  try {
    ImageReader r(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ImageDir, RoundTrip) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  EXPECT_FALSE(fs::exists(dir + ".tmp-" + std::to_string(getpid())));
  ImageReader r(dir);
  ASSERT_EQ(r.processes().size(), 1u);
  const auto& p = r.process(4242);
  EXPECT_EQ(p.comm(), "sample");
  EXPECT_EQ(p.threads(0).xsave().size(), 832u);
  EXPECT_EQ(p.sigactions(0).handler(), 0x401234u);
  std::vector<unsigned char> page(kPageSize);
  r.pages(4242).read(kArea + kPageSize, 1, page.data());
  EXPECT_EQ(page[0], static_cast<unsigned char>(4096 * 7 + 1));
  EXPECT_THROW(r.process(1), Error);
}

TEST(ImageDir, WriterWithoutCommitLeavesNothing) {
  TempDir tmp;
  {
    ImageWriter w(tmp.path + "/img", false);
    w.write_process(sample_process(7));
  }
  EXPECT_TRUE(fs::is_empty(tmp.path));
}

TEST(ImageDir, TrailingSlashIsTheSameDirectory) {
  TempDir tmp;
  {
    ImageWriter w(tmp.path + "/img//", false);
    w.write_process(sample_process(7));
    w.write_inventory(sample_inventory(7));
    w.commit();
  }
  EXPECT_TRUE(fs::exists(tmp.path + "/img/inventory.pb"));
  EXPECT_THROW(ImageWriter("/", true), Error);
}

TEST(ImageDir, WriterRefusesANonEmptyDirectory) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  EXPECT_THROW(ImageWriter(dir, false), Error);
  EXPECT_NO_THROW(ImageWriter(dir, true));
}

TEST(ImageDir, TruncationAtEveryByteIsRefused) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  for (const char* name : {"/inventory.pb", "/process-4242.pb", "/shared.pb"}) {
    std::string path = dir + name;
    std::string good = slurp(path);
    for (size_t len = 0; len < good.size(); len++) {
      spit(path, good.substr(0, len));
      std::string err = error_of(dir);
      EXPECT_NE(err, "") << name << " truncated to " << len;
      EXPECT_NE(err.find(path), std::string::npos) << err;
    }
    spit(path, good);
  }
  EXPECT_EQ(error_of(dir), "");
}

TEST(ImageDir, BitFlipsAreRefused) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  int undetected = 0, total = 0;
  for (const char* name : {"/inventory.pb", "/process-4242.pb", "/shared.pb"}) {
    std::string path = dir + name;
    std::string good = slurp(path);
    total += static_cast<int>(good.size()) * 2;
    for (size_t i = 0; i < good.size(); i++) {
      for (int bit : {0, 5}) {
        std::string bad = good;
        bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
        spit(path, bad);
        if (error_of(dir) != "") continue;
        // A flip inside compressed data can decode to the very same bytes (the checksum is
        // over the content, which is then right): allowed only if nothing changed.
        ImageReader r(dir);
        EXPECT_EQ(r.process(4242).SerializeAsString(), sample_process(4242).SerializeAsString())
            << name << " byte " << i << " bit " << bit;
        EXPECT_EQ(r.inventory().SerializeAsString(), sample_inventory(4242).SerializeAsString());
        EXPECT_EQ(r.shared().SerializeAsString(), sample_shared().SerializeAsString());
        undetected++;
      }
    }
    spit(path, good);
  }
  EXPECT_LT(undetected * 100, total) << undetected << " of " << total << " flips went unnoticed";
}

TEST(ImageDir, MissingFilesAreNamed) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  fs::remove(dir + "/pages-4242.lzp");
  EXPECT_NE(error_of(dir).find("pages-4242.lzp"), std::string::npos);
  fs::remove(dir + "/process-4242.pb");
  EXPECT_NE(error_of(dir).find("process-4242.pb"), std::string::npos);
  fs::remove(dir + "/inventory.pb");
  EXPECT_NE(error_of(dir).find("inventory.pb"), std::string::npos);
  EXPECT_NE(error_of(tmp.path + "/nothing-here").find("not an image directory"), std::string::npos);
}

// An epoll descriptor at fd 3 of p, made there, watching fd 0 (EPOLLIN).
Epoll* add_epoll(Process& p) {
  auto* f = p.add_fds();
  f->set_fd(3);
  f->set_kind(FileDescriptor::EPOLL);
  f->set_target("anon_inode:[eventpoll]");
  f->set_file_id(2);
  f->set_restorable(true);
  Epoll* e = f->mutable_epoll();
  e->set_made_in_pid(p.pid());
  e->set_made_at_fd(3);
  auto* t = e->add_targets();
  t->set_fd(0);
  t->set_events(EPOLLIN);
  t->set_data(7);
  return e;
}

// Well-formed files with hostile contents: each is refused with a reason.
struct Hostile {
  const char* what;
  const char* expect;
  void (*mutate)(Inventory&, Process&);
};

const Hostile kHostile[] = {
    {"future version", "format 99, this lazycr reads 4",
     [](Inventory& i, Process&) { i.set_format_version(99); }},
    {"format 1 inventory", "format 1, this lazycr reads 4",
     [](Inventory& i, Process&) { i.set_format_version(1); }},
    {"no file_id", "no file_id", [](Inventory&, Process& p) { p.mutable_fds(0)->set_file_id(0); }},
    {"object inode on a device", "object inode",
     [](Inventory&, Process& p) { p.mutable_fds(0)->set_object_inode(5); }},
    {"restorable pipe without object", "without an object inode",
     [](Inventory&, Process& p) {
       auto* f = p.add_fds();
       f->set_fd(3);
       f->set_kind(FileDescriptor::PIPE);
       f->set_file_id(2);
       f->set_restorable(true);
     }},
    {"pipe not in shared.pb", "not in shared.pb",
     [](Inventory&, Process& p) {
       auto* f = p.add_fds();
       f->set_fd(3);
       f->set_kind(FileDescriptor::PIPE);
       f->set_file_id(2);
       f->set_object_inode(1001);
       f->set_restorable(true);
     }},
    {"FIFO fd on a pipe", "shared.pb has a pipe",
     [](Inventory&, Process& p) {
       auto* f = p.add_fds();
       f->set_fd(3);
       f->set_kind(FileDescriptor::FIFO);
       f->set_file_id(2);
       f->set_object_inode(1000);
       f->set_restorable(true);
     }},
    {"socket fd on a pipe inode", "not in shared.pb",
     [](Inventory&, Process& p) {
       auto* f = p.add_fds();
       f->set_fd(3);
       f->set_kind(FileDescriptor::SOCKET);
       f->set_file_id(2);
       f->set_object_inode(1000);
       f->set_restorable(true);
     }},
    {"one file_id, two files", "different file",
     [](Inventory&, Process& p) {
       auto* f = p.add_fds();
       f->set_fd(3);
       f->set_kind(FileDescriptor::CHARDEV);
       f->set_target("/dev/zero");
       f->set_file_id(1);
     }},
    {"one file_id, two kinds", "different file",
     [](Inventory&, Process& p) {
       auto* f = p.add_fds();
       *f = p.fds(0);
       f->set_fd(3);
       f->set_kind(FileDescriptor::REGULAR);
     }},
    {"zombie with threads", "a zombie with", [](Inventory&, Process& p) { p.set_zombie(true); }},
    {"child outside the image", "not a process of the image",
     [](Inventory&, Process& p) { p.add_children(5); }},
    {"page size", "page size", [](Inventory& i, Process&) { i.set_page_size(65536); }},
    {"no pids", "no processes", [](Inventory& i, Process&) { i.clear_pids(); }},
    {"negative pid", "invalid pid", [](Inventory& i, Process&) { i.add_pids(-1); }},
    {"duplicate pid", "twice", [](Inventory& i, Process&) { i.add_pids(4242); }},
    {"huge xsave", "xsave",
     [](Inventory& i, Process&) { i.mutable_cpu()->set_xsave_size(1u << 30); }},
    {"wrong pid in file", "holds process",
     [](Inventory&, Process& p) {
       p.set_pid(4243);
       p.mutable_threads(0)->set_tid(4243);
     }},
    {"no threads", "no threads", [](Inventory&, Process& p) { p.clear_threads(); }},
    {"leader not first", "not the leader",
     [](Inventory&, Process& p) { p.mutable_threads(0)->set_tid(9); }},
    {"duplicate tid", "twice", [](Inventory&, Process& p) { *p.add_threads() = p.threads(0); }},
    {"xsave size mismatch", "xsave",
     [](Inventory&, Process& p) { p.mutable_threads(0)->set_xsave("x"); }},
    {"inverted area", "inverted",
     [](Inventory&, Process& p) { p.mutable_areas(0)->set_end(kArea); }},
    {"unaligned area", "aligned",
     [](Inventory&, Process& p) { p.mutable_areas(0)->set_start(kArea + 1); }},
    {"kernel address", "user space",
     [](Inventory&, Process& p) {
       p.mutable_areas(0)->set_start(0xffff800000000000ull);
       p.mutable_areas(0)->set_end(0xffff800000010000ull);
     }},
    {"unknown area kind", "unknown kind",
     [](Inventory&, Process& p) {
       p.mutable_areas(0)->set_kind(static_cast<MemoryArea::Kind>(77));
     }},
    {"overlap", "overlaps",
     [](Inventory&, Process& p) {
       auto* b = p.add_areas();
       *b = p.areas(0);
       b->set_stored_pages(0);
     }},
    {"stored pages miscount", "stored pages",
     [](Inventory&, Process& p) { p.mutable_areas(0)->set_stored_pages(7); }},
    {"more stored than fit", "more stored",
     [](Inventory&, Process& p) { p.mutable_areas(0)->set_stored_pages(1000); }},
    {"pages outside areas", "outside every memory area",
     [](Inventory&, Process& p) {
       p.mutable_areas(0)->set_start(kArea + 4 * kPageSize);
       p.mutable_areas(0)->set_stored_pages(4);
     }},
    {"bad signal", "invalid signal",
     [](Inventory&, Process& p) { p.mutable_sigactions(0)->set_signo(SIGKILL); }},
    {"bad rlimit", "rlimit", [](Inventory&, Process& p) { p.add_rlimits()->set_resource(1000); }},
    {"odd auxv", "auxv", [](Inventory&, Process& p) { p.set_auxv("12345"); }},
    {"fd order", "out of order", [](Inventory&, Process& p) { p.add_fds()->set_fd(0); }},
    {"bad pending", "pending",
     [](Inventory&, Process& p) { p.add_shared_pending()->set_signo(10); }},
    {"epoll without its list", "without its interest list",
     [](Inventory&, Process& p) {
       add_epoll(p)->Clear();
       p.mutable_fds(1)->clear_epoll();
     }},
    {"epoll state on a device", "with epoll state",
     [](Inventory&, Process& p) { p.mutable_fds(0)->mutable_epoll()->set_made_in_pid(1); }},
    {"epoll target not held", "which the process does not hold",
     [](Inventory&, Process& p) { add_epoll(p)->mutable_targets(0)->set_fd(7); }},
    {"epoll watching itself", "which the process does not hold",
     [](Inventory&, Process& p) { add_epoll(p)->mutable_targets(0)->set_fd(3); }},
    {"epoll target twice", "registration of fd 0 twice",
     [](Inventory&, Process& p) {
       Epoll* e = add_epoll(p);
       *e->add_targets() = e->targets(0);
     }},
    {"epoll unknown events", "unknown event bits 0x4000",
     [](Inventory&, Process& p) { add_epoll(p)->mutable_targets(0)->set_events(0x4001); }},
    {"epoll registrations beyond the bound", "epoll registrations exceeds the bound",
     [](Inventory&, Process& p) {
       Epoll* e = add_epoll(p);
       // Records big enough for the parse's memory bound (bounded_parse.h) to let them in.
       e->mutable_targets(0)->set_events(EPOLLIN | EPOLLET);
       e->mutable_targets(0)->set_data(~0ull);
       for (int i = 0; i < kMaxEpollTargets; i++) *e->add_targets() = e->targets(0);
     }},
    {"epoll bad maker", "epoll made in pid",
     [](Inventory&, Process& p) { add_epoll(p)->set_made_in_pid(0); }},
    {"epoll made elsewhere with targets", "with registrations of its own",
     [](Inventory&, Process& p) { add_epoll(p)->set_made_at_fd(4); }},
    {"epoll made by a later descriptor", "its first descriptor in the image is fd 3",
     [](Inventory&, Process& p) {
       Epoll* e = add_epoll(p);
       e->clear_targets();
       e->set_made_at_fd(4);
       auto* g = p.add_fds();
       *g = p.fds(1);
       g->set_fd(4);
     }},
};

TEST(ImageDir, HostileContentsAreRefused) {
  for (const auto& h : kHostile) {
    TempDir tmp;
    std::string dir = write_sample(tmp.path);
    Inventory inv = sample_inventory(4242);
    Process proc = sample_process(4242);
    h.mutate(inv, proc);
    write_message_file(inventory_path(dir), kInventoryMagic, inv);
    write_message_file(process_path(dir, 4242), kProcessMagic, proc);
    std::string err = error_of(dir);
    EXPECT_NE(err.find(h.expect), std::string::npos) << h.what << ": got '" << err << "'";
  }
}

TEST(ImageDir, SharedRoundTripAndAbsence) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  {
    ImageReader r(dir);
    EXPECT_EQ(r.shared().SerializeAsString(), sample_shared().SerializeAsString());
  }
  fs::remove(shared_path(dir));
  ImageReader r(dir);
  EXPECT_EQ(0, r.shared().pipes_size());
  EXPECT_EQ(0, r.shared().sockets_size());
}

TEST(ImageDir, FormatOneHeaderIsRefusedByName) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  for (const char* name : {"/inventory.pb", "/process-4242.pb", "/shared.pb"}) {
    std::string path = dir + name;
    std::string good = slurp(path);
    std::string old = good;
    old[8] = 1;
    spit(path, old);
    std::string err = error_of(dir);
    EXPECT_NE(err.find(path + ": format 1, this lazycr reads 4"), std::string::npos) << err;
    spit(path, good);
  }
  EXPECT_EQ(error_of(dir), "");
}

// shared.pb contents the reader refuses; write_shared refuses them too.
// A well-formed ghost file (a deleted regular file of 10 bytes), appended with the next id.
GhostFile* add_ghost(SharedObjects& s) {
  GhostFile* g = s.add_ghosts();
  g->set_id(static_cast<uint64_t>(s.ghosts_size()));
  g->set_kind(GhostFile::REGULAR);
  g->set_path("/tmp/held");
  g->set_mode(S_IFREG | 0640);
  g->set_size(10);
  g->set_data("0123456789");
  return g;
}

TEST(ImageDir, HostileSharedObjectsAreRefused) {
  struct Case {
    const char* what;
    const char* expect;
    std::function<void(SharedObjects&)> mutate;
  };
  const Case cases[] = {
      {"pipe inode 0", "inode 0", [](SharedObjects& s) { s.mutable_pipes(0)->set_inode(0); }},
      {"SysV id negative", "negative id",
       [](SharedObjects& s) {
         auto* m = s.add_sysv_shm();
         m->set_id(-1);
         m->set_size(4096);
       }},
      {"SysV ids twice", "sorted",
       [](SharedObjects& s) {
         for (int i = 0; i < 2; i++) {
           auto* m = s.add_sysv_shm();
           m->set_id(7);
           m->set_size(4096);
         }
       }},
      {"SysV size 0", "size 0", [](SharedObjects& s) { s.add_sysv_shm()->set_id(3); }},
      {"SysV size 2 TiB", "is not in",
       [](SharedObjects& s) { s.add_sysv_shm()->set_size(2ull << 40); }},
      {"SysV mode bits", "has bits beyond",
       [](SharedObjects& s) {
         auto* m = s.add_sysv_shm();
         m->set_size(4096);
         m->set_mode(04640);
       }},
      {"pipes twice", "sorted", [](SharedObjects& s) { *s.add_pipes() = s.pipes(0); }},
      {"pipes unsorted", "sorted",
       [](SharedObjects& s) {
         *s.add_pipes() = s.pipes(0);
         s.mutable_pipes(1)->set_inode(999);
       }},
      {"capacity 0", "capacity", [](SharedObjects& s) { s.mutable_pipes(0)->set_capacity(0); }},
      {"capacity not a power of two", "capacity",
       [](SharedObjects& s) { s.mutable_pipes(0)->set_capacity(65536 + 4096); }},
      {"capacity 128 MiB", "capacity",
       [](SharedObjects& s) { s.mutable_pipes(0)->set_capacity(128u << 20); }},
      {"capacity max", "capacity",
       [](SharedObjects& s) { s.mutable_pipes(0)->set_capacity(UINT32_MAX); }},
      {"data over capacity", "more than its capacity",
       [](SharedObjects& s) {
         s.mutable_pipes(0)->set_capacity(4096);
         s.mutable_pipes(0)->set_data(std::string(4097, 'x'));
       }},
      {"socket inode 0", "inode 0",
       [](SharedObjects& s) {
         s.mutable_sockets(0)->set_inode(0);
         s.mutable_sockets(1)->set_peer_inode(0);
       }},
      {"sockets twice", "sorted", [](SharedObjects& s) { *s.add_sockets() = s.sockets(1); }},
      {"socket type", "SOCK_STREAM",
       [](SharedObjects& s) {
         s.mutable_sockets(0)->set_type(3);  // SOCK_RAW
         s.mutable_sockets(1)->set_type(3);
       }},
      {"stream with two elements", "at most 1",
       [](SharedObjects& s) { s.mutable_sockets(1)->add_queued("more"); }},
      // Empty datagrams: refused by the parse bound (3 bytes each on the wire, ~60 parsed).
      {"too many datagrams", "bound",
       [](SharedObjects& s) {
         for (auto* u : {s.mutable_sockets(0), s.mutable_sockets(1)}) {
           u->set_type(SOCK_DGRAM);
           u->clear_queued();
         }
         for (int i = 0; i <= kMaxSocketQueued; ++i) s.mutable_sockets(0)->add_queued("");
       }},
      {"too many bytes", "exceeds the bound",
       [](SharedObjects& s) {
         for (auto* u : {s.mutable_sockets(0), s.mutable_sockets(1)}) u->set_type(SOCK_SEQPACKET);
         for (int i = 0; i < 2; ++i)
           s.mutable_sockets(0)->add_queued(std::string(kMaxSocketQueuedBytes / 2 + 1, 'q'));
       }},
      {"buffer size", "INT_MAX",
       [](SharedObjects& s) { s.mutable_sockets(0)->set_sndbuf(1u << 31); }},
      {"own peer", "its own peer",
       [](SharedObjects& s) { s.mutable_sockets(0)->set_peer_inode(2000); }},
      {"peer missing", "not in shared.pb",
       [](SharedObjects& s) { s.mutable_sockets(0)->set_peer_inode(3000); }},
      {"one-way peer", "not this one",
       [](SharedObjects& s) { s.mutable_sockets(1)->set_peer_inode(0); }},
      {"peer of another type", "its peer's",
       [](SharedObjects& s) {
         s.mutable_sockets(0)->set_type(SOCK_DGRAM);
         s.mutable_sockets(0)->clear_queued();
       }},
      // Ghost files (image-format/ghost.h).
      {"ghost id 0", "numbered", [](SharedObjects& s) { add_ghost(s)->set_id(0); }},
      {"ghost id twice", "numbered",
       [](SharedObjects& s) {
         add_ghost(s);
         add_ghost(s)->set_id(1);
       }},
      {"ghost kind", "unknown",
       [](SharedObjects& s) { add_ghost(s)->set_kind(GhostFile_Kind(7)); }},
      {"ghost relative path", "absolute",
       [](SharedObjects& s) { add_ghost(s)->set_path("etc/passwd"); }},
      {"ghost path NUL", "NUL",
       [](SharedObjects& s) { add_ghost(s)->set_path(std::string("/tmp/a\0b", 8)); }},
      {"ghost data past size", "bytes of data",
       [](SharedObjects& s) { add_ghost(s)->set_data(std::string(20, 'x')); }},
      {"ghost size", "exceeds the bound",
       [](SharedObjects& s) { add_ghost(s)->set_size(kMaxGhostBytes + 1); }},
      {"ghost mode", "mode", [](SharedObjects& s) { add_ghost(s)->set_mode(S_IFDIR | 0755); }},
      {"memfd name", "memfd name",
       [](SharedObjects& s) {
         GhostFile* g = add_ghost(s);
         g->set_kind(GhostFile::MEMFD);
         g->set_name(std::string(kMaxMemfdName + 1, 'n'));
       }},
      {"seals on a file", "seals", [](SharedObjects& s) { add_ghost(s)->set_seals(1); }},
      {"unknown seals", "unknown seals",
       [](SharedObjects& s) {
         GhostFile* g = add_ghost(s);
         g->set_kind(GhostFile::MEMFD);
         g->set_seals(0x40);
       }},
      {"directory with data", "directory with data",
       [](SharedObjects& s) {
         GhostFile* g = add_ghost(s);
         g->set_kind(GhostFile::DIRECTORY);
         g->set_mode(S_IFDIR | 0755);
       }},
      {"pipe with no end", "neither a reader nor a writer",
       [](SharedObjects& s) {
         s.mutable_pipes(0)->set_no_readers(true);
         s.mutable_pipes(0)->set_no_writers(true);
       }},
      {"data nobody can read", "no reader but",
       [](SharedObjects& s) {
         s.mutable_pipes(0)->set_no_readers(true);
         s.mutable_pipes(0)->set_data("x");
       }},
      {"pty termios size", "termios of 3 bytes",
       [](SharedObjects& s) { s.add_ptys()->set_termios("abc"); }},
      {"ptys twice", "sorted",
       [](SharedObjects& s) {
         s.add_ptys()->set_termios(std::string(kPtyTermiosSize, '\0'));
         *s.add_ptys() = s.ptys(0);
       }},
      {"pty window size", "window size",
       [](SharedObjects& s) {
         auto* t = s.add_ptys();
         t->set_termios(std::string(kPtyTermiosSize, '\0'));
         t->set_rows(70000);
       }},
      {"pty unread bytes", "unread bytes",
       [](SharedObjects& s) {
         auto* t = s.add_ptys();
         t->set_termios(std::string(kPtyTermiosSize, '\0'));
         t->set_to_slave(std::string(kMaxPtyQueuedBytes + 1, 'x'));
       }},
  };
  for (const auto& c : cases) {
    TempDir tmp;
    std::string dir = write_sample(tmp.path);
    SharedObjects s = sample_shared();
    c.mutate(s);
    write_message_file(shared_path(dir), kSharedMagic, s);
    std::string err = error_of(dir);
    EXPECT_NE(err.find(shared_path(dir) + ": "), std::string::npos) << c.what << ": " << err;
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.what << ": got '" << err << "'";
    ImageWriter w(tmp.path + "/other", false);
    EXPECT_THROW(w.write_shared(s), Error) << c.what;
  }
}

TEST(ImageDir, WrongMagicIsNamed) {
  TempDir tmp;
  std::string dir = write_sample(tmp.path);
  // A process file where the inventory should be.
  fs::copy_file(process_path(dir, 4242), inventory_path(dir), fs::copy_options::overwrite_existing);
  EXPECT_NE(error_of(dir).find("bad magic"), std::string::npos);
}

// --- process trees ----------------------------------------------------------------------

// A tree image: root 100 (4 data pages then 4 zero pages at kArea, as write_sample) and its
// child 101, whose area holds 2 pages of its own and 6 REF pages to 100's pages 2..7.
struct Tree {
  Inventory inv;
  std::map<int, Process> procs;
  // Per pid: fills the page store (zombies get none).
  std::map<int, std::function<void(PageStoreWriter&)>> pages;
  // Written as is (not through write_shared, which would refuse hostile contents).
  SharedObjects shared;
  bool write_shared = false;

  Tree() {
    inv = sample_inventory(100);
    inv.add_pids(101);
    procs[100] = sample_process(100);
    procs[101] = sample_process(101);
    procs[101].set_ppid(100);
    procs[100].add_children(101);
    pages[100] = [](PageStoreWriter& w) {
      std::vector<unsigned char> data(8 * kPageSize, 0);
      for (int i = 0; i < 4 * 4096; i++) data[i] = static_cast<unsigned char>(i * 7 + 1);
      w.add_pages(kArea, data.data(), 8);
    };
    pages[101] = [](PageStoreWriter& w) {
      std::vector<unsigned char> own(2 * kPageSize, 0x55);
      w.add_pages(kArea, own.data(), 2);
      w.add_ref_pages(kArea + 2 * kPageSize, 6, 100, kArea + 2 * kPageSize);
    };
  }

  std::string write(const std::string& root) const {
    std::string dir = root + "/tree";
    ImageWriter w(dir, true);
    for (const auto& [pid, fill] : pages) {
      PageStoreWriter store(w.pages_path(pid), PageStoreOptions{});
      fill(store);
      store.finish();
    }
    for (const auto& [pid, p] : procs) w.write_process(p);
    w.write_inventory(inv);
    if (write_shared) write_message_file(shared_path(w.staging_dir()), kSharedMagic, shared);
    w.commit();
    return dir;
  }
};

TEST(ImageDirTree, RefPagesReadThroughTheParent) {
  TempDir tmp;
  ImageReader r(Tree().write(tmp.path));
  const PageStoreReader& child = r.pages(101);
  EXPECT_TRUE(child.refs_linked());
  EXPECT_EQ(6u, child.ref_pages());
  std::vector<unsigned char> got(8 * kPageSize), want(8 * kPageSize);
  child.read(kArea, 8, got.data());
  r.pages(100).read(kArea, 8, want.data());
  std::memset(want.data(), 0x55, 2 * kPageSize);
  EXPECT_TRUE(got == want);
  // The shared store outlives the reader.
  std::shared_ptr<const PageStoreReader> kept = r.shared_pages(101);
  EXPECT_EQ(&child, kept.get());
}

TEST(ImageDirTree, BadRefsAreRefused) {
  struct Case {
    const char* what;
    const char* expect;
    std::function<void(Tree&)> mutate;
  };
  const Case cases[] = {
      {"ref to a pid outside the image", "not in the image",
       [](Tree& t) {
         t.pages[101] = [](PageStoreWriter& w) {
           std::vector<unsigned char> own(2 * kPageSize, 0x55);
           w.add_pages(kArea, own.data(), 2);
           w.add_ref_pages(kArea + 2 * kPageSize, 6, 77, kArea + 2 * kPageSize);
         };
       }},
      {"ref to a later process", "not listed before",
       [](Tree& t) {
         t.pages[100] = [](PageStoreWriter& w) {
           w.add_ref_pages(kArea, 8, 101, kArea);  // the parent refers to its child
         };
         t.pages[101] = [](PageStoreWriter& w) {
           std::vector<unsigned char> data(8 * kPageSize, 3);
           w.add_pages(kArea, data.data(), 8);
         };
       }},
      {"ref to itself", "not listed before",
       [](Tree& t) {
         t.pages[101] = [](PageStoreWriter& w) {
           std::vector<unsigned char> own(2 * kPageSize, 0x55);
           w.add_pages(kArea, own.data(), 2);
           w.add_ref_pages(kArea + 2 * kPageSize, 6, 101, kArea);
         };
       }},
      {"ref beyond the parent's pages", "does not hold",
       [](Tree& t) {
         t.pages[101] = [](PageStoreWriter& w) {
           std::vector<unsigned char> own(2 * kPageSize, 0x55);
           w.add_pages(kArea, own.data(), 2);
           w.add_ref_pages(kArea + 2 * kPageSize, 6, 100, kArea + 3 * kPageSize);
         };
       }},
      {"ref to a zombie", "zombie",
       [](Tree& t) {
         Process& z = t.procs[100];
         z.set_zombie(true);
         z.clear_threads();
         z.clear_areas();
         z.clear_fds();
         t.pages.erase(100);
       }},
  };
  for (const auto& c : cases) {
    TempDir tmp;
    Tree t;
    c.mutate(t);
    std::string err = error_of(t.write(tmp.path));
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.what << ": got '" << err << "'";
  }
}

TEST(ImageDirTree, TreeLinksAreChecked) {
  struct Case {
    const char* what;
    const char* expect;
    std::function<void(Tree&)> mutate;
  };
  auto zombie = [](Process& p) {
    p.set_zombie(true);
    p.set_exit_status(3 << 8);
    p.clear_threads();
    p.clear_areas();
    p.clear_fds();
  };
  const Case cases[] = {
      {"orphan", "no process lists it as a child", [](Tree& t) { t.procs[100].clear_children(); }},
      {"child listed twice", "listed twice", [](Tree& t) { t.procs[100].add_children(101); }},
      {"child with another ppid", "has ppid", [](Tree& t) { t.procs[101].set_ppid(55); }},
      {"child of itself", "has ppid", [](Tree& t) { t.procs[101].add_children(101); }},
      {"child before its parent", "before its parent",
       [](Tree& t) {
         // 100 <- 101 <- 102, with 102 listed between them.
         t.inv.clear_pids();
         for (int pid : {100, 102, 101}) t.inv.add_pids(pid);
         t.procs[102] = sample_process(102);
         t.procs[102].set_ppid(101);
         t.procs[101].add_children(102);
         t.pages[102] = t.pages[100];
       }},
      {"child not in the image", "not a process of the image",
       [](Tree& t) { t.procs[101].add_children(777); }},
      {"zombie with areas", "a zombie with",
       [&](Tree& t) {
         zombie(t.procs[101]);
         t.procs[101].add_areas()->set_end(4096);
         t.pages.erase(101);
       }},
      {"fd of a child names a missing socket", "not in shared.pb",
       [](Tree& t) {
         auto* f = t.procs[101].add_fds();
         f->set_fd(5);
         f->set_kind(FileDescriptor::SOCKET);
         f->set_file_id(9);
         f->set_object_inode(2002);
         f->set_restorable(true);
         t.shared = sample_shared();
         t.write_shared = true;
       }},
      {"file_id shared across processes by different files", "different file",
       [](Tree& t) { t.procs[101].mutable_fds(0)->set_target("/dev/zero"); }},
  };
  for (const auto& c : cases) {
    TempDir tmp;
    Tree t;
    c.mutate(t);
    std::string err = error_of(t.write(tmp.path));
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.what << ": got '" << err << "'";
  }
  // The accepted shapes: a zombie child, a grandchild, fds sharing descriptions across
  // processes, and a socket pair split between parent and child.
  TempDir tmp;
  Tree t;
  t.inv.add_pids(102);
  t.inv.add_pids(103);
  t.procs[102] = sample_process(102);
  t.procs[102].set_ppid(101);
  t.procs[101].add_children(102);
  t.pages[102] = t.pages[100];
  t.procs[103] = sample_process(103);
  zombie(t.procs[103]);
  t.procs[103].set_ppid(100);
  t.procs[100].add_children(103);
  t.shared = sample_shared();
  t.write_shared = true;
  for (int pid : {100, 101}) {
    auto* f = t.procs[pid].add_fds();
    f->set_fd(7);
    f->set_kind(FileDescriptor::SOCKET);
    f->set_target(pid == 100 ? "socket:[2000]" : "socket:[2001]");
    f->set_file_id(pid == 100 ? 20 : 21);
    f->set_object_inode(pid == 100 ? 2000 : 2001);
    f->set_restorable(true);
  }
  // An unrestorable socket (connected outside the tree) is recorded without its object.
  auto* outside = t.procs[102].add_fds();
  outside->set_fd(9);
  outside->set_kind(FileDescriptor::SOCKET);
  outside->set_target("socket:[4444]");
  outside->set_file_id(44);
  outside->set_object_inode(4444);
  std::string dir = t.write(tmp.path);
  EXPECT_EQ("", error_of(dir));
  ImageReader r(dir);
  EXPECT_EQ(4u, r.processes().size());
  EXPECT_TRUE(r.process(103).zombie());
  EXPECT_THROW(r.pages(103), Error);
}

}  // namespace
}  // namespace lazycr::image
