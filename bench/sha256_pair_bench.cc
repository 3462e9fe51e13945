// sha256_pair (libipsec-mb's job manager, two messages in its lanes) against two libcrypto
// SHA-256 calls, at the sizes of frames (16 KiB compressed, 64 KiB raw), both sides of
// libipsec-mb 1.3's 65,534-byte job limit, and 1 MiB (bench/RESULTS.md, "SHA-256 pairs by
// libipsec-mb"). Bytes/s count both messages.
#include <benchmark/benchmark.h>

#include <vector>

#include "image-format/sha256_pair.h"

namespace {

using lazycr::image::kSha256Bytes;

std::vector<unsigned char> bytes(size_t n, unsigned seed) {
  std::vector<unsigned char> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned char>(i * seed + (i >> 9));
  return v;
}

void BM_Sha256Pair(benchmark::State& state) {
  const size_t n = state.range(0);
  const auto a = bytes(n, 7), b = bytes(n, 13);
  unsigned char oa[kSha256Bytes], ob[kSha256Bytes];
  for (auto _ : state) {
    lazycr::image::sha256_pair(a.data(), n, b.data(), n, oa, ob);
    benchmark::DoNotOptimize(oa);
    benchmark::DoNotOptimize(ob);
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 2 * n);
  state.SetLabel(lazycr::image::sha256_pair_multibuffer() ? "libipsec-mb" : "libcrypto");
}

void BM_TwoLibcrypto(benchmark::State& state) {
  const size_t n = state.range(0);
  const auto a = bytes(n, 7), b = bytes(n, 13);
  unsigned char oa[kSha256Bytes], ob[kSha256Bytes];
  for (auto _ : state) {
    lazycr::image::sha256_one(a.data(), n, oa);
    lazycr::image::sha256_one(b.data(), n, ob);
    benchmark::DoNotOptimize(oa);
    benchmark::DoNotOptimize(ob);
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 2 * n);
}

#define SIZES Arg(16384)->Arg(65534)->Arg(65536)->Arg(1 << 20)
BENCHMARK(BM_Sha256Pair)->SIZES;
BENCHMARK(BM_TwoLibcrypto)->SIZES;

}  // namespace

BENCHMARK_MAIN();
