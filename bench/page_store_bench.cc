// Page store benchmarks (RESULTS.md): write and random-read throughput and compression ratio
// for 256 MiB of random, semi-compressible and text-like pages at frame sizes
// 16/64/128/256 KiB and zstd levels 1/3, sequential-read throughput, and the latency of one
// random 4 KiB read with a cold and a warm frame cache (level 1), and the time
// PageStoreReader::open() takes on 64 MiB..2 GiB stores, dense (one DATA run) or sparse
// (DATA and ZERO runs of 1..15 pages alternating), in a fresh process and repeated.
//
// Stores are written to $LAZYCR_BENCH_DIR (default /dev/shm, tmpfs), one at a time.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "image-format/page_store.h"

namespace lazycr::image {
namespace {

constexpr size_t kStoreBytes = 256u << 20;
constexpr size_t kStorePages = kStoreBytes / kPageSize;
constexpr uint64_t kBaseAddr = 0x7f0000000000;
constexpr int kLatencyReads = 2000;

enum class Data { kRandom, kSemi, kText };
const char* data_name(Data d) {
  switch (d) {
    case Data::kRandom:
      return "random";
    case Data::kSemi:
      return "semi";
    default:
      return "text";
  }
}

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  void fill(unsigned char* p, size_t n) {
    for (size_t i = 0; i + 8 <= n; i += 8) {
      uint64_t v = next();
      std::memcpy(p + i, &v, 8);
    }
  }
};

// Text-like: words from a 4096-word vocabulary of random lowercase letters, skewed toward
// the frequent ones, with punctuation and line breaks.
void fill_text(unsigned char* p, size_t n, Rng& rng) {
  static const std::vector<std::string> vocab = [] {
    Rng r(99);
    std::vector<std::string> v;
    for (int i = 0; i < 4096; ++i) {
      std::string w(2 + r.next() % 9, ' ');
      for (char& c : w) c = static_cast<char>('a' + r.next() % 26);
      v.push_back(w);
    }
    return v;
  }();
  size_t i = 0;
  while (i < n) {
    uint64_t r = rng.next();
    uint64_t a = r & 4095, b = (r >> 12) & 4095;
    const std::string& w = vocab[a * b / 4096];  // skewed toward low indices
    for (char c : w) {
      if (i == n) break;
      p[i++] = static_cast<unsigned char>(c);
    }
    if (i < n) p[i++] = (r >> 24) % 13 == 0 ? '\n' : ((r >> 24) % 7 == 0 ? ',' : ' ');
  }
}

// The current data set: 256 MiB of one kind, generated on first use.
const std::vector<unsigned char>& data_set(Data d) {
  static Data current;
  static std::vector<unsigned char> bytes;
  if (bytes.empty() || current != d) {
    bytes.assign(kStoreBytes, 0);
    Rng rng(static_cast<uint64_t>(d) + 1);
    for (size_t p = 0; p < kStorePages; ++p) {
      unsigned char* page = bytes.data() + p * kPageSize;
      switch (d) {
        case Data::kRandom:
          rng.fill(page, kPageSize);
          break;
        case Data::kSemi:
          rng.fill(page, 1024);
          break;  // 1 KiB random, then zeros
        case Data::kText:
          fill_text(page, kPageSize, rng);
          break;
      }
    }
    current = d;
  }
  return bytes;
}

struct Config {
  Data data;
  uint32_t frame_size;
  int level;
  bool operator==(const Config& o) const {
    return data == o.data && frame_size == o.frame_size && level == o.level;
  }
};

std::string bench_dir() {
  const char* d = std::getenv("LAZYCR_BENCH_DIR");
  return d != nullptr ? d : "/dev/shm";
}

std::string store_path() {
  static const std::string path =
      bench_dir() + "/lazycr-page-store-bench-" + std::to_string(::getpid()) + ".lzp";
  return path;
}

PageStoreStats write_store(const Config& c) {
  const auto& bytes = data_set(c.data);
  PageStoreOptions o;
  o.frame_size = c.frame_size;
  o.level = c.level;
  o.threads = 0;
  PageStoreWriter w(store_path(), o);
  constexpr size_t kChunk = 256;  // 1 MiB per call, like a dump reading /proc/pid/mem
  for (size_t p = 0; p < kStorePages; p += kChunk)
    w.add_pages(kBaseAddr + p * kPageSize, bytes.data() + p * kPageSize, kChunk);
  return w.finish();
}

// The store on disk is the one for `c` (only one exists at a time).
void ensure_store(const Config& c) {
  static std::unique_ptr<Config> current;
  if (current && *current == c) return;
  write_store(c);
  current = std::make_unique<Config>(c);
}

void BM_Write(benchmark::State& state, Config c) {
  data_set(c.data);  // generate outside the timing
  PageStoreStats stats;
  for (auto _ : state) stats = write_store(c);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kStoreBytes));
  state.counters["ratio"] =
      static_cast<double>(kStoreBytes) / static_cast<double>(stats.file_bytes);
  ensure_store(c);  // marks the file as current (rewrites nothing if it already is)
}

