#pragma once
// What the page store's unit tests share: a scratch directory and deterministic pages.

#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "image-format/page_store.h"

namespace lazycr::test {

// A fresh directory under the system's temporary one, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "lazycr-unit-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const {
    return (std::filesystem::path(path_) / name).string();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// xorshift64*: fast, deterministic filler.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  void fill(unsigned char* p, size_t n) {
    for (size_t i = 0; i + 8 <= n; i += 8) {
      const uint64_t v = next();
      std::memcpy(p + i, &v, 8);
    }
    for (size_t i = n - n % 8; i < n; ++i) p[i] = static_cast<unsigned char>(next());
  }
};

// Pages by letter: 'r' random, 'c' compressible (1 KiB random then zeros), 't' text-like
// (repeated words), anything else a zero page.
inline std::vector<unsigned char> test_pages(const std::string& kinds, uint64_t seed) {
  constexpr size_t P = image::kPageSize;
  std::vector<unsigned char> out(kinds.size() * P, 0);
  Rng rng(seed);
  static const char* const kWords[] = {"alpha ", "beta ", "gamma ", "delta ", "key_", "value:"};
  for (size_t p = 0; p < kinds.size(); ++p) {
    unsigned char* page = out.data() + p * P;
    if (kinds[p] == 't') {
      for (size_t i = 0; i < P;) {
        const char* w = kWords[rng.next() % 6];
        for (size_t k = 0; w[k] != 0 && i < P; ++k) page[i++] = static_cast<unsigned char>(w[k]);
      }
    } else {
      rng.fill(page, kinds[p] == 'r' ? P : kinds[p] == 'c' ? 1024 : 0);
    }
  }
  return out;
}

}  // namespace lazycr::test
