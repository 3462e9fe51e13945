#include "uffd/working_set.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/json.h"
#include "common/log.h"
#include "image-format/image_mac.h"

namespace lazycr::uffd {
namespace {

constexpr uint64_t kPage = kOwedPage;
constexpr uint64_t kUserEnd = 0x0000800000000000ull;  // x86_64, 4-level paging

std::string sha256(const std::string& bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr) != 1 || len != 32)
    fail("working set: SHA-256 failed");
  return std::string(reinterpret_cast<const char*>(md), len);
}

void put(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; i++) out.push_back(static_cast<char>(v >> (8 * i)));
}

class Reader {
 public:
  explicit Reader(const std::string& b) : b_(b) {}
  uint64_t get(int bytes) {
    if (pos_ + static_cast<size_t>(bytes) > b_.size())
      fail("it ends early (", b_.size(), " bytes)");
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
      v |= static_cast<uint64_t>(static_cast<unsigned char>(b_[pos_ + i])) << (8 * i);
    pos_ += static_cast<size_t>(bytes);
    return v;
  }
  std::string take(size_t n) {
    if (pos_ + n > b_.size()) fail("it ends early (", b_.size(), " bytes)");
    std::string s = b_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  size_t left() const { return b_.size() - pos_; }

 private:
  const std::string& b_;
  size_t pos_ = 0;
};

// Adds [s, e) to a set of disjoint ranges; false when it overlaps one.
bool add_disjoint(std::map<uint64_t, uint64_t>& set, uint64_t s, uint64_t e) {
  auto it = set.upper_bound(s);
  if (it != set.end() && it->first < e) return false;
  if (it != set.begin() && std::prev(it)->second > s) return false;
  set.emplace(s, e);
  return true;
}

}  // namespace

uint64_t WorkingSetRecord::pages() const {
  uint64_t n = 0;
  for (const auto& p : processes)
    for (const auto& r : p.runs) n += r.pages;
  return n;
}

std::string encode_working_set(const WorkingSetRecord& record) {
  std::string payload;
  put(payload, record.processes.size(), 4);
  put(payload, 0, 4);
  for (const auto& p : record.processes) {
    if (p.store_digest.size() != 32) fail("working set: pid ", p.image_pid, ": bad store digest");
    put(payload, static_cast<uint32_t>(p.image_pid), 4);
    put(payload, p.runs.size(), 4);
    payload += p.store_digest;
    if (!p.pages_digest.empty() && p.pages_digest.size() != 32)
      fail("working set: pid ", p.image_pid, ": bad record pages digest");
    payload += p.pages_digest.empty() ? std::string(32, '\0') : p.pages_digest;
    if (p.push_slice_pages == 0) fail("working set: pid ", p.image_pid, ": push slice of 0 pages");
    put(payload, p.push_slice_pages, 4);
    put(payload, 0, 4);
    for (const auto& r : p.runs) {
      put(payload, r.start, 8);
      put(payload, r.pages, 8);
    }
  }
  std::string out(kWorkingSetMagic, 8);
  put(out, kWorkingSetVersion, 4);
  put(out, 0, 4);
  put(out, payload.size(), 8);
  out += sha256(payload);
  out += payload;
  return out;
}

