// `expertflow info`: version, build options, backends found, environment knobs.
#include <cstdio>

#include "launch/command.h"
#include "runtime/core/build_info.h"
#include "runtime/core/params.h"

namespace ef::launch {

Command AddInfoCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("info", "Version, build options, backends found and every environment knob");
  c.run = [] {
    std::printf("expertflow %s (git %s)\n", EF_VERSION_STRING, EF_GIT_SHA);
    std::printf("build: %s, %s\n", EF_BUILD_TYPE, EF_CXX_COMPILER);
#ifdef EF_HAVE_CUDA
    std::printf("backends: cpu, cuda (compiled in)\n");
#else
    std::printf("backends: cpu (built without CUDA)\n");
#endif
    std::printf("\nenvironment knobs:\n");
    std::printf("  %-28s %-7s %-14s %-8s %s\n", "KEY", "TYPE", "VALUE", "SOURCE", "DESCRIPTION");
    for (const auto& p : params::AllParams()) {
      std::printf("  %-28s %-7s %-14s %-8s %s\n", p.key.c_str(), p.type.c_str(), p.current().c_str(),
                  p.from_env() ? "env" : "default", p.doc.c_str());
    }
    return 0;
  };
  return c;
}

}  // namespace ef::launch
