// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddTraceCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("trace", "Record real routing of a model on prompts as a routing trace (JSONL)");
  c.run = [] { return ReportError(Unimplemented("'trace' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