WorkingSetRecord parse_working_set(const std::string& bytes) {
  if (bytes.size() < kWorkingSetHeaderBytes || bytes.size() > kMaxWorkingSetBytes)
    fail("size ", bytes.size(), " is not within ", kWorkingSetHeaderBytes, "..",
         kMaxWorkingSetBytes);
  if (std::memcmp(bytes.data(), kWorkingSetMagic, 8) != 0) fail("it is not a working-set record");
  Reader h(bytes);
  h.take(8);
  const uint64_t version = h.get(4);
  if (version != kWorkingSetVersion && version != 1)
    fail("version ", version, ", this lazycr reads 1 and ", kWorkingSetVersion);
  if (h.get(4) != 0) fail("unknown flags");
  const uint64_t size = h.get(8);
  if (size != bytes.size() - kWorkingSetHeaderBytes)
    fail("payload size ", size, " but the file holds ", bytes.size() - kWorkingSetHeaderBytes);
  const std::string digest = h.take(32);
  const std::string payload = bytes.substr(kWorkingSetHeaderBytes);
  if (sha256(payload) != digest) fail("checksum mismatch (the file is damaged)");
  Reader r(payload);
  WorkingSetRecord rec;
  const uint64_t nproc = r.get(4);
  r.get(4);
  const uint64_t proc_bytes = version == 1 ? 40 : 80;
  if (nproc > r.left() / proc_bytes) fail(nproc, " processes do not fit in the file");
  std::map<int32_t, bool> pids;
  for (uint64_t i = 0; i < nproc; i++) {
    ProcessWorkingSet p;
    p.image_pid = static_cast<int32_t>(r.get(4));
    if (p.image_pid <= 0 || pids[p.image_pid]) fail("pid ", p.image_pid, " is bad or repeated");
    pids[p.image_pid] = true;
    const uint64_t nruns = r.get(4);
    p.store_digest = r.take(32);
    if (version >= 2) {
      p.pages_digest = r.take(32);
      if (p.pages_digest == std::string(32, '\0')) p.pages_digest.clear();
      const uint64_t slice = r.get(4);
      if (slice == 0 || slice > kMaxWorkingSetPages)
        fail("pid ", p.image_pid, ": push slice of ", slice, " pages");
      p.push_slice_pages = static_cast<uint32_t>(slice);
      r.get(4);
    } else {
      p.push_slice_pages = 1;
    }
    if (nruns > r.left() / 16) fail("pid ", p.image_pid, ": ", nruns, " runs do not fit");
    std::map<uint64_t, uint64_t> seen;
    uint64_t pages = 0;
    for (uint64_t k = 0; k < nruns; k++) {
      WorkingSetRun run{r.get(8), r.get(8)};
      if (run.start % kPage || run.pages == 0 || run.start >= kUserEnd ||
          run.pages > (kUserEnd - run.start) / kPage)
        fail("pid ", p.image_pid, ": run ", hex(run.start), " of ", run.pages,
             " pages is not page aligned, empty or beyond user space");
      if (!add_disjoint(seen, run.start, run.end()))
        fail("pid ", p.image_pid, ": run ", hex(run.start), " overlaps another");
      pages += run.pages;
      if (pages > kMaxWorkingSetPages)
        fail("pid ", p.image_pid, ": more than ", kMaxWorkingSetPages, " pages");
      p.runs.push_back(run);
    }
    rec.processes.push_back(std::move(p));
  }
  if (r.left() != 0) fail(r.left(), " bytes after the last process");
  return rec;
}

std::string working_set_path(const std::string& image_dir) {
  return cat(image_dir, "/", image::kWorkingSetFile);
}

std::string working_set_pages_path(const std::string& image_dir, int32_t image_pid) {
  return cat(image_dir, "/", image::kWorkingSetPagesPrefix, image_pid, ".lzp");
}

std::string write_working_set_pages(const std::string& image_dir, const ProcessWorkingSet& ws,
                                    const image::PageStoreReader& store) {
  const std::string path = working_set_pages_path(image_dir, ws.image_pid);
  const std::string tmp = cat(path, ".tmp-", ::getpid());
  // LZ4: the push decompresses these while the process runs, where LZ4 is 2-3x zstd's speed;
  // their size matters little (a few MiB).
  image::PageStoreOptions o;
  o.compression = image::PageIndex::LZ4;
  o.level = image::kLz4Acceleration;
  o.threads = 1;
  image::PageStoreStats stats;
  {
    image::PageStoreWriter w(tmp, o);
    constexpr size_t kBatch = 64;
    std::unique_ptr<char[]> buf(new char[kBatch * kPage]);
    uint64_t record_page = 0;
    for (const WorkingSetRun& run : push_order(ws.runs, ws.push_slice_pages)) {
      for (uint64_t i = 0; i < run.pages;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(kBatch, run.pages - i));
        for (size_t k = 0; k < n; k++) {
          const uint64_t a = run.start + (i + k) * kPage;
          char* out = buf.get() + k * kPage;
          if (store.find(a))
            store.read(a, 1, out);
          else
            std::memset(out, 0, kPage);
        }
        w.add_pages(record_page * kPage, buf.get(), n);
        record_page += n;
        i += n;
      }
    }
    stats = w.finish();
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail_errno_value(err, cat("cannot write ", path));
  }
  return stats.mac_digest;
}

