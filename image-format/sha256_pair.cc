#include "image-format/sha256_pair.h"

#include <cpuid.h>
#include <immintrin.h>
#include <openssl/evp.h>

#include <cstdint>
#include <cstring>

#include "common/error.h"

namespace lazycr::image {
namespace {

// The round constants and initial state of FIPS 180-4.
alignas(16) constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
constexpr uint32_t kInit[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#define LAZYCR_SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

// One lane's state in the SHA extensions' layout (ABEF, CDGH).
struct Lane {
  __m128i abef, cdgh;
};

LAZYCR_SHA_TARGET inline Lane lane_init() {
  __m128i s0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kInit));      // DCBA
  __m128i s1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kInit + 4));  // HGFE
  __m128i t = _mm_shuffle_epi32(s0, 0xB1);                                    // CDAB
  s1 = _mm_shuffle_epi32(s1, 0x1B);                                           // EFGH
  return {_mm_alignr_epi8(t, s1, 8), _mm_blend_epi16(s1, t, 0xF0)};
}

LAZYCR_SHA_TARGET inline void lane_out(const Lane& l, unsigned char* out) {
  __m128i t = _mm_shuffle_epi32(l.abef, 0x1B);   // FEBA
  __m128i s1 = _mm_shuffle_epi32(l.cdgh, 0xB1);  // DCHG
  __m128i s0 = _mm_blend_epi16(t, s1, 0xF0);     // DCBA
  s1 = _mm_alignr_epi8(s1, t, 8);                // HGFE
  const __m128i bswap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(s0, bswap));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_shuffle_epi8(s1, bswap));
}

// `Lanes` 64-byte blocks, one per lane, compressed into the lanes' states; written so that the
// compiler interleaves the lanes' independent round chains.
template <int Lanes>
LAZYCR_SHA_TARGET inline void blocks(Lane* l, const unsigned char* const* block) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bull, 0x0405060700010203ull);
  __m128i m[Lanes][4];
  Lane save[Lanes];
  for (int j = 0; j < Lanes; ++j) {
    save[j] = l[j];
    for (int q = 0; q < 4; ++q)
      m[j][q] = _mm_shuffle_epi8(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(block[j] + 16 * q)), bswap);
  }
#pragma GCC unroll 16
  for (int g = 0; g < 16; ++g) {
    const __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(kK + 4 * g));
    for (int j = 0; j < Lanes; ++j) {
      __m128i* q = m[j];
      if (g >= 4) {  // W[t] from W[t-16], W[t-15], W[t-7], W[t-2]
        const __m128i w7 = _mm_alignr_epi8(q[(g + 3) % 4], q[(g + 2) % 4], 4);
        q[g % 4] = _mm_sha256msg2_epu32(
            _mm_add_epi32(_mm_sha256msg1_epu32(q[g % 4], q[(g + 1) % 4]), w7), q[(g + 3) % 4]);
      }
      __m128i wk = _mm_add_epi32(q[g % 4], k);
      l[j].cdgh = _mm_sha256rnds2_epu32(l[j].cdgh, l[j].abef, wk);
      wk = _mm_shuffle_epi32(wk, 0x0E);
      l[j].abef = _mm_sha256rnds2_epu32(l[j].abef, l[j].cdgh, wk);
    }
  }
  for (int j = 0; j < Lanes; ++j) {
    l[j].abef = _mm_add_epi32(l[j].abef, save[j].abef);
    l[j].cdgh = _mm_add_epi32(l[j].cdgh, save[j].cdgh);
  }
}

// The padded tail of a message of `len` bytes whose full blocks are done: 1 or 2 blocks.
size_t tail(const unsigned char* p, size_t len, unsigned char* buf) {
  const size_t rest = len % 64;
  std::memset(buf, 0, 128);
  std::memcpy(buf, p + (len - rest), rest);
  buf[rest] = 0x80;
  const size_t n = rest < 56 ? 64 : 128;
  const uint64_t bits = static_cast<uint64_t>(len) * 8;
  for (int i = 0; i < 8; ++i) buf[n - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  return n / 64;
}

LAZYCR_SHA_TARGET void pair(const unsigned char* a, size_t alen, const unsigned char* b,
                            size_t blen, unsigned char* out_a, unsigned char* out_b) {
  Lane l[2] = {lane_init(), lane_init()};
  unsigned char ta[128], tb[128];
  const size_t na = alen / 64 + tail(a, alen, ta), nb = blen / 64 + tail(b, blen, tb);
  auto at = [](const unsigned char* p, size_t len, const unsigned char* t, size_t i) {
    return i < len / 64 ? p + 64 * i : t + 64 * (i - len / 64);
  };
  const size_t both = na < nb ? na : nb;
  for (size_t i = 0; i < both; ++i) {
    const unsigned char* blk[2] = {at(a, alen, ta, i), at(b, blen, tb, i)};
    blocks<2>(l, blk);
  }
  for (size_t i = both; i < na; ++i) {
    const unsigned char* blk[1] = {at(a, alen, ta, i)};
    blocks<1>(&l[0], blk);
  }
  for (size_t i = both; i < nb; ++i) {
    const unsigned char* blk[1] = {at(b, blen, tb, i)};
    blocks<1>(&l[1], blk);
  }
  lane_out(l[0], out_a);
  lane_out(l[1], out_b);
}

bool cpu_has_sha() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool sse = (c & (1u << 9)) && (c & (1u << 19));  // SSSE3, SSE4.1
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return sse && (b & (1u << 29));  // SHA
}

}  // namespace

bool sha256_pair_interleaves() {
  static const bool ok = cpu_has_sha();
  return ok;
}

void sha256_one(const void* data, size_t len, unsigned char* out) {
  unsigned int n = 0;
  if (EVP_Digest(data, len, out, &n, EVP_sha256(), nullptr) != 1 || n != kSha256Bytes)
    fail("libcrypto cannot compute a SHA-256");
}

void sha256_pair(const void* a, size_t alen, const void* b, size_t blen, unsigned char* out_a,
                 unsigned char* out_b) {
  if (!sha256_pair_interleaves()) {
    sha256_one(a, alen, out_a);
    sha256_one(b, blen, out_b);
    return;
  }
  pair(static_cast<const unsigned char*>(a), alen, static_cast<const unsigned char*>(b), blen,
       out_a, out_b);
}

}  // namespace lazycr::image
