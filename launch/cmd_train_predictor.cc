// Placeholder until the command lands.
#include "launch/command.h"

namespace ef::launch {

Command AddTrainPredictorCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("train-predictor", "Train a routing predictor on a routing trace");
  c.run = [] { return ReportError(Unimplemented("'train-predictor' is not available in this build yet")); };
  return c;
}

}  // namespace ef::launch
