#include "tools/show_working_set.h"

#include <optional>
#include <string>

#include "common/error.h"
#include "uffd/working_set.h"

namespace lazycr::cli {
namespace {

constexpr size_t kFirstRuns = 8;  // runs shown per process

struct Loaded {
  std::optional<uffd::WorkingSetRecord> record;
  std::string error;  // why a restore would ignore it
};

// The record and, when a restore would ignore it, why (the checks a restore makes that need
// no live process: checksum and bounds, pids and store digests of this image).
Loaded load(const image::ImageReader& img) {
  Loaded l;
  try {
    l.record = uffd::read_working_set(img.dir());
  } catch (const std::exception& e) {
    l.error = e.what();
    return l;
  }
  if (!l.record) return l;
  for (const auto& p : l.record->processes) {
    bool found = false;
    for (const auto& proc : img.processes())
      if (proc.pid() == p.image_pid && !proc.zombie()) found = true;
    if (!found) {
      l.error = cat("pid ", p.image_pid, " is not a process of this image");
    } else if (img.pages(p.image_pid).mac_digest() != p.store_digest) {
      l.error = cat("pid ", p.image_pid, ": it was recorded for another image");
    }
    if (!l.error.empty()) break;
  }
  return l;
}

// A process's record pages: whether a restore would read them, or why not.
struct RecordPages {
  bool present = false;
  uint64_t file_bytes = 0;
  std::string error;
};
RecordPages record_pages(const image::ImageReader& img, const uffd::ProcessWorkingSet& p) {
  RecordPages r;
  r.present = !p.pages_digest.empty();
  if (!r.present) return r;
  try {
    r.file_bytes = uffd::open_working_set_pages(img.dir(), p)->file_size();
  } catch (const std::exception& e) {
    r.error = e.what();
  }
  return r;
}

}  // namespace

void print_working_set_text(std::ostream& o, const image::ImageReader& img) {
  const Loaded l = load(img);
  if (!l.record && l.error.empty()) return;
  if (!l.record) {
    o << "\nWorking set: damaged, a restore ignores it: " << l.error << "\n";
    return;
  }
  o << "\nWorking set (" << uffd::working_set_path(img.dir()) << "): " << l.record->pages()
    << " pages, " << (l.error.empty() ? "used by lazy restores" : "ignored: " + l.error) << "\n";
  for (const auto& p : l.record->processes) {
    uint64_t pages = 0;
    for (const auto& r : p.runs) pages += r.pages;
    o << "  pid " << p.image_pid << ": " << pages << " pages in " << p.runs.size()
      << " runs, first touched:";
    for (size_t i = 0; i < p.runs.size() && i < kFirstRuns; i++)
      o << " " << hex(p.runs[i].start) << "+" << p.runs[i].pages;
    o << (p.runs.size() > kFirstRuns ? " ...\n" : "\n");
    const RecordPages rp = record_pages(img, p);
    o << "    record pages: ";
    if (!rp.present)
      o << "none (pushed from the page store)\n";
    else if (rp.error.empty())
      o << uffd::working_set_pages_path(img.dir(), p.image_pid) << ", " << rp.file_bytes
        << " bytes\n";
    else
      o << "ignored: " << rp.error << "\n";
  }
}

void working_set_json(JsonWriter& j, const image::ImageReader& img) {
  const Loaded l = load(img);
  j.key("working_set");
  if (!l.record && l.error.empty()) {
    j.null();
    return;
  }
  j.begin_object();
  j.field("path", uffd::working_set_path(img.dir()));
  j.field("used", l.error.empty());
  if (!l.error.empty()) j.field("error", l.error);
  if (l.record) {
    j.field("pages", l.record->pages());
    j.key("processes");
    j.begin_array();
    for (const auto& p : l.record->processes) {
      j.begin_object();
      j.field("pid", static_cast<int64_t>(p.image_pid));
      j.key("runs");
      j.begin_array();  // in the order they were first touched
      for (const auto& r : p.runs) {
        j.begin_object();
        j.hex_field("start", r.start);
        j.field("pages", r.pages);
        j.end_object();
      }
      j.end_array();
      const RecordPages rp = record_pages(img, p);
      j.key("record_pages");
      if (!rp.present) {
        j.null();
      } else {
        j.begin_object();
        j.field("path", uffd::working_set_pages_path(img.dir(), p.image_pid));
        j.field("used", rp.error.empty());
        if (rp.error.empty())
          j.field("bytes", rp.file_bytes);
        else
          j.field("error", rp.error);
        j.end_object();
      }
      j.end_object();
    }
    j.end_array();
  }
  j.end_object();
}

}  // namespace lazycr::cli
