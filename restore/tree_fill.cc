// The pages a lazily restored process writes for its children: restore/tree_fill.h.
#include "restore/tree_fill.h"

namespace lazycr::restore {

TreeFill::TreeFill(const TreeSharing* sharing, int pid, MemoryStrategy& own, const cpu_set_t& cpus)
    : sharing_(sharing), pid_(pid), own_(own), cpus_(cpus) {}

TreeFill::~TreeFill() = default;

std::vector<PageRange> TreeFill::add(RemoteProcess& target, const image::MemoryArea& area,
                                     bool kept) {
  if (sharing_ == nullptr) return {};
  // The eager fillers take areas: each range is written as an area of its own. In an area
  // inherited with the parent's content, every page is written (zero ones too) or dropped.
  auto queue = [&](MemoryStrategy& filler, const PageRange& r) {
    image::MemoryArea piece = area;
    piece.set_start(r.start);
    piece.set_end(r.end);
    if (kept)
      filler.prepare_inherited_area(target, piece, /*no parent's page is kept*/ 0);
    else
      filler.prepare_area(target, piece);
  };
  std::vector<PageRange> own = sharing_->filled_for_children(pid_, area.start(), area.end());
  for (const PageRange& r : own) queue(own_, r);
  for (const ForeignFill& f : sharing_->foreign_for_children(pid_, area.start(), area.end())) {
    auto& filler = foreign_[f.source];
    if (!filler) filler = make_eager_filler(sharing_->store(f.source), &cpus_);
    queue(*filler, f.range);
  }
  return unite(sharing_->inherited(pid_, area.start(), area.end()), own);
}

void TreeFill::fill(RemoteProcess& target) {
  for (auto& [pid, filler] : foreign_) filler->fill_mapped(target);
}

MemoryStats TreeFill::stats() const {
  MemoryStats s;
  for (const auto& [pid, filler] : foreign_) {
    MemoryStats f = filler->stats();
    s.pages_written += f.pages_written;
    s.bytes_written += f.bytes_written;
    s.read_ns += f.read_ns;
    s.write_ns += f.write_ns;
  }
  return s;
}

}  // namespace lazycr::restore
