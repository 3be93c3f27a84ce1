// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddScoreCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("score", "Full-sequence forward: logits and router top-k as JSON");
  c.run = [] { return ReportError(Unimplemented("'score' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
