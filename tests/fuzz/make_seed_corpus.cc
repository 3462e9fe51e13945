// make_seed_corpus OUTDIR FUZZER...: writes valid inputs for each named fuzzer into
// OUTDIR/FUZZER/ (created if missing). A fuzzer without a seed writer here gets an empty
// directory, and libFuzzer starts from nothing.
//
// Hook for other fuzzers: write a `void NAME_seeds(const std::string& dir)` below and add it
// to kSeedWriters under the fuzzer's name (e.g. "image_dir_fuzz").
#include <sys/stat.h>
#include <zstd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "common/error.h"
#include "image-format/image_dir.h"
#include "image-format/page_store.h"
#include "tests/fuzz/hostile_images.h"

namespace {

using namespace lazycr::image;

void make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    lazycr::fail_errno("make_seed_corpus: cannot create ", dir);
}

// Deterministic pages: kind 0 random, 1 compressible (256 random bytes then zeros), 2 text,
// 3 zero.
std::vector<unsigned char> pages(const std::vector<int>& kinds, uint64_t seed) {
  std::vector<unsigned char> out(kinds.size() * kPageSize, 0);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  auto next = [&s] {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  };
  static const char* const kWords[] = {"page ", "frame ", "zstd ", "index ", "run ", "lazy "};
  for (size_t i = 0; i < kinds.size(); ++i) {
    unsigned char* p = out.data() + i * kPageSize;
    switch (kinds[i]) {
      case 0:
        for (size_t j = 0; j < kPageSize; ++j) p[j] = static_cast<unsigned char>(next());
        break;
      case 1:
        for (size_t j = 0; j < 256; ++j) p[j] = static_cast<unsigned char>(next());
        break;
      case 2:
        for (size_t j = 0; j < kPageSize;) {
          const char* w = kWords[next() % 6];
          for (; *w && j < kPageSize; ++w) p[j++] = static_cast<unsigned char>(*w);
        }
        break;
      default:
        break;
    }
  }
  return out;
}

struct Part {
  uint64_t addr;
  std::vector<int> kinds;
};

void write_store(
    const std::string& path, const std::vector<Part>& parts, uint32_t frame_size, int level,
    uint64_t seed,
    lazycr::image::PageIndex::Compression compression = lazycr::image::PageIndex::ZSTD) {
  PageStoreOptions options;
  options.frame_size = frame_size;
  options.level = level;
  options.compression = compression;
  options.threads = 1;
  PageStoreWriter writer(path, options);
  for (const Part& part : parts) {
    std::vector<unsigned char> data = pages(part.kinds, seed++);
    writer.add_pages(part.addr, data.data(), part.kinds.size());
  }
  writer.finish();
}

// The "IDX" form of a store that page_store_fuzz.cc describes: "IDX", u32 LE length of the
// header and frames, header and frames, the raw (decompressed) PageIndex.
void write_index_form(const std::string& store, const std::string& out) {
  std::ifstream in(store, std::ios::binary);
  std::string file((std::istreambuf_iterator<char>(in)), {});
  if (file.size() < 96) lazycr::fail(store, ": too small");
  uint64_t index_offset = 0, index_size = 0;
  for (int i = 7; i >= 0; --i) {
    index_offset = index_offset << 8 | static_cast<unsigned char>(file[file.size() - 32 + i]);
    index_size = index_size << 8 | static_cast<unsigned char>(file[file.size() - 24 + i]);
  }
  const char* packed = file.data() + index_offset;
  unsigned long long raw_size = ZSTD_getFrameContentSize(packed, index_size);
  if (raw_size > (1u << 20)) lazycr::fail(store, ": bad index frame");
  std::string raw(raw_size, '\0');
  size_t n = ZSTD_decompress(raw.data(), raw.size(), packed, index_size);
  if (ZSTD_isError(n) || n != raw_size) lazycr::fail(store, ": cannot decompress the index");
  std::string seed = "IDX";
  for (int i = 0; i < 4; ++i) seed += static_cast<char>(index_offset >> (8 * i));
  seed.append(file, 0, index_offset);
  seed += raw;
  std::ofstream o(out, std::ios::binary | std::ios::trunc);
  o.write(seed.data(), static_cast<std::streamsize>(seed.size()));
  if (!o.flush()) lazycr::fail(out, ": write failed");
}

