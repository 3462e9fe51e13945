#include "image-format/bounded_parse.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/wire_format_lite.h>

#include <algorithm>
#include <map>

#include "common/error.h"

namespace lazycr::image {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;

// Costs, in bytes, over-estimated on purpose: a repeated slot counts twice (capacity doubles
// as elements arrive), a string its object, heap block and terminator.
constexpr uint64_t kSlotBytes = 16;
constexpr uint64_t kStringBytes = 48;
// One field kept in an UnknownFieldSet (a 16-byte entry in a growing vector, plus a heap
// string for length-delimited ones): charged in full although it is dropped after the parse.
constexpr uint64_t kUnknownFieldBytes = 64;
// Our schemas nest 4 deep; protobuf's own parser stops at 100.
constexpr int kMaxDepth = 100;

enum WireType {
  kVarint = 0,
  kFixed64 = 1,
  kLengthDelimited = 2,
  kStartGroup = 3,
  kEndGroup = 4,
  kFixed32 = 5
};

class Estimator {
 public:
  explicit Estimator(const std::string& what) : what_(what) {}

  // The bytes of one message of `type` (null: an unknown group's contents, up to its end tag).
  uint64_t message(const uint8_t*& p, const uint8_t* end, const Descriptor* type, int depth,
                   uint32_t group = 0) {
    if (depth > kMaxDepth) bad("nested more than ", kMaxDepth, " deep");
    uint64_t cost = 0;
    while (p < end) {
      uint64_t tag = varint(p, end);
      uint32_t number = static_cast<uint32_t>(tag >> 3);
      int wire = static_cast<int>(tag & 7);
      if (number == 0 || tag >> 32 != 0) bad("field number 0 or out of range");
      if (wire == kEndGroup) {
        if (group == 0 || number != group) bad("unmatched end-group tag");
        return cost;
      }
      const FieldDescriptor* f = type ? type->FindFieldByNumber(static_cast<int>(number)) : nullptr;
      if (f != nullptr && matches(f, wire)) {
        cost += known(p, end, f, wire, depth);
      } else {
        cost += kUnknownFieldBytes + skip(p, end, wire, number, depth);
      }
    }
    if (group != 0) bad("group ", group, " has no end tag");
    return cost;
  }

 private:
  template <typename... Args>
  [[noreturn]] void bad(const Args&... args) const {
    fail(what_, ": not protobuf wire format: ", args...);
  }

