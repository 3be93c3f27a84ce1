// The `expertflow` subcommands. Each lives in its own launch/cmd_<name>.cc and adds itself to
// the CLI11 app; main() runs whichever one was chosen. A command returns the process exit code
// (0 success, 1 error, 2 usage) and prints errors through ReportError.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

#include "runtime/core/status.h"

namespace ef::launch {

struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

Command AddInfoCommand(CLI::App& root);
Command AddGenerateCommand(CLI::App& root);
Command AddScoreCommand(CLI::App& root);
Command AddTraceCommand(CLI::App& root);
Command AddReplayCommand(CLI::App& root);
Command AddTrainPredictorCommand(CLI::App& root);
Command AddEvalPredictorCommand(CLI::App& root);
Command AddScheduleEvalCommand(CLI::App& root);
Command AddServeCommand(CLI::App& root);
Command AddBenchCommand(CLI::App& root);
Command AddPlaceCommand(CLI::App& root);
Command AddQuantizeCommand(CLI::App& root);

// Prints "error: <message>" to stderr and returns 1.
int ReportError(const Status& status);

}  // namespace ef::launch
