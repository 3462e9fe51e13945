// The page server's prefetch: what it pushes when no fault waits (the working set first, then
// every process's owed pages in turn), read on the loop or decompressed ahead by the fill
// pipeline (uffd/fill_pipeline.h), and copied in pieces that wake nobody.
#include "uffd/page_server_impl.h"

namespace lazycr::uffd {

// The next chunk to prefetch, processes in turn, without taking it.
auto PageServer::Impl::peek_chunk() -> std::optional<Chunk> {
  note_working_set_done();
  if (procs.empty()) return std::nullopt;
  auto it = procs.upper_bound(rr_last);
  for (size_t n = 0; n < procs.size(); ++n, ++it) {
    if (it == procs.end()) it = procs.begin();
    Proc& p = *it->second;
    if (p.killed || p.gone || p.owed.empty()) continue;
    if (auto w = p.ws.next(p.owed, opt.prefetch_chunk)) {
      if (use_worker() && pipeline.overlaps(p.id, w->start, w->end - w->start)) continue;
      const uint64_t len = w->end - w->start;
      return Chunk{&p, w->start, w->src, len, w->tag == kTagZero, true, w->record_addr};
    }
    if (!opt.prefetch) continue;  // only the working set is pushed
    auto r = p.owed.next(p.cursor);
    if (!r) r = p.owed.first();
    const uint64_t s = std::max(r->start, p.cursor >= r->end ? r->start : p.cursor);
    const uint64_t len = std::min(r->end - s, opt.prefetch_chunk);
    if (use_worker() && pipeline.overlaps(p.id, s, len)) continue;
    return Chunk{&p, s, r->src_of(s), len, r->tag == kTagZero};
  }
  note_working_set_done();
  return std::nullopt;
}

void PageServer::Impl::note_working_set_done() {
  if (!ws_left) return;
  for (const auto& [id, p] : procs)
    if (p->ws.pending() && !p->killed && !p->gone) return;
  ws_left = false;
  stats.working_set_done_ns = since_start();
  log::info("page server: working set pushed: ", stats.working_set_pages, " pages in ",
            stats.working_set_done_ns / 1000, " us");
}

void PageServer::Impl::take_chunk(const Chunk& c) {
  c.proc->cursor = c.dst + c.len;
  rr_last = c.proc->id;
}

// Fills [dst, dst + len) of p as prefetch (the chunk must still be owed with source src),
// in pieces of at most prefetch_piece() bytes, none of which wakes anyone; the threads
// that waited in what was filled are woken once at the end (by the copy itself when it is
// one piece). `data(off, n)` gives the bytes of [dst + off, dst + off + n) (unused for a ZERO
// chunk). Between pieces, a fault outside the chunk, a layout event or a message for another
// process stops it: they wait for one piece at most, not for the chunk. A thread faulting
// inside the chunk (reading just behind prefetch) waits for its end instead: woken once per
// chunk, not once per piece (each wake-up costs the server ~8 us here, too much per 128 KiB).
// Returns the bytes filled.
template <typename Data>
uint64_t PageServer::Impl::prefetch_fill(Proc& p, uint64_t dst, uint64_t src, uint64_t len,
                                         bool zero, const Data& data) {
  const auto r = p.owed.find(dst);
  if (!r || r->src_of(dst) != src || (r->tag == kTagZero) != zero) return 0;  // stale
  len = std::min(len, r->end - dst);
  const size_t queued = p.faults.size();
  uint64_t done = 0;
  // A chunk of one piece (the working set's runs, mostly) wakes with its copy: one ioctl
  // less per run.
  const bool one_piece = len <= prefetch_piece(now_ns(), last_fault_ns);
  while (done < len) {
    const uint64_t n = std::min(prefetch_piece(now_ns(), last_fault_ns), len - done);
    bool lost = false;
    const uint64_t got = fill_quietly(p.uffd, p.owed, stats, dst + done, n, zero,
                                      zero ? nullptr : data(done, n), lost, one_piece);
    if (lost) gone(p);
    done += got;
    if (got < n || p.gone || done == len || interrupted(p, dst, dst + len)) break;
  }
  if (done > 0 && !p.gone) {
    if (!one_piece) p.uffd.wake(dst, done);
    // Faults read meanwhile on pages now filled were answered by that wake.
    for (size_t i = queued; i < p.faults.size();) {
      const uint64_t a = p.faults[i].first.arg.pagefault.address;
      if (a >= dst && a < dst + done) {
        ++stats.prefetch_waits;
        p.faults.erase(p.faults.begin() + static_cast<long>(i));
      } else {
        ++i;
      }
    }
  }
  if (done < len) p.cursor = dst + done;  // a stopped chunk goes on from there
  note_if_all_served();
  return done;
}

// Between two pieces of a prefetch chunk of p covering [lo, hi): must it stop? Yes for a
// message on another process's uffd, a layout event of p, or a fault of p outside the
// chunk (p's messages are read here: faults are queued for the loop, events applied).
bool PageServer::Impl::interrupted(Proc& p, uint64_t lo, uint64_t hi) {
  pfds.clear();
  for (const auto& [id, q] : procs)
    if (!q->gone && q->uffd.valid()) pfds.push_back(pollfd{q->uffd.fd(), POLLIN, 0});
  if (::poll(pfds.data(), pfds.size(), 0) <= 0) return false;
  bool mine = false;
  for (const pollfd& f : pfds) {
    if (f.revents == 0) continue;
    if (f.fd != p.uffd.fd()) return true;
    mine = true;
  }
  if (!mine || p.killed) return false;
  const uint64_t events = events_seen();
  const size_t queued = p.faults.size();
  pull(p);
  if (events_seen() != events || p.gone) return true;
  for (size_t i = queued; i < p.faults.size(); ++i) {
    const uint64_t a = p.faults[i].first.arg.pagefault.address;
    if (a < lo || a >= hi) return true;
  }
  return false;
}

// A message (a fault, an event) waits on some process's uffd.
bool PageServer::Impl::messages_waiting() {
  pfds.clear();
  for (const auto& [id, q] : procs)
    if (!q->gone && q->uffd.valid()) pfds.push_back(pollfd{q->uffd.fd(), POLLIN, 0});
  return ::poll(pfds.data(), pfds.size(), 0) > 0;
}

uint64_t PageServer::Impl::events_seen() const {
  return stats.events_fork + stats.events_remap + stats.events_remove + stats.events_unmap;
}

void PageServer::Impl::start_worker() {
  if (!use_worker() || pipeline.started()) return;
  pipeline.start();
  watch(pipeline.ready_fd(), kWorkerKey);
}

void PageServer::Impl::stop_worker() {
  if (pipeline.started()) unwatch(pipeline.ready_fd());
  pipeline.stop();
}

// Hands DATA chunks to the pipeline while it has free buffers; a ZERO chunk met on the way
// is filled here (once per call). Not the working set: it is wanted now, read here a run at a
// time; handed over, one wake-up per run of a few pages let node's push reach 224 of its
// 13,000 pages before node faulted on the rest (bench/RESULTS.md, "Decompress-ahead in real
// restores").
void PageServer::Impl::feed_worker() {
  while (pipeline.can_queue()) {
    auto c = peek_chunk();
    if (!c || c->ws) return;
    take_chunk(*c);
    if (c->zero) {
      prefetch_fill(*c->proc, c->dst, c->src, c->len, true,
                    [](uint64_t, uint64_t) { return static_cast<const char*>(nullptr); });
      return;
    }
    pipeline.queue(c->proc->id, c->proc->store, c->dst, c->src, c->len);
  }
}

// Whether prefetch has something to do right now without waiting for the pipeline.
bool PageServer::Impl::prefetch_ready() {
  if (recorder && recorder->active()) return false;  // recording: faults only
  if (!opt.prefetch) return ws_left && peek_chunk().has_value();
  if (pipelined()) {
    if (pipeline.ready() != nullptr) return true;
    if (faults_quiet()) return pipeline.take_back_due() || (pipeline.can_queue() && peek_chunk());
  }
  return peek_chunk().has_value();
}

// One prefetch fill (about prefetch_chunk bytes), then back to the loop.
void PageServer::Impl::prefetch_step() {
  const FillPipeline::Chunk* j = pipelined() ? pipeline.ready() : nullptr;
  if (pipelined() && (j != nullptr || faults_quiet())) {
    if (faults_quiet()) feed_worker();  // decompressed while this chunk is copied
    if (j == nullptr) {
      if (auto c = pipeline.take_back()) {
        auto it = procs.find(c->proc_id);
        if (it != procs.end()) fill_direct(Chunk{it->second.get(), c->dst, c->src, c->len, false});
      }
      return;
    }
    auto it = procs.find(j->proc_id);
    Proc* p = it == procs.end() ? nullptr : it->second.get();
    if (p != nullptr && !p->killed && !p->gone) {
      try {
        fill_ready(*p, *j);
      } catch (const std::exception& e) {
        kill(*p, e.what());
      }
    }
    pipeline.release(j);
    if (std::exchange(stop_mid_prefetch, false)) ::kill(::getpid(), SIGSTOP);  // (see below)
    return;
  }
  auto c = peek_chunk();
  if (!c) return;
  take_chunk(*c);
  fill_direct(*c);
  // The working set is mostly runs of a page or two (node: 9,931 runs for 13,110 pages): a
  // loop round per run cost more than its copy. More runs in this step, while no message
  // waits (looked for every few runs: a fault waits behind a few pages at most).
  for (int k = 1; c->ws && k < kWorkingSetRunsPerStep; ++k) {
    if (k % 8 == 0 && messages_waiting()) break;
    c = peek_chunk();
    if (!c || !c->ws) break;
    take_chunk(*c);
    fill_direct(*c);
  }
  // Tests (LAZYCR_FAULT_INJECT=server-stop-mid-prefetch): stopped after one chunk, pages
  // still owed, for a test to kill the server and its guardian in a chosen order.
  if (std::exchange(stop_mid_prefetch, false)) ::kill(::getpid(), SIGSTOP);
}

// Fills chunk c on the loop thread, reading it piece by piece straight from its store.
void PageServer::Impl::fill_direct(const Chunk& c) {
  Proc& p = *c.proc;
  if (p.killed || p.gone) return;
  try {
    if (!prefetch_buf) prefetch_buf.reset(new char[kPrefetchPieceQuiet]);
    const uint64_t before = stats.prefetch_pages + stats.zero_pages;
    prefetch_fill(p, c.dst, c.src, c.len, c.zero, [&](uint64_t off, uint64_t n) {
      if (c.ws && p.ws_pages && read_record_pages(p, c.record_addr + off, n))
        return static_cast<const char*>(prefetch_buf.get());
      direct.read(*p.store, c.src + off, n / kPage, prefetch_buf.get());
      return static_cast<const char*>(prefetch_buf.get());
    });
    if (c.ws) stats.working_set_pages += stats.prefetch_pages + stats.zero_pages - before;
  } catch (const std::exception& e) {
    kill(p, e.what());
  }
}

// n bytes of p's record pages from `addr` into prefetch_buf. They are only a faster copy of
// pages the store holds: when they cannot be read (a damaged frame), the store serves the
// rest of the working set.
bool PageServer::Impl::read_record_pages(Proc& p, uint64_t addr, uint64_t n) {
  try {
    direct.read(*p.ws_pages, addr, n / kPage, prefetch_buf.get());
    stats.working_set_record_pages += n / kPage;
    return true;
  } catch (const std::exception& e) {
    log::warn("page server: ", p.name(), ": record pages ignored from now on (the page store ",
              "serves the working set): ", e.what());
    p.ws_pages.reset();
    return false;
  }
}

// A ready chunk of p: every part of it still owed from the same source is filled, not only
// a first part (faults served meanwhile split it: a chunk dropped at its first hole was
// decompressed again later, 2.7-3.0 GiB for 2 GiB read in order, bench/RESULTS.md "Restore
// (lazy)"). Stops where a fill stops (interrupted, or unusual): the rest stays owed.
void PageServer::Impl::fill_ready(Proc& p, const FillPipeline::Chunk& j) {
  for (const OwedRange& r : p.owed.still_owed(j.dst, j.len, j.src, kTagData)) {
    if (p.gone || p.killed) return;
    if (!j.error.empty()) fail(j.error);
    const char* buf = j.data + (r.start - j.dst);
    if (prefetch_fill(p, r.start, r.src, r.end - r.start, false,
                      [buf](uint64_t off, uint64_t) { return buf + off; }) < r.end - r.start)
      return;
  }
}

}  // namespace lazycr::uffd
