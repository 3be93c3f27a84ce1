// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddReplayCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("replay", "Trace-driven expert cache simulation");
  c.run = [] { return ReportError(Unimplemented("'replay' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
