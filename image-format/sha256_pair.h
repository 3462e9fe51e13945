// SHA-256 of two messages at once, their rounds interleaved on the CPU's SHA extensions.
//
// One SHA-256 is a chain of dependent rounds: on this machine's CPU (AMD EPYC, sha_ni) a single
// message waits on each round's latency and hashes at ~1.45 GB/s (OpenSSL's SHA-NI code, the
// same); two independent messages interleaved fill those waits, ~2.8 GB/s for both together
// (bench/RESULTS.md, "Frame digests two at a time"). The frame digests of a dump (two frames
// compressed at a time per thread) and of the drain (the whole frames of a prefetch chunk)
// are hashed in pairs; a fault's single frame is not.
#pragma once

#include <cstddef>

namespace lazycr::image {

inline constexpr size_t kSha256Bytes = 32;

// out_a = SHA-256(a[0, alen)), out_b = SHA-256(b[0, blen)); on a CPU without the SHA
// extensions, two calls of libcrypto's. Throws Error if libcrypto fails.
void sha256_pair(const void* a, size_t alen, const void* b, size_t blen, unsigned char* out_a,
                 unsigned char* out_b);
// The same for one message (libcrypto's).
void sha256_one(const void* data, size_t len, unsigned char* out);
// Whether sha256_pair interleaves (the CPU has the SHA extensions, SSSE3 and SSE4.1).
bool sha256_pair_interleaves();

}  // namespace lazycr::image
