// The working-set record (uffd/working_set.h): encode/parse, every way a file is refused, the
// checks against the image (store digest, pages outside the lazy areas), the recorder's
// order and de-duplication, the push order, the record pages, and the queue's order and
// trimming.
#include "uffd/working_set.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <boost/filesystem.hpp>
#include <cstring>
#include <fstream>

#include "common/error.h"

namespace lazycr::uffd {
namespace {

constexpr uint64_t P = 4096;

WorkingSetRecord sample() {
  WorkingSetRecord rec;
  ProcessWorkingSet p;
  p.image_pid = 42;
  p.store_digest = std::string(32, 'd');
  p.runs = {{0x20000, 2}, {0x10000, 1}, {0x40000, 8}};
  rec.processes.push_back(p);
  return rec;
}

std::string refusal(const std::string& bytes) {
  try {
    parse_working_set(bytes);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The file with its SHA-256 recomputed (a tool writing a bad record on purpose can always do
// that: the bounds must hold on their own).
std::string resum(std::string b) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  const std::string payload = b.substr(kWorkingSetHeaderBytes);
  EVP_Digest(payload.data(), payload.size(), md, &len, EVP_sha256(), nullptr);
  b.replace(24, 32, reinterpret_cast<const char*>(md), 32);
  return b;
}

// The record's file with `bytes` bytes of its payload at `payload_off` set to `value`.
// Payload offsets: process count 0, first process at 8 (pid 8, run count 12, store digest
// 16..48, record pages digest 48..80, push slice 80, zero 84), its runs from 88 (start, pages:
// 16 bytes each).
std::string edited(const WorkingSetRecord& rec, size_t payload_off, uint64_t value, int bytes) {
  std::string b = encode_working_set(rec);
  for (int i = 0; i < bytes; i++)
    b[kWorkingSetHeaderBytes + payload_off + i] = static_cast<char>(value >> (8 * i));
  return b;
}

TEST(WorkingSet, RoundTrip) {
  const WorkingSetRecord rec = sample();
  const WorkingSetRecord back = parse_working_set(encode_working_set(rec));
  ASSERT_EQ(back.processes.size(), 1u);
  EXPECT_EQ(back.processes[0].image_pid, 42);
  EXPECT_EQ(back.processes[0].store_digest, std::string(32, 'd'));
  EXPECT_EQ(back.processes[0].runs, rec.processes[0].runs);  // order kept
  EXPECT_EQ(back.pages(), 11u);
}

TEST(WorkingSet, KeepsTheRecordPagesDigestAndReadsVersion1) {
  WorkingSetRecord rec = sample();
  rec.processes[0].pages_digest = std::string(32, 'r');
  rec.processes[0].push_slice_pages = 77;
  const WorkingSetRecord back = parse_working_set(encode_working_set(rec));
  EXPECT_EQ(back.processes[0].pages_digest, std::string(32, 'r'));
  EXPECT_EQ(back.processes[0].push_slice_pages, 77u);
  // Version 1: no record pages digest nor push slice (the 40 bytes after the store digest).
  rec.processes[0].pages_digest.clear();
  std::string b = encode_working_set(rec);
  b.erase(kWorkingSetHeaderBytes + 48, 40);
  b[8] = 1;
  const uint64_t size = b.size() - kWorkingSetHeaderBytes;
  for (int i = 0; i < 8; i++) b[16 + i] = static_cast<char>(size >> (8 * i));
  const WorkingSetRecord v1 = parse_working_set(resum(b));
  ASSERT_EQ(v1.processes.size(), 1u);
  EXPECT_EQ(v1.processes[0].store_digest, std::string(32, 'd'));
  EXPECT_EQ(v1.processes[0].pages_digest, "");
  EXPECT_EQ(v1.processes[0].push_slice_pages, 1u);  // pushed in the record's own order
  EXPECT_EQ(v1.processes[0].runs, rec.processes[0].runs);
}

// The record pages: the process's recorded pages in push order, read back as the push reads
// them; refused when they are not this record's.
TEST(WorkingSet, RecordPagesHoldTheRecordsPagesInItsOrder) {
  namespace fs = boost::filesystem;
  const fs::path dir = fs::temp_directory_path() / fs::unique_path("ws-pages-%%%%%%");
  fs::create_directories(dir);
  const std::string store_path = (dir / "pages-9.lzp").string();
  {
    image::PageStoreWriter w(store_path, image::PageStoreOptions{});
    std::string data(16 * P, '\0');
    for (size_t i = 0; i < 16; i++) std::memset(&data[i * P], static_cast<int>(0x10 + i), P);
    w.add_pages(0x10000, data.data(), 16);
    w.finish();
  }
  auto store = image::PageStoreReader::open(store_path);
  ProcessWorkingSet ws;
  ws.image_pid = 9;
  ws.store_digest = store->mac_digest();
  // 0x30000 is not in the store (a zero page of the area): written as zeros. One slice:
  // written in address order (push_order).
  ws.runs = {{0x18000, 2}, {0x30000, 1}, {0x11000, 1}};
  EXPECT_EQ(open_working_set_pages(dir.string(), ws), nullptr) << "no digest: no record pages";
  ws.pages_digest = write_working_set_pages(dir.string(), ws, *store);
  auto pages = open_working_set_pages(dir.string(), ws);
  ASSERT_NE(pages, nullptr);
  std::string got(4 * P, 'x');
  pages->read(0, 4, got.data());
  for (size_t i = 0; i < 4; i++) {
    const int want = i == 0 ? 0x11 : i == 1 ? 0x18 : i == 2 ? 0x19 : 0;
    EXPECT_EQ(got.substr(i * P, P), std::string(P, static_cast<char>(want))) << "page " << i;
  }
  auto refusal_of = [&](const ProcessWorkingSet& w) -> std::string {
    try {
      open_working_set_pages(dir.string(), w);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  ProcessWorkingSet other = ws;
  other.pages_digest = std::string(32, 'o');
  EXPECT_NE(refusal_of(other).find("not the pages of this record"), std::string::npos);
  other = ws;
  other.runs.push_back({0x40000, 1});  // a record of more pages (its digest forged)
  EXPECT_NE(refusal_of(other).find("holds 4 pages, the record 5"), std::string::npos);
  other = ws;
  other.image_pid = 10;  // no file
  EXPECT_NE(refusal_of(other).find("working-set-10.lzp"), std::string::npos);
  fs::remove_all(dir);
}

TEST(WorkingSet, RefusesDamagedFiles) {
  const std::string good = encode_working_set(sample());
  EXPECT_NE(refusal(good.substr(0, 20)).find("size"), std::string::npos);
  std::string b = good;
  b[0] = 'X';
  EXPECT_NE(refusal(b).find("not a working-set record"), std::string::npos);
  b = good;
  b[8] = 9;
  EXPECT_NE(refusal(b).find("version 9"), std::string::npos);
  b = good;
  b[good.size() - 1] ^= 1;
  EXPECT_NE(refusal(b).find("checksum mismatch"), std::string::npos);
  b = good + "x";
  EXPECT_NE(refusal(b).find("payload size"), std::string::npos);
}

TEST(WorkingSet, RefusesBadBoundsEvenWithAGoodChecksum) {
  const WorkingSetRecord rec = sample();
  EXPECT_NE(refusal(resum(edited(rec, 88, 0x20001, 8))).find("not page aligned"),
            std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 96, 0, 8))).find("empty"), std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 88, 0x0000800000000000ull, 8))).find("user space"),
            std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 96, 1ull << 40, 8))).find("user space"), std::string::npos);
  // Second run moved onto the first.
  EXPECT_NE(refusal(resum(edited(rec, 104, 0x21000, 8))).find("overlaps"), std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 12, 1000, 4))).find("do not fit"), std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 0, 7, 4))).find("do not fit"), std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 8, 0, 4))).find("bad or repeated"), std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 80, 0, 4))).find("push slice of 0"), std::string::npos);
  EXPECT_NE(refusal(resum(edited(rec, 12, 2, 4))).find("after the last process"),
            std::string::npos);
  EXPECT_EQ(refusal(resum(encode_working_set(rec))), "");
}

