// Loading libcrypto's SHA-256 ahead of its first use (page_store.cc computes the digests).
#pragma once

namespace lazycr::image {

// Loads libcrypto's SHA-256 (configuration and providers: 1.5 ms on first use, 10+ ms on a
// loaded machine): a thread does it while the restore reads the image's other files; the first
// digest waits for it.
void load_sha256();

}  // namespace lazycr::image