void page_store_seeds(const std::string& dir) {
  // Small stores (a few KiB each): libFuzzer's default max_len follows the largest seed.
  write_store(dir + "/empty.lzp", {}, kMinFrameSize, 1, 1);
  write_store(dir + "/one-page.lzp", {{0x1000, {1}}}, kMinFrameSize, 1, 2);
  write_store(dir + "/zeros.lzp", {{0x7f0000000000, {3, 3, 3}}}, kMinFrameSize, 1, 3);
  write_store(dir + "/mixed.lzp",
              {{0x10000, {1, 1, 3, 3, 1, 2, 1}}, {0x200000, {3, 1, 1, 2, 1}}, {0x7ffffff000, {1}}},
              kMinFrameSize, 1, 4);
  write_store(dir + "/text-level3.lzp", {{0x400000, {2, 2, 2, 2, 2, 3, 2, 2, 2}}}, kMinFrameSize, 3,
              5);
  write_store(dir + "/frame32k.lzp", {{0x555555554000, {1, 2, 1, 3, 1, 2, 1, 1, 1, 2}}}, 32 * 1024,
              -1, 6);
  // Raw frames (version 3): a page of random data that zstd does not shrink; every frame of a
  // store written with compression none.
  write_store(dir + "/random.lzp", {{0x1000, {0}}, {0x3000, {3, 1}}}, kMinFrameSize, 1, 7);
  write_store(dir + "/none.lzp", {{0x10000, {1, 2, 3, 1, 0, 1, 2}}, {0x200000, {1}}}, kMinFrameSize,
              1, 9, lazycr::image::PageIndex::NONE);
  // LZ4 frames (version 5, --compress lz4), a raw frame among them.
  write_store(dir + "/lz4.lzp", {{0x10000, {1, 2, 3, 1, 0, 1, 2}}, {0x200000, {2, 2, 1, 2}}},
              kMinFrameSize, lazycr::image::kLz4Acceleration, 10, lazycr::image::PageIndex::LZ4);
  {
    // REF runs (format 2): two that merge, one to another pid, between DATA and ZERO pages.
    PageStoreOptions options;
    options.frame_size = kMinFrameSize;
    options.threads = 1;
    PageStoreWriter writer(dir + "/refs.lzp", options);
    std::vector<unsigned char> data = pages({1, 2, 3, 1}, 8);
    writer.add_pages(0x400000, data.data(), 2);
    writer.add_ref_pages(0x402000, 2, 10, 0x600000);
    writer.add_ref_pages(0x404000, 1, 10, 0x602000);
    writer.add_ref_pages(0x405000, 3, 11, 0x1000);
    writer.add_pages(0x408000, data.data() + 2 * kPageSize, 2);
    writer.finish();
  }
  {
    // Incremental stores: a parent with page digests, and its child with PARENT runs (pages
    // 1 and 3 changed, page 4 new, page 2 now zero) and digests of its own.
    PageStoreOptions options;
    options.frame_size = kMinFrameSize;
    options.threads = 1;
    options.page_hashes = true;
    std::vector<unsigned char> v1 = pages({1, 2, 1, 2, 1}, 10);
    {
      PageStoreWriter writer(dir + "/parent.lzp", options);
      writer.add_pages(0x400000, v1.data(), 4);
      writer.finish();
    }
    std::vector<unsigned char> v2 = v1;
    std::vector<unsigned char> changed = pages({1, 1}, 11);
    std::memcpy(v2.data() + kPageSize, changed.data(), kPageSize);
    std::memset(v2.data() + 2 * kPageSize, 0, kPageSize);
    std::memcpy(v2.data() + 3 * kPageSize, changed.data() + kPageSize, kPageSize);
    options.parent = PageStoreReader::open(dir + "/parent.lzp");
    PageStoreWriter writer(dir + "/child.lzp", options);
    writer.add_pages(0x400000, v2.data(), 5);
    writer.finish();
  }
  for (const char* name : {"empty", "one-page", "zeros", "mixed", "text-level3", "frame32k", "refs",
                           "random", "none", "parent", "child", "lz4"})
    write_index_form(dir + "/" + name + ".lzp", dir + "/" + name + ".idx");
}