std::shared_ptr<const image::PageStoreReader> open_working_set_pages(const std::string& image_dir,
                                                                     const ProcessWorkingSet& ws) {
  if (ws.pages_digest.empty()) return nullptr;
  const std::string path = working_set_pages_path(image_dir, ws.image_pid);
  std::shared_ptr<const image::PageStoreReader> pages = image::PageStoreReader::open(path, 4);
  if (pages->mac_digest() != ws.pages_digest)
    fail(path, ": not the pages of this record (its digest differs)");
  if (!pages->has_frame_digests()) fail(path, ": its frames have no digests");
  // Page i of the record at i * 4096, every one DATA or ZERO: nothing to link, nothing missing.
  uint64_t expect = 0;
  for (const image::PageRun& run : pages->index().runs()) {
    if (run.start() != expect ||
        (run.kind() != image::PageRun::DATA && run.kind() != image::PageRun::ZERO))
      fail(path, ": page ", hex(expect), " is not a stored page of the record");
    expect += run.pages() * kPage;
  }
  uint64_t want = 0;
  for (const WorkingSetRun& r : ws.runs) want += r.pages;
  if (expect != want * kPage)
    fail(path, ": it holds ", expect / kPage, " pages, the record ", want);
  return pages;
}

std::optional<WorkingSetRecord> read_working_set(const std::string& image_dir) {
  const std::string path = working_set_path(image_dir);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return std::nullopt;
    fail_errno(path, ": cannot open");
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_errno(path, ": cannot stat");
  if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > kMaxWorkingSetBytes)
    fail(path, ": ", st.st_size, " bytes, more than ", kMaxWorkingSetBytes);
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::read(fd.get(), bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail_errno(path, ": cannot read");
    got += static_cast<size_t>(n);
  }
  try {
    return parse_working_set(bytes);
  } catch (const std::exception& e) {
    fail(path, ": ", e.what());
  }
}

void write_working_set(const std::string& image_dir, const WorkingSetRecord& record) {
  const std::string path = working_set_path(image_dir);
  const std::string tmp = cat(path, ".tmp-", ::getpid());
  const std::string bytes = encode_working_set(record);
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!fd) fail_errno("cannot create ", tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      fail_errno_value(err, cat("cannot write ", tmp));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail_errno_value(err, cat("cannot write ", path));
  }
}

void check_working_set(const ProcessWorkingSet& ws, const std::string& store_digest,
                       const OwedSet& owed) {
  if (ws.store_digest != store_digest)
    fail("pid ", ws.image_pid, ": it was recorded for another image (its page store differs)");
  for (const WorkingSetRun& run : ws.runs) {
    for (uint64_t a = run.start; a < run.end();) {
      const auto r = owed.find(a);
      if (!r)
        fail("pid ", ws.image_pid, ": page ", hex(a),
             " is not one the image serves lazily (outside its areas)");
      a = std::min(r->end, run.end());
    }
  }
}

int32_t image_pid_of_store(const std::string& store_path, std::string* dir) {
  const size_t slash = store_path.rfind('/');
  const std::string name = slash == std::string::npos ? store_path : store_path.substr(slash + 1);
  if (dir != nullptr) *dir = slash == std::string::npos ? "." : store_path.substr(0, slash);
  int pid = 0;
  char tail = 0;
  if (std::sscanf(name.c_str(), "pages-%d.lz%c", &pid, &tail) != 2 || tail != 'p' ||
      name != cat("pages-", pid, ".lzp") || pid <= 0)
    return 0;
  return pid;
}