void BM_RandomRead(benchmark::State& state, Config c) {
  ensure_store(c);
  auto r = PageStoreReader::open(store_path());
  std::mt19937_64 rng(1);
  std::vector<unsigned char> buf(kPageSize);
  for (auto _ : state) {
    r->read(kBaseAddr + (rng() % kStorePages) * kPageSize, 1, buf.data());
    benchmark::DoNotOptimize(buf.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kPageSize));
  state.counters["frames/read"] =
      static_cast<double>(r->frames_decompressed()) / static_cast<double>(state.iterations());
}

void BM_SequentialRead(benchmark::State& state, Config c) {
  ensure_store(c);
  std::vector<unsigned char> buf(1u << 20);
  for (auto _ : state) {
    auto r = PageStoreReader::open(store_path());
    for (size_t p = 0; p < kStorePages; p += 256)
      r->read(kBaseAddr + p * kPageSize, 256, buf.data());
    benchmark::DoNotOptimize(buf.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kStoreBytes));
}

// One random 4 KiB read, timed one by one. Cold: every read needs a frame that is not in the
// cache (a 1-frame cache, consecutive reads in different frames). Warm: 16 frames are read
// once first, then every read hits one of them.
void BM_Latency(benchmark::State& state, Config c, bool warm) {
  ensure_store(c);
  const auto& bytes = data_set(c.data);
  uint64_t frame_pages = c.frame_size / kPageSize;
  uint64_t nframes = kStorePages / frame_pages;
  std::vector<double> us(kLatencyReads);
  std::vector<unsigned char> buf(kPageSize);
  for (auto _ : state) {
    auto r = PageStoreReader::open(store_path(), warm ? 16 : 1);
    std::mt19937_64 rng(7);
    std::vector<uint64_t> hot;
    if (warm) {
      for (int i = 0; i < 16; ++i) hot.push_back(rng() % nframes);
      for (uint64_t f : hot) r->read(kBaseAddr + f * frame_pages * kPageSize, 1, buf.data());
    }
    uint64_t last_frame = UINT64_MAX;
    double total = 0;
    for (int i = 0; i < kLatencyReads; ++i) {
      uint64_t frame;
      if (warm) {
        frame = hot[rng() % hot.size()];
      } else {
        do frame = rng() % nframes;
        while (frame == last_frame);
      }
      last_frame = frame;
      uint64_t page = frame * frame_pages + rng() % frame_pages;
      auto t0 = std::chrono::steady_clock::now();
      r->read(kBaseAddr + page * kPageSize, 1, buf.data());
      auto t1 = std::chrono::steady_clock::now();
      us[i] = std::chrono::duration<double, std::micro>(t1 - t0).count();
      total += us[i];
      if (std::memcmp(buf.data(), bytes.data() + page * kPageSize, kPageSize) != 0) {
        state.SkipWithError("read returned wrong data");
        return;
      }
    }
    state.SetIterationTime(total / 1e6);
  }
  std::sort(us.begin(), us.end());
  state.counters["p50_us"] = us[us.size() / 2];
  state.counters["p99_us"] = us[us.size() * 99 / 100];
}

// open() on a store of `mib` MiB of pages: the lazy restore opens every store before the
// first instruction, so this must stay flat in the store's size. Content does not matter to
// open() (it reads no data frame): each data page holds its page number and zeros.
void write_open_store(const std::string& path, uint64_t mib, bool sparse) {
  PageStoreOptions o;  // default 64 KiB frames, level 1
  PageStoreWriter w(path, o);
  const uint64_t pages = mib << 20 >> 12;
  std::vector<unsigned char> chunk(256 * kPageSize);
  Rng rng(5);
  bool data = true;
  uint64_t left_in_run = 0;
  for (uint64_t p = 0; p < pages; p += 256) {
    std::memset(chunk.data(), 0, chunk.size());
    for (uint64_t i = 0; i < 256; ++i) {
      if (!sparse) {
        data = true;
      } else if (left_in_run == 0) {
        data = !data;
        left_in_run = 1 + rng.next() % 15;
      }
      if (sparse) --left_in_run;
      if (data) {
        uint64_t n = p + i + 1;
        std::memcpy(chunk.data() + i * kPageSize, &n, sizeof n);
      }
    }
    w.add_pages(kBaseAddr + p * kPageSize, chunk.data(), 256);
  }
  w.finish();
}

