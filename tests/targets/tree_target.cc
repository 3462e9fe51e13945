// Process trees of a given shape (--mode):
//   levels:   R -> A, B; A -> A1, A2; B -> B1, B2 (three levels, everyone in R's group)
//   sessions: the same tree; R is a session leader, A and B lead process groups of their own,
//             A1 stays in A's group, A2 joins B's group (across branches), B1 joins R's group,
//             B2 is the leader of a session of its own
//   zombie:   R -> A, Z; A -> A1, Z2, where Z exited with status 42 and Z2 was killed by
//             SIGTERM, and neither parent has reaped it
// The root fills --mib MiB (default 4) with a pattern before forking; every other live task
// rewrites its own part of it (part = its index of 8) before forking its children, so each task
// holds a different mix of its ancestors' parts. When the whole tree is set up the root prints
//   ready mode=M pid=R tasks=R:P,B:P,.. zombies=Z:P:exit42,Z2:P:sig15 mib=N
// (tasks: the live ones, R first) and every live task waits for the file named by
// --verify-file. On it each task checks its pid, ppid, pgid and sid against those it had, every
// byte of its memory, that each zombie child is still a zombie with the status it ended with
// (then reaps it), reaps its live children (each must exit 0) and that it has no other child,
// prints "VERIFY <role> pid=P ok" (or "... FAILED: <first wrong thing>") and exits 0 or 1.
// Options: --mode, --mib N, --verify-file F, --workdir D, --setsid (levels and zombie: the root
// becomes a session leader; sessions always does), --selftest (verify at once, no checkpoint),
// --flip ROLE (that task flips one byte of its memory before verifying), --max-wait S,
// --nobody ROLE (that live task becomes uid/gid 65534 without groups once its children are
// forked; every task then checks its real, effective and saved uid and gid are still its own:
// the verify file's directory must be searchable by that user).
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tests/targets/tree_util.h"

