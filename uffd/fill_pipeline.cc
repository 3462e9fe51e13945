#include "uffd/fill_pipeline.h"

#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "common/clock.h"
#include "common/error.h"
#include "image-format/page_store_direct.h"

namespace lazycr::uffd {

namespace {
constexpr uint64_t kPage = 4096;
}  // namespace

struct FillPipeline::Impl {
  struct Slot {
    Chunk chunk;
    std::unique_ptr<char[]> buf;
    enum State { kFree, kQueued, kReading, kReady };
    State state = kFree;  // under mu
    uint64_t seq = 0;     // queue order
    int64_t queued_ns = 0;
  };
  uint64_t chunk_bytes;
  unsigned nthreads;
  std::vector<Slot> slots;
  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<Slot*> todo;
  bool quit = false;
  bool starved = false;  // a chunk was taken back since a worker last made one ready
  uint64_t next_seq = 0;
  UniqueFd ready_fd;
  // take_back() would give a chunk now (under mu).
  bool take_back_due_locked() const {
    return !todo.empty() && (starved || monotonic_ns() - todo.front()->queued_ns >= kTakeBackNs);
  }
  std::vector<std::thread> workers;
  std::atomic<uint64_t> bytes_loaded{0};  // by the workers' DirectPageReaders

  Impl(uint64_t bytes, unsigned buffers, unsigned threads)
      : chunk_bytes(bytes),
        nthreads(threads == 0 ? 1 : threads),
        slots(buffers == 0 ? 1 : buffers) {}

  void worker_main() {
    // Whole frames go straight into the chunk buffer (no frame cache, no copy).
    image::DirectPageReader direct;
    // Background work: it runs on a CPU nobody else wants. On a busy machine it may not run
    // at all; the loop then takes its chunks back (take_back()) and reads them itself.
    sched_param idle{};
    (void)::sched_setscheduler(0, SCHED_IDLE, &idle);
    for (;;) {
      Slot* s;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return quit || !todo.empty(); });
        if (quit) return;
        s = todo.front();
        todo.pop_front();
        s->state = Slot::kReading;
      }
      Chunk& c = s->chunk;
      const uint64_t before = direct.bytes_loaded();
      try {
        direct.read(*c.store, c.src, c.len / kPage, s->buf.get());
      } catch (const std::exception& e) {
        c.error = e.what();
      }
      bytes_loaded.fetch_add(direct.bytes_loaded() - before, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lock(mu);
        s->state = Slot::kReady;
        starved = false;
      }
      uint64_t one = 1;
      (void)!::write(ready_fd.get(), &one, sizeof(one));
    }
  }
};

FillPipeline::FillPipeline(uint64_t chunk_bytes, unsigned buffers, unsigned threads)
    : impl_(std::make_unique<Impl>(chunk_bytes, buffers, threads)) {}

FillPipeline::~FillPipeline() {
  stop();
}

void FillPipeline::start() {
  Impl& im = *impl_;
  if (!im.workers.empty()) return;
  im.ready_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!im.ready_fd) fail_errno("page server: eventfd");
  for (auto& s : im.slots)
    if (!s.buf) s.buf.reset(new char[im.chunk_bytes]);
  im.quit = false;
  for (unsigned i = 0; i < im.nthreads; ++i) im.workers.emplace_back([&im] { im.worker_main(); });
}

void FillPipeline::stop() {
  Impl& im = *impl_;
  if (im.workers.empty()) return;
  {
    std::lock_guard<std::mutex> lock(im.mu);
    im.quit = true;
  }
  im.cv.notify_all();
  for (auto& t : im.workers) t.join();
  im.workers.clear();
  im.todo.clear();
  for (auto& s : im.slots) {
    s.state = Impl::Slot::kFree;
    s.chunk = Chunk{};
  }
}

uint64_t FillPipeline::bytes_loaded() const {
  return impl_->bytes_loaded.load(std::memory_order_relaxed);
}

bool FillPipeline::started() const {
  return !impl_->workers.empty();
}

int FillPipeline::ready_fd() const {
  return impl_->ready_fd.get();
}

void FillPipeline::consume() {
  uint64_t v;
  (void)!::read(impl_->ready_fd.get(), &v, sizeof(v));
}

bool FillPipeline::can_queue() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (const auto& s : impl_->slots)
    if (s.state == Impl::Slot::kFree) return true;
  return false;
}

void FillPipeline::queue(uint64_t proc_id, std::shared_ptr<const image::PageStoreReader> store,
                         uint64_t dst, uint64_t src, uint64_t len) {
  Impl& im = *impl_;
  if (len > im.chunk_bytes) fail("page server: prefetch chunk of ", len, " bytes is too large");
  {
    std::lock_guard<std::mutex> lock(im.mu);
    Impl::Slot* free = nullptr;
    for (auto& s : im.slots)
      if (s.state == Impl::Slot::kFree) {
        free = &s;
        break;
      }
    if (free == nullptr) fail("page server: no free prefetch buffer");
    if (!free->buf) free->buf.reset(new char[im.chunk_bytes]);  // queued before start()
    free->chunk = Chunk{proc_id, std::move(store), dst, src, len, free->buf.get(), {}};
    free->state = Impl::Slot::kQueued;
    free->seq = im.next_seq++;
    free->queued_ns = monotonic_ns();
    im.todo.push_back(free);
  }
  im.cv.notify_one();
}

const FillPipeline::Chunk* FillPipeline::ready() {
  Impl& im = *impl_;
  std::lock_guard<std::mutex> lock(im.mu);
  Impl::Slot* best = nullptr;
  for (auto& s : im.slots)
    if (s.state == Impl::Slot::kReady && (best == nullptr || s.seq < best->seq)) best = &s;
  return best == nullptr ? nullptr : &best->chunk;
}

void FillPipeline::release(const Chunk* c) {
  Impl& im = *impl_;
  std::lock_guard<std::mutex> lock(im.mu);
  for (auto& s : im.slots)
    if (&s.chunk == c) {
      s.state = Impl::Slot::kFree;
      s.chunk.store.reset();
    }
}

bool FillPipeline::take_back_due() const {
  const Impl& im = *impl_;
  std::lock_guard<std::mutex> lock(im.mu);
  return im.take_back_due_locked();
}

std::optional<FillPipeline::Chunk> FillPipeline::take_back() {
  Impl& im = *impl_;
  std::lock_guard<std::mutex> lock(im.mu);
  if (!im.take_back_due_locked()) return std::nullopt;
  im.starved = true;
  Impl::Slot* s = im.todo.front();
  im.todo.pop_front();
  std::optional<Chunk> c(std::move(s->chunk));
  c->data = nullptr;
  s->chunk = Chunk{};
  s->state = Impl::Slot::kFree;
  return c;
}

bool FillPipeline::waiting() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return !impl_->todo.empty();
}

bool FillPipeline::overlaps(uint64_t proc_id, uint64_t dst, uint64_t len) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (const auto& s : impl_->slots) {
    const Chunk& c = s.chunk;
    if (s.state != Impl::Slot::kFree && c.proc_id == proc_id && dst < c.dst + c.len &&
        c.dst < dst + len)
      return true;
  }
  return false;
}

bool FillPipeline::busy(uint64_t proc_id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (const auto& s : impl_->slots)
    if (s.state != Impl::Slot::kFree && s.chunk.proc_id == proc_id) return true;
  return false;
}

}  // namespace lazycr::uffd
