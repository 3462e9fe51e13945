// /proc parsers: fixed sample texts, then live reads of this test process.
#include "common/proc.h"

#include <elf.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <string>

#include "common/error.h"
#include "common/fd.h"
#include "common/signals.h"

namespace lazycr::proc {
namespace {

const char kMaps[] =
    "55d6b9994000-55d6b9996000 r--p 00000000 fe:00 247134                     /usr/bin/cat\n"
    "55d6b9996000-55d6b999b000 r-xp 00002000 fe:00 247134                     /usr/bin/cat\n"
    "55d6ba000000-55d6ba021000 rw-p 00000000 00:00 0                          [heap]\n"
    "7f10a0000000-7f10a0004000 rw-s 00001000 00:1f 98765                      /tmp/my dir/a "
    "file (1).dat (deleted)\n"
    "7f10a0004000-7f10a0005000 ---p 00000000 00:00 0 \n"
    "7f10a0005000-7f10a0006000 rw-p 00000000 00:00 0\n"
    "7ffd3c000000-7ffd3c021000 rw-p 00000000 00:00 0                          [stack]\n"
    "7ffd3c1f8000-7ffd3c1fc000 r--p 00000000 00:00 0                          [vvar]\n"
    "7ffd3c1fc000-7ffd3c1fe000 r--p 00000000 00:00 0                          [vvar_vclock]\n"
    "7ffd3c1fe000-7ffd3c200000 r-xp 00000000 00:00 0                          [vdso]\n"
    "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n";

TEST(ProcMaps, ParsesFields) {
  auto m = parse_maps(kMaps);
  ASSERT_EQ(m.size(), 11u);
  EXPECT_EQ(m[0].start, 0x55d6b9994000u);
  EXPECT_EQ(m[0].end, 0x55d6b9996000u);
  EXPECT_TRUE(m[0].read);
  EXPECT_FALSE(m[0].write);
  EXPECT_FALSE(m[0].exec);
  EXPECT_FALSE(m[0].shared);
  EXPECT_EQ(m[0].dev_major, 0xfeu);
  EXPECT_EQ(m[0].dev_minor, 0u);
  EXPECT_EQ(m[0].inode, 247134u);
  EXPECT_EQ(m[0].path, "/usr/bin/cat");
  EXPECT_EQ(m[0].vmflags, "");
  EXPECT_TRUE(m[1].exec);
  EXPECT_EQ(m[1].offset, 0x2000u);
  EXPECT_EQ(m[2].path, "[heap]");
  EXPECT_TRUE(m[3].shared);
  EXPECT_TRUE(m[3].write);
  EXPECT_EQ(m[3].offset, 0x1000u);
  EXPECT_EQ(m[3].dev_minor, 0x1fu);
  EXPECT_EQ(m[3].path, "/tmp/my dir/a file (1).dat (deleted)");
  EXPECT_EQ(m[4].path, "");
  EXPECT_FALSE(m[4].read || m[4].write || m[4].exec);
  EXPECT_EQ(m[5].path, "");
  EXPECT_EQ(m[5].inode, 0u);
  EXPECT_EQ(m[6].path, "[stack]");
  EXPECT_EQ(m[7].path, "[vvar]");
  EXPECT_EQ(m[8].path, "[vvar_vclock]");
  EXPECT_EQ(m[9].path, "[vdso]");
  EXPECT_TRUE(m[9].exec);
  EXPECT_EQ(m[10].start, 0xffffffffff600000u);
  EXPECT_EQ(m[10].path, "[vsyscall]");
}

TEST(ProcMaps, RejectsGarbage) {
  EXPECT_THROW(parse_maps("hello world\n"), Error);
  EXPECT_THROW(parse_maps("1000-zz r--p 00000000 00:00 0\n"), Error);
  EXPECT_THROW(parse_maps("2000-1000 r--p 00000000 00:00 0\n"), Error);
  EXPECT_THROW(parse_maps("1000-2000 r--p 00000000\n"), Error);
  EXPECT_THROW(parse_maps("Rss: 4 kB\n"), Error);  // smaps field before any mapping
  EXPECT_TRUE(parse_maps("").empty());
}

const char kSmaps[] =
    "55d6ba000000-55d6ba021000 rw-p 00000000 00:00 0                          [heap]\n"
    "Size:                132 kB\n"
    "KernelPageSize:        4 kB\n"
    "MMUPageSize:           4 kB\n"
    "Rss:                  12 kB\n"
    "Pss:                  12 kB\n"
    "Pss_Dirty:            12 kB\n"
    "Shared_Clean:          0 kB\n"
    "Shared_Dirty:          0 kB\n"
    "Private_Clean:         0 kB\n"
    "Private_Dirty:        12 kB\n"
    "Referenced:           12 kB\n"
    "Anonymous:            12 kB\n"
    "KSM:                   0 kB\n"
    "LazyFree:              0 kB\n"
    "AnonHugePages:         0 kB\n"
    "ShmemPmdMapped:        0 kB\n"
    "FilePmdMapped:         0 kB\n"
    "Shared_Hugetlb:        0 kB\n"
    "Private_Hugetlb:       0 kB\n"
    "Swap:                  8 kB\n"
    "SwapPss:               8 kB\n"
    "Locked:                0 kB\n"
    "THPeligible:           0\n"
    "ProtectionKey:         0\n"
    "VmFlags: rd wr mr mw me ac sd \n"
    "7f10a0000000-7f10a0004000 rw-s 00001000 00:1f 98765                      /tmp/x y (deleted)\n"
    "Size:                 16 kB\n"
    "Rss:                   4 kB\n"
    "Anonymous:             0 kB\n"
    "Swap:                  0 kB\n"
    "VmFlags: rd wr sh mr mw me ms sd \n"
    "7ffd3c000000-7ffd3c021000 rw-p 00000000 00:00 0                          [stack]\n"
    "Size:                132 kB\n"
    "Rss:                  16 kB\n"
    "Anonymous:            16 kB\n"
    "Swap:                  0 kB\n"
    "VmFlags: rd wr mr mw me gd ac \n"
    "7ffd3c1f8000-7ffd3c1fc000 r--p 00000000 00:00 0                          [vvar]\n"
    "Size:                 16 kB\n"
    "Rss:                   0 kB\n"
    "VmFlags: rd mr pf io de dd sd \n"
    "7ffd3c1fc000-7ffd3c1fe000 r--p 00000000 00:00 0                          [vvar_vclock]\n"
    "Size:                  8 kB\n"
    "Rss:                   0 kB\n"
    "VmFlags: rd mr pf io de dd sd \n"
    "7ffd3c1fe000-7ffd3c200000 r-xp 00000000 00:00 0                          [vdso]\n"
    "Size:                  8 kB\n"
    "Rss:                   8 kB\n"
    "Anonymous:             0 kB\n"
    "VmFlags: rd ex mr mw me de sd \n";

TEST(ProcMaps, ParsesSmaps) {
  auto m = parse_maps(kSmaps);
  ASSERT_EQ(m.size(), 6u);
  EXPECT_EQ(m[0].path, "[heap]");
  EXPECT_EQ(m[0].rss_kb, 12u);
  EXPECT_EQ(m[0].anonymous_kb, 12u);
  EXPECT_EQ(m[0].swap_kb, 8u);  // not SwapPss
  EXPECT_EQ(m[0].vmflags, "rd wr mr mw me ac sd");
  EXPECT_EQ(m[1].path, "/tmp/x y (deleted)");
  EXPECT_TRUE(m[1].shared);
  EXPECT_EQ(m[1].rss_kb, 4u);
  EXPECT_EQ(m[1].vmflags, "rd wr sh mr mw me ms sd");
  EXPECT_EQ(m[2].path, "[stack]");
  EXPECT_EQ(m[2].vmflags, "rd wr mr mw me gd ac");
  EXPECT_EQ(m[3].path, "[vvar]");
  EXPECT_EQ(m[3].vmflags, "rd mr pf io de dd sd");
  EXPECT_EQ(m[4].path, "[vvar_vclock]");
  EXPECT_EQ(m[5].path, "[vdso]");
  EXPECT_EQ(m[5].rss_kb, 8u);
  EXPECT_EQ(m[5].vmflags, "rd ex mr mw me de sd");
}

// 52 fields; comm is "we) (ird )" and must not split the line.
const char kStat[] =
    "4242 (we) (ird )) S 4241 4240 4239 34816 4240 4194560 113 0 0 0 0 0 0 0 20 0 3 0 "
    "5623711 3133440 415 18446744073709551615 94000000000000 94000000020000 "
    "140720000000000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94000000030000 94000000031000 "
    "94000001000000 140720000001000 140720000001020 140720000001020 140720000002000 0\n";

TEST(ProcStat, ParsesFieldsWithParensInComm) {
  Stat s = parse_stat(kStat);
  EXPECT_EQ(s.pid, 4242);
  EXPECT_EQ(s.comm, "we) (ird )");
  EXPECT_EQ(s.state, 'S');
  EXPECT_EQ(s.ppid, 4241);
  EXPECT_EQ(s.pgrp, 4240);
  EXPECT_EQ(s.session, 4239);
  EXPECT_EQ(s.flags, 4194560u);
  EXPECT_EQ(s.num_threads, 3u);
  EXPECT_EQ(s.start_time, 5623711u);
  EXPECT_EQ(s.start_code, 94000000000000u);
  EXPECT_EQ(s.end_code, 94000000020000u);
  EXPECT_EQ(s.start_stack, 140720000000000u);
  EXPECT_EQ(s.exit_signal, 17);
  EXPECT_EQ(s.start_data, 94000000030000u);
  EXPECT_EQ(s.end_data, 94000000031000u);
  EXPECT_EQ(s.start_brk, 94000001000000u);
  EXPECT_EQ(s.arg_start, 140720000001000u);
  EXPECT_EQ(s.arg_end, 140720000001020u);
  EXPECT_EQ(s.env_start, 140720000001020u);
  EXPECT_EQ(s.env_end, 140720000002000u);
  EXPECT_EQ(s.exit_code, 0);
}

TEST(ProcStat, RejectsGarbage) {
  EXPECT_THROW(parse_stat("4242 (x) S 1 2 3\n"), Error);  // too few fields
  EXPECT_THROW(parse_stat("no parens here"), Error);
  EXPECT_THROW(parse_stat(""), Error);
}

const char kStatus[] =
    "Name:\tmy prog\n"
    "Umask:\t0027\n"
    "State:\tS (sleeping)\n"
    "Tgid:\t4661\n"
    "Ngid:\t0\n"
    "Pid:\t4662\n"
    "PPid:\t4653\n"
    "TracerPid:\t4000\n"
    "Uid:\t1000\t1001\t1002\t1003\n"
    "Gid:\t100\t101\t102\t103\n"
    "FDSize:\t256\n"
    "Groups:\t4 24 27 \n"
    "NStgid:\t4661\n"
    "VmPeak:\t    3060 kB\n"
    "Threads:\t2\n"
    "SigQ:\t0/96365\n"
    "SigPnd:\t0000000000000200\n"
    "ShdPnd:\t0000000000000100\n"
    "SigBlk:\t0000000000010000\n"
    "SigIgn:\t0000000000001000\n"
    "SigCgt:\t0000000180004002\n"
    "CapInh:\t0000000000000000\n"
    "CapPrm:\t000001fffeffffff\n"
    "CapEff:\t000001fffeffffff\n"
    "CapBnd:\t000001ffffffffff\n"
    "CapAmb:\t0000000000000001\n"
    "NoNewPrivs:\t1\n"
    "Seccomp:\t0\n";

TEST(ProcStatus, ParsesFields) {
  Status s = parse_status(kStatus);
  EXPECT_EQ(s.name, "my prog");
  EXPECT_EQ(s.umask, 027u);
  EXPECT_EQ(s.state, 'S');
  EXPECT_EQ(s.tgid, 4661);
  EXPECT_EQ(s.pid, 4662);
  EXPECT_EQ(s.ppid, 4653);
  EXPECT_EQ(s.tracer_pid, 4000);
  EXPECT_EQ(s.uids, (std::vector<uint32_t>{1000, 1001, 1002, 1003}));
  EXPECT_EQ(s.gids, (std::vector<uint32_t>{100, 101, 102, 103}));
  EXPECT_EQ(s.groups, (std::vector<uint32_t>{4, 24, 27}));
  EXPECT_EQ(s.threads, 2u);
  EXPECT_EQ(s.sig_pnd, 0x200u);
  EXPECT_EQ(s.shd_pnd, 0x100u);
  EXPECT_EQ(s.sig_blk, 0x10000u);
  EXPECT_EQ(s.sig_ign, 0x1000u);
  EXPECT_EQ(s.sig_cgt, 0x180004002u);
  EXPECT_EQ(s.cap_inh, 0u);
  EXPECT_EQ(s.cap_prm, 0x1fffeffffffu);
  EXPECT_EQ(s.cap_eff, 0x1fffeffffffu);
  EXPECT_EQ(s.cap_bnd, 0x1ffffffffffu);
  EXPECT_EQ(s.cap_amb, 1u);
  EXPECT_TRUE(s.no_new_privs);
}

TEST(ProcStatus, EmptyGroups) {
  Status s = parse_status("Name:\tx\nGroups:\t \nUmask:\t0022\n");
  EXPECT_TRUE(s.groups.empty());
  EXPECT_EQ(s.umask, 022u);
  EXPECT_THROW(parse_status("Tgid:\tabc\n"), Error);
}

TEST(ProcFdinfo, ParsesFields) {
  FdInfo f = parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t24\nino:\t123456\n");
  EXPECT_EQ(f.pos, 4096u);
  EXPECT_EQ(f.flags, 02100002u);
  EXPECT_EQ(f.mnt_id, 24);
  EXPECT_EQ(f.ino, 123456u);
  // Extra lines (eventfd, inotify, ...) are ignored.
  FdInfo g = parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t7\neventfd-count:\t5\n");
  EXPECT_EQ(g.flags, 02u);
  EXPECT_EQ(g.ino, 7u);
  EXPECT_THROW(parse_fdinfo("flags:\t09\npos:\t0\n"), Error);  // not octal
  EXPECT_THROW(parse_fdinfo("mnt_id:\t1\n"), Error);
}

// --- live reads of this process ---

TEST(ProcLive, SmapsOfSelf) {
  std::string text = read_file("/proc/self/smaps");
  EXPECT_GT(text.size(), 4096u);  // more than one read(2) worth
  auto maps = read_smaps(::getpid());
  ASSERT_FALSE(maps.empty());
  bool vdso = false;
  uint64_t prev_end = 0;
  for (const auto& m : maps) {
    EXPECT_LT(m.start, m.end);
    EXPECT_LE(prev_end, m.start);
    prev_end = m.end;
    EXPECT_FALSE(m.vmflags.empty()) << m.path;
    if (m.path == "[vdso]") {
      vdso = true;
      EXPECT_TRUE(m.exec);
      EXPECT_NE(m.vmflags.find("ex"), std::string::npos);
    }
  }
  EXPECT_TRUE(vdso);
  // The code of this function lives in an executable mapping of our own binary.
  auto self = reinterpret_cast<uint64_t>(&read_smaps);
  auto it = std::find_if(maps.begin(), maps.end(),
                         [&](const MapsEntry& m) { return m.start <= self && self < m.end; });
  ASSERT_NE(it, maps.end());
  EXPECT_TRUE(it->exec);
}

TEST(ProcLive, StatStatusOfSelf) {
  Stat st = read_stat(::getpid());
  EXPECT_EQ(st.pid, ::getpid());
  EXPECT_EQ(st.ppid, ::getppid());
  EXPECT_EQ(st.state, 'R');
  EXPECT_GE(st.num_threads, 1u);
  auto again = try_read_stat(::getpid());
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->start_time, st.start_time);
  EXPECT_FALSE(try_read_stat(0).has_value());  // no /proc/0
  EXPECT_NE(st.start_brk, 0u);
  EXPECT_LT(st.arg_start, st.arg_end);
  EXPECT_EQ(st.exit_signal, SIGCHLD);
  std::string comm = read_file("/proc/self/comm");
  EXPECT_EQ(st.comm + "\n", comm);

