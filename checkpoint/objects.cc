// The dump's side of objects/: a frozen process as objects::RemoteProcess.
#include <sys/mman.h>

#include "checkpoint/collect.h"
#include "checkpoint/frozen.h"
#include "common/error.h"
#include "common/log.h"
#include "common/ptrace.h"
#include "image-format/page_store.h"
#include "objects/objects.h"

namespace lazycr::checkpoint {
namespace {

class FrozenRemote final : public objects::RemoteProcess {
 public:
  explicit FrozenRemote(FrozenProcess& fp) : fp_(fp) {}
  pid_t pid() const override { return fp_.pid(); }
  size_t thread_count() const override { return fp_.threads().size(); }
  pid_t tid(size_t i) const override { return fp_.threads().at(i).tid(); }
  pid_t image_tid(size_t i) const override { return tid(i); }
  TracedThread& traced(size_t i) override { return fp_.threads().at(i); }
  // Done for every filtered thread when it was frozen (FrozenProcess::freeze).
  void suspend_seccomp(size_t) override {}
  long call(size_t i, const std::string& what, long nr, uint64_t a1, uint64_t a2, uint64_t a3,
            uint64_t a4, uint64_t a5, uint64_t a6) override {
    return fp_.call(fp_.threads().at(i), what.c_str(), nr, a1, a2, a3, a4, a5, a6);
  }
  std::vector<long> calls(size_t i, const std::string& what,
                          std::span<const BatchCall> calls) override {
    return fp_.run_calls(fp_.threads().at(i), what.c_str(), calls);
  }
  uint64_t put(const void* data, size_t len) override {
    if (len > image::kPageSize) fail(len, " bytes do not fit the scratch page of pid ", pid());
    uint64_t s = fp_.scratch();
    remote_write(pid(), s, data, len);
    return s;
  }
  void read(uint64_t addr, void* buf, size_t len) override { remote_read(pid(), addr, buf, len); }

 private:
  FrozenProcess& fp_;
};

}  // namespace

void collect_objects(FrozenTree& tree, std::vector<image::Process>& procs) {
  objects::DumpContext ctx;
  const auto& order = tree.preorder();
  for (size_t i = 0; i < order.size(); i++) {
    TreeNode& node = tree.node(order[i]);
    if (node.zombie()) continue;
    FrozenRemote remote(*node.frozen);
    objects::dump_objects(remote, procs[i], ctx);
    node.frozen->release_scratch();
    log::info(describe_pid(order[i]), ": scratch page mapped for ",
              node.frozen->scratch_ns() / 1000, " us, ", node.frozen->injected(),
              " injected calls");
  }
}

}  // namespace lazycr::checkpoint
