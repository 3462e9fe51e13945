// Internal to restore/: the pages a lazily restored process of a tree writes before its
// children are forked (restore/tree_sharing.h says which), through eager fillers.
#pragma once

#include <sched.h>

#include <map>
#include <memory>
#include <vector>

#include "restore/memory.h"
#include "restore/tree_sharing.h"

namespace lazycr::restore {

class TreeFill {
 public:
  // `sharing` may be nullptr (no tree: nothing to write). `own`: the process's eager filler
  // (its own store); fillers on its children's stores are made as needed, running on `cpus`.
  TreeFill(const TreeSharing* sharing, int pid, MemoryStrategy& own, const cpu_set_t& cpus);
  ~TreeFill();

  // `area`, a lazy candidate (`kept`: inherited from the parent, with its content): queues
  // the writes for the children inside it, and returns the pages of it that are not owed by
  // the page server: those inherited from the parent and those written with its own content.
  std::vector<PageRange> add(RemoteProcess& target, const image::MemoryArea& area, bool kept);
  // Writes what add() queued on children's stores (the caller fills through `own`).
  void fill(RemoteProcess& target);
  MemoryStats stats() const;

 private:
  const TreeSharing* sharing_;
  int pid_;
  MemoryStrategy& own_;
  cpu_set_t cpus_;
  std::map<int, std::unique_ptr<MemoryStrategy>> foreign_;  // by the child whose pages
};

}  // namespace lazycr::restore