TEST(WorkingSet, CheckedAgainstTheImage) {
  const ProcessWorkingSet p = sample().processes[0];
  OwedSet owed;
  owed.insert(0x10000, 0x30000, 0x10000);
  owed.insert(0x40000, 0x48000, 0x40000, 1);
  EXPECT_NO_THROW(check_working_set(p, std::string(32, 'd'), owed));
  try {
    check_working_set(p, std::string(32, 'e'), owed);
    ADD_FAILURE() << "another image's record was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("another image"), std::string::npos) << e.what();
  }
  OwedSet smaller;
  smaller.insert(0x10000, 0x30000, 0x10000);
  smaller.insert(0x40000, 0x47000, 0x40000);  // the last page of the last run is not served
  try {
    check_working_set(p, std::string(32, 'd'), smaller);
    ADD_FAILURE() << "a page outside the lazy areas was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("page 0x47000"), std::string::npos) << e.what();
  }
}

TEST(WorkingSet, FileInTheImageDirectory) {
  namespace fs = boost::filesystem;
  const fs::path dir = fs::temp_directory_path() / fs::unique_path("ws-test-%%%%%%");
  fs::create_directories(dir);
  EXPECT_FALSE(read_working_set(dir.string()).has_value());
  write_working_set(dir.string(), sample());
  auto back = read_working_set(dir.string());
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->pages(), 11u);
  std::ofstream(working_set_path(dir.string()), std::ios::app) << "junk";
  try {
    read_working_set(dir.string());
    ADD_FAILURE() << "a damaged file was read";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(working_set_path(dir.string()) + ": payload size"),
              std::string::npos)
        << e.what();
  }
  fs::remove_all(dir);
}

