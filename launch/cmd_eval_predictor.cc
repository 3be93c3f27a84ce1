// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddEvalPredictorCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("eval-predictor", "Evaluate a routing predictor on a routing trace");
  c.run = [] { return ReportError(Unimplemented("'eval-predictor' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
