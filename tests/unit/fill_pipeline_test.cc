// The fill pipeline's take-back (uffd/fill_pipeline.h): a chunk no worker took is given back
// to the loop once it has waited long enough, oldest first, and its buffer is free again. The
// pipeline is not started here, so no worker can take anything: what a machine too busy to
// run the SCHED_IDLE worker looks like to the loop.
#include "uffd/fill_pipeline.h"

#include <gtest/gtest.h>
#include <time.h>

namespace lazycr::uffd {
namespace {

constexpr uint64_t kChunk = 64 * 1024;

void sleep_ms(long ms) {
  timespec t{0, ms * 1'000'000};
  ::nanosleep(&t, nullptr);
}

TEST(FillPipeline, ChunksNoWorkerTookAreTakenBackOldestFirstOnceTheyWaited) {
  FillPipeline p(kChunk, 2, 1);
  EXPECT_EQ(p.longest_wait_ns(), -1);
  EXPECT_FALSE(p.take_back(0));
  p.queue(7, nullptr, 0x10000, 0x90000, kChunk);
  p.queue(8, nullptr, 0x20000, 0xa0000, kChunk);
  EXPECT_FALSE(p.can_queue());
  EXPECT_TRUE(p.busy(7));
  // Not yet: it has not waited for a second.
  EXPECT_FALSE(p.take_back(1'000'000'000));
  sleep_ms(5);
  EXPECT_GE(p.longest_wait_ns(), 5'000'000);
  auto c = p.take_back(1'000'000);
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
  c = p.take_back(0);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->proc_id, 8u);
  EXPECT_EQ(p.longest_wait_ns(), -1);
  EXPECT_FALSE(p.take_back(0));
  EXPECT_EQ(p.ready(), nullptr);
}

}  // namespace
}  // namespace lazycr::uffd