TEST(WorkingSet, StorePathsNameTheProcess) {
  std::string dir;
  EXPECT_EQ(image_pid_of_store("/tmp/img/pages-123.lzp", &dir), 123);
  EXPECT_EQ(dir, "/tmp/img");
  EXPECT_EQ(image_pid_of_store("pages-7.lzp", &dir), 7);
  EXPECT_EQ(dir, ".");
  EXPECT_EQ(image_pid_of_store("/tmp/img/pages-12x.lzp"), 0);
  EXPECT_EQ(image_pid_of_store("/tmp/img/pages-0.lzp"), 0);
  EXPECT_EQ(image_pid_of_store("/tmp/img/inventory.pb"), 0);
}

TEST(WorkingSet, RecorderKeepsFirstTouchOrderOnce) {
  WorkingSetRecorder rec(10'000'000'000, 1'000'000'000);
  const boost::filesystem::path dir =
      boost::filesystem::temp_directory_path() / boost::filesystem::unique_path("ws-rec-%%%%%%");
  boost::filesystem::create_directories(dir);
  rec.add_process(1, (dir / "pages-9.lzp").string(), std::string(32, 's'));
  rec.note(1, 0x50000, 0x51000, 0);  // before start(): not recorded
  rec.start(100);
  EXPECT_TRUE(rec.active());
  EXPECT_EQ(rec.deadline(), 100 + 10'000'000'000);
  rec.note(1, 0x30000, 0x31000, 200);
  rec.note(1, 0x31000, 0x32000, 300);  // extends the last run
  rec.note(1, 0x10000, 0x12000, 400);
  rec.note(1, 0x30000, 0x33000, 500);  // only 0x32000 is new
  rec.note(2, 0x90000, 0x91000, 600);  // a process not recorded (a forked child)
  EXPECT_EQ(rec.deadline(), 500 + 1'000'000'000);
  rec.finish("test");
  EXPECT_FALSE(rec.active());
  rec.wait();  // written on a thread of its own
  auto back = read_working_set(dir.string());
  ASSERT_TRUE(back.has_value());
  ASSERT_EQ(back->processes.size(), 1u);
  EXPECT_EQ(back->processes[0].image_pid, 9);
  const std::vector<WorkingSetRun> want = {{0x30000, 2}, {0x10000, 2}, {0x32000, 1}};
  EXPECT_EQ(back->processes[0].runs, want);
  boost::filesystem::remove_all(dir);
}

TEST(WorkingSet, PushOrderSortsEachSliceOfTheRecord) {
  // The first run fills the first slice (16 pages) alone; the three after it make the second
  // (32), sorted by address, the two contiguous ones merged.
  const std::vector<WorkingSetRun> record = {
      {0x1000000, kPushSlicePages}, {0x18000, 4}, {0x12000, 2}, {0x1c000, 8}};
  const std::vector<WorkingSetRun> want = {
      {0x1000000, kPushSlicePages}, {0x12000, 2}, {0x18000, 12}};
  EXPECT_EQ(push_order(record, kPushSlicePages), want);
  // A slice ends with the run that reaches kPushSlicePages: what follows is not sorted into it.
  const std::vector<WorkingSetRun> two = {
      {0x900000, kPushSlicePages - 1}, {0x800000, 1}, {0x10000, 1}};
  const std::vector<WorkingSetRun> two_pushed = {
      {0x900000, kPushSlicePages - 1}, {0x10000, 1}, {0x800000, 1}};
  EXPECT_EQ(push_order(two, kPushSlicePages), two_pushed);
  EXPECT_EQ(push_order({}, kPushSlicePages), std::vector<WorkingSetRun>{});
  // Slices grow 16, 32, 64, ... pages: 120 one-page runs touched downwards come back in
  // slices of 16, 32, 64 and the last 8, each upwards.
  std::vector<WorkingSetRun> down;
  for (uint64_t k = 0; k < 120; k++) down.push_back({0x10000000 - 2 * k * P, 1});
  std::vector<WorkingSetRun> down_pushed;
  for (const auto& [from, n] :
       std::vector<std::pair<size_t, size_t>>{{0, 16}, {16, 32}, {48, 64}, {112, 8}})
    for (size_t k = from + n; k-- > from;) down_pushed.push_back(down[k]);
  EXPECT_EQ(push_order(down, kPushSlicePages), down_pushed);
  // At most the record's slice: of 32 pages, the third is 32 too.
  down_pushed.clear();
  for (const auto& [from, n] :
       std::vector<std::pair<size_t, size_t>>{{0, 16}, {16, 32}, {48, 32}, {80, 32}, {112, 8}})
    for (size_t k = from + n; k-- > from;) down_pushed.push_back(down[k]);
  EXPECT_EQ(push_order(down, 32), down_pushed);
  // Slices of one page: the record's own order (version 1 records).
  EXPECT_EQ(push_order(record, 1), record);
}

TEST(WorkingSet, QueueFollowsThePushOrderAndSkipsWhatIsNotOwed) {
  OwedSet owed;
  owed.insert(0x10000, 0x20000, 0x110000);
  owed.insert(0x20000, 0x30000, 0x120000, 1);
  // One slice: pushed as 0x12000 +2 (record pages 0-1), then 0x18000 +12 (2-13).
  WorkingSetQueue q({{0x18000, 4}, {0x1c000, 8}, {0x12000, 2}}, kPushSlicePages);
  EXPECT_EQ(q.pages(), 14u);
  EXPECT_TRUE(q.contains(0x18000));
  EXPECT_TRUE(q.contains(0x23fff));
  EXPECT_FALSE(q.contains(0x24000));
  EXPECT_FALSE(q.contains(0x11000));
  owed.erase(0x18000, 0x19000);  // served by a fault meanwhile
  auto n = q.next(owed, 1 << 20);
  ASSERT_TRUE(n);
  EXPECT_EQ(n->start, 0x12000u);
  EXPECT_EQ(n->end, 0x14000u);
  EXPECT_EQ(n->src, 0x112000u);
  EXPECT_EQ(n->record_addr, 0u);
  owed.erase(n->start, n->end);
  n = q.next(owed, 1 << 20);
  ASSERT_TRUE(n);
  // What a fault took is skipped; the piece ends with the owed range.
  EXPECT_EQ(n->start, 0x19000u);
  EXPECT_EQ(n->end, 0x20000u);
  EXPECT_EQ(n->src, 0x119000u);
  EXPECT_EQ(n->record_addr, 3 * P);
  owed.erase(n->start, n->end);
  n = q.next(owed, 2 * P);
  ASSERT_TRUE(n);
  EXPECT_EQ(n->start, 0x20000u);
  EXPECT_EQ(n->end, 0x22000u);  // max_len
  EXPECT_EQ(n->tag, 1u);
  EXPECT_EQ(n->record_addr, 10 * P);
  owed.erase(0x20000, 0x24000);
  EXPECT_TRUE(q.pending());
  EXPECT_FALSE(q.next(owed, 1 << 20));
  EXPECT_FALSE(q.pending());
}

}  // namespace
}  // namespace lazycr::uffd