namespace {

using tree::Verdict;

enum class Kind { kLive, kZombieExit, kZombieSignal };
enum class Group { kInherit, kOwn, kJoin, kSession };

struct Node {
  const char* role;
  int parent;  // index, -1 for the root
  Kind kind = Kind::kLive;
  Group group = Group::kInherit;
  int join = -1;   // kJoin: the node whose process group this one joins
  int status = 0;  // zombies: exit code, or the signal that killed it
};

// Children are forked in table order: B before A, so that A2 can join B's group.
const std::vector<Node> kLevels = {{"R", -1}, {"B", 0},  {"A", 0}, {"A1", 2},
                                   {"A2", 2}, {"B1", 1}, {"B2", 1}};
const std::vector<Node> kSessions = {
    {"R", -1},
    {"B", 0, Kind::kLive, Group::kOwn},
    {"A", 0, Kind::kLive, Group::kOwn},
    {"A1", 2},
    {"A2", 2, Kind::kLive, Group::kJoin, 1},
    {"B1", 1, Kind::kLive, Group::kJoin, 0},
    {"B2", 1, Kind::kLive, Group::kSession},
};
const std::vector<Node> kZombie = {
    {"R", -1},
    {"A", 0},
    {"Z", 0, Kind::kZombieExit, Group::kInherit, -1, 42},
    {"A1", 1},
    {"Z2", 1, Kind::kZombieSignal, Group::kInherit, -1, SIGTERM},
};
constexpr size_t kParts = 8;

struct Record {
  int index;
  pid_t pid;
};

std::vector<Node> g_nodes;
std::vector<pid_t> g_pid;  // what this task knows: itself, its ancestors, earlier-forked nodes
tree::CommonOptions g_opt;
unsigned char* g_buf = nullptr;
size_t g_pages = 0, g_part_pages = 0;
int g_ready[2] = {-1, -1};
std::string g_mode = "levels";
std::string g_nobody;  // --nobody ROLE
uid_t g_uid = 0;       // the ids every other task keeps
gid_t g_gid = 0;
constexpr uid_t kNobody = 65534;

// Real, effective and saved uid and gid all `uid` / `gid`.
bool ids_are(uid_t uid, gid_t gid) {
  uid_t r, e, s;
  gid_t rg, eg, sg;
  return getresuid(&r, &e, &s) == 0 && getresgid(&rg, &eg, &sg) == 0 && r == uid && e == uid &&
         s == uid && rg == gid && eg == gid && sg == gid;
}

bool in_lineage(int task, int node) {
  for (int t = task; t >= 0; t = g_nodes[t].parent)
    if (t == node) return true;
  return false;
}

uint64_t expected_seed(int task, size_t p) {
  size_t part = p / g_part_pages;
  if (part == 0 || part >= g_nodes.size() || part >= kParts) return 0;
  return in_lineage(task, static_cast<int>(part)) ? 1 + part : 0;
}

struct Ids {
  pid_t pid, ppid, pgid, sid;
  static Ids now() { return {getpid(), getppid(), getpgrp(), getsid(0)}; }
};

// The process group or session change of node t, done by the child itself and, for groups,
// also by its parent right after fork (whichever runs first; the other call is harmless).
void change_group(int t, pid_t pid) {
  const Node& n = g_nodes[t];
  if (n.group == Group::kOwn) setpgid(pid, pid);
  if (n.group == Group::kJoin) setpgid(pid, g_pid[n.join]);
}

[[noreturn]] void fail_setup(const std::string& role, const char* what) {
  tree::say("setup FAILED: %s: %s: %s", role.c_str(), what, std::strerror(errno));
  _exit(3);
}

void check_zombie(int z, Verdict& v) {
  const Node& n = g_nodes[z];
  siginfo_t info{};
  if (waitid(P_PID, g_pid[z], &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
    v.fail("waitid(%s pid=%d): %s", n.role, g_pid[z], std::strerror(errno));
    return;
  }
  if (info.si_pid != g_pid[z]) {
    v.fail("%s pid=%d is not a zombie (it runs)", n.role, g_pid[z]);
    return;
  }
  int status = 0;
  if (waitpid(g_pid[z], &status, 0) != g_pid[z]) {
    v.fail("waitpid(%s pid=%d): %s", n.role, g_pid[z], std::strerror(errno));
    return;
  }
  if (n.kind == Kind::kZombieExit && !(WIFEXITED(status) && WEXITSTATUS(status) == n.status))
    v.fail("%s pid=%d: wait status 0x%x, expected exit %d", n.role, g_pid[z], status, n.status);
  if (n.kind == Kind::kZombieSignal && !(WIFSIGNALED(status) && WTERMSIG(status) == n.status))
    v.fail("%s pid=%d: wait status 0x%x, expected killed by signal %d", n.role, g_pid[z], status,
           n.status);
}

[[noreturn]] void run_task(int t, const Ids& ids) {
  const Node& me = g_nodes[t];
  std::string role = me.role;
  if (!tree::wait_for_file(g_opt.verify_file, g_opt.max_wait_s)) _exit(3);
  Verdict v;
  if (g_opt.flip == role) g_buf[(g_pages - 1) * tree::kPage + 1234] ^= 0x01;
  Ids now = Ids::now();
  if (now.pid != ids.pid) v.fail("pid %d, was %d", now.pid, ids.pid);
  if (t > 0 && now.ppid != ids.ppid) v.fail("ppid %d, was %d", now.ppid, ids.ppid);
  if (now.pgid != ids.pgid) v.fail("pgid %d, was %d", now.pgid, ids.pgid);
  if (now.sid != ids.sid) v.fail("sid %d, was %d", now.sid, ids.sid);
  const bool nobody = role == g_nobody;
  if (!ids_are(nobody ? kNobody : g_uid, nobody ? kNobody : g_gid))
    v.fail("uid %d gid %d, not %s's", getuid(), getgid(), nobody ? "nobody" : "its own");
  for (size_t p = 0; p < g_pages && v.ok(); p++) {
    uint64_t seed = expected_seed(t, p);
    long off = tree::page_mismatch(g_buf + p * tree::kPage, seed, p);
    if (off >= 0)
      v.fail("memory page %zu (part %zu) byte %ld is 0x%02x, not pattern %llu's", p,
             p / g_part_pages, off, g_buf[p * tree::kPage + off],
             static_cast<unsigned long long>(seed));
  }
  for (size_t c = 0; c < g_nodes.size(); c++)
    if (g_nodes[c].parent == t && g_nodes[c].kind != Kind::kLive) check_zombie(c, v);
  for (size_t c = 0; c < g_nodes.size(); c++) {
    if (g_nodes[c].parent != t || g_nodes[c].kind != Kind::kLive) continue;
    int status = 0;
    if (waitpid(g_pid[c], &status, 0) != g_pid[c])
      v.fail("waitpid(%s pid=%d): %s", g_nodes[c].role, g_pid[c], std::strerror(errno));
    else if (tree::decode(status) != 0)
      v.fail("%s pid=%d exited with %d", g_nodes[c].role, g_pid[c], tree::decode(status));
  }
  int status = 0;
  pid_t extra = waitpid(-1, &status, WNOHANG);
  if (extra != -1 || errno != ECHILD)
    v.fail("a child that is not in the tree: waitpid(-1) gave %d", extra);
  tree::report(role, v);
  if (t == 0 && g_opt.selftest) unlink(g_opt.verify_file.c_str());
  _exit(v.ok() ? 0 : 1);
}

// The process group and session node t must have by design, from the root's actual ones.
pid_t design_pgid(int t, const Ids& root) {
  const Node& n = g_nodes[t];
  if (t == 0) return root.pgid;
  if (n.group == Group::kOwn || n.group == Group::kSession) return g_pid[t];
  if (n.group == Group::kJoin) return design_pgid(n.join, root);
  return design_pgid(n.parent, root);
}
pid_t design_sid(int t, const Ids& root) {
  if (t == 0) return root.sid;
  if (g_nodes[t].group == Group::kSession) return g_pid[t];
  return design_sid(g_nodes[t].parent, root);
}

// The root, once its children are forked: learns every pid from the tasks' records, checks
// the groups and sessions are as designed (before any checkpoint) and prints the ready line.
void root_ready(const Ids& ids) {
  // Until EOF, not just one record per task: a task closes its copy of the write end after
  // its record, and no task may still hold the pipe when the tree says it is ready (a dump
  // would find half a pipe).
  size_t records = 0;
  for (;;) {
    Record r{};
    ssize_t n = tree::read_exact(g_ready[0], &r, sizeof r, tree::now_ms() + 60000);
    if (n == 0) break;
    if (n != sizeof r || r.index <= 0 || r.index >= static_cast<int>(g_nodes.size()))
      fail_setup("R", "read the tasks' ready records");
    g_pid[r.index] = r.pid;
    records++;
  }
  if (records != g_nodes.size() - 1) {
    errno = 0;
    fail_setup("R", "count the tasks' ready records");
  }
  close(g_ready[0]);
  std::string tasks, zombies;
  for (size_t t = 0; t < g_nodes.size(); t++) {
    const Node& n = g_nodes[t];
    if (n.kind != Kind::kLive) {
      zombies += std::string(zombies.empty() ? "" : ",") + n.role + ":" + std::to_string(g_pid[t]) +
                 (n.kind == Kind::kZombieExit ? ":exit" : ":sig") + std::to_string(n.status);
      continue;
    }
    tasks += std::string(tasks.empty() ? "" : ",") + n.role + ":" + std::to_string(g_pid[t]);
    pid_t pgid = getpgid(g_pid[t]), sid = getsid(g_pid[t]);
    if (pgid != design_pgid(t, ids) || sid != design_sid(t, ids)) {
      tree::say("setup FAILED: %s pid=%d: pgid %d sid %d, designed %d %d", n.role, g_pid[t], pgid,
                sid, design_pgid(t, ids), design_sid(t, ids));
      _exit(3);
    }
  }
  tree::say("ready mode=%s pid=%d tasks=%s zombies=%s mib=%zu", g_mode.c_str(), getpid(),
            tasks.c_str(), zombies.c_str(), g_pages / 256);
  if (g_opt.selftest) close(open(g_opt.verify_file.c_str(), O_WRONLY | O_CREAT, 0644));
}

// Node t, just forked (or the root): sets itself up, forks its children, tells the root.
[[noreturn]] void setup_task(int t) {
  const Node& me = g_nodes[t];
  g_pid[t] = getpid();
  if (t > 0) {
    tree::die_with_parent(g_pid[me.parent]);
    close(g_ready[0]);
    change_group(t, 0);
    if (me.group == Group::kSession && setsid() < 0) fail_setup(me.role, "setsid");
  }
  if (me.kind != Kind::kLive) {
    Record r{t, getpid()};
    if (write(g_ready[1], &r, sizeof r) != sizeof r) fail_setup(me.role, "write ready");
    if (me.kind == Kind::kZombieExit) _exit(me.status);
    signal(me.status, SIG_DFL);
    kill(getpid(), me.status);
    _exit(99);  // not reached
  }
  if (t > 0) {
    size_t part = static_cast<size_t>(t);
    for (size_t p = part * g_part_pages; p < (part + 1) * g_part_pages; p++)
      tree::fill_page(g_buf + p * tree::kPage, 1 + part, p);
  }
  Ids ids = Ids::now();
  for (size_t c = 0; c < g_nodes.size(); c++) {
    if (g_nodes[c].parent != t) continue;
    pid_t pid = fork();
    if (pid < 0) fail_setup(me.role, "fork");
    if (pid == 0) setup_task(static_cast<int>(c));
    g_pid[c] = pid;
    change_group(static_cast<int>(c), pid);
  }
  // Zombie children: dead (not reaped: WNOWAIT) with the right status before anyone is ready.
  for (size_t c = 0; c < g_nodes.size(); c++) {
    if (g_nodes[c].parent != t || g_nodes[c].kind == Kind::kLive) continue;
    siginfo_t info{};
    if (waitid(P_PID, g_pid[c], &info, WEXITED | WNOWAIT) != 0) fail_setup(me.role, "waitid");
    bool right = g_nodes[c].kind == Kind::kZombieExit
                     ? info.si_code == CLD_EXITED && info.si_status == g_nodes[c].status
                     : info.si_code == CLD_KILLED && info.si_status == g_nodes[c].status;
    if (!right) {
      errno = 0;
      fail_setup(g_nodes[c].role, "ended with another status");
    }
  }
  if (me.role == g_nobody) {
    const gid_t gid = kNobody;
    if (setgroups(0, &gid) != 0 || setresgid(kNobody, kNobody, kNobody) != 0 ||
        setresuid(kNobody, kNobody, kNobody) != 0)
      fail_setup(me.role, "become nobody");
  }
  if (t == 0) {
    close(g_ready[1]);
    root_ready(ids);
    run_task(0, ids);
  }
  Record r{t, getpid()};
  if (write(g_ready[1], &r, sizeof r) != sizeof r) fail_setup(me.role, "write ready");
  close(g_ready[1]);
  run_task(t, ids);
}

}  // namespace

int main(int argc, char** argv) {
  size_t mib = 4;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (g_opt.parse(argc, argv, i)) continue;
    if (a == "--mode" && i + 1 < argc) {
      g_mode = argv[++i];
    } else if (a == "--nobody" && i + 1 < argc) {
      g_nobody = argv[++i];
    } else if (a == "--mib" && i + 1 < argc) {
      mib = static_cast<size_t>(std::atol(argv[++i]));
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (g_mode == "levels") {
    g_nodes = kLevels;
  } else if (g_mode == "sessions") {
    g_nodes = kSessions;
    g_opt.setsid = true;
  } else if (g_mode == "zombie") {
    g_nodes = kZombie;
  } else {
    std::fprintf(stderr, "--mode levels|sessions|zombie\n");
    return 2;
  }
  if (mib < 1) {
    std::fprintf(stderr, "--mib >= 1\n");
    return 2;
  }
  g_uid = getuid();
  g_gid = getgid();
  if (g_opt.setsid) tree::become_session_leader();
  if (g_opt.verify_file.empty()) {
    if (!g_opt.selftest) {
      std::fprintf(stderr, "--verify-file F or --selftest\n");
      return 2;
    }
    g_opt.verify_file = g_opt.workdir + "/tree_target." + std::to_string(getpid()) + ".verify";
  }
  g_pages = mib * 256;
  g_part_pages = g_pages / kParts;
  g_buf = static_cast<unsigned char*>(mmap(nullptr, g_pages * tree::kPage, PROT_READ | PROT_WRITE,
                                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (g_buf == MAP_FAILED) {
    std::perror("mmap");
    return 3;
  }
  for (size_t p = 0; p < g_pages; p++) tree::fill_page(g_buf + p * tree::kPage, 0, p);
  g_pid.assign(g_nodes.size(), 0);
  if (pipe(g_ready) != 0) {
    std::perror("pipe");
    return 3;
  }
  setup_task(0);
}