  uint64_t varint(const uint8_t*& p, const uint8_t* end) const {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p == end) bad("truncated varint");
      uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return v;
    }
    bad("varint longer than 10 bytes");
  }

  const uint8_t* length_delimited(const uint8_t*& p, const uint8_t* end) const {
    uint64_t len = varint(p, end);
    if (len > static_cast<uint64_t>(end - p)) bad("a length of ", len, " runs past the end");
    const uint8_t* body_end = p + len;
    return body_end;
  }

  static bool packable(const FieldDescriptor* f) {
    return f->is_repeated() && f->cpp_type() != FieldDescriptor::CPPTYPE_STRING &&
           f->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE;
  }

  // The wire types the parser accepts for f; any other is kept as an unknown field.
  static bool matches(const FieldDescriptor* f, int wire) {
    int declared =
        static_cast<int>(google::protobuf::internal::WireFormatLite::WireTypeForFieldType(
            static_cast<google::protobuf::internal::WireFormatLite::FieldType>(f->type())));
    return wire == declared || (packable(f) && wire == kLengthDelimited);
  }

  static uint64_t scalar_bytes(const FieldDescriptor* f) {
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT64:
      case FieldDescriptor::CPPTYPE_UINT64:
      case FieldDescriptor::CPPTYPE_DOUBLE:
        return 8;
      case FieldDescriptor::CPPTYPE_BOOL:
        return 1;
      default:
        return 4;
    }
  }

  uint64_t object_bytes(const Descriptor* type) {
    auto it = object_bytes_.find(type);
    if (it != object_bytes_.end()) return it->second;
    const google::protobuf::Message* proto =
        google::protobuf::MessageFactory::generated_factory()->GetPrototype(type);
    uint64_t n = proto ? proto->SpaceUsedLong() : 1024;
    object_bytes_[type] = n;
    return n;
  }

  uint64_t known(const uint8_t*& p, const uint8_t* end, const FieldDescriptor* f, int wire,
                 int depth) {
    const uint64_t slot = f->is_repeated() ? kSlotBytes : 0;
    if (f->type() == FieldDescriptor::TYPE_GROUP) bad("group field ", f->name());
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      const uint8_t* body_end = length_delimited(p, end);
      uint64_t cost = slot + object_bytes(f->message_type()) +
                      message(p, body_end, f->message_type(), depth + 1);
      return cost;
    }
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_STRING) {
      const uint8_t* body_end = length_delimited(p, end);
      uint64_t len = static_cast<uint64_t>(body_end - p);
      p = body_end;
      return slot + kStringBytes + len;
    }
    uint64_t elem = scalar_bytes(f);
    if (wire == kLengthDelimited) {  // packed: one element per varint end, or per fixed width
      const uint8_t* body_end = length_delimited(p, end);
      uint64_t count = 0;
      if (wire_is_varint(f)) {
        for (const uint8_t* q = p; q < body_end; ++q) count += (*q & 0x80) == 0;
      } else {
        count = static_cast<uint64_t>(body_end - p) / (elem == 8 ? 8 : 4);
      }
      p = body_end;
      return 2 * elem * count;
    }
    skip(p, end, wire, 0, depth);
    return f->is_repeated() ? 2 * elem : 0;
  }

  static bool wire_is_varint(const FieldDescriptor* f) {
    switch (f->type()) {
      case FieldDescriptor::TYPE_FIXED32:
      case FieldDescriptor::TYPE_SFIXED32:
      case FieldDescriptor::TYPE_FLOAT:
      case FieldDescriptor::TYPE_FIXED64:
      case FieldDescriptor::TYPE_SFIXED64:
      case FieldDescriptor::TYPE_DOUBLE:
        return false;
      default:
        return true;
    }
  }

  // Skips one value; returns the bytes an unknown field of it keeps.
  uint64_t skip(const uint8_t*& p, const uint8_t* end, int wire, uint32_t number, int depth) {
    switch (wire) {
      case kVarint:
        varint(p, end);
        return 0;
      case kFixed64:
        if (end - p < 8) bad("truncated fixed64");
        p += 8;
        return 0;
      case kFixed32:
        if (end - p < 4) bad("truncated fixed32");
        p += 4;
        return 0;
      case kLengthDelimited: {
        const uint8_t* body_end = length_delimited(p, end);
        uint64_t len = static_cast<uint64_t>(body_end - p);
        p = body_end;
        return len;
      }
      case kStartGroup:
        return message(p, end, nullptr, depth + 1, number);
      default:
        bad("wire type ", wire);
    }
  }

  const std::string& what_;
  std::map<const Descriptor*, uint64_t> object_bytes_;
};

}  // namespace

void MetadataBudget::take_decoded(const std::string& what, uint64_t decoded) {
  if (decoded > kMaxImageDecodedBytes - decoded_)
    fail(what, ": ", decoded, " decoded bytes would bring the image's metadata past its bound of ",
         kMaxImageDecodedBytes, " bytes (", decoded_, " already read)");
  decoded_ += decoded;
}

void MetadataBudget::take_parsed(const std::string& what, uint64_t parsed) {
  if (parsed > kMaxImageParsedBytes - parsed_)
    fail(what, ": parsing would take ", parsed, " bytes of memory, past the image's bound of ",
         kMaxImageParsedBytes, " bytes (", parsed_, " already taken)");
  parsed_ += parsed;
}

uint64_t parsed_size_estimate(const std::string& what, const void* data, size_t size,
                              const Descriptor* type) {
  Estimator e(what);
  const uint8_t* p = static_cast<const uint8_t*>(data);
  return e.message(p, p + size, type, 0);
}

uint64_t parse_bounded(const std::string& what, const void* data, size_t size,
                       google::protobuf::Message* msg, MetadataBudget* budget) {
  msg->Clear();
  uint64_t estimate = parsed_size_estimate(what, data, size, msg->GetDescriptor());
  uint64_t bound =
      std::min<uint64_t>(kParsedBytesPerDecodedByte * size + kParsedSlackBytes, kMaxParsedBytes);
  if (estimate > bound)
    fail(what, ": ", size, " decoded bytes would take ", estimate,
         " bytes of memory once parsed, more than the bound of ", bound,
         " (damaged or hostile: empty records or unknown fields)");
  if (budget != nullptr) budget->take_parsed(what, estimate);
  if (size > static_cast<size_t>(INT32_MAX) || !msg->ParseFromArray(data, static_cast<int>(size)))
    fail(what, ": not a valid ", msg->GetTypeName(), " message");
  // Nothing reads them; kept, they would stay in memory as long as the image.
  msg->DiscardUnknownFields();
  return estimate;
}

}  // namespace lazycr::image
