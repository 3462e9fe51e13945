#pragma once
// What the page store's corruption tests share (lz4_frame_test, page_store_raw_test): a
// finished store taken apart into its frames and its index, and put together again around
// another index, other frames or another version, as the writer would have laid them out.

#include <zstd.h>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include "image-format/page_store.h"

namespace lazycr::test {

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
inline uint32_t u32_at(const std::string& f, size_t at) {
  uint32_t v;
  std::memcpy(&v, f.data() + at, 4);
  return v;
}
inline uint64_t u64_at(const std::string& f, size_t at) {
  uint64_t v;
  std::memcpy(&v, f.data() + at, 8);
  return v;
}

struct StoreParts {
  std::string file;  // the store as written
  uint64_t index_offset = 0;
  image::PageIndex index;

  // The header and the frames: everything before the index.
  std::string frames() const { return file.substr(0, index_offset); }

  // `frames` followed by `idx` (zstd, with its checksum, as the writer packs it) and a footer
  // naming it; `version` in the header and the footer.
  static std::string rebuild(const image::PageIndex& idx, std::string frames, uint32_t version) {
    const std::string raw = idx.SerializeAsString();
    ZSTD_CCtx* c = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1);
    std::string packed(ZSTD_compressBound(raw.size()), '\0');
    packed.resize(ZSTD_compress2(c, packed.data(), packed.size(), raw.data(), raw.size()));
    ZSTD_freeCCtx(c);
    std::memcpy(frames.data() + 8, &version, 4);
    std::string footer(32, '\0');
    const uint64_t off = frames.size(), size = packed.size();
    std::memcpy(footer.data(), &off, 8);
    std::memcpy(footer.data() + 8, &size, 8);
    std::memcpy(footer.data() + 16, &version, 4);
    std::memcpy(footer.data() + 24, "LZCRPEND", 8);
    return frames + packed + footer;
  }
};

// Reads the store at `path` into `out` (use under ASSERT_NO_FATAL_FAILURE).
inline void read_store_parts(const std::string& path, StoreParts& out) {
  out.file = slurp(path);
  ASSERT_GE(out.file.size(), 32u);
  out.index_offset = u64_at(out.file, out.file.size() - 32);
  const uint64_t size = u64_at(out.file, out.file.size() - 24);
  ASSERT_LE(out.index_offset + size, out.file.size());
  const std::string packed = out.file.substr(out.index_offset, size);
  const unsigned long long content = ZSTD_getFrameContentSize(packed.data(), packed.size());
  ASSERT_LT(content, 1ull << 30) << path << ": the index is not a zstd frame with its size";
  std::string raw(content, '\0');
  ASSERT_EQ(raw.size(), ZSTD_decompress(raw.data(), raw.size(), packed.data(), packed.size()));
  ASSERT_TRUE(out.index.ParseFromString(raw));
}

}  // namespace lazycr::test
