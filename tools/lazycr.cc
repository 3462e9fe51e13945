// lazycr: command-line entry point. Parses options, calls one function per command, and
// turns any error into one line on stderr and a non-zero exit code (README: exit codes).
#include <sched.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "common/clock.h"
#include "common/error.h"
#include "common/log.h"
#include "image-format/ghost.h"
#include "tools/commands.h"

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
// What `lazycr dump` uses without --compress (or --level): LZ4 dumped a python dict heap and
// 512 MiB / 2 GiB of mixed pages 1.06-1.6x faster than zstd:-3 for images 1.01-1.06x its size,
// still under half of CRIU's (bench/RESULTS.md "Dump: --compress lz4"). Library users
// (image::PageStoreOptions) keep zstd unless they ask.
constexpr const char* kDefaultCompression = "auto";

// Option values CLI11 cannot check by itself: refused as usage errors, before anything runs.
bool usage_error(const std::string& what) {
  std::fprintf(stderr, "lazycr: %s (see --help)\n", what.c_str());
  return true;
}

// `frame_size` as given (64 bits: "5G" is refused by value rather than wrapped).
bool bad_dump_options(const lazycr::checkpoint::DumpOptions& d, uint64_t frame_size) {
  using lazycr::cat;
  if (d.dir.empty()) return usage_error("dump -D: the image directory is an empty path");
  if (frame_size % 4096 != 0 || frame_size < lazycr::image::kMinFrameSize ||
      frame_size > lazycr::image::kMaxFrameSize)
    return usage_error(
        cat("dump --frame-size ", frame_size, ": must be 16K..4M and a multiple of 4K"));
  if (d.ghost_limit > lazycr::image::kMaxGhostBytes)
    return usage_error(cat("dump --ghost-limit ", d.ghost_limit, ": at most ",
                           lazycr::image::kMaxGhostBytes, " (48M)"));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace lazycr;
  const uint64_t start_ns = now_ns();
  CLI::App app{"lazycr: checkpoint and (lazily) restore Linux process trees"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "lazycr " LAZYCR_VERSION);
  int verbose = 0;
  std::string log_file;
  app.add_flag("-v,--verbose", verbose, "More diagnostics on stderr (repeat for debug)");
  app.add_option("--log-file", log_file, "Write diagnostics to this file instead of stderr");

  cli::CheckOptions check;
  auto* check_cmd = app.add_subcommand("check", "Tell what this kernel supports for lazycr");
  check_cmd->add_flag("--json", check.json, "Machine-readable output");

  cli::ShowOptions show;
  auto* show_cmd = app.add_subcommand("show", "Decode an image directory");
  show_cmd->add_option("DIR", show.dir, "Image directory")->required();
  show_cmd->add_flag("--json", show.json, "Machine-readable output (stable keys)");
  show_cmd->add_flag("--pages", show.pages, "List every page run of every page store");
  show_cmd->add_flag("--verify", show.verify, "Decompress every frame and check its checksum");

  checkpoint::DumpOptions dump;
  auto* dump_cmd = app.add_subcommand(
      "dump", "Checkpoint a running process and every process below it into an image directory");
  dump_cmd->add_option("-t,--tree", dump.pid, "PID of the root of the process tree to dump")
      ->required();
  dump_cmd->add_option("-D,--images-dir", dump.dir, "Image directory to create")->required();
  dump_cmd->add_flag("--leave-running", dump.leave_running,
                     "Let the tree continue after the dump (default: kill it)");
  dump_cmd->add_flag("--frozen-copy", dump.frozen_copy,
                     "With --leave-running: keep the tree frozen while its memory is read "
                     "(default: a live dump, which lets it run on and reads its memory as it was "
                     "at the freeze from copy-on-write twins)");
  dump_cmd->add_flag("-f,--force", dump.replace, "Replace an existing image directory");
  CLI::Option* level_opt =
      dump_cmd
          ->add_option("--level", dump.level, "zstd compression level (as --compress zstd:LEVEL)")
          ->default_val(image::kDefaultLevel)
          ->check(CLI::Range(-7, 19));
  std::string compress;
  dump_cmd
      ->add_option("--compress", compress,
                   "Page compression: zstd[:LEVEL] (negative levels are zstd's fast ones), "
                   "lz4[:ACCELERATION] (faster, somewhat larger; 1..64, higher is faster and "
                   "larger) or none; frames that do not compress are stored raw")
      ->default_str(kDefaultCompression);
  dump_cmd->add_option("--threads", dump.threads, "Compression threads (0 = number of CPUs)")
      ->default_val(0)
      ->check(CLI::Range(0, 256));
  uint64_t frame_size = dump.frame_size;
  dump_cmd
      ->add_option("--frame-size", frame_size,
                   "Uncompressed bytes per page-store frame (16K..4M, multiple of 4K)")
      ->transform(CLI::AsSizeValue(false))
      ->default_str("64K");
  dump_cmd->add_option("--parent", dump.parent_dir,
                       "Incremental dump: store only the pages that differ from this earlier "
                       "image of the same tree, and refer to it for the rest");
  dump_cmd->add_flag("--track", dump.track,
                     "With --leave-running: track the pages the tree writes after this dump "
                     "(userfaultfd write-protect), so that a later --parent dump of this image "
                     "reads only those");
  dump_cmd->add_flag("--hash-pages", dump.page_hashes,
                     "Record a digest of every page, so that a later --parent dump of this "
                     "image compares digests instead of reading it back (implied by --parent)");
  dump_cmd->add_flag("--skip-unsupported-fds", dump.skip_unsupported_fds,
                     "Record descriptors lazycr cannot restore instead of refusing to dump "
                     "(restore --skip-unsupported-fds opens /dev/null in their place)");
  dump_cmd->add_flag("--tcp-established", dump.tcp_established,
                     "Checkpoint established TCP connections (TCP_REPAIR; restore needs the "
                     "flag too); without it the dump refuses them");
  dump_cmd->add_flag("--ext-unix-sk", dump.ext_unix_sk,
                     "Record datagram UNIX sockets connected to a bound socket outside the tree "
                     "(restore --ext-unix-sk connects them to that name again), as CRIU's flag");
  dump_cmd
      ->add_option("--ghost-limit", dump.ghost_limit,
                   "Largest deleted file or memfd whose contents the image stores (at most 48M)")
      ->transform(CLI::AsSizeValue(false))
      ->default_str("16M");
  bool no_dedup = false;
  dump_cmd->add_flag("--no-dedup", no_dedup,
                     "Store every process's pages in full (default: pages a fork left shared, "
                     "and shared memory mapped by several processes, are stored once)");
  dump_cmd->add_option("--fault-inject", dump.fault_inject)->group("");  // tests only

  cli::RestoreCliOptions restore;
  restore.restore.start_ns = start_ns;
  auto* restore_cmd =
      app.add_subcommand("restore", "Restore a process tree from an image directory");
  restore_cmd->add_option("-D,--images-dir", restore.restore.dir, "Image directory")->required();
  restore_cmd->add_flag("-d,--detach", restore.detach,
                        "Return once the process runs and print its pid (default: wait for it "
                        "and exit with its status)");
  restore_cmd->add_option("--pidfile", restore.pidfile, "Write the restored process's pid here");
  restore_cmd->add_flag("--shell-job", restore.restore.shell_job,
                        "Give the process lazycr's fds 0-2 where it had a terminal or something "
                        "lazycr cannot restore; a root that led no session stays in lazycr's");
  restore_cmd->add_flag("--skip-unsupported-fds", restore.restore.skip_unsupported_fds,
                        "Open /dev/null (same number, access mode and flags) in place of each "
                        "descriptor the image recorded but lazycr cannot restore");
  restore_cmd->add_flag("--tcp-established", restore.restore.tcp_established,
                        "Restore the image's established TCP connections (dump "
                        "--tcp-established); without it an image holding any is refused");
  restore_cmd->add_flag("--trust-image", restore.restore.trust_image,
                        "Restore an image that asks for root, capabilities or ids other than "
                        "yours even if this machine did not sign it (see README, Trust)");
  restore_cmd->add_flag("--pidns", restore.restore.pidns,
                        "Restore into a new PID namespace (its PIDs are free there); a minimal "
                        "reaper is its PID 1");
  restore_cmd->add_flag("--ext-unix-sk", restore.restore.ext_unix_sk,
                        "Connect datagram UNIX sockets recorded by dump --ext-unix-sk to their "
                        "peer's name outside the tree again");
  restore_cmd->add_flag("--netns", restore.restore.netns,
                        "Restore into a fresh network namespace with loopback up (its ports are "
                        "free there: a server restores beside its still-running original)");
  auto* lazy_flag = restore_cmd->add_flag(
      "--lazy", restore.restore.lazy.enabled,
      "Let the process run at once: its private anonymous memory is served on first touch by a "
      "page server (userfaultfd) that prefetches the rest and exits when nothing is owed");
  restore_cmd
      ->add_option("--stats", restore.restore.lazy.stats_file,
                   "--lazy: write the page server's stats here (JSON) when it finishes")
      ->needs(lazy_flag);
  std::string prefetch = "on";
  restore_cmd
      ->add_option("--prefetch", prefetch,
                   "--lazy: push owed pages in the background (on) or only on faults (off)")
      ->check(CLI::IsMember({"on", "off"}))
      ->default_str("on")
      ->needs(lazy_flag);
  restore_cmd
      ->add_option("--window", restore.restore.lazy.window,
                   "--lazy: bytes filled per fault (4K..1M, multiple of 4K)")
      ->transform(CLI::AsSizeValue(false))
      ->default_str("64K")
      ->needs(lazy_flag);
  restore_cmd
      ->add_flag("--no-tree-sharing{false}", restore.restore.lazy.tree_sharing,
                 "--lazy, trees: fork every process at once (first instruction sooner); the "
                 "pages a child shared with its parent are each its own copy afterwards")
      ->needs(lazy_flag);
  restore_cmd
      ->add_flag("--record-working-set", restore.restore.lazy.record_working_set,
                 "--lazy: record in the image the pages the process touches in its first "
                 "seconds (until 1 s without a fault, at most 10 s); later lazy restores push "
                 "them first")
      ->needs(lazy_flag);
  restore_cmd
      ->add_option("--server-pidfile", restore.restore.lazy.server_pidfile,
                   "--lazy: write the page server's pid here")
      ->needs(lazy_flag);
  // Tests: how long without a fault ends the recording of a working set.
  restore_cmd->add_option("--record-quiet-ms", restore.restore.lazy.record_quiet_ms)
      ->group("")
      ->check(CLI::Range(1, 10'000))
      ->needs(lazy_flag);
  // Benchmarks: the page server's CPU.
  restore_cmd->add_option("--server-cpu", restore.restore.lazy.server_cpu)
      ->group("")
      ->check(CLI::Range(0, CPU_SETSIZE - 1))
      ->needs(lazy_flag);
  // Internal, for tests: fail at the named step.
  restore_cmd->add_option("--fault-inject", restore.restore.fault_inject)->group("");

  cli::TemplateOptions tmpl;
  tmpl.start_ns = start_ns;
  auto* template_cmd = app.add_subcommand(
      "template", "Restore an image once and hold it, answering clone requests on a socket");
  template_cmd->add_option("-D,--images-dir", tmpl.dir, "Image directory")->required();
  template_cmd->add_option("--socket", tmpl.socket, "UNIX socket to answer on (mode 0600)")
      ->required();
  template_cmd->add_flag("-d,--detach", tmpl.detach,
                         "Run in the background once the template is held; print its pid");
  template_cmd->add_flag("--small-pages", tmpl.small_pages,
                         "Do not collapse the held memory into huge pages (clones are then "
                         "slower to make: fork copies one page-table entry per 4 KiB page)");
  template_cmd->add_flag("--shell-job", tmpl.shell_job,
                         "As restore --shell-job, for the template itself (needed to hold an "
                         "image whose fds 0-2 lead outside it; clones take their own with "
                         "clone --shell-job)");
  template_cmd->add_flag("--netns", tmpl.netns,
                         "Hold the template in a fresh network namespace with loopback up; "
                         "clones stay in it (its ports are free there) unless clone --netns");
  cli::CloneOptions clone;
  clone.start_ns = start_ns;
  auto* clone_cmd = app.add_subcommand(
      "clone", "Start one running copy of a held template (lazycr template), sharing its memory");
  clone_cmd->add_option("--socket", clone.socket, "The template's socket")->required();
  clone_cmd->add_flag("-d,--detach", clone.detach, "Leave the clone running; print its pid");
  clone_cmd->add_flag("--stop", clone.stop, "Stop the template (its clones keep running)");
  clone_cmd->add_flag("--netns", clone.netns,
                      "Put the clone in a fresh network namespace with loopback up (a server "
                      "can be cloned many times on the same port)");
  clone_cmd->add_flag("--shell-job", clone.shell_job,
                      "The clone's fds 0-2 that lead outside the image (a terminal, a pipe) "
                      "are this command's own fds 0-2 (its session and process group stay "
                      "the template's)");
  clone_cmd->add_option("--pidfile", clone.pidfile, "Write the clone's pid here");
  clone_cmd->add_option("--stats", clone.stats_file, "Write the clone's timings as JSON here");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "lazycr: %s (see --help)\n", e.what());
    return kExitUsage;
  }

  try {
    log::set_level(verbose >= 2   ? log::Level::kDebug
                   : verbose == 1 ? log::Level::kInfo
                                  : log::Level::kWarn);
    if (!log_file.empty()) log::set_file(log_file);
    if (*check_cmd) return cli::run_check(check);
    if (*show_cmd) {
      if (show.dir.empty() && usage_error("show: the image directory is an empty path"))
        return kExitUsage;
      return cli::run_show(show);
    }
    if (*dump_cmd) {
      dump.dedup = !no_dedup;
      if (bad_dump_options(dump, frame_size)) return kExitUsage;
      // --level alone keeps meaning zstd at that level.
      if (compress.empty() && level_opt->count() == 0) compress = kDefaultCompression;
      if (!compress.empty()) {
        image::PageStoreOptions parsed;
        try {
          image::parse_compression(compress, parsed);
        } catch (const Error& e) {
          usage_error(cat("dump ", e.what()));
          return kExitUsage;
        }
        dump.compression = parsed.compression;
        dump.auto_codec = parsed.auto_codec;
        if (parsed.compression != image::PageIndex::NONE) dump.level = parsed.level;
      }
      dump.frame_size = static_cast<uint32_t>(frame_size);
      return cli::run_dump(dump);
    }
    if (*template_cmd) return cli::run_template(tmpl);
    if (*clone_cmd) return cli::run_clone(clone);
    if (*restore_cmd) {
      if (restore.restore.dir.empty() &&
          usage_error("restore -D: the image directory is an empty path"))
        return kExitUsage;
      restore.restore.lazy.prefetch = prefetch == "on";
      const uint64_t w = restore.restore.lazy.window;
      if (w < 4096 || w > (1u << 20) || w % 4096 != 0) {
        std::fprintf(stderr, "lazycr: --window %llu: must be 4K..1M and a multiple of 4K\n",
                     static_cast<unsigned long long>(w));
        return kExitUsage;
      }
      return cli::run_restore(restore);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lazycr: %s\n", e.what());
    return kExitFailure;
  }
  return kExitUsage;
}
