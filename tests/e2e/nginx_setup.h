// An nginx configuration in a temporary directory for the tests: master and two workers
// (running as nobody) serving one static file on 127.0.0.1:PORT.
#pragma once

#include <sys/stat.h>

#include <fstream>
#include <string>

#include "tests/e2e/harness.h"

namespace lazycr::test {

struct NginxSetup {
  TempDir dir;
  std::string conf = dir / "nginx.conf";
  explicit NginxSetup(int port, const std::string& page = "served by a restored nginx") {
    // Its workers run as nobody: the files they serve must be theirs to read.
    ::chmod(dir.path().c_str(), 0755);
    ::mkdir((dir / "www").c_str(), 0755);
    ::mkdir((dir / "logs").c_str(), 0755);
    std::ofstream(dir / "www/index.html") << page << "\n";
    std::ofstream(conf) << "daemon off;\nmaster_process on;\nworker_processes 2;\n"
                        << "pid " << dir / "nginx.pid;\n"
                        << "error_log " << dir / "logs/error.log;\n"
                        << "events { worker_connections 64; }\n"
                        << "http { access_log off;\n"
                        << "  client_body_temp_path " << dir / "body;\n"
                        << "  server { listen 127.0.0.1:" << port << "; root " << dir / "www;"
                        << " }\n}\n";
  }
};

}  // namespace lazycr::test