  Status s = read_status(::getpid());
  EXPECT_EQ(s.pid, ::getpid());
  EXPECT_EQ(s.tgid, ::getpid());
  EXPECT_EQ(s.ppid, ::getppid());
  EXPECT_EQ(s.name + "\n", comm);
  EXPECT_EQ(s.uids.size(), 4u);
  EXPECT_EQ(s.uids[0], ::getuid());
  EXPECT_EQ(s.gids.size(), 4u);
  EXPECT_EQ(s.threads, st.num_threads);
  mode_t old = ::umask(027);
  EXPECT_EQ(read_status(::getpid()).umask, 027u);
  ::umask(old);
}

TEST(ProcLive, TasksFdsFdinfo) {
  auto tasks = list_tasks(::getpid());
  EXPECT_NE(std::find(tasks.begin(), tasks.end(), static_cast<pid_t>(::syscall(SYS_gettid))),
            tasks.end());
  EXPECT_TRUE(std::is_sorted(tasks.begin(), tasks.end()));

  UniqueFd fd(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::lseek(fd.get(), 123, SEEK_SET), 123);
  auto fds = list_fds(::getpid());
  EXPECT_TRUE(std::is_sorted(fds.begin(), fds.end()));
  for (int want : {0, 1, 2, fd.get()}) {
    EXPECT_NE(std::find(fds.begin(), fds.end(), want), fds.end()) << want;
  }
  // No fd of the listing itself is left behind or reported.
  auto again = list_fds(::getpid());
  EXPECT_EQ(fds, again);

  FdInfo info = parse_fdinfo(read_file("/proc/self/fdinfo/" + std::to_string(fd.get())));
  struct stat st;
  ASSERT_EQ(::fstat(fd.get(), &st), 0);
  EXPECT_EQ(info.pos, 123u);
  EXPECT_EQ(info.flags & O_ACCMODE, static_cast<uint32_t>(O_RDONLY));
  EXPECT_TRUE(info.flags & O_CLOEXEC);
  EXPECT_EQ(info.ino, st.st_ino);
  EXPECT_GE(info.mnt_id, 0);

  std::string exe = read_link("/proc/self/exe");
  EXPECT_EQ(read_link("/proc/self/fd/" + std::to_string(fd.get())), exe);
  EXPECT_NE(exe.find("proc_test"), std::string::npos);
}

TEST(ProcLive, ChildrenAndExists) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd r(p[0]), w(p[1]);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    char c;
    w.reset();
    (void)!::read(r.get(), &c, 1);  // until the parent closes its end
    ::_exit(0);
  }
  r.reset();
  auto kids = list_children(::getpid());
  EXPECT_NE(std::find(kids.begin(), kids.end(), pid), kids.end());
  EXPECT_TRUE(exists(pid));
  w.reset();  // child exits
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  kids = list_children(::getpid());
  EXPECT_EQ(std::find(kids.begin(), kids.end(), pid), kids.end());
  EXPECT_FALSE(exists(pid));
  EXPECT_FALSE(exists(0));
  EXPECT_FALSE(exists(-1));
  EXPECT_TRUE(exists(::getpid()));
}

