// Parses the "ready key=value ..." line the targets print about themselves.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace lazycr::test {

struct TargetInfo {
  std::map<std::string, std::string> kv;

  static TargetInfo parse(const std::string& line) {
    TargetInfo t;
    std::istringstream in(line);
    std::string word;
    while (in >> word) {
      auto eq = word.find('=');
      if (eq != std::string::npos) t.kv[word.substr(0, eq)] = word.substr(eq + 1);
    }
    return t;
  }
  std::string str(const std::string& k) const {
    auto it = kv.find(k);
    return it == kv.end() ? "" : it->second;
  }
  // "a:b" -> first / second as numbers (hex with 0x prefix allowed).
  uint64_t first(const std::string& k) const { return std::strtoull(str(k).c_str(), nullptr, 0); }
  uint64_t second(const std::string& k) const {
    auto s = str(k);
    auto colon = s.find(':');
    return colon == std::string::npos ? 0 : std::strtoull(s.c_str() + colon + 1, nullptr, 0);
  }
  std::vector<int> list(const std::string& k) const {
    std::vector<int> out;
    std::istringstream in(str(k));
    std::string item;
    while (std::getline(in, item, ',')) out.push_back(std::atoi(item.c_str()));
    return out;
  }
};

}  // namespace lazycr::test
