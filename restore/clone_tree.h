// Internal to restore/: the other processes of a tree in one clone of a template (issue 13).
// The clone's root is the fork of the template's root (clone.cc); every other process is
// forked inside the clone from its parent there, right after that parent, as the eager tree
// restore forks it (restore.cc): it keeps the areas it inherits from its parent (their pages
// stay shared copy-on-write with the clone's root, hence with the template), and is shaped by
// the same steps (process_steps.h), its descriptors made afresh for the clone (clone_fds.h).
#pragma once

#include <sched.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "image-format/image_dir.h"
#include "restore/address_space.h"

namespace lazycr::restore {

class Restoree;
struct CloneFiles;
struct CloneTreeProcess;

class CloneTree {
 public:
  // `root`: the clone's root, its descriptors in place; `transport_netns`: the network
  // namespace the root is in (-1: lazycr's); `std_fds`: clone --shell-job's (else -1);
  // `objects`: the clone's own shared objects, made in the root (clone_shared_memory.h).
  CloneTree(const image::ImageReader& img, Restoree& root, const CloneFiles& files,
            SharedObjectMap objects, const cpu_set_t& cpus, int transport_netns,
            const int (&std_fds)[3]);
  // Kills and reaps every process made, unless released.
  ~CloneTree();
  CloneTree(const CloneTree&) = delete;
  CloneTree& operator=(const CloneTree&) = delete;

  // The root's session and group, then every other process, whole but not running.
  // `step(name)` names each step (for errors and timings).
  void make(const std::function<void(std::string)>& step);
  // Every thread of the other processes gets its registers and is detached, children before
  // parents; the root is the caller's (detached after).
  void release();
  size_t threads() const;

 private:
  const image::ImageReader& img_;
  Restoree& root_;
  const CloneFiles& files_;
  SharedObjectMap objects_;
  const cpu_set_t& cpus_;
  int transport_netns_;
  int std_fds_[3];
  std::vector<std::unique_ptr<CloneTreeProcess>> procs_;  // image order, the root's excluded
  bool released_ = false;
};

}  // namespace lazycr::restore
