#include "image-format/page_store_direct.h"
#include "image-format/page_store_internal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "image-format/lz4_frame.h"

namespace lazycr::image {

namespace {

constexpr uint64_t P = kPageSize;

struct DCtxDeleter {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

}  // namespace

struct DirectPageReader::Impl {
  std::map<std::string, UniqueFd> fds;  // by store path (one file per path in a restore)
  std::unique_ptr<ZSTD_DCtx, DCtxDeleter> dctx;
  uint64_t bytes = 0, frames = 0;

  // The very file the store's reader checked (opened again through its descriptor, never by
  // path: the path may name another file by now), with a file description, and so readahead,
  // of its own: the drain's sequential reads do not disturb the faults'.
  int fd_of(const PageStoreReader& store) {
    auto it = fds.find(store.path());
    if (it != fds.end()) return it->second.get();
    const std::string self = cat("/proc/self/fd/", store.fd());
    UniqueFd fd(::open(self.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) fail_errno(store.path(), ": cannot open the page store again (", self, ")");
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) fail_errno(store.path(), ": fstat");
    if (static_cast<uint64_t>(st.st_size) != store.file_size())
      fail(store.path(), ": the page store is ", st.st_size, " bytes now, it was ",
           store.file_size(), " when opened (changed under the restore)");
    return fds.emplace(store.path(), std::move(fd)).first->second.get();
  }

  // A frame read from the file and not yet checked: its bytes are `out` (raw) or a scratch
  // buffer (to decode into `out` once checked).
  struct Fetched {
    uint64_t fi = 0, pages = 0;
    unsigned char* out = nullptr;
    const unsigned char* bytes = nullptr;
    size_t size = 0;
    bool raw = false;
  };
  std::vector<unsigned char> scratch[2];  // one compressed frame each
  std::optional<Fetched> held;            // fetched, waiting for a second one to check with

  Fetched fetch(const PageStoreReader& store, uint64_t fi, uint64_t pages, unsigned char* out,
                int slot) {
    const PageStoreReader::FrameInfo f = store.frame(fi);
    const uint64_t expected = pages * P;
    const int fd = fd_of(store);
    if (f.raw) {
      if (f.size != expected)
        fail(store.path(), ": frame ", fi, ": raw frame of ", f.size, " bytes, expected ",
             expected);
      store_detail::pread_all(fd, out, expected, f.offset, store.path());
      return {fi, pages, out, out, expected, true};
    }
    // Bounded at open: a frame is at most its codec's bound for its content.
    const size_t bound =
        store.lz4_frames() ? lz4_frame_bound(kMaxFrameSize) : ZSTD_compressBound(kMaxFrameSize);
    if (f.size > bound) fail(store.path(), ": frame ", fi, ": ", f.size, " bytes is too large");
    std::vector<unsigned char>& buf = scratch[slot];
    if (buf.size() < f.size) buf.resize(f.size);
    store_detail::pread_all(fd, buf.data(), f.size, f.offset, store.path());
    return {fi, pages, out, buf.data(), f.size, false};
  }

  // A checked frame into its `out`: a frame the dump did not write never reaches the decoders.
  void decode(const PageStoreReader& store, const Fetched& x) {
    const uint64_t expected = x.pages * P;
    if (x.raw) {
    } else if (store.lz4_frames()) {
      lz4_decode_frame(x.bytes, x.size, x.out, expected, cat(store.path(), ": frame ", x.fi));
    } else {
      const unsigned long long content = ZSTD_getFrameContentSize(x.bytes, x.size);
      if (content != expected)
        fail(store.path(), ": frame ", x.fi, ": zstd frame holds ", content, " bytes, expected ",
             expected);
      if (!dctx) dctx.reset(ZSTD_createDCtx());
      if (!dctx) fail("cannot create a zstd decompression context");
      const size_t r = ZSTD_decompressDCtx(dctx.get(), x.out, expected, x.bytes, x.size);
      if (ZSTD_isError(r)) fail(store.path(), ": frame ", x.fi, ": zstd: ", ZSTD_getErrorName(r));
      if (r != expected)
        fail(store.path(), ": frame ", x.fi, ": decompressed to ", r, " bytes, expected ",
             expected);
    }
    bytes += expected;
    ++frames;
  }

  // Frame fi (of `pages` pages) into out, checked against its digest before any use: held
  // until a second frame comes, then both are checked at once and decoded (flush_held() for
  // the last one alone).
  void load_frame(const PageStoreReader& store, uint64_t fi, uint64_t pages, unsigned char* out) {
    if (!held) {
      held = fetch(store, fi, pages, out, 0);
      return;
    }
    const Fetched second = fetch(store, fi, pages, out, 1);
    const Fetched first = *held;
    held.reset();
    store.check_frame_pair(first.fi, first.bytes, first.size, second.fi, second.bytes, second.size);
    decode(store, first);
    decode(store, second);
  }

  void flush_held(const PageStoreReader& store) {
    if (!held) return;
    const Fetched x = *held;
    held.reset();
    store.check_frame(x.fi, x.bytes, x.size);
    decode(store, x);
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
  impl_->held.reset();  // (left by a read that threw)
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
  impl_->flush_held(store);
  flush(end);
}

}  // namespace lazycr::image