std::vector<LoadedWorkingSet> load_working_set(const std::vector<WorkingSetTarget>& targets) {
  std::vector<LoadedWorkingSet> out(targets.size());
  if (targets.empty()) return out;
  std::string dir;
  image_pid_of_store(targets.front().store_path, &dir);
  try {
    std::optional<WorkingSetRecord> rec = read_working_set(dir);
    if (!rec) return out;
    std::map<int32_t, size_t> by_pid;
    for (size_t i = 0; i < targets.size(); i++)
      by_pid[image_pid_of_store(targets[i].store_path)] = i;
    for (const ProcessWorkingSet& p : rec->processes) {
      auto it = by_pid.find(p.image_pid);
      if (it == by_pid.end()) fail("pid ", p.image_pid, " is not a process this restore serves");
      const WorkingSetTarget& t = targets[it->second];
      check_working_set(p, t.store_digest, *t.owed);
    }
    const uint64_t pages = rec->pages();
    uint64_t with_pages = 0;
    for (ProcessWorkingSet& p : rec->processes) {
      LoadedWorkingSet& l = out[by_pid[p.image_pid]];
      try {
        l.pages = open_working_set_pages(dir, p);
      } catch (const std::exception& e) {
        log::warn(e.what(),
                  ": record pages ignored (the record's order is pushed from the page "
                  "store)");
      }
      if (l.pages) with_pages += l.pages->index().data_pages() + l.pages->index().zero_pages();
      l.runs = std::move(p.runs);
      l.push_slice_pages = p.push_slice_pages;
    }
    log::debug("working set: ", pages, " pages from ", working_set_path(dir), ", ", with_pages,
               " of them from their record pages");
  } catch (const std::exception& e) {
    std::string what = e.what();
    const std::string path = working_set_path(dir);
    if (what.rfind(path + ": ", 0) == 0) what = what.substr(path.size() + 2);
    log::warn(path, ": working set ignored (pages are fetched in the usual order): ", what);
    for (auto& v : out) v = LoadedWorkingSet{};
  }
  return out;
}

// ---- WorkingSetQueue ---------------------------------------------------------------------------

std::vector<WorkingSetRun> push_order(const std::vector<WorkingSetRun>& record,
                                      uint64_t slice_pages) {
  slice_pages = std::max<uint64_t>(slice_pages, 1);
  std::vector<WorkingSetRun> out;
  out.reserve(record.size());
  uint64_t slice = std::min(kFirstPushSlicePages, slice_pages);
  for (size_t i = 0; i < record.size(); slice = std::min(2 * slice, slice_pages)) {
    const size_t first = out.size();
    for (uint64_t pages = 0; i < record.size() && pages < slice; ++i) {
      out.push_back(record[i]);
      pages += record[i].pages;
    }
    std::sort(out.begin() + static_cast<long>(first), out.end(),
              [](const WorkingSetRun& a, const WorkingSetRun& b) { return a.start < b.start; });
    size_t kept = first;
    for (size_t k = first; k < out.size(); ++k) {
      if (kept > first && out[kept - 1].end() == out[k].start)
        out[kept - 1].pages += out[k].pages;
      else
        out[kept++] = out[k];
    }
    out.resize(kept);
  }
  return out;
}

WorkingSetQueue::WorkingSetQueue(const std::vector<WorkingSetRun>& record, uint64_t slice_pages) {
  for (const WorkingSetRun& r : push_order(record, slice_pages)) {
    by_start_[r.start] = r.end();
    Run run;
    run.start = r.start;
    run.pages = r.pages;
    run.record_page = pages_;
    runs_.push_back(run);
    pages_ += r.pages;
  }
}

std::optional<WorkingSetPiece> WorkingSetQueue::next(const OwedSet& owed, uint64_t max_len) {
  while (pos_ < runs_.size()) {
    Run& run = runs_[pos_];
    const auto r = owed.next(run.start);
    if (r && r->start < run.end()) {
      const uint64_t s = std::max(r->start, run.start);
      // What is before s in this run is owed no more: it goes.
      run.record_page += (s - run.start) / kPage;
      run.pages = (run.end() - s) / kPage;
      run.start = s;
      WorkingSetPiece out;
      static_cast<OwedRange&>(out) = *r;
      out.src = r->src_of(s);
      out.start = s;
      out.end = std::min({r->end, run.end(), s + std::max(max_len, kPage)});
      out.record_addr = run.record_page * kPage;
      return out;
    }
    ++pos_;
  }
  runs_.clear();
  pos_ = 0;
  return std::nullopt;
}

