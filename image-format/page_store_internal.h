// Internal to image-format/: what the page store's writer (page_store_writer.cc) and reader
// (page_store.cc) share: the file's framing constants and small byte helpers. Not for users
// of the page store (page_store.h).
#pragma once

#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <sstream>
#include <string>

#include "common/error.h"
#include "image-format/page_store.h"

namespace lazycr::image::store_detail {

inline constexpr size_t kHeaderSize = 64;
inline constexpr size_t kFooterSize = 32;
inline constexpr char kHeaderMagic[8] = {'L', 'Z', 'C', 'R', 'P', 'A', 'G', 'E'};
inline constexpr char kFooterMagic[8] = {'L', 'Z', 'C', 'R', 'P', 'E', 'N', 'D'};
// The decompressed index is refused above this size, before anything is allocated for it:
// ~1 TiB of pages in 64 KiB frames (16 M frame sizes of ~3 bytes) or 3 M runs.
inline constexpr uint64_t kMaxIndexBytes = 64ull << 20;
// Pages live below the end of x86_64 user space (4-level paging).
inline constexpr uint64_t kAddrEnd = 0x0000800000000000ull;
inline constexpr uint64_t kMaxPages = kAddrEnd / kPageSize;
inline constexpr uint32_t kMinFramePages = kMinFrameSize / kPageSize;
inline constexpr uint32_t kMaxFramePages = kMaxFrameSize / kPageSize;
inline constexpr unsigned kMaxThreads = 1024;
// Frames in flight per compression thread (queued, compressing or waiting to be written).
// A producer that finds them all in flight sleeps until half are written: one wake-up per
// few frames, not one per frame (futex wake-ups and context switches were ~12% of a 512 MiB
// dump's CPU with 2 per thread and a wake-up per frame, perf).
inline constexpr size_t kFramesPerThread = 8;
// A frame is stored raw when zstd saves less than 1/kRawMargin of it: reading it back then
// costs a copy instead of a decompression, for at most ~3% more bytes.
inline constexpr size_t kRawMargin = 32;
// The early writeback asks the kernel to start writing each this many bytes of frames.
inline constexpr uint64_t kWritebackChunk = 8ull << 20;

inline bool saves_too_little(size_t compressed, size_t raw) {
  return compressed >= raw - raw / kRawMargin;
}

inline uint64_t raw_bitmap_bytes(uint64_t frames) {
  return (frames + 7) / 8;
}
inline bool bit(const std::string& bitmap, uint64_t i) {
  return (static_cast<unsigned char>(bitmap[i / 8]) >> (i % 8)) & 1;
}

inline void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline std::string hex(uint64_t v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

// Fast check: the first word is zero and every byte equals the one 8 bytes before it.
inline bool is_zero_page(const unsigned char* p) {
  uint64_t first;
  std::memcpy(&first, p, sizeof first);
  return first == 0 && std::memcmp(p, p + 8, kPageSize - 8) == 0;
}

inline void pwrite_all(int fd, const void* data, size_t len, uint64_t offset,
                       const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, ": write of ", len, " bytes at offset ", offset, " failed");
    }
    if (n == 0) fail(path, ": write at offset ", offset, " wrote nothing");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

// Reads exactly len bytes; a short read means the file shrank under us.
inline void pread_all(int fd, void* data, size_t len, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, ": read of ", len, " bytes at offset ", offset, " failed");
    }
    if (n == 0) fail(path, ": file ends at offset ", offset, " (truncated while open?)");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

// SHA-256 (libcrypto, SHA-NI): 1.6 GB/s on 64 KiB here, BLAKE2b-512 0.8 GB/s, and Debian 12
// has no BLAKE3 (bench/RESULTS.md "Frame digests"). The algorithm is fetched once: an implicit
// fetch per call costs microseconds, which a fault on a small frame would pay.
inline const EVP_MD* sha256_md() {
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return md;
}

struct Bytes {
  const void* data;
  size_t size;
};

// SHA-256 of the concatenation of `parts` into out[kFrameDigestBytes].
inline void sha256(std::initializer_list<Bytes> parts, unsigned char* out) {
  struct CtxFree {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
  };
  thread_local std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
  bool ok = ctx && sha256_md() && EVP_DigestInit_ex2(ctx.get(), sha256_md(), nullptr) == 1;
  for (const Bytes& b : parts) ok = ok && EVP_DigestUpdate(ctx.get(), b.data, b.size) == 1;
  unsigned int len = 0;
  if (!ok || EVP_DigestFinal_ex(ctx.get(), out, &len) != 1 || len != kFrameDigestBytes)
    fail("libcrypto cannot compute a SHA-256");
}

inline std::string sha256_string(std::initializer_list<Bytes> parts) {
  unsigned char md[kFrameDigestBytes];
  sha256(parts, md);
  return std::string(reinterpret_cast<const char*>(md), sizeof md);
}

}  // namespace lazycr::image::store_detail
