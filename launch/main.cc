// expertflow: the command-line entry point.
#include <cstdio>
#include <vector>

#include "launch/command.h"
#include "runtime/core/build_info.h"

int main(int argc, char** argv) {
  CLI::App app{
      "ExpertFlow: a Mixture-of-Experts inference and serving runtime.\n"
      "Run `expertflow <command> --help` for the options of a command.",
      "expertflow"};
  app.set_version_flag("--version", std::string(EF_VERSION_STRING " (" EF_GIT_SHA ")"));
  app.require_subcommand(1);
  using ef::launch::Command;
  std::vector<Command> commands = {
      ef::launch::AddGenerateCommand(app),       ef::launch::AddScoreCommand(app),
      ef::launch::AddServeCommand(app),          ef::launch::AddBenchCommand(app),
      ef::launch::AddTraceCommand(app),          ef::launch::AddReplayCommand(app),
      ef::launch::AddTrainPredictorCommand(app), ef::launch::AddEvalPredictorCommand(app),
      ef::launch::AddScheduleEvalCommand(app),   ef::launch::AddPlaceCommand(app),
      ef::launch::AddQuantizeCommand(app),       ef::launch::AddInfoCommand(app),
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  for (const Command& c : commands) {
    if (c.app && c.app->parsed()) return c.run();
  }
  std::fprintf(stderr, "error: no command given (see --help)\n");
  return 2;
}