bool WorkingSetQueue::contains(uint64_t addr) const {
  auto it = by_start_.upper_bound(addr);
  return it != by_start_.begin() && std::prev(it)->second > addr;
}

// ---- WorkingSetRecorder ------------------------------------------------------------------------

WorkingSetRecorder::WorkingSetRecorder(int64_t max_ns, int64_t quiet_ns)
    : max_ns_(max_ns), quiet_ns_(quiet_ns) {}

void WorkingSetRecorder::add_process(uint64_t key, const std::string& store_path,
                                     std::string store_digest,
                                     std::shared_ptr<const image::PageStoreReader> store) {
  std::string dir;
  const int32_t pid = image_pid_of_store(store_path, &dir);
  if (pid <= 0) return;
  if (dir_.empty()) dir_ = dir;
  Proc& p = procs_[key];
  p.ws.image_pid = pid;
  p.ws.store_digest = std::move(store_digest);
  p.store = std::move(store);
}

void WorkingSetRecorder::start(int64_t now) {
  if (finished_) return;
  started_ = now;
  active_ = true;
}

void WorkingSetRecorder::note(uint64_t key, uint64_t start, uint64_t end, int64_t now) {
  if (!active_) return;
  auto it = procs_.find(key);
  if (it == procs_.end()) return;  // a forked child: not in the image
  last_fault_ = now;
  Proc& p = it->second;
  // The parts of [start, end) not recorded yet, in address order.
  uint64_t a = start;
  while (a < end && p.pages < kMaxWorkingSetPages) {
    const auto s = p.seen.upper_bound(a);
    if (s != p.seen.begin() && std::prev(s)->second > a) {
      a = std::prev(s)->second;
      continue;
    }
    const uint64_t e = s == p.seen.end() ? end : std::min(end, s->first);
    auto& runs = p.ws.runs;
    if (!runs.empty() && runs.back().end() == a) {
      p.seen[runs.back().start] = e;
      runs.back().pages += (e - a) / kPage;
    } else {
      runs.push_back(WorkingSetRun{a, (e - a) / kPage});
      p.seen[a] = e;
    }
    p.pages += (e - a) / kPage;
    a = e;
  }
}

int64_t WorkingSetRecorder::deadline() const {
  if (!active_) return -1;
  int64_t d = started_ + max_ns_;
  if (last_fault_ >= 0) d = std::min(d, last_fault_ + quiet_ns_);
  return d;
}

void WorkingSetRecorder::finish(const std::string& why) {
  if (finished_) return;
  finished_ = true;
  active_ = false;
  std::vector<Proc> procs;
  for (auto& [key, p] : procs_) procs.push_back(std::move(p));
  procs_.clear();
  writer_ = std::thread([procs = std::move(procs), dir = dir_, why]() mutable {
    sched_param sp{};
    ::sched_setscheduler(0, SCHED_IDLE, &sp);  // this thread: its work waits for the loop's
    WorkingSetRecord rec;
    uint64_t with_pages = 0;
    const int64_t t0 = monotonic_ns();
    for (Proc& p : procs) {
      if (p.store && !p.ws.runs.empty()) {
        try {
          p.ws.pages_digest = write_working_set_pages(dir, p.ws, *p.store);
          with_pages += p.pages;
        } catch (const std::exception& e) {
          log::warn("page server: the record pages of pid ", p.ws.image_pid,
                    " not written (the record's order alone is kept): ", e.what());
        }
      }
      rec.processes.push_back(std::move(p.ws));
    }
    try {
      write_working_set(dir, rec);
      log::info("page server: recorded a working set of ", rec.pages(), " pages (",
                rec.processes.size(), " process", rec.processes.size() == 1 ? "" : "es", ") in ",
                working_set_path(dir), ", ", with_pages, " of them also as record pages, in ",
                (monotonic_ns() - t0) / 1'000'000, " ms (", why, ")");
    } catch (const std::exception& e) {
      log::warn("page server: working set not recorded: ", e.what());
    }
  });
}

void WorkingSetRecorder::wait() {
  if (writer_.joinable()) writer_.join();
}

WorkingSetRecorder::~WorkingSetRecorder() {
  wait();
}

}  // namespace lazycr::uffd