// image_dir_fuzz: a mode byte (0 inventory file, 1 process file, 2 raw Inventory, 3 raw
// Process, 4 shared file, 5 raw SharedObjects; see image_dir_fuzz.cc) and then the bytes.
void image_dir_seeds(const std::string& dir) {
  Inventory inv;
  inv.set_format_version(kFormatVersion);
  inv.set_tool_version("seed");
  inv.set_page_size(kPageSize);
  inv.set_root_pid(1);
  inv.add_pids(1);
  inv.mutable_cpu()->set_xsave_size(832);
  // Incremental images: the tree's identity and a parent link (fields 1600-1602).
  inv.set_root_start_ticks(12345);
  inv.set_boot_id("00000000-0000-0000-0000-000000000000");
  inv.mutable_parent()->set_dir("/tmp/seed-parent");
  inv.mutable_parent()->set_digest(std::string(32, '\x5a'));
  inv.mutable_parent()->set_chain_length(1);
  Process proc;
  proc.set_pid(1);
  proc.set_comm("seed");
  for (int tid : {1, 2}) {
    auto* t = proc.add_threads();
    t->set_tid(tid);
    t->set_xsave(std::string(832, '\x01'));
    t->mutable_regs()->set_rip(0x401000);
    auto* s = t->add_pending();
    s->set_signo(10);
    s->set_siginfo(std::string(128, '\0'));
  }
  for (uint64_t i = 0; i < 3; i++) {
    auto* a = proc.add_areas();
    a->set_start(0x400000 + i * 0x10000);
    a->set_end(0x400000 + i * 0x10000 + 0x4000);
    a->set_prot(static_cast<uint32_t>(i + 1));
    a->set_kind(static_cast<MemoryArea::Kind>(i));
    a->set_stored_pages(i);
    a->mutable_file()->set_path("/bin/true");
  }
  auto* sa = proc.add_sigactions();
  sa->set_signo(10);
  sa->set_handler(0x401234);
  auto* f = proc.add_fds();
  f->set_fd(1);
  f->set_kind(FileDescriptor::REGULAR);
  f->set_file_id(1);
  auto* pf = proc.add_fds();
  pf->set_fd(3);
  pf->set_kind(FileDescriptor::PIPE);
  pf->set_file_id(2);
  pf->set_object_inode(100);
  pf->set_restorable(true);
  proc.add_children(2);
  proc.add_rlimits()->set_resource(7);
  proc.set_auxv(std::string(32, '\0'));

  auto file_bytes = [&](const char magic[8], const google::protobuf::MessageLite& m) {
    std::string tmp = dir + "/.tmp";
    write_message_file(tmp, magic, m);
    std::ifstream in(tmp, std::ios::binary);
    std::string bytes{std::istreambuf_iterator<char>(in), {}};
    std::remove(tmp.c_str());
    return bytes;
  };
  auto put = [&](const std::string& name, char mode, const std::string& body) {
    std::ofstream(dir + "/" + name, std::ios::binary) << mode << body;
  };
  put("inventory_file", 0, file_bytes(kInventoryMagic, inv));
  put("process_file", 1, file_bytes(kProcessMagic, proc));
  put("inventory_raw", 2, inv.SerializeAsString());
  put("process_raw", 3, proc.SerializeAsString());

  SharedObjects shared;
  auto* pipe = shared.add_pipes();
  pipe->set_inode(100);
  pipe->set_capacity(65536);
  pipe->set_data("buffered");
  auto* fifo = shared.add_pipes();
  fifo->set_inode(101);
  fifo->set_fifo(true);
  fifo->set_capacity(4096);
  for (uint64_t inode : {200, 201}) {
    auto* u = shared.add_sockets();
    u->set_inode(inode);
    u->set_peer_inode(inode ^ 1);
    u->set_type(5);  // SOCK_SEQPACKET
    u->set_rcvbuf(212992);
  }
  shared.mutable_sockets(0)->add_queued("one");
  shared.mutable_sockets(0)->add_queued("");
  put("shared_file", 4, file_bytes(kSharedMagic, shared));
  put("shared_raw", 5, shared.SerializeAsString());

  // Hostile seeds (tests/fuzz/hostile_images.h), run first on every fuzzing run under the
  // memory limits of CMakeLists.txt: files of a few KiB that decode to 255 MiB (an unknown
  // field), and 8 M empty memory areas (16 MiB decoded, ~1 GB parsed).
  using namespace lazycr::test;
  put("hostile_inventory_bomb", 0, hostile::metadata_bomb(kInventoryMagic, inv, 255u << 20));
  put("hostile_process_bomb", 1, hostile::metadata_bomb(kProcessMagic, proc, 255u << 20));
  put("hostile_shared_bomb", 4, hostile::metadata_bomb(kSharedMagic, shared, 255u << 20));
  put("hostile_empty_areas", 1, hostile::empty_records(kProcessMagic, proc, 19, 8u << 20));
}

const std::map<std::string, std::function<void(const std::string&)>> kSeedWriters = {
    {"page_store_fuzz", page_store_seeds},
    {"image_dir_fuzz", image_dir_seeds},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s OUTDIR FUZZER...\n", argv[0]);
    return 2;
  }
  try {
    std::string out = argv[1];
    make_dir(out);
    for (int i = 2; i < argc; ++i) {
      std::string dir = out + "/" + argv[i];
      make_dir(dir);
      auto it = kSeedWriters.find(argv[i]);
      if (it == kSeedWriters.end()) {
        std::printf("%s: no seed writer, empty corpus\n", argv[i]);
        continue;
      }
      it->second(dir);
      std::printf("%s: seeds in %s\n", argv[i], dir.c_str());
    }
  } catch (const lazycr::Error& e) {
    std::fprintf(stderr, "make_seed_corpus: %s\n", e.what());
    return 1;
  }
  return 0;
}