TEST(ProcLive, Auxv) {
  auto auxv = read_auxv(::getpid());
  ASSERT_GE(auxv.size(), 2 * sizeof(uint64_t));
  ASSERT_EQ(auxv.size() % (2 * sizeof(uint64_t)), 0u);
  const auto* words = reinterpret_cast<const uint64_t*>(auxv.data());
  size_t n = auxv.size() / sizeof(uint64_t);
  EXPECT_EQ(words[n - 2], static_cast<uint64_t>(AT_NULL));
  bool pagesz = false;
  for (size_t i = 0; i + 1 < n; i += 2) {
    if (words[i] == AT_PAGESZ) {
      pagesz = true;
      EXPECT_EQ(words[i + 1], static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)));
    }
  }
  EXPECT_TRUE(pagesz);
}

TEST(ProcLive, ErrorsNameThePath) {
  try {
    read_file("/proc/self/no-such-file");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/proc/self/no-such-file"), std::string::npos) << e.what();
    EXPECT_EQ(e.sys_errno(), ENOENT);
  }
  EXPECT_FALSE(try_read_file("/proc/self/no-such-file").has_value());
  EXPECT_TRUE(try_read_file("/proc/self/stat").has_value());
  try {
    read_link("/proc/self/stat");  // not a link
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/proc/self/stat"), std::string::npos) << e.what();
  }
  try {
    list_fds(999999999);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/proc/999999999/fd"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lazycr::proc
