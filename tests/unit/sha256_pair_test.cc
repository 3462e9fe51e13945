// sha256_pair (image-format/sha256_pair.h) against libcrypto's SHA-256, at the lengths where
// the padding changes (55/56/64 bytes into a block) and at frame sizes, the two messages of
// different lengths (one lane finishes alone).
#include "image-format/sha256_pair.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace lazycr::image {
namespace {

std::string hex(const unsigned char* d) {
  static const char* x = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < kSha256Bytes; ++i) s += {x[d[i] >> 4], x[d[i] & 15]};
  return s;
}

TEST(Sha256Pair, MatchesLibcryptoAtEveryPaddingCase) {
  std::mt19937_64 rng(7);
  std::vector<unsigned char> a(70000), b(70000);
  for (auto& c : a) c = static_cast<unsigned char>(rng());
  for (auto& c : b) c = static_cast<unsigned char>(rng());
  const size_t lens[] = {0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 16384, 65536};
  for (size_t la : lens) {
    for (size_t lb : lens) {
      unsigned char pa[kSha256Bytes], pb[kSha256Bytes], ea[kSha256Bytes], eb[kSha256Bytes];
      sha256_pair(a.data(), la, b.data(), lb, pa, pb);
      sha256_one(a.data(), la, ea);
      sha256_one(b.data(), lb, eb);
      ASSERT_EQ(hex(pa), hex(ea)) << la << " / " << lb;
      ASSERT_EQ(hex(pb), hex(eb)) << la << " / " << lb;
    }
  }
}

TEST(Sha256Pair, KnownAnswer) {
  // FIPS 180-2 appendix B.1 ("abc") and the empty message.
  unsigned char x[kSha256Bytes], y[kSha256Bytes];
  sha256_pair("abc", 3, "", 0, x, y);
  EXPECT_EQ(hex(x), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(y), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

}  // namespace
}  // namespace lazycr::image