// One open() in this fresh process, printed as "<us> <minor faults>": what a restore pays.
int open_once(const char* path) {
  rusage u0, u1;
  ::getrusage(RUSAGE_SELF, &u0);
  auto t0 = std::chrono::steady_clock::now();
  auto r = PageStoreReader::open(path);
  auto t1 = std::chrono::steady_clock::now();
  ::getrusage(RUSAGE_SELF, &u1);
  std::printf("%.1f %ld\n", std::chrono::duration<double, std::micro>(t1 - t0).count(),
              u1.ru_minflt - u0.ru_minflt);
  return 0;
}

// Cold: open() in a new process each time (posix_spawn of this binary with --open-once), so
// every page the reader touches is a first touch, as in a restore. Warm: open() repeated in
// this process, whose allocator hands back memory touched by the previous open().
void BM_Open(benchmark::State& state, uint64_t mib, bool sparse) {
  const std::string path = store_path() + ".open";
  write_open_store(path, mib, sparse);
  char exe[4096];
  ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) {
    state.SkipWithError("readlink /proc/self/exe failed");
    return;
  }
  exe[n] = '\0';
  std::vector<double> cold, warm;
  double faults = 0;
  for (auto _ : state) {
    std::string cmd = std::string(exe) + " --open-once " + path;
    FILE* f = ::popen(cmd.c_str(), "r");
    double us = 0;
    long flt = 0;
    if (f == nullptr || std::fscanf(f, "%lf %ld", &us, &flt) != 2) {
      if (f != nullptr) ::pclose(f);
      state.SkipWithError("the --open-once child failed");
      return;
    }
    ::pclose(f);
    cold.push_back(us);
    faults = static_cast<double>(flt);
    state.SetIterationTime(us / 1e6);
  }
  size_t runs = 0, frames = 0;
  for (int i = 0; i < 20; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto r = PageStoreReader::open(path);
    auto t1 = std::chrono::steady_clock::now();
    warm.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    runs = static_cast<size_t>(r->index().runs_size());
    frames = static_cast<size_t>(r->frame_count());
  }
  ::unlink(path.c_str());
  std::sort(cold.begin(), cold.end());
  std::sort(warm.begin(), warm.end());
  state.counters["cold_min_us"] = cold.front();
  state.counters["cold_p50_us"] = cold[cold.size() / 2];
  state.counters["warm_p50_us"] = warm[warm.size() / 2];
  state.counters["faults"] = faults;
  state.counters["runs"] = static_cast<double>(runs);
  state.counters["frames"] = static_cast<double>(frames);
}

void register_all() {
  for (uint64_t mib : {64u, 512u, 2048u})
    for (bool sparse : {false, true})
      benchmark::RegisterBenchmark(
          (std::string("Open/") + (sparse ? "sparse" : "dense") + "/" + std::to_string(mib) + "MiB")
              .c_str(),
          BM_Open, mib, sparse)
          ->Iterations(15)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);

  for (Data d : {Data::kRandom, Data::kSemi, Data::kText}) {
    for (uint32_t kib : {16u, 64u, 128u, 256u}) {
      for (int level : {1, 3}) {
        Config c{d, kib * 1024, level};
        std::string suffix = std::string(data_name(d)) + "/frame:" + std::to_string(kib) +
                             "KiB/level:" + std::to_string(level);
        benchmark::RegisterBenchmark(("Write/" + suffix).c_str(), BM_Write, c)
            ->Iterations(3)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("RandomRead/" + suffix).c_str(), BM_RandomRead, c)
            ->MinTime(0.3)
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("SequentialRead/" + suffix).c_str(), BM_SequentialRead, c)
            ->Iterations(1)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
        if (level == 1) {
          for (bool warm : {false, true})
            benchmark::RegisterBenchmark(
                ((warm ? "LatencyWarm/" : "LatencyCold/") + suffix).c_str(), BM_Latency, c, warm)
                ->Iterations(1)
                ->UseManualTime()
                ->Unit(benchmark::kMicrosecond);
        }
      }
    }
  }
}

}  // namespace
}  // namespace lazycr::image

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--open-once") == 0)
    return lazycr::image::open_once(argv[2]);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  lazycr::image::register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  ::unlink(lazycr::image::store_path().c_str());
  return 0;
}
