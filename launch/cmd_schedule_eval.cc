// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddScheduleEvalCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("schedule-eval", "Trace-driven evaluation of token regrouping and placement");
  c.run = [] { return ReportError(Unimplemented("'schedule-eval' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
