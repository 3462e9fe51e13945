// sha256_pair (image-format/sha256_pair.h, libipsec-mb's job manager) against libcrypto's
// SHA-256 called here directly: every length 0..200 (all the padding cases: 55/56/64 bytes into
// a block, one and two final blocks), frame sizes, both sides of the 65,534-byte job limit,
// the two messages of different lengths (one lane finishes alone, or one message goes to
// libcrypto), and from several threads at once (one manager per thread).
#include "image-format/sha256_pair.h"

#include <cpuid.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace lazycr::image {
namespace {

std::string hex(const unsigned char* d) {
  static const char* x = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < kSha256Bytes; ++i) s += {x[d[i] >> 4], x[d[i] & 15]};
  return s;
}

std::string libcrypto_sha256(const unsigned char* data, size_t len) {
  unsigned char md[kSha256Bytes];
  unsigned int n = 0;
  if (EVP_Digest(data, len, md, &n, EVP_sha256(), nullptr) != 1 || n != kSha256Bytes)
    return "libcrypto failed";
  return hex(md);
}

std::vector<unsigned char> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<unsigned char> v(n);
  for (auto& c : v) c = static_cast<unsigned char>(rng());
  return v;
}

// Checks sha256_pair(a[0, la), b[0, lb)) against libcrypto; false (with a message) if not.
::testing::AssertionResult pair_matches(const std::vector<unsigned char>& a, size_t la,
                                        const std::vector<unsigned char>& b, size_t lb) {
  unsigned char pa[kSha256Bytes], pb[kSha256Bytes];
  sha256_pair(a.data(), la, b.data(), lb, pa, pb);
  const std::string ea = libcrypto_sha256(a.data(), la), eb = libcrypto_sha256(b.data(), lb);
  if (hex(pa) != ea || hex(pb) != eb)
    return ::testing::AssertionFailure() << "lengths " << la << " / " << lb << ": " << hex(pa)
                                         << " / " << hex(pb) << ", libcrypto " << ea << " / " << eb;
  return ::testing::AssertionSuccess();
}

TEST(Sha256Pair, MatchesLibcryptoAtEveryLengthTo200) {
  const auto a = random_bytes(256, 7), b = random_bytes(256, 8);
  for (size_t la = 0; la <= 200; ++la) {
    // b the same length, and lengths around a's (one lane ends a block or more before the other).
    for (size_t lb : {la, size_t{0}, size_t{55}, size_t{56}, size_t{64}, size_t{200}, la / 2})
      ASSERT_TRUE(pair_matches(a, la, b, lb));
  }
}

TEST(Sha256Pair, MatchesLibcryptoAtLargeSizes) {
  const auto a = random_bytes(1 << 20, 9), b = random_bytes(1 << 20, 10);
  // 65,534 bytes is libipsec-mb 1.3's largest hash job; above, libcrypto takes that message.
  const size_t lens[] = {1000,  4096,  16384, 16385, 65533,  65534,
                         65535, 65536, 65600, 98304, 1 << 20};
  for (size_t la : lens)
    for (size_t lb : lens) ASSERT_TRUE(pair_matches(a, la, b, lb));
  ASSERT_TRUE(pair_matches(a, 0, b, 1 << 20));
  ASSERT_TRUE(pair_matches(a, 1 << 20, b, 3));
}

TEST(Sha256Pair, SameBufferTwice) {
  const auto a = random_bytes(20000, 11);
  ASSERT_TRUE(pair_matches(a, a.size(), a, a.size()));
  ASSERT_TRUE(pair_matches(a, 100, a, a.size()));
}

TEST(Sha256Pair, ThreadsHashConcurrently) {
  const auto a = random_bytes(70000, 12), b = random_bytes(70000, 13);
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (size_t len = 0; len < 70000; len += 211 + t)
        if (!pair_matches(a, len, b, 70000 - len)) ++bad[t];
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
}

TEST(Sha256Pair, KnownAnswer) {
  // FIPS 180-2 appendix B.1 ("abc") and the empty message.
  unsigned char x[kSha256Bytes], y[kSha256Bytes];
  sha256_pair("abc", 3, "", 0, x, y);
  EXPECT_EQ(hex(x), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(y), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  sha256_one("abc", 3, x);
  EXPECT_EQ(hex(x), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256Pair, MultibufferWhereTheCpuHasTheShaExtensions) {
  // Where the CPU has them, libipsec-mb's SSE manager must run (else two libcrypto calls:
  // half the speed); elsewhere either is correct.
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool sha = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29)) != 0;
  if (!sha) GTEST_SKIP() << "no SHA extensions on this CPU";
  EXPECT_TRUE(sha256_pair_multibuffer());
}

}  // namespace
}  // namespace lazycr::image
