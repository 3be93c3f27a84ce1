// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddGenerateCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("generate", "Generate text from a prompt");
  c.run = [] { return ReportError(Unimplemented("'generate' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
