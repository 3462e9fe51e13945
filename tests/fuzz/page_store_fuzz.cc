// libFuzzer target: PageStoreReader on arbitrary bytes. Any input must give a store that
// opens and reads, or a clean lazycr::Error; a crash, hang, leak or sanitizer report is a bug.
//
// An input is a page store file, except one that starts with "IDX": then it is
//   "IDX" | header and frames (H bytes) | u32 LE H | raw PageIndex protobuf
// and the file is built from it with the index zstd-compressed (checksum on) and a correct
// footer, so that mutations of the index get past its checksum and reach the validation.
#include <sys/mman.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "image-format/page_store.h"

namespace {

using lazycr::image::kPageSize;
using lazycr::image::PageStoreReader;

// Reading work per input is bounded: a tiny input can describe a huge (valid) ZERO run, or
// frames that decompress to 4 MiB each.
constexpr uint64_t kPagesPerRunEnd = 16;      // read this many pages at each end of a run
constexpr uint64_t kMaxPagesPerInput = 4096;  // and at most this many in total
constexpr uint64_t kMaxVerifyPages = 4096;    // verify_all() only up to 16 MiB of data

void write_all(int fd, const uint8_t* data, size_t size) {
  if (::ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
}

// Builds the file for an "IDX" input.
std::string build_from_index(const uint8_t* data, size_t size) {
  data += 3;
  size -= 3;
  size_t h = 0;
  if (size >= 4) {
    h = data[0] | data[1] << 8 | data[2] << 16 | static_cast<size_t>(data[3]) << 24;
    data += 4;
    size -= 4;
  }
  h = std::min(h, size);
  std::string file(reinterpret_cast<const char*>(data), h);
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
  std::string packed(ZSTD_compressBound(size - h), '\0');
  size_t n = ZSTD_compress2(cctx, packed.data(), packed.size(), data + h, size - h);
  ZSTD_freeCCtx(cctx);
  if (ZSTD_isError(n)) std::abort();
  uint64_t index_offset = file.size();
  file.append(packed.data(), n);
  unsigned char footer[32] = {};
  for (int i = 0; i < 8; ++i) {
    footer[i] = static_cast<unsigned char>(index_offset >> (8 * i));
    footer[8 + i] = static_cast<unsigned char>(static_cast<uint64_t>(n) >> (8 * i));
  }
  // The footer's version is the header's (2, 3 or 4), so that inputs reach the index checks
  // of each.
  footer[16] = file.size() >= 12 ? static_cast<unsigned char>(file[8])
                                 : static_cast<unsigned char>(lazycr::image::kPageStoreVersion);
  std::memcpy(footer + 24, "LZCRPEND", 8);
  file.append(reinterpret_cast<const char*>(footer), 32);
  return file;
}

void exercise(const std::string& path) {
  auto reader = PageStoreReader::open(path, 4);
  const auto& index = reader->index();
  std::vector<unsigned char> buf(kPagesPerRunEnd * kPageSize);
  uint64_t budget = kMaxPagesPerInput;
  // Nothing is linked: REF runs are looked up, not read (reading them is a clean Error).
  if (!reader->refs_linked()) {
    try {
      reader->link_refs([](int32_t) { return nullptr; });
      std::abort();  // a store with REF runs cannot link to nothing
    } catch (const lazycr::Error&) {
    }
  }
  // Nor a parent: PARENT runs (incremental images) are looked up, not read.
  if (!reader->parent_linked()) {
    try {
      reader->link_parent(nullptr);
      std::abort();  // a store with PARENT runs cannot link to no parent
    } catch (const lazycr::Error&) {
    }
  }
  for (const auto& run : index.runs()) {
    (void)reader->find(run.start());
    (void)reader->find(run.start() - 1);
    (void)reader->find(run.start() + run.pages() * kPageSize);
    (void)reader->page_hash(run.start());
    (void)reader->page_hash(run.start() + (run.pages() - 1) * kPageSize);
    if (run.kind() == lazycr::image::PageRun::REF || run.kind() == lazycr::image::PageRun::PARENT)
      continue;
    uint64_t n = std::min<uint64_t>({run.pages(), kPagesPerRunEnd, budget});
    if (n == 0) break;
    reader->read(run.start(), n, buf.data());
    budget -= n;
    if (run.pages() > n && budget > 0) {
      uint64_t m = std::min<uint64_t>({run.pages() - n, kPagesPerRunEnd, budget});
      reader->read(run.start() + (run.pages() - m) * kPageSize, m, buf.data());
      budget -= m;
    }
  }
  if (index.data_pages() <= kMaxVerifyPages) reader->verify_all();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // One memfd for the whole run; the reader opens it by path like any file.
  static const int fd = ::memfd_create("page_store_fuzz", MFD_CLOEXEC);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0) std::abort();
  if (size >= 3 && std::memcmp(data, "IDX", 3) == 0) {
    std::string file = build_from_index(data, size);
    write_all(fd, reinterpret_cast<const uint8_t*>(file.data()), file.size());
  } else {
    write_all(fd, data, size);
  }
  try {
    exercise(path);
  } catch (const lazycr::Error&) {
    // A clean refusal.
  }
  return 0;
}
