// SHA-256 of two messages at once, by Intel's multi-buffer crypto library (libipsec-mb, Debian's
// libipsec-mb-dev): its job manager runs independent messages in parallel lanes (SHA-NI, AVX2
// or AVX512 code chosen at run time).
//
// One SHA-256 is a chain of dependent rounds: on this machine's CPU (AMD EPYC, sha_ni) a single
// message waits on each round's latency; two messages in lanes fill those waits
// (bench/RESULTS.md, "SHA-256 pairs by libipsec-mb"). The frame digests of a dump (two frames
// compressed at a time per thread) and of the drain (the whole frames of a prefetch chunk)
// are hashed in pairs; a fault's single frame is not.
#pragma once

#include <cstddef>

namespace lazycr::image {

inline constexpr size_t kSha256Bytes = 32;

// out_a = SHA-256(a[0, alen)), out_b = SHA-256(b[0, blen)). Either message libipsec-mb
// cannot take (over 65,534 bytes in 1.3), or both where it cannot run, is hashed by
// libcrypto. Thread-safe (one job manager per thread). Throws Error if libcrypto fails.
void sha256_pair(const void* a, size_t alen, const void* b, size_t blen, unsigned char* out_a,
                 unsigned char* out_b);
// The same for one message (libcrypto's).
void sha256_one(const void* data, size_t len, unsigned char* out);
// Whether sha256_pair runs two at once on this thread (libipsec-mb's job manager started).
bool sha256_pair_multibuffer();

}  // namespace lazycr::image
