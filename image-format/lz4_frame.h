// LZ4 page frames (`lazycr dump --compress lz4`): one LZ4 block per frame, no LZ4 framing.
// The page store's index records each frame's stored size and SHA-256 and the frame's content
// size follows from its page count, so the block format needs nothing more (FORMAT.md "LZ4
// frames").
#pragma once

#include <cstddef>
#include <string>

namespace lazycr::image {

// Bytes an LZ4 block of `size` bytes of content may take in the worst case.
size_t lz4_frame_bound(size_t size);

// Compresses `size` bytes of `in` into `out` (`capacity` bytes) at LZ4's fastest setting with
// the given acceleration (1 = LZ4's default). Returns the block's size, or 0 when it does not
// fit in `capacity` (the caller then stores the frame raw).
size_t lz4_compress_frame(const void* in, size_t size, void* out, size_t capacity,
                          int acceleration);

// Decodes the LZ4 block [src, src + size) into exactly `expected` bytes at `out`. Throws
// Error naming `what` when the block is damaged: it does not decode, or decodes to another
// size. Never reads or writes outside the two buffers, whatever the block holds.
void lz4_decode_frame(const void* src, size_t size, void* out, size_t expected,
                      const std::string& what);

}  // namespace lazycr::image
