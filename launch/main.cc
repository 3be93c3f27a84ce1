// expertflow: the command-line entry point.
#include <cstdio>
#include <string>
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
  // A first word that is not a command (CLI11 would only say that a subcommand is required).
  if (argc > 1 && argv[1][0] != '-') {
    const std::string word = argv[1];
    bool known = false;
    std::string names;
    for (const CLI::App* sub : app.get_subcommands({})) {
      known = known || sub->check_name(word);
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      std::fprintf(stderr, "error: unknown command '%s' (commands: %s; see --help)\n", word.c_str(), names.c_str());
      return 2;
    }
  }
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
