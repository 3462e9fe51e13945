#include "image-format/page_store_direct.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <map>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "image-format/lz4_frame.h"

namespace lazycr::image {

namespace {

constexpr uint64_t P = kPageSize;

void pread_exact(int fd, void* data, size_t len, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (len > 0) {
    const ssize_t n = ::pread(fd, p, len, static_cast<off_t>(offset));
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

struct DCtxDeleter {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

}  // namespace

struct DirectPageReader::Impl {
  std::map<std::string, UniqueFd> fds;  // by store path
  std::vector<unsigned char> scratch;   // one compressed frame
  std::unique_ptr<ZSTD_DCtx, DCtxDeleter> dctx;
  uint64_t bytes = 0, frames = 0;

  int fd_of(const PageStoreReader& store) {
    auto it = fds.find(store.path());
    if (it != fds.end()) return it->second.get();
    UniqueFd fd(::open(store.path().c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) fail_errno(store.path(), ": cannot open the page store");
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) fail_errno(store.path(), ": fstat");
    if (static_cast<uint64_t>(st.st_size) != store.file_size())
      fail(store.path(), ": the page store is ", st.st_size, " bytes now, it was ",
           store.file_size(), " when opened (changed under the restore)");
    return fds.emplace(store.path(), std::move(fd)).first->second.get();
  }

  // Frame fi (of `pages` pages) into out, checked against its digest before any use.
  void load_frame(const PageStoreReader& store, uint64_t fi, uint64_t pages, unsigned char* out) {
    const PageStoreReader::FrameInfo f = store.frame(fi);
    const uint64_t expected = pages * P;
    const int fd = fd_of(store);
    if (f.raw) {
      if (f.size != expected)
        fail(store.path(), ": frame ", fi, ": raw frame of ", f.size, " bytes, expected ",
             expected);
      pread_exact(fd, out, expected, f.offset, store.path());
      store.check_frame(fi, out, expected);
    } else if (store.lz4_frames()) {
      if (f.size > lz4_frame_bound(kMaxFrameSize))
        fail(store.path(), ": frame ", fi, ": ", f.size, " bytes is too large");
      if (scratch.size() < f.size) scratch.resize(f.size);
      pread_exact(fd, scratch.data(), f.size, f.offset, store.path());
      store.check_frame(fi, scratch.data(), f.size);  // before the decoder sees it
      lz4_decode_frame(scratch.data(), f.size, out, expected, cat(store.path(), ": frame ", fi));
    } else {
      // Bounded at open: a zstd frame is at most ZSTD_compressBound(its content) bytes.
      if (f.size > ZSTD_compressBound(kMaxFrameSize))
        fail(store.path(), ": frame ", fi, ": ", f.size, " bytes is too large");
      if (scratch.size() < f.size) scratch.resize(f.size);
      pread_exact(fd, scratch.data(), f.size, f.offset, store.path());
      // Before anything parses the frame: a frame the dump did not write never reaches zstd.
      store.check_frame(fi, scratch.data(), f.size);
      const unsigned long long content = ZSTD_getFrameContentSize(scratch.data(), f.size);
      if (content != expected)
        fail(store.path(), ": frame ", fi, ": zstd frame holds ", content, " bytes, expected ",
             expected);
      if (!dctx) dctx.reset(ZSTD_createDCtx());
      if (!dctx) fail("cannot create a zstd decompression context");
      const size_t r = ZSTD_decompressDCtx(dctx.get(), out, expected, scratch.data(), f.size);
      if (ZSTD_isError(r)) fail(store.path(), ": frame ", fi, ": zstd: ", ZSTD_getErrorName(r));
      if (r != expected)
        fail(store.path(), ": frame ", fi, ": decompressed to ", r, " bytes, expected ", expected);
    }
    bytes += expected;
    ++frames;
  }
};

DirectPageReader::DirectPageReader() : impl_(std::make_unique<Impl>()) {}
DirectPageReader::~DirectPageReader() = default;

uint64_t DirectPageReader::bytes_loaded() const {
  return impl_->bytes;
}
uint64_t DirectPageReader::frames_direct() const {
  return impl_->frames;
}

void DirectPageReader::read(const PageStoreReader& store, uint64_t addr, size_t npages, void* out) {
  if (!store.has_frame_digests() || addr % P != 0 || npages == 0 || out == nullptr) {
    store.read(addr, npages, out);  // (its errors for bad arguments)
    return;
  }
  unsigned char* const base = static_cast<unsigned char*>(out);
  const uint64_t fp = store.index().frame_pages();
  const uint64_t data_pages = store.index().data_pages();
  if (npages > (UINT64_MAX - addr) / P || fp == 0) {
    store.read(addr, npages, out);
    return;
  }
  const uint64_t end = addr + npages * P;
  // [pending, a) is left to store.read(): what is not a whole frame inside the range.
  uint64_t pending = addr, a = addr;
  auto flush = [&](uint64_t upto) {
    if (upto > pending) store.read(pending, (upto - pending) / P, base + (pending - addr));
  };
  while (a < end) {
    const auto loc = store.find(a);
    if (!loc || loc->kind != PageRun::DATA) {
      a += P;
      continue;
    }
    const uint64_t sp = loc->stream_page;
    const uint64_t in_frame = sp % fp;
    const uint64_t fi = sp / fp;
    if (in_frame == 0 && sp < data_pages) {
      const uint64_t pages = std::min(fp, data_pages - sp);
      const uint64_t last = a + (pages - 1) * P;
      // Stream pages follow DATA pages in address order: the frame's last page at its
      // stream place means every page between is DATA and in this frame.
      if (last < end) {
        const auto l = store.find(last);
        if (l && l->kind == PageRun::DATA && l->stream_page == sp + pages - 1) {
          flush(a);
          impl_->load_frame(store, fi, pages, base + (a - addr));
          a = last + P;
          pending = a;
          continue;
        }
      }
    }
    // Not the start of a whole frame here: go on at the next frame's first page (pages
    // skipped that are not in this frame are read by store.read, which is always right).
    a += (fp - in_frame) * P;
  }
  flush(end);
}

}  // namespace lazycr::image
