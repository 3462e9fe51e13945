// A small streaming JSON writer for `check`, `show` and stats files (no JSON library is
// among our dependencies). Produces valid JSON with stable key order: the caller's.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace lazycr {

class JsonWriter {
 public:
  explicit JsonWriter(std::ostream& out, bool pretty = true) : out_(out), pretty_(pretty) {}

  void begin_object();
  void end_object();
  void begin_array();
  void end_array();
  void key(std::string_view k);

  void value(std::string_view v);
  void value(const char* v) { value(std::string_view(v)); }
  void value(const std::string& v) { value(std::string_view(v)); }
  void value(bool v);
  void value(int v) { value(static_cast<int64_t>(v)); }
  void value(unsigned v) { value(static_cast<uint64_t>(v)); }
  void value(long long v) { value(static_cast<int64_t>(v)); }
  void value(unsigned long long v) { value(static_cast<uint64_t>(v)); }
  void value(int64_t v);
  void value(uint64_t v);
  void value(double v);
  void null();

  template <typename T>
  void field(std::string_view k, const T& v) {
    key(k);
    value(v);
  }
  // Writes "0x..." for addresses and masks: JSON numbers lose precision above 2^53.
  void hex_field(std::string_view k, uint64_t v);

  static std::string escape(std::string_view s);

 private:
  void before_value();
  void newline();
  std::ostream& out_;
  bool pretty_;
  std::vector<bool> first_;  // per open container: nothing written yet
  bool after_key_ = false;
};

std::string hex(uint64_t v);

}  // namespace lazycr
