// `lazycr show`: the chain of an incremental image.
#include "tools/show_chain.h"

#include <cstdio>

#include "image-format/image_chain.h"

namespace lazycr::cli {
namespace {

struct LinkSummary {
  uint64_t data_pages = 0, zero_pages = 0, ref_pages = 0, parent_pages = 0, file_bytes = 0;
};

LinkSummary summarize_link(const image::ImageReader& img) {
  LinkSummary s;
  for (int pid : img.inventory().pids()) {
    if (!img.has_pages(pid)) continue;
    const image::PageStoreReader& st = img.pages(pid);
    s.data_pages += st.index().data_pages();
    s.zero_pages += st.index().zero_pages();
    s.ref_pages += st.ref_pages();
    s.parent_pages += st.parent_pages();
    s.file_bytes += st.file_size();
  }
  return s;
}

}  // namespace

void print_chain_text(std::ostream& o, const image::ImageReader& img) {
  if (!img.inventory().has_parent()) return;
  o << "Chain: link " << img.inventory().parent().chain_length()
    << " of an incremental chain (newest first; pages: stored here / left to the parent)\n";
  char line[512];
  for (const image::ImageReader* link = &img; link != nullptr; link = link->parent()) {
    const LinkSummary s = summarize_link(*link);
    const auto& inv = link->inventory();
    const uint64_t all = s.data_pages + s.zero_pages + s.ref_pages + s.parent_pages;
    std::snprintf(line, sizeof line,
                  "  %-3u %s  %llu data + %llu zero / %llu parent pages (%.2f%% stored), "
                  "%.1f MiB of page stores%s\n",
                  inv.has_parent() ? inv.parent().chain_length() : 0u, link->dir().c_str(),
                  static_cast<unsigned long long>(s.data_pages),
                  static_cast<unsigned long long>(s.zero_pages),
                  static_cast<unsigned long long>(s.parent_pages),
                  all > 0 ? 100.0 * double(s.data_pages) / double(all) : 0.0,
                  s.file_bytes / double(1 << 20), inv.has_parent() ? "" : "  (full dump)");
    o << line;
  }
}

void chain_json(JsonWriter& j, const image::ImageReader& img) {
  j.key("chain");
  j.begin_array();
  for (const image::ImageReader* link = &img; link != nullptr; link = link->parent()) {
    const LinkSummary s = summarize_link(*link);
    const auto& inv = link->inventory();
    j.begin_object();
    j.field("dir", link->dir());
    j.field("link", inv.has_parent() ? inv.parent().chain_length() : 0u);
    j.field("data_pages", s.data_pages);
    j.field("zero_pages", s.zero_pages);
    j.field("ref_pages", s.ref_pages);
    j.field("parent_pages", s.parent_pages);
    j.field("store_bytes", s.file_bytes);
    if (inv.has_parent()) j.field("parent_digest", image::short_hex(inv.parent().digest()));
    j.end_object();
  }
  j.end_array();
}

void verify_parents(const image::ImageReader& img) {
  for (const image::ImageReader* link = img.parent(); link != nullptr; link = link->parent())
    for (int pid : link->inventory().pids())
      if (link->has_pages(pid)) link->pages(pid).verify_all();
}

}  // namespace lazycr::cli
