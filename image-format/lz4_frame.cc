// LZ4 page frames (lz4_frame.h).
#include "image-format/lz4_frame.h"

#include <lz4.h>

#include <climits>

#include "common/error.h"

namespace lazycr::image {

size_t lz4_frame_bound(size_t size) {
  if (size > static_cast<size_t>(LZ4_MAX_INPUT_SIZE)) return 0;
  return static_cast<size_t>(LZ4_compressBound(static_cast<int>(size)));
}

size_t lz4_compress_frame(const void* in, size_t size, void* out, size_t capacity,
                          int acceleration) {
  if (size > static_cast<size_t>(LZ4_MAX_INPUT_SIZE))
    fail("lz4: a frame of ", size, " bytes is more than LZ4 takes");
  const int cap = capacity > static_cast<size_t>(INT_MAX) ? INT_MAX : static_cast<int>(capacity);
  // LZ4_compress_fast keeps its state on the stack (16 KiB): nothing to share between threads.
  const int r = LZ4_compress_fast(static_cast<const char*>(in), static_cast<char*>(out),
                                  static_cast<int>(size), cap, acceleration);
  return r <= 0 ? 0 : static_cast<size_t>(r);
}

void lz4_decode_frame(const void* src, size_t size, void* out, size_t expected,
                      const std::string& what) {
  if (size == 0 || size > static_cast<size_t>(INT_MAX) ||
      expected > static_cast<size_t>(LZ4_MAX_INPUT_SIZE))
    fail(what, ": lz4 frame of ", size, " bytes for ", expected, " bytes of pages is out of range");
  // LZ4_decompress_safe never reads past `size` nor writes past `expected`, whatever the
  // block holds; a negative result is a malformed block.
  const int r = LZ4_decompress_safe(static_cast<const char*>(src), static_cast<char*>(out),
                                    static_cast<int>(size), static_cast<int>(expected));
  if (r < 0) fail(what, ": damaged lz4 frame (", size, " bytes do not decode)");
  if (static_cast<size_t>(r) != expected)
    fail(what, ": damaged lz4 frame (decodes to ", r, " bytes, expected ", expected, ")");
}

}  // namespace lazycr::image
