// Parsing untrusted protobuf bytes without letting them choose how much memory the parse
// takes. A decoded-size bound alone is not enough: an empty submessage is 2 bytes on the wire
// and a heap object of 100+ bytes once parsed, so 64 MiB of them would take gigabytes. The
// wire is therefore walked against the message's descriptor first, and the memory the parse
// would allocate (objects, strings, repeated slots, unknown fields) is bounded before it runs.
// Bounds: FORMAT.md, "Metadata bounds".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <google/protobuf/message.h>

namespace lazycr::image {

// Whatever one file holds, its parsed form may take at most this many times its decoded size
// (plus kParsedSlackBytes) and never more than kMaxParsedBytes. Real metadata takes 1-4.5
// times its decoded size (page-store runs are the densest); a file of empty submessages or
// unknown fields takes 30-70 times.
inline constexpr uint64_t kParsedBytesPerDecodedByte = 8;
inline constexpr uint64_t kParsedSlackBytes = 64 * 1024;
inline constexpr uint64_t kMaxParsedBytes = 128ull << 20;
// The image as a whole: decoded bytes of every metadata file and page-store index, and the
// memory their parsed forms take.
inline constexpr uint64_t kMaxImageDecodedBytes = 512ull << 20;
inline constexpr uint64_t kMaxImageParsedBytes = 1ull << 30;

// What the metadata of one image may still take. An ImageReader charges every file it reads
// to one budget, so many files each within their own bound still cannot add up to a bomb.
class MetadataBudget {
 public:
  // Refuses (Error naming `what`) `decoded` more bytes once the image is over its bound.
  void take_decoded(const std::string& what, uint64_t decoded);
  void take_parsed(const std::string& what, uint64_t parsed);
  uint64_t parsed_left() const { return kMaxImageParsedBytes - parsed_; }

 private:
  uint64_t decoded_ = 0;
  uint64_t parsed_ = 0;
};

// An upper estimate of the memory parsing `size` bytes as a `type` message allocates.
// Throws Error naming `what` on bytes that are not protobuf wire format.
uint64_t parsed_size_estimate(const std::string& what, const void* data, size_t size,
                              const google::protobuf::Descriptor* type);

// Parses `size` bytes into `msg` (cleared first) when their parsed_size_estimate is within
// the per-file bound and what `budget` (may be null) has left, charging it; drops unknown
// fields. Throws Error naming `what` otherwise. Returns the estimate.
uint64_t parse_bounded(const std::string& what, const void* data, size_t size,
                       google::protobuf::Message* msg, MetadataBudget* budget);

}  // namespace lazycr::image
