// The fill pipeline's take-back (uffd/fill_pipeline.h): a chunk no worker took is given back
// to the loop once it has waited long enough, oldest first, and its buffer is free again; once
// one was, the next ones at once, until a worker makes a chunk ready again. A pipeline not
// started has no worker to take anything: what a machine too busy to run the SCHED_IDLE worker
// looks like to the loop.
#include "uffd/fill_pipeline.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "image-format/page_store.h"
#include "tests/unit/page_fixtures.h"

namespace lazycr::uffd {
namespace {

constexpr uint64_t kChunk = 64 * 1024;

// A chunk queued at `queued_ns` is not taken back before kTakeBackNs (with `take`: take_back()
// is asked too, and gets it if it was due). Asserted only when the check ran within
// kTakeBackNs of the queueing: a machine that preempts this test for a millisecond between the
// two proves nothing either way.
void expect_not_taken_back_yet(FillPipeline& p, int64_t queued_ns, bool take) {
  const bool due = p.take_back_due();
  const bool got = take && p.take_back().has_value();
  if (monotonic_ns() - queued_ns < FillPipeline::kTakeBackNs) {
    EXPECT_FALSE(due);
    EXPECT_FALSE(got);
  }
}

void sleep_ms(long ms) {
  timespec t{0, ms * 1'000'000};
  ::nanosleep(&t, nullptr);
}

TEST(FillPipeline, ChunksNoWorkerTookAreTakenBackOldestFirstOnceTheyWaited) {
  FillPipeline p(kChunk, 3, 1);
  EXPECT_FALSE(p.waiting());
  EXPECT_FALSE(p.take_back_due());
  EXPECT_FALSE(p.take_back());
  const int64_t queued = monotonic_ns();
  p.queue(7, nullptr, 0x10000, 0x90000, kChunk);
  p.queue(8, nullptr, 0x20000, 0xa0000, kChunk);
  expect_not_taken_back_yet(p, queued, false);
  EXPECT_TRUE(p.waiting());
  EXPECT_TRUE(p.busy(7));
  sleep_ms(FillPipeline::kTakeBackNs / 1'000'000 + 4);
  EXPECT_TRUE(p.take_back_due());
  auto c = p.take_back();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->proc_id, 7u);
  EXPECT_EQ(c->dst, 0x10000u);
  EXPECT_EQ(c->src, 0x90000u);
  EXPECT_EQ(c->len, kChunk);
  EXPECT_EQ(c->data, nullptr);  // nothing was read for it
  // Its buffer is free again, and the pipeline no longer counts it as in flight.
  EXPECT_TRUE(p.can_queue());
  EXPECT_FALSE(p.busy(7));
  EXPECT_FALSE(p.overlaps(7, 0x10000, kChunk));
  EXPECT_TRUE(p.overlaps(8, 0x20000, 4096));
  // The worker is starved now: a chunk queued just now is taken back at once.
  p.queue(9, nullptr, 0x30000, 0xb0000, kChunk);
  c = p.take_back();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->proc_id, 8u);
  c = p.take_back();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->proc_id, 9u);
  EXPECT_FALSE(p.waiting());
  EXPECT_FALSE(p.take_back());
  EXPECT_EQ(p.ready(), nullptr);
}

TEST(FillPipeline, AWorkerThatRunsEndsTheTakeBacks) {
  test::TempDir dir;
  const std::string path = dir.file("pages.lzp");
  {
    image::PageStoreWriter w(path, image::PageStoreOptions{});
    std::vector<char> page(4096, 'x');
    for (uint64_t a = 0x20000; a < 0x20000 + kChunk; a += 4096) w.add_pages(a, page.data(), 1);
    w.finish();
  }
  std::shared_ptr<const image::PageStoreReader> store = image::PageStoreReader::open(path);
  FillPipeline p(kChunk, 2, 1);
  p.queue(1, nullptr, 0x10000, 0x90000, kChunk);
  sleep_ms(FillPipeline::kTakeBackNs / 1'000'000 + 4);
  ASSERT_TRUE(p.take_back());  // starved from now on
  p.queue(2, store, 0x20000, 0x20000, kChunk);
  p.start();
  const FillPipeline::Chunk* r = nullptr;
  for (int i = 0; i < 5000 && (r = p.ready()) == nullptr; i++) sleep_ms(1);
  ASSERT_NE(r, nullptr) << "the worker never made the chunk ready";
  EXPECT_EQ(r->proc_id, 2u);
  EXPECT_EQ(r->error, "");
  EXPECT_EQ(r->data[4096 * 3], 'x');
  p.release(r);
  p.stop();  // no worker from here on
  const int64_t queued = monotonic_ns();
  p.queue(3, nullptr, 0x30000, 0xb0000, kChunk);
  expect_not_taken_back_yet(p, queued, true);  // not starved any more: it must wait again
}

}  // namespace
}  // namespace lazycr::uffd
