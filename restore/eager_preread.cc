#include "restore/eager_preread.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "restore/memory.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;
using image::PageRun;

// More than this is left to the filler (which writes in 8 MiB batches anyway): the copy would
// cost lazycr memory for no gain once reading outlasts the steps it overlaps.
constexpr uint64_t kMaxBytes = 64u << 20;

struct Piece {
  const image::PageStoreReader* store;
  uint64_t addr, pages;
  size_t offset;  // in the buffer
};

bool before(const Piece& p, const image::PageStoreReader* store, uint64_t addr) {
  return p.store != store ? std::less<>()(p.store, store) : p.addr + p.pages * kPageSize <= addr;
}

}  // namespace

bool lazy_candidate(const MemoryArea& a) {
  switch (a.kind()) {
    case MemoryArea::ANON:
    case MemoryArea::HEAP:
    case MemoryArea::STACK:
      break;
    default:
      return false;
  }
  return !a.shared() && a.stored_pages() > 0 && !has_vmflag(a.vmflags(), "lo") &&
         !has_vmflag(a.vmflags(), "lf") && !has_vmflag(a.vmflags(), "wf");
}

struct EagerPreread::Impl {
  // Every store of the image (REF runs read through the others), alive while the thread is:
  // a failed restore may drop the image before this.
  std::vector<std::shared_ptr<const image::PageStoreReader>> stores;
  std::vector<Piece> pieces;  // by store, then address; none overlap
  std::unique_ptr<char[]> buf;
  std::thread thread;
  bool ok = false;  // written by the thread, read after the join
  mutable std::once_flag joined;

  void join() const {
    std::call_once(joined, [this] {
      if (thread.joinable()) const_cast<std::thread&>(thread).join();
    });
  }

  void read_all() noexcept {
    try {
      for (const Piece& p : pieces) p.store->read(p.addr, p.pages, buf.get() + p.offset);
      ok = true;
    } catch (const std::exception&) {
      ok = false;  // the filler reads the store itself and reports it
    }
  }
};

EagerPreread::EagerPreread() : impl_(std::make_unique<Impl>()) {}

EagerPreread::~EagerPreread() {
  impl_->join();
}

std::shared_ptr<EagerPreread> EagerPreread::start(const image::ImageReader& img) {
  std::shared_ptr<EagerPreread> out(new EagerPreread());
  Impl& im = *out->impl_;
  size_t bytes = 0;
  for (const auto& p : img.processes()) {
    if (p.zombie()) continue;
    im.stores.push_back(img.shared_pages(p.pid()));
    const image::PageStoreReader& store = *im.stores.back();
    const auto& runs = store.index().runs();
    std::vector<Piece>& mine = im.pieces;
    for (const MemoryArea& a : p.areas()) {
      if (!eager_fills(a) || lazy_candidate(a)) continue;
      auto it = std::upper_bound(runs.begin(), runs.end(), a.start(),
                                 [](uint64_t x, const PageRun& r) { return x < r.start(); });
      if (it != runs.begin()) --it;
      for (; it != runs.end() && it->start() < a.end(); ++it) {
        const uint64_t s = std::max(it->start(), a.start());
        const uint64_t e = std::min(it->start() + it->pages() * kPageSize, a.end());
        if (s >= e || it->kind() == PageRun::ZERO) continue;
        if (bytes + (e - s) > kMaxBytes) break;
        mine.push_back({&store, s, (e - s) / kPageSize, bytes});
        bytes += e - s;
      }
    }
  }
  std::sort(im.pieces.begin(), im.pieces.end(), [](const Piece& x, const Piece& y) {
    return x.store != y.store ? std::less<>()(x.store, y.store) : x.addr < y.addr;
  });
  if (im.pieces.empty()) return out;
  im.buf.reset(new char[bytes]);  // not zeroed: the thread writes every byte
  im.thread = std::thread([&im] { im.read_all(); });
  return out;
}

void EagerPreread::wait() const {
  impl_->join();
}

bool EagerPreread::copy(const image::PageStoreReader& store, uint64_t addr, uint64_t pages,
                        char* out) const {
  const Impl& im = *impl_;
  im.join();
  if (!im.ok) return false;
  auto it = std::lower_bound(im.pieces.begin(), im.pieces.end(), addr,
                             [&](const Piece& p, uint64_t a) { return before(p, &store, a); });
  if (it == im.pieces.end() || it->store != &store || it->addr > addr ||
      addr + pages * kPageSize > it->addr + it->pages * kPageSize)
    return false;
  std::memcpy(out, im.buf.get() + it->offset + (addr - it->addr), pages * kPageSize);
  return true;
}

}  // namespace lazycr::restore
