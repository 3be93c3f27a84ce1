// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddServeCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("serve", "OpenAI-compatible HTTP server");
  c.run = [] { return ReportError(Unimplemented("'serve' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
