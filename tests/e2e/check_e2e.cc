// `lazycr check` as users run it: the real binary, text and JSON, on this machine (where every
// required feature is present, DESIGN.md section 7).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "common/proc.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"

namespace lazycr::test {
namespace {

// The line of the text report for `name`: "<status>  <name>  <detail>  <why>".
std::string line_for(const std::string& out, const std::string& name) {
  size_t pos = 0;
  while (pos < out.size()) {
    size_t end = out.find('\n', pos);
    if (end == std::string::npos) end = out.size();
    std::string line = out.substr(pos, end - pos);
    pos = end + 1;
    size_t first_space = line.find(' ');
    if (first_space == std::string::npos) continue;
    size_t name_start = line.find_first_not_of(' ', first_space);
    if (name_start != std::string::npos && line.compare(name_start, name.size(), name) == 0 &&
        (line.size() == name_start + name.size() || line[name_start + name.size()] == ' ')) {
      return line;
    }
  }
  return "";
}

std::string last_line(const std::string& out) {
  std::string s = out;
  while (!s.empty() && s.back() == '\n') s.pop_back();
  size_t nl = s.rfind('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
}

TEST(Check, TextReportsEveryRequiredFeatureOk) {
  RunResult r = lazycr({"check"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  for (const char* name :
       {"userfaultfd.syscall", "ptrace.seize", "uffd.feature.event_fork",
        "uffd.feature.event_remap", "uffd.feature.event_remove", "uffd.feature.event_unmap",
        "pidfd.getfd", "clone3.set_tid", "arch_prctl.map_vdso"}) {
    std::string line = line_for(r.out, name);
    ASSERT_FALSE(line.empty()) << "no line for " << name << " in:\n" << r.out;
    EXPECT_EQ(line.rfind("ok ", 0), 0u) << line;
  }
  // What dump --tcp-established uses (tests run as root; setup.sh installs nftables).
  for (const char* name : {"socket.tcp_repair", "net.nftables_lock"}) {
    std::string line = line_for(r.out, name);
    ASSERT_FALSE(line.empty()) << "no line for " << name << " in:\n" << r.out;
    EXPECT_EQ(line.rfind("ok ", 0), 0u) << line;
  }
  // Nothing required is missing; the verdict is the last line.
  EXPECT_EQ(r.out.find("\nmissing "), std::string::npos) << r.out;
  EXPECT_EQ(last_line(r.out).rfind("verdict: ready", 0), 0u) << r.out;
  EXPECT_EQ(r.err, "");
}

// lazycr loads the nftables library only to lock TCP connections: without it, lazycr starts,
// and `check` names the library on the net.nftables_lock line.
TEST(Check, WithoutTheNftablesLibraryStartsAndNamesIt) {
  const std::string lib = nftables_library();
  if (lib.empty()) GTEST_SKIP() << "no libnftables.so.1 on this machine";
  RunResult v = lazycr_without(lib, {"--version"});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  RunResult r = lazycr_without(lib, {"check"});
  std::string line = line_for(r.out, "net.nftables_lock");
  ASSERT_FALSE(line.empty()) << r.out << r.err;
  EXPECT_EQ(line.rfind("optional-missing ", 0), 0u) << line;
  EXPECT_NE(line.find("cannot load libnftables.so.1"), std::string::npos) << line;
}

TEST(Check, JsonReportsEveryRequiredFeatureOk) {
  RunResult r = lazycr({"check", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  const std::string& j = r.out;
  ASSERT_FALSE(j.empty());
  EXPECT_EQ(j.front(), '{');
  EXPECT_NE(j.find("\"kernel\": \""), std::string::npos) << j;
  EXPECT_NE(j.find("\"lazy_restore_ready\": true"), std::string::npos) << j;
  EXPECT_NE(j.find("\"uffd_features\": \"0x"), std::string::npos) << j;
  EXPECT_NE(j.find("\"xsave_size\": "), std::string::npos) << j;
  // The items themselves, whatever the layout: parsed by python3 (setup.sh installs it).
  TempDir dir;
  std::ofstream(dir / "check.json") << j;
  RunResult parsed = run({"/usr/bin/python3", "-c",
                          "import json,sys\n"
                          "d = {f['name']: f for f in json.load(open(sys.argv[1]))['features']}\n"
                          "for n in ('userfaultfd.syscall', 'ptrace.seize'):\n"
                          "    assert d[n]['ok'] and d[n]['required'], n\n"
                          "bad = [n for n, f in d.items() if f['required'] and not f['ok']]\n"
                          "assert not bad, bad\n",
                          dir / "check.json"});
  EXPECT_EQ(parsed.exit_code, 0) << parsed.err << j;
}

// The JSON must parse as JSON; python3 is on Debian machines, so use it when present.
TEST(Check, JsonIsValid) {
  if (::access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no python3 to parse JSON";
  RunResult r = lazycr({"check", "--json"});
  ASSERT_EQ(r.exit_code, 0);
  TempDir dir;
  {
    std::ofstream out(dir / "check.json");
    out << r.out;
  }
  RunResult parsed = run({"/usr/bin/python3", "-c",
                          "import json,sys\n"
                          "d = json.load(open(sys.argv[1]))\n"
                          "names = [f['name'] for f in d['features']]\n"
                          "assert len(names) == len(set(names)), names\n"
                          "assert all(set(f) == {'name','ok','required','detail','why'} "
                          "for f in d['features'])\n"
                          "assert d['lazy_restore_ready'] is True\n"
                          "assert int(d['uffd_features'], 16) & 0x4e == 0x4e\n"
                          "assert d['xsave_size'] > 0\n"
                          "print('valid')\n",
                          dir / "check.json"});
  EXPECT_EQ(parsed.exit_code, 0) << parsed.err;
  EXPECT_EQ(parsed.out, "valid\n");
}

// Is `pid` dead or dying: a zombie, or SIGKILL pending?
bool dying_now(pid_t pid) {
  auto status = proc::try_read_file("/proc/" + std::to_string(pid) + "/status");
  if (!status) return true;
  std::istringstream in(*status);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("State:", 0) == 0 && line.find('Z') != std::string::npos) return true;
    if (line.rfind("SigPnd:", 0) == 0 || line.rfind("ShdPnd:", 0) == 0)
      if (std::stoull(line.substr(7), nullptr, 16) & (1ull << (SIGKILL - 1))) return true;
  }
  return false;
}

// Between taking SIGKILL off its queue and becoming a zombie, a process shows neither: wait
// (a bound, not a timing) for one of them. One left stopped stays neither for ever.
bool dying(pid_t pid) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!dying_now(pid)) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// A lazycr killed while a probe child is stopped (LAZYCR_FAULT_INJECT=kill-during-probe): the
// child must die with it (it would stay stopped for ever, holding lazycr's stdout, so that a
// `$(lazycr check)` never returned).
TEST(Check, ProbeChildrenDieWithAKilledLazycr) {
  StateTarget t;
  TempDir images;
  t.dump(images / "img");
  for (std::vector<std::string> args :
       {std::vector<std::string>{"check"},
        std::vector<std::string>{"restore", "--lazy", "--shell-job", "-D", images / "img"}}) {
    SCOPED_TRACE(args[0]);
    args.insert(args.begin(), lazycr_bin());
    setenv("LAZYCR_FAULT_INJECT", "kill-during-probe", 1);
    Child lz(args);
    unsetenv("LAZYCR_FAULT_INJECT");
    EXPECT_EQ(lz.wait(), 128 + SIGKILL);
    // Its children are ours now (the harness is a child subreaper).
    for (pid_t c : proc::list_children(getpid())) {
      EXPECT_TRUE(dying(c))
          << "probe child " << c << " outlived lazycr: "
          << proc::try_read_file("/proc/" + std::to_string(c) + "/stat").value_or("gone");
      if (c > 0) kill(c, SIGKILL);
      int status;
      waitpid(c, &status, 0);
    }
    EXPECT_EQ(lz.read_rest(), "");  // end of file: nothing holds lazycr's stdout any more
  }
}

TEST(Check, HelpExitsZero) {
  RunResult r = lazycr({"check", "--help"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("--json"), std::string::npos) << r.out;
}

TEST(Check, UnknownOptionIsAUsageError) {
  RunResult r = lazycr({"check", "--bogus"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(r.out, "");
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "not one line: " << r.err;
  EXPECT_NE(r.err.find("--bogus"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace lazycr::test
