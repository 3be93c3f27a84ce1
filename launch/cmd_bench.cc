// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddBenchCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("bench", "Offline benchmark of a workload");
  c.run = [] { return ReportError(Unimplemented("'bench' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
