// `expertflow serve` end to end: the real binary on a free loopback port, real HTTP requests.
// Every wait is bounded and every child is killed in teardown, so a broken server fails the test
// instead of hanging it.
#include <gtest/gtest.h>
#include <httplib.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "launch/server/chat_template.h"

extern char** environ;

namespace ef::launch {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

const std::string kModelDir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
constexpr const char* kModel = "tiny-code-moe";

// A child `expertflow serve` process.
class ServerProcess {
 public:
  ~ServerProcess() { Kill(); }

  // Starts the server with `extra` flags (and `env` entries "KEY=VALUE" added to this process's
  // environment) and waits (bounded) for its "listening on" line.
  void Start(std::vector<std::string> extra = {}, std::vector<std::string> env = {}) {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    std::vector<std::string> args = {EF_BINARY, "serve", "--model", kModelDir, "--port", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    std::vector<char*> envp;
    for (char** e = environ; *e; ++e) envp.push_back(*e);
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    ASSERT_EQ(posix_spawn(&pid_, EF_BINARY, &fa, nullptr, argv.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    out_fd_ = fds[0];
    std::string out;
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    while (Clock::now() < deadline) {
      pollfd p{out_fd_, POLLIN, 0};
      if (poll(&p, 1, 200) > 0) {
        char buf[256];
        const ssize_t n = read(out_fd_, buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, static_cast<size_t>(n));
        const size_t at = out.find("listening on 127.0.0.1:");
        if (at != std::string::npos && out.find('\n', at) != std::string::npos) {
          port_ = std::stoi(out.substr(at + std::strlen("listening on 127.0.0.1:")));
          return;
        }
      }
    }
    FAIL() << "the server did not report its port; stdout so far: " << out;
  }

  // Sends `sig` to the server; false when it has exited.
  bool Signal(int sig) { return pid_ > 0 && kill(pid_, sig) == 0; }

  // SIGTERM, then the exit status (bounded wait; -1 if it had to be killed).
  int Terminate(std::chrono::seconds timeout = std::chrono::seconds(60)) {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    return WaitExit(timeout);
  }

  // The exit status once the server exits by itself (bounded wait; -1 if it had to be killed).
  int WaitExit(std::chrono::seconds timeout = std::chrono::seconds(60)) {
    if (pid_ <= 0) return -1;
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    Kill();
    return -1;
  }

  void Kill() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    if (out_fd_ >= 0) {
      close(out_fd_);
      out_fd_ = -1;
    }
  }

  httplib::Client Client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_connection_timeout(10);
    c.set_read_timeout(120);
    c.set_write_timeout(30);
    return c;
  }
  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int port_ = 0;
};

struct Reply {
  int status = 0;
  json body;
  std::string raw;
};

Reply Post(const ServerProcess& s, const std::string& path, const std::string& body,
           const httplib::Headers& headers = {}) {
  httplib::Client c = s.Client();
  auto r = c.Post(path.c_str(), headers, body, "application/json");
  Reply out;
  if (!r) {
    out.raw = "transport error: " + httplib::to_string(r.error());
    return out;
  }
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

Reply Get(const ServerProcess& s, const std::string& path) {
  httplib::Client c = s.Client();
  auto r = c.Get(path.c_str());
  Reply out;
  if (!r) return out;
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

// Concatenated text of each choice of an SSE stream (by index); checks the framing and the
// [DONE] end. `errors` (when given) collects error events.
std::map<int, std::string> SseChoices(const std::string& raw, bool chat, std::map<int, std::string>* finish,
                                      std::vector<json>* errors = nullptr) {
  std::map<int, std::string> text;
  size_t pos = 0;
  bool done = false;
  while (pos < raw.size()) {
    const size_t end = raw.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "unterminated event in: " << raw;
    if (end == std::string::npos) break;
    const std::string ev = raw.substr(pos, end - pos);
    pos = end + 2;
    EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
    const std::string data = ev.substr(6);
    EXPECT_FALSE(done) << "event after [DONE]";
    if (data == "[DONE]") {
      done = true;
      continue;
    }
    json j = json::parse(data, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << data;
    if (j.contains("error") && errors) errors->push_back(j["error"]);
    if (j.is_discarded() || !j.contains("choices") || j["choices"].empty()) continue;
    const json& c = j["choices"][0];
    const int index = c["index"];
    if (chat) {
      EXPECT_EQ(j["object"], "chat.completion.chunk");
      if (c["delta"].contains("content")) text[index] += c["delta"]["content"].get<std::string>();
    } else {
      EXPECT_EQ(j["object"], "text_completion");
      text[index] += c["text"].get<std::string>();
    }
    if (!c["finish_reason"].is_null()) (*finish)[index] = c["finish_reason"];
  }
  EXPECT_TRUE(done) << "no [DONE]";
  return text;
}

// The text of choice 0 of an SSE stream.
std::string SseText(const std::string& raw, bool chat, std::string* finish) {
  std::map<int, std::string> finishes;
  std::map<int, std::string> text = SseChoices(raw, chat, &finishes);
  *finish = finishes[0];
  return text[0];
}

// `expertflow generate` stdout (bounded by `timeout`).
std::string RunGenerate(const std::string& prompt, int n) {
  const std::string cmd = std::string("timeout 120 ") + EF_BINARY + " generate --model " + kModelDir + " -p '" +
                          prompt + "' -n " + std::to_string(n);
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return "";
  std::string out;
  char buf[512];
  size_t got;
  while ((got = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, got);
  EXPECT_EQ(pclose(f), 0) << cmd;
  return out;
}

// An OpenAI error body; `param`, when given, is the field the error must name.
void ExpectJsonError(const Reply& r, int status, const std::string& what, const std::string& param = "") {
  EXPECT_EQ(r.status, status) << what << ": " << r.raw;
  ASSERT_TRUE(r.body.is_object()) << what << ": " << r.raw;
  ASSERT_TRUE(r.body.contains("error")) << what << ": " << r.raw;
  EXPECT_TRUE(r.body["error"]["message"].is_string()) << what;
  EXPECT_TRUE(r.body["error"]["type"].is_string()) << what;
  EXPECT_TRUE(r.body["error"].contains("code")) << what;
  EXPECT_TRUE(r.body["error"].contains("param")) << what;
  if (!param.empty()) {
    EXPECT_EQ(r.body["error"]["param"], param) << what << ": " << r.raw;
  }
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess;
    server_->Start({"--max-batch", "16"});
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    if (!server_ || server_->port() == 0) GTEST_FAIL() << "server did not start";
  }
  static ServerProcess* server_;

 public:
  static ServerProcess* server() { return server_; }
};
ServerProcess* ServerTest::server_ = nullptr;
ServerProcess* ServerTestServer() { return ServerTest::server(); }

TEST_F(ServerTest, HealthModelsAndMetrics) {
  Reply h = Get(*server_, "/health");
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.body["status"], "ok");
  Reply m = Get(*server_, "/v1/models");
  ASSERT_EQ(m.status, 200);
  EXPECT_EQ(m.body["object"], "list");
  EXPECT_EQ(m.body["data"][0]["id"], kModel);
  Post(*server_, "/v1/completions", json{{"model", kModel}, {"prompt", "def f("}, {"max_tokens", 3}}.dump());
  // The request counter is updated by the server's access log, which runs after the response has
  // been written: poll briefly rather than race it.
  const std::string counted = "expertflow_requests_total{endpoint=\"/v1/completions\",status=\"200\"}";
  Reply metrics = Get(*server_, "/metrics");
  for (int i = 0; i < 100 && metrics.raw.find(counted) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    metrics = Get(*server_, "/metrics");
  }
  ASSERT_EQ(metrics.status, 200);
  for (const char* want :
       {"expertflow_requests_total{endpoint=\"/v1/completions\",status=\"200\"}", "expertflow_prompt_tokens_total",
        "expertflow_generated_tokens_total", "expertflow_queue_depth", "expertflow_request_latency_seconds_bucket",
        "expertflow_time_to_first_token_seconds_count", "expertflow_expert_tokens_total{layer=\"0\",expert=\"0\"}",
        "expertflow_expert_tokens_total{layer=\"7\",expert=\"7\"}"}) {
    EXPECT_NE(metrics.raw.find(want), std::string::npos) << want;
  }
}

TEST_F(ServerTest, CompletionAnswers) {
  Reply r = Post(*server_, "/v1/completions",
                 json{{"model", kModel}, {"prompt", "def main("}, {"max_tokens", 12}, {"temperature", 0}}.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "text_completion");
  EXPECT_EQ(r.body["model"], kModel);
  EXPECT_TRUE(r.body["id"].is_string());
  EXPECT_TRUE(r.body["created"].is_number_integer());
  const json& c = r.body["choices"][0];
  EXPECT_EQ(c["index"], 0);
  EXPECT_TRUE(c["text"].is_string());
  EXPECT_FALSE(c["text"].get<std::string>().empty());
  EXPECT_TRUE(c["finish_reason"] == "length" || c["finish_reason"] == "stop");
  const json& u = r.body["usage"];
  EXPECT_GT(u["prompt_tokens"].get<int>(), 0);
  EXPECT_LE(u["completion_tokens"].get<int>(), 12);
  EXPECT_EQ(u["total_tokens"].get<int>(), u["prompt_tokens"].get<int>() + u["completion_tokens"].get<int>());

  // Token-id prompts give the same as the text they encode to (greedy).
  Reply ids = Post(*server_, "/v1/completions",
                   json{{"model", kModel}, {"prompt", json::array({1, 2, 3, 100})}, {"max_tokens", 4}}.dump());
  EXPECT_EQ(ids.status, 200) << ids.raw;
  EXPECT_EQ(ids.body["usage"]["prompt_tokens"], 4);
}

TEST_F(ServerTest, ChatAnswers) {
  json req = {{"model", kModel},
              {"messages", json::array({{{"role", "system"}, {"content", "you write python"}},
                                        {{"role", "user"}, {"content", "def add(a, b):"}}})},
              {"max_tokens", 16}};
  Reply r = Post(*server_, "/v1/chat/completions", req.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "chat.completion");
  EXPECT_EQ(r.body["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(r.body["choices"][0]["message"]["content"].is_string());
  EXPECT_GT(r.body["usage"]["completion_tokens"].get<int>(), 0);
  // max_completion_tokens, OpenAI's name for chat, wins over max_tokens (as in vLLM); EOS is ignored
  // so the limit is what ends the answer.
  req["max_completion_tokens"] = 3;
  req["ignore_eos"] = true;
  r = Post(*server_, "/v1/chat/completions", req.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["usage"]["completion_tokens"], 3) << r.raw;
}

TEST_F(ServerTest, StreamingMatchesNonStreaming) {
  for (bool chat : {false, true}) {
    json req = {{"model", kModel}, {"max_tokens", 24}, {"temperature", 0}};
    if (chat) {
      req["messages"] = json::array({{{"role", "user"}, {"content", "class Stack:"}}});
    } else {
      req["prompt"] = "import os\ndef ";
    }
    const std::string path = chat ? "/v1/chat/completions" : "/v1/completions";
    Reply plain = Post(*server_, path, req.dump());
    ASSERT_EQ(plain.status, 200) << plain.raw;
    req["stream"] = true;
    Reply streamed = Post(*server_, path, req.dump());
    ASSERT_EQ(streamed.status, 200) << streamed.raw;
    std::string finish;
    const std::string text = SseText(streamed.raw, chat, &finish);
    const json& c = plain.body["choices"][0];
    EXPECT_EQ(text, chat ? c["message"]["content"].get<std::string>() : c["text"].get<std::string>()) << path;
    EXPECT_EQ(finish, c["finish_reason"]) << path;
  }
}

// A batch prompt answers one choice per prompt, in order, each as the prompt alone would (greedy);
// token-id lists as well as strings, streamed or not, with n choices per prompt.
TEST_F(ServerTest, BatchPromptsAnswerOneChoiceEach) {
  const json prompts = json::array({"def main(", "import os\n", "class A:"});
  const json id_prompts = json::array({json::array({1, 2, 3, 100}), json::array({5, 6, 7})});
  for (const json& batch : {prompts, id_prompts}) {
    std::vector<std::string> alone;
    int prompt_tokens = 0;
    for (const json& p : batch) {
      Reply r = Post(*server_, "/v1/completions",
                     json{{"model", kModel}, {"prompt", p}, {"max_tokens", 6}, {"temperature", 0}}.dump());
      ASSERT_EQ(r.status, 200) << r.raw;
      alone.push_back(r.body["choices"][0]["text"]);
      prompt_tokens += r.body["usage"]["prompt_tokens"].get<int>();
    }
    json req = {{"model", kModel}, {"prompt", batch}, {"max_tokens", 6}, {"temperature", 0}};
    Reply r = Post(*server_, "/v1/completions", req.dump());
    ASSERT_EQ(r.status, 200) << r.raw;
    ASSERT_EQ(r.body["choices"].size(), batch.size()) << r.raw;
    for (size_t i = 0; i < batch.size(); ++i) {
      EXPECT_EQ(r.body["choices"][i]["index"], i);
      EXPECT_EQ(r.body["choices"][i]["text"], alone[i]) << "prompt " << i;
    }
    EXPECT_EQ(r.body["usage"]["prompt_tokens"], prompt_tokens);  // each prompt once
    // Streamed, two choices per prompt: choice i answers prompt i / 2.
    req["stream"] = true;
    req["n"] = 2;
    Reply streamed = Post(*server_, "/v1/completions", req.dump());
    ASSERT_EQ(streamed.status, 200) << streamed.raw;
    std::map<int, std::string> finish;
    std::map<int, std::string> texts = SseChoices(streamed.raw, false, &finish);
    ASSERT_EQ(texts.size(), 2 * batch.size()) << streamed.raw;
    for (int i = 0; i < static_cast<int>(texts.size()); ++i) {
      EXPECT_EQ(texts[i], alone[i / 2]) << "choice " << i;
      EXPECT_FALSE(finish[i].empty()) << "choice " << i;
    }
  }
}

// n > 1 samples n choices with distinct seeds derived from the request seed: reproducible, not all
// alike, and choice 0 is what n = 1 gives with the same seed.
TEST_F(ServerTest, NChoicesSampleWithDistinctReproducibleSeeds) {
  json req = {{"model", kModel}, {"prompt", "def "}, {"max_tokens", 12},  {"temperature", 1.0},
              {"seed", 7},       {"n", 4},           {"ignore_eos", true}};
  Reply a = Post(*server_, "/v1/completions", req.dump());
  Reply b = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(a.status, 200) << a.raw;
  ASSERT_EQ(b.status, 200) << b.raw;
  ASSERT_EQ(a.body["choices"].size(), 4u);
  std::set<std::string> distinct;
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(a.body["choices"][i]["index"], i);
    EXPECT_EQ(a.body["choices"][i]["text"], b.body["choices"][i]["text"]) << "choice " << i;
    distinct.insert(a.body["choices"][i]["text"].get<std::string>());
  }
  EXPECT_GT(distinct.size(), 1u) << a.raw;
  EXPECT_EQ(a.body["usage"]["completion_tokens"], 48);
  req["n"] = 1;
  Reply one = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(one.status, 200) << one.raw;
  EXPECT_EQ(one.body["choices"][0]["text"], a.body["choices"][0]["text"]);
  EXPECT_EQ(one.body["usage"]["prompt_tokens"], a.body["usage"]["prompt_tokens"]);
}

// A sampled request draws the same tokens whether the backend picks them (no logprobs: its
// logits stay there, Backend::SampleRows) or the host does from the logits (logprobs asked), and
// with top_k / top_p cuts.
TEST_F(ServerTest, SampledTokensAreTheSameOnTheBackendAndTheHost) {
  for (const json& cut : {json{{"temperature", 0.9}}, json{{"temperature", 1.2}, {"top_p", 0.8}, {"top_k", 30}}}) {
    json req = {{"model", kModel}, {"prompt", "def fib"}, {"max_tokens", 16}, {"seed", 11}, {"ignore_eos", true}};
    req.update(cut);
    Reply backend = Post(*server_, "/v1/completions", req.dump());
    req["logprobs"] = 1;
    Reply host = Post(*server_, "/v1/completions", req.dump());
    ASSERT_EQ(backend.status, 200) << backend.raw;
    ASSERT_EQ(host.status, 200) << host.raw;
    EXPECT_EQ(backend.body["choices"][0]["text"], host.body["choices"][0]["text"]) << cut.dump();
    EXPECT_EQ(backend.body["usage"]["completion_tokens"], 16);
    EXPECT_EQ(host.body["choices"][0]["logprobs"]["tokens"].size(), 16u) << host.raw;
  }
}

// Penalties reach the sampler: a greedy request with them gets other tokens than without, the same
// on every call, and streams the same text.
TEST_F(ServerTest, PenaltiesChangeGreedyTokens) {
  json req = {{"model", kModel}, {"prompt", "def fib"}, {"max_tokens", 24}, {"temperature", 0}, {"ignore_eos", true}};
  Reply plain = Post(*server_, "/v1/completions", req.dump());
  req["presence_penalty"] = 1.5;
  req["repetition_penalty"] = 1.5;
  Reply a = Post(*server_, "/v1/completions", req.dump());
  Reply b = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(plain.status, 200) << plain.raw;
  ASSERT_EQ(a.status, 200) << a.raw;
  ASSERT_EQ(b.status, 200) << b.raw;
  EXPECT_NE(a.body["choices"][0]["text"], plain.body["choices"][0]["text"]);
  EXPECT_EQ(a.body["choices"][0]["text"], b.body["choices"][0]["text"]);
  EXPECT_EQ(a.body["usage"]["completion_tokens"], 24);
}

namespace fs = std::filesystem;

// `expertflow score` over `ids`: the log-softmax (in double) of the logits at every position.
std::vector<std::vector<double>> ScoreLogSoftmax(const std::vector<int32_t>& ids) {
  const fs::path dir = fs::path(::testing::TempDir()) / "ef_server_score";
  fs::create_directories(dir);
  std::ofstream(dir / "ids.json") << json{{"input_ids", json::array({ids})}}.dump();
  const std::string cmd = std::string("timeout 120 ") + EF_BINARY + " score --model " + kModelDir + " --ids-file " +
                          (dir / "ids.json").string() + " --out " + (dir / "out.json").string();
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(dir / "out.json");
  const json out = json::parse(in, nullptr, false);
  std::vector<std::vector<double>> rows;
  if (out.is_discarded()) return rows;
  for (const json& logits : out["logits"][0]) {
    std::vector<double> row = logits.get<std::vector<double>>();
    const double max = *std::max_element(row.begin(), row.end());
    double sum = 0;
    for (double x : row) sum += std::exp(x - max);
    for (double& x : row) x -= max + std::log(sum);
    rows.push_back(std::move(row));
  }
  return rows;
}

int32_t TokenId(const json& token) {
  const std::string s = token.get<std::string>();
  EXPECT_EQ(s.rfind("token_id:", 0), 0u) << s;
  return std::stoi(s.substr(std::strlen("token_id:")));
}

// The generated token ids of a completion (greedy unless `extra` says otherwise).
std::vector<int32_t> CompletionTokens(const json& extra, std::string* finish = nullptr) {
  json req = {{"model", kModel},
              {"prompt", "def fib"},
              {"max_tokens", 12},
              {"temperature", 0},
              {"ignore_eos", true},
              {"logprobs", 0},
              {"return_tokens_as_token_ids", true}};
  req.update(extra);
  Reply r = Post(*ServerTestServer(), "/v1/completions", req.dump());
  EXPECT_EQ(r.status, 200) << r.raw;
  std::vector<int32_t> ids;
  if (r.status != 200) return ids;
  for (const json& t : r.body["choices"][0]["logprobs"]["tokens"]) ids.push_back(TokenId(t));
  if (finish) *finish = r.body["choices"][0]["finish_reason"].get<std::string>();
  return ids;
}

// logit_bias makes a token win every step; stop_token_ids ends the request at a token (without
// its text); min_tokens bars the end tokens until that many are generated.
TEST_F(ServerTest, LogitBiasStopTokenIdsAndMinTokens) {
  const std::vector<int32_t> plain = CompletionTokens(json::object());
  ASSERT_EQ(plain.size(), 12u);
  const int32_t forced = 77;
  const std::vector<int32_t> biased = CompletionTokens({{"logit_bias", {{std::to_string(forced), 100}}}});
  EXPECT_EQ(biased, std::vector<int32_t>(12, forced));
  const int32_t stop = plain[3];
  const size_t first = std::find(plain.begin(), plain.end(), stop) - plain.begin();
  std::string finish;
  const std::vector<int32_t> stopped = CompletionTokens({{"stop_token_ids", {stop}}}, &finish);
  EXPECT_EQ(finish, "stop");
  EXPECT_EQ(stopped, std::vector<int32_t>(plain.begin(), plain.begin() + static_cast<std::ptrdiff_t>(first)));
  const std::vector<int32_t> held =
      CompletionTokens({{"stop_token_ids", {stop}}, {"min_tokens", static_cast<int>(first) + 3}}, &finish);
  ASSERT_GE(held.size(), first + 3);
  for (size_t i = 0; i < first + 3; ++i) EXPECT_NE(held[i], stop) << "token " << i << " is barred by min_tokens";
}

// Completions logprobs (echoed prompt and sampled tokens, at temperature 0.9) are the model's
// log-softmax before the temperature: `score`'s logits of the same ids, within 1e-5, and the
// alternatives are that row's most likely tokens.
TEST_F(ServerTest, LogprobsAreTheLogSoftmaxOfScoreLogits) {
  constexpr int kTokens = 8, kTop = 5;
  json req = {{"model", kModel},
              {"prompt", "def main("},
              {"max_tokens", kTokens},
              {"temperature", 0.9},
              {"seed", 3},
              {"ignore_eos", true},
              {"logprobs", kTop},
              {"echo", true},
              {"return_tokens_as_token_ids", true}};
  Reply r = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  const json& lp = r.body["choices"][0]["logprobs"];
  const int prompt_tokens = r.body["usage"]["prompt_tokens"];
  ASSERT_EQ(lp["tokens"].size(), static_cast<size_t>(prompt_tokens + kTokens)) << lp.dump();
  std::vector<int32_t> ids;
  for (const json& t : lp["tokens"]) ids.push_back(TokenId(t));
  const std::vector<std::vector<double>> rows = ScoreLogSoftmax(ids);
  ASSERT_EQ(rows.size(), ids.size());
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());  // nothing predicts the first token
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  for (size_t i = 1; i < ids.size(); ++i) {
    const std::vector<double>& row = rows[i - 1];  // position i - 1 predicts token i
    EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), row[ids[i]], 1e-5) << "token " << i;
    std::vector<double> sorted = row;
    std::sort(sorted.rbegin(), sorted.rend());
    const json& top = lp["top_logprobs"][i];
    EXPECT_EQ(top.size(), static_cast<size_t>(kTop)) << "token " << i;
    for (const auto& [token, value] : top.items()) {
      EXPECT_NEAR(value.get<double>(), row[TokenId(json(token))], 1e-5) << "token " << i << " alternative " << token;
      EXPECT_GE(value.get<double>(), sorted[kTop - 1] - 1e-5) << "token " << i << ": not among the top " << kTop;
    }
    EXPECT_GT(lp["text_offset"][i].get<size_t>(), lp["text_offset"][i - 1].get<size_t>());
  }
}

// Chat logprobs: one entry per generated token with its bytes and the top_logprobs asked for;
// greedy picks the most likely token, so each entry leads its own alternatives.
TEST_F(ServerTest, ChatLogprobsListEachToken) {
  json req = {{"model", kModel},  {"messages", json::array({{{"role", "user"}, {"content", "def add(a, b):"}}})},
              {"max_tokens", 8},  {"temperature", 0},
              {"logprobs", true}, {"top_logprobs", 3}};
  Reply r = Post(*server_, "/v1/chat/completions", req.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  const json& content = r.body["choices"][0]["logprobs"]["content"];
  ASSERT_TRUE(content.is_array()) << r.raw;
  ASSERT_GE(content.size(), 1u);
  EXPECT_LE(content.size(), r.body["usage"]["completion_tokens"].get<size_t>());
  std::string joined;
  for (const json& t : content) {
    const std::string token = t["token"];
    joined += token;
    EXPECT_EQ(t["bytes"].get<std::vector<uint8_t>>(), std::vector<uint8_t>(token.begin(), token.end()));
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    ASSERT_EQ(t["top_logprobs"].size(), 3u);
    EXPECT_DOUBLE_EQ(t["top_logprobs"][0]["logprob"].get<double>(), t["logprob"].get<double>());
    EXPECT_EQ(t["top_logprobs"][0]["token"], token);
    for (int k = 1; k < 3; ++k)
      EXPECT_LE(t["top_logprobs"][k]["logprob"].get<double>(), t["top_logprobs"][k - 1]["logprob"].get<double>());
  }
  EXPECT_EQ(joined, r.body["choices"][0]["message"]["content"]);
  // Without logprobs the field is null, as OpenAI's.
  req.erase("logprobs");
  req.erase("top_logprobs");
  Reply plain = Post(*server_, "/v1/chat/completions", req.dump());
  EXPECT_TRUE(plain.body["choices"][0]["logprobs"].is_null()) << plain.raw;
}

// echo puts the prompt's text before the completion (streamed too); with logprobs and max_tokens 0
// it scores the prompt alone.
TEST_F(ServerTest, EchoPrependsThePrompt) {
  const std::string prompt = "def main(";
  json req = {{"model", kModel}, {"prompt", prompt}, {"max_tokens", 6}, {"temperature", 0}};
  Reply plain = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(plain.status, 200) << plain.raw;
  const std::string completion = plain.body["choices"][0]["text"];
  req["echo"] = true;
  Reply echoed = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(echoed.status, 200) << echoed.raw;
  EXPECT_EQ(echoed.body["choices"][0]["text"], prompt + completion);
  req["stream"] = true;
  Reply streamed = Post(*server_, "/v1/completions", req.dump());
  std::string finish;
  EXPECT_EQ(SseText(streamed.raw, false, &finish), prompt + completion);

  json score = {{"model", kModel}, {"prompt", prompt}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 1}};
  Reply scored = Post(*server_, "/v1/completions", score.dump());
  ASSERT_EQ(scored.status, 200) << scored.raw;
  const json& c = scored.body["choices"][0];
  EXPECT_EQ(c["text"], prompt);
  EXPECT_EQ(scored.body["usage"]["completion_tokens"], 0);
  EXPECT_EQ(c["logprobs"]["tokens"].size(), scored.body["usage"]["prompt_tokens"].get<size_t>());
  EXPECT_TRUE(c["logprobs"]["token_logprobs"][0].is_null());
  EXPECT_TRUE(c["logprobs"]["token_logprobs"][1].is_number());
}

TEST_F(ServerTest, StopStringsCutTheText) {
  json req = {{"model", kModel}, {"prompt", "def main("}, {"max_tokens", 40}};
  Reply full = Post(*server_, "/v1/completions", req.dump());
  ASSERT_EQ(full.status, 200);
  const std::string text = full.body["choices"][0]["text"];
  ASSERT_GE(text.size(), 6u) << "completion too short to pick a stop string";
  const std::string stop = text.substr(3, 3);
  req["stop"] = json::array({stop});
  for (bool stream : {false, true}) {
    req["stream"] = stream;
    Reply cut = Post(*server_, "/v1/completions", req.dump());
    ASSERT_EQ(cut.status, 200);
    std::string finish, got;
    if (stream) {
      got = SseText(cut.raw, false, &finish);
    } else {
      got = cut.body["choices"][0]["text"];
      finish = cut.body["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(got, text.substr(0, text.find(stop))) << "stream=" << stream;
    EXPECT_EQ(finish, "stop");
  }
}

TEST_F(ServerTest, GreedyOutputEqualsGenerate) {
  const std::string prompt = "def main(";
  const int n = 40;
  const std::string expected = RunGenerate(prompt, n);
  ASSERT_FALSE(expected.empty());
  Reply r = Post(*server_, "/v1/completions",
                 json{{"model", kModel}, {"prompt", prompt}, {"max_tokens", n}, {"temperature", 0}}.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(prompt + r.body["choices"][0]["text"].get<std::string>() + "\n", expected);
}

TEST_F(ServerTest, BadInputsGetJsonErrorsAndTheServerKeepsServing) {
  const std::string long_prompt = [] {
    json ids = json::array();
    for (int i = 0; i < 3000; ++i) ids.push_back(5 + i % 50);
    return json{{"model", kModel}, {"prompt", ids}}.dump();
  }();
  struct Case {
    std::string path, body;
    int status;
    std::string param;  // the field the error names ("": not checked)
  };
  const std::string c = "/v1/completions", ch = "/v1/chat/completions";
  const std::vector<Case> cases = {
      {c, "{not json", 400, ""},
      {c, "", 400, ""},
      {c, "[1, 2]", 400, ""},
      {c, R"({"model": "tiny-code-moe"})", 400, "prompt"},
      {c, R"({"prompt": "x"})", 400, "model"},
      {c, R"({"model": 7, "prompt": "x"})", 400, "model"},
      {c, R"({"model": "no-such-model", "prompt": "x"})", 404, "model"},
      {c, R"({"model": "tiny-code-moe", "prompt": 5})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": ""})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": [1, "a"]})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": ["a", 1]})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": ["a", ""]})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": [999999]})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": [[1], [999999]]})", 400, "prompt"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": -1})", 400, "max_tokens"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 100000000})", 400, "max_tokens"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 1e300})", 400, "max_tokens"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 1024})", 400, "max_tokens"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": "5"})", 400, "max_tokens"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "temperature": "hot"})", 400, "temperature"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "temperature": -1})", 400, "temperature"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "top_p": 0})", 400, "top_p"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "presence_penalty": 2.5})", 400, "presence_penalty"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "frequency_penalty": "a"})", 400, "frequency_penalty"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "repetition_penalty": 0})", 400, "repetition_penalty"},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": "x"}], "min_p": 0.05})", 400,
       "min_p"},
      {ch,
       R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})",
       400, "tools"},
      {ch,
       R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})",
       400, "response_format"},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"role": "alien", "content": "x"}]})", 400, "messages"},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"role": "user"}]})", 400, "messages"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "repetition_penalty": 1e-50})", 400, "repetition_penalty"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "logit_bias": {"17": 500}})", 400, "logit_bias"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "logit_bias": {"abc": 5}})", 400, "logit_bias"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "logit_bias": {"99999": 5}})", 400, "logit_bias"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "logit_bias": [1]})", 400, "logit_bias"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "best_of": 3})", 400, "best_of"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 3, "min_tokens": 4})", 400, "min_tokens"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stop_token_ids": [-2]})", 400, "stop_token_ids"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stop_token_ids": 2})", 400, "stop_token_ids"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "typical_p": 0.5})", 400, "typical_p"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "n": 0})", 400, "n"},
      {c, R"({"model": "tiny-code-moe", "prompt": ["x", "y"], "n": 100})", 400, "n"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "logprobs": 21})", 400, "logprobs"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "logprobs": true})", 400, "logprobs"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "echo": 1})", 400, "echo"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stop": 3})", 400, "stop"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stop": [""]})", 400, "stop"},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stream": "yes"})", 400, "stream"},
      {c, long_prompt, 400, "prompt"},
      {ch, R"({"model": "tiny-code-moe"})", 400, "messages"},
      {ch, R"({"model": "tiny-code-moe", "messages": []})", 400, "messages"},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"content": "x"}]})", 400, "messages"},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": 5}]})", 400, "messages"},
      {ch, R"({"model": "tiny-code-moe", "messages": "hi"})", 400, "messages"},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", 400,
       "top_logprobs"},
      {ch,
       R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": "x"}], "logprobs": true,
           "top_logprobs": 21})",
       400, "top_logprobs"},
      {"/v1/nothing", "{}", 404, ""},
  };
  for (const Case& k : cases)
    ExpectJsonError(Post(*server_, k.path, k.body), k.status, k.path + " " + k.body.substr(0, 80), k.param);
  EXPECT_EQ(Get(*server_, "/health").status, 200);
  Reply ok = Post(*server_, "/v1/completions", json{{"model", kModel}, {"prompt", "x = "}, {"max_tokens", 2}}.dump());
  // min_p's neutral value is accepted, and so are penalties.
  Reply neutral = Post(*server_, "/v1/completions",
                       json{{"model", kModel},
                            {"prompt", "x = "},
                            {"max_tokens", 2},
                            {"presence_penalty", 0},
                            {"frequency_penalty", 0.0},
                            {"repetition_penalty", 1},
                            {"min_p", 0},
                            {"best_of", 1},
                            {"logit_bias", json::object()},
                            {"stop_token_ids", nullptr}}
                           .dump());
  EXPECT_EQ(neutral.status, 200) << neutral.raw;
  EXPECT_EQ(ok.status, 200) << ok.raw;
  Reply metrics = Get(*server_, "/metrics");
  EXPECT_NE(metrics.raw.find("expertflow_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"),
            std::string::npos);
}

TEST_F(ServerTest, TwoHundredConcurrentRequestsAllAnswer) {
  constexpr int kRequests = 200;
  std::vector<int> status(kRequests, 0), tokens(kRequests, -1);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      json req = {{"model", kModel},     {"prompt", "def f" + std::to_string(i) + "("},
                  {"max_tokens", 4},     {"ignore_eos", true},
                  {"temperature", 0.7},  {"seed", i},
                  {"stream", i % 4 == 0}};
      Reply r = Post(*server_, "/v1/completions", req.dump());
      status[i] = r.status;
      if (r.status != 200) ADD_FAILURE() << "request " << i << ": " << r.raw;
      if (r.status == 200 && i % 4 != 0) tokens[i] = r.body["usage"]["completion_tokens"];
      if (r.status == 200 && i % 4 == 0 && r.raw.find("data: [DONE]") != std::string::npos) tokens[i] = 4;
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(status[i], 200) << "request " << i;
    EXPECT_EQ(tokens[i], 4) << "request " << i;
  }
  EXPECT_EQ(Get(*server_, "/health").status, 200);
}

// With an expert cache smaller than the model: the same greedy text as `generate` without one,
// the cache's counters on /metrics, and a clean shutdown (the cache is freed before the engine).
TEST(ServerExpertCacheTest, SameTextAndCacheMetrics) {
  const std::string prompt = "def main(";
  const int n = 24;
  const std::string expected = RunGenerate(prompt, n);
  ASSERT_FALSE(expected.empty());
  ServerProcess server;
  server.Start({"--cache-device-budget", "2 slots per layer", "--cache-policy", "lru", "--predictor", "lookahead"});
  ASSERT_GT(server.port(), 0);
  Reply r = Post(server, "/v1/completions",
                 json{{"model", kModel}, {"prompt", prompt}, {"max_tokens", n}, {"temperature", 0}}.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(prompt + r.body["choices"][0]["text"].get<std::string>() + "\n", expected);
  Reply m = Get(server, "/metrics");
  ASSERT_EQ(m.status, 200);
  for (const char* want :
       {"expertflow_expert_cache_slots_per_layer 2\n", "expertflow_expert_cache_hits_total{layer=\"0\",expert=\"0\"}",
        "expertflow_expert_cache_misses_total{layer=\"7\",expert=\"7\"}",
        "expertflow_expert_cache_bytes_total{layer=\"3\",expert=\"1\",tier=\"host\"}",
        "expertflow_expert_cache_bytes_total{layer=\"3\",expert=\"1\",tier=\"device\"}"})
    EXPECT_NE(m.raw.find(want), std::string::npos) << want;
  int64_t misses = 0;
  for (size_t at = m.raw.find("expertflow_expert_cache_misses_total{"); at != std::string::npos;
       at = m.raw.find("expertflow_expert_cache_misses_total{", at + 1))
    misses += std::stoll(m.raw.substr(m.raw.find("} ", at) + 2));
  EXPECT_GT(misses, 0);
  EXPECT_EQ(server.Terminate(), 0);
}

// Admission regrouping from a trained path predictor: a batch of 2 with 12 greedy requests
// queued; every request answers with the text `generate` gives its prompt alone.
TEST(ServerRegroupTest, QueuedRequestsRegroupedSameText) {
  const fs::path dir = fs::path(::testing::TempDir()) / "ef_server_regroup";
  fs::create_directories(dir);
  const std::string trace = std::string(EF_TEST_DATA) + "/traces/tiny_code_moe_prefill.jsonl";
  ASSERT_TRUE(fs::exists(trace)) << trace << " is missing (tests/data/traces)";
  const std::string predictor = (dir / "p.safetensors").string();
  const std::string train = std::string(EF_BINARY) + " train-predictor --trace " + trace + " --kind path --out " +
                            predictor + " --epochs 2 --hidden 32 > " + (dir / "train.log").string() + " 2>&1";
  ASSERT_EQ(std::system(train.c_str()), 0) << "train-predictor failed";
  ServerProcess server;
  server.Start({"--max-batch", "2", "--regroup-window", "4", "--predictor-path", predictor});
  ASSERT_GT(server.port(), 0);
  constexpr int kRequests = 12, kTokens = 6;
  std::vector<std::string> prompts, texts(kRequests);
  for (int i = 0; i < kRequests; ++i) prompts.push_back(i % 3 == 0 ? "import os" : "def f" + std::to_string(i) + "(");
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i)
    threads.emplace_back([&, i] {
      Reply r =
          Post(server, "/v1/completions",
               json{{"model", kModel}, {"prompt", prompts[i]}, {"max_tokens", kTokens}, {"temperature", 0}}.dump());
      if (r.status == 200)
        texts[i] = r.body["choices"][0]["text"].get<std::string>();
      else
        ADD_FAILURE() << "request " << i << ": " << r.raw;
    });
  for (auto& t : threads) t.join();
  for (int i : {0, 1, 5}) EXPECT_EQ(prompts[i] + texts[i] + "\n", RunGenerate(prompts[i], kTokens)) << "request " << i;
  EXPECT_EQ(server.Terminate(), 0);
}

// Without a predictor there is nothing to regroup on: the flag is refused, naming what is missing.
TEST(ServerRegroupTest, RegroupWindowWithoutPredictorIsAnError) {
  const std::string cmd = std::string(EF_BINARY) + " serve --model " + kModelDir +
                          " --port 0 --regroup-window 4 > /dev/null 2> " + ::testing::TempDir() + "/regroup.err";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  std::ifstream in(::testing::TempDir() + "/regroup.err");
  std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(err.find("--predictor-path"), std::string::npos) << err;
  // A predictor file that is not there is named with its key.
  const std::string missing = std::string(EF_BINARY) + " serve --model " + kModelDir +
                              " --port 0 --regroup-window 4 --predictor-path " + ::testing::TempDir() +
                              "/no_such_predictor.bin > /dev/null 2> " + ::testing::TempDir() + "/regroup.err";
  EXPECT_NE(std::system(missing.c_str()), 0);
  std::ifstream in2(::testing::TempDir() + "/regroup.err");
  err.assign(std::istreambuf_iterator<char>(in2), std::istreambuf_iterator<char>());
  EXPECT_NE(err.find("predictor.path (--predictor-path, for admission regrouping): cannot open predictor file"),
            std::string::npos)
      << err;
}

// Settings that would make a server refuse everything or let everything in are refused at start.
TEST(ServerBindTest, UselessSettingsAreRefusedAtStart) {
  const std::string err_file = ::testing::TempDir() + "/flags.err";
  auto run = [&](const std::string& flags) {
    const std::string cmd =
        std::string(EF_BINARY) + " serve --model " + kModelDir + " --port 0 " + flags + " > /dev/null 2> " + err_file;
    const int rc = std::system(cmd.c_str());
    std::ifstream in(err_file);
    return std::make_pair(rc, std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
  };
  auto [rc, err] = run("--max-queue 0");
  EXPECT_NE(rc, 0);
  EXPECT_NE(err.find("--max-queue must be >= 1"), std::string::npos) << err;
  std::tie(rc, err) = run("--api-key ''");
  EXPECT_NE(rc, 0);
  EXPECT_NE(err.find("--api-key (server.api_key) is empty"), std::string::npos) << err;
  std::tie(rc, err) = run("--host ''");
  EXPECT_NE(rc, 0);
  EXPECT_NE(err.find("--host is empty"), std::string::npos) << err;
}

// A port in use is refused: a second server must not share it (and take half the connections).
TEST(ServerBindTest, APortInUseIsAnError) {
  ServerProcess first;
  first.Start();
  ASSERT_GT(first.port(), 0);
  const std::string err_file = ::testing::TempDir() + "/bind.err";
  const std::string cmd = std::string(EF_BINARY) + " serve --model " + kModelDir + " --port " +
                          std::to_string(first.port()) + " > /dev/null 2> " + err_file;
  EXPECT_NE(std::system(cmd.c_str()), 0);
  std::ifstream in(err_file);
  const std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(err.find("cannot bind 127.0.0.1:" + std::to_string(first.port())), std::string::npos) << err;
  EXPECT_EQ(first.Terminate(), 0);
}

TEST(ServerAuthTest, ApiKeyIsRequiredOnV1) {
  ServerProcess s;
  s.Start({"--api-key", "sekrit"});
  ASSERT_GT(s.port(), 0);
  const std::string body = json{{"model", kModel}, {"prompt", "x"}, {"max_tokens", 2}}.dump();
  Reply none = Post(s, "/v1/completions", body);
  ExpectJsonError(none, 401, "no key");
  EXPECT_EQ(none.body["error"]["code"], "invalid_api_key");
  ExpectJsonError(Post(s, "/v1/completions", body, {{"Authorization", "Bearer wrong"}}), 401, "wrong key");
  ExpectJsonError(Post(s, "/v1/chat/completions", body), 401, "chat, no key");
  Reply ok = Post(s, "/v1/completions", body, {{"Authorization", "Bearer sekrit"}});
  EXPECT_EQ(ok.status, 200) << ok.raw;
  EXPECT_EQ(Get(s, "/health").status, 200);
  EXPECT_EQ(s.Terminate(), 0);
}

// Request limits from the command line: a body over --max-body-bytes gets 413, max_tokens over
// --max-tokens-limit gets 400 naming the field; both as OpenAI error bodies.
TEST(ServerLimitsTest, OversizedBodyAndMaxTokensAreRefused) {
  ServerProcess s;
  s.Start({"--max-body-bytes", "4KiB", "--max-tokens-limit", "8"});
  ASSERT_GT(s.port(), 0);
  const std::string big = json{{"model", kModel}, {"prompt", std::string(8000, 'a')}, {"max_tokens", 2}}.dump();
  ExpectJsonError(Post(s, "/v1/completions", big), 413, "body over 4KiB");
  ExpectJsonError(Post(s, "/v1/completions", json{{"model", kModel}, {"prompt", "x"}, {"max_tokens", 9}}.dump()), 400,
                  "max_tokens over the limit", "max_tokens");
  Reply ok = Post(s, "/v1/completions", json{{"model", kModel}, {"prompt", "x"}, {"max_tokens", 8}}.dump());
  EXPECT_EQ(ok.status, 200) << ok.raw;
  EXPECT_EQ(s.Terminate(), 0);
}

// A JSON body sent as form data (curl -d's default Content-Type) is read as JSON up to
// --max-body-bytes whatever its size: httplib alone caps form bodies at 8 KiB.
TEST(ServerLimitsTest, JsonSentAsFormDataIsReadUpToTheBodyLimit) {
  ServerProcess s;
  s.Start({"--max-body-bytes", "64KiB"});
  ASSERT_GT(s.port(), 0);
  const json req = {{"model", kModel}, {"prompt", "x"}, {"max_tokens", 2}, {"user", std::string(20000, 'u')}};
  httplib::Client c = s.Client();
  auto r = c.Post("/v1/completions", req.dump(), "application/x-www-form-urlencoded");
  ASSERT_TRUE(r) << httplib::to_string(r.error());
  EXPECT_EQ(r->status, 200) << r->body;
  json too_big = req;
  too_big["user"] = std::string(70000, 'u');
  auto big = c.Post("/v1/completions", too_big.dump(), "application/x-www-form-urlencoded");
  ASSERT_TRUE(big) << httplib::to_string(big.error());
  EXPECT_EQ(big->status, 413) << big->body;
  EXPECT_NE(big->body.find("server.max_body_bytes"), std::string::npos) << big->body;
  EXPECT_EQ(s.Terminate(), 0);
}

// An engine failure (injected at the third forward pass) while a request runs: it gets a 5xx
// OpenAI error body, or when streaming an error event and then [DONE], and the server exits with
// an error instead of serving on a broken engine.
TEST(ServerFailureTest, RequestInFlightGetsAnErrorThenTheServerExits) {
  for (bool stream : {false, true}) {
    ServerProcess s;
    s.Start({}, {"EF_DEBUG_FAIL_AT_STEP=2"});
    ASSERT_GT(s.port(), 0);
    json req = {{"model", kModel}, {"prompt", "def main("}, {"max_tokens", 32}, {"ignore_eos", true}};
    req["stream"] = stream;
    Reply r = Post(s, "/v1/completions", req.dump());
    if (!stream) {
      ExpectJsonError(r, 500, "engine failure");
      EXPECT_EQ(r.body["error"]["type"], "server_error");
      EXPECT_NE(r.body["error"]["message"].get<std::string>().find("EF_DEBUG_FAIL_AT_STEP"), std::string::npos);
    } else {
      EXPECT_EQ(r.status, 200) << r.raw;  // the status went out with the first event
      std::map<int, std::string> finish;
      std::vector<json> errors;
      SseChoices(r.raw, false, &finish, &errors);
      ASSERT_EQ(errors.size(), 1u) << r.raw;
      EXPECT_EQ(errors[0]["type"], "server_error");
      EXPECT_TRUE(finish.empty()) << "an engine failure is not a normal finish";
    }
    EXPECT_GT(s.WaitExit(), 0) << (stream ? "streaming" : "whole");
  }
}

// Waits (bounded, 30 s) until `n` requests are in the server, running or queued (/metrics).
bool WaitUntilInServer(const ServerProcess& s, int n) {
  auto gauge = [](const std::string& text, const std::string& name) {
    const size_t at = text.find("\n" + name + " ");
    return at == std::string::npos ? -1 : std::stoi(text.substr(at + name.size() + 2));
  };
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline) {
    const std::string m = Get(s, "/metrics").raw;
    if (gauge(m, "expertflow_running_requests") + gauge(m, "expertflow_queue_depth") == n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

// Waits (bounded, 30 s) until /health says "stopping": the server has taken a signal in and
// refuses new requests from then on. A signal is handled on the server's own thread some time
// after kill() returns; a request sent before that is accepted and answered like any other (after
// the requests queued ahead of it), and a second signal sent before that merges with the first.
bool WaitUntilStopping(const ServerProcess& s) {
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline) {
    if (Get(s, "/health").raw.find("stopping") != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

// SIGTERM while 8 requests run or wait, every other one streaming: each is answered in full (a
// stream to its finish_reason and [DONE]), a request that arrives while they drain gets 503, and
// the server exits 0.
TEST(ServerShutdownTest, SigtermFinishesInFlightRequestsAndExitsZero) {
  ServerProcess s;
  s.Start({"--max-batch", "4"});
  ASSERT_GT(s.port(), 0);
  constexpr int kRequests = 8;
  constexpr int kTokens = 96;
  std::vector<int> status(kRequests, 0), tokens(kRequests, -1);
  std::vector<std::string> finish(kRequests);
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      const bool stream = i % 2 == 1;
      json req = {{"model", kModel},
                  {"prompt", "class A" + std::to_string(i) + ":"},
                  {"max_tokens", kTokens},
                  {"ignore_eos", true},
                  {"stream", stream}};
      if (stream) req["stream_options"] = {{"include_usage", true}};
      ++started;
      Reply r = Post(s, "/v1/completions", req.dump());
      status[i] = r.status;
      if (r.status != 200) return;
      if (!stream) {
        tokens[i] = r.body["usage"]["completion_tokens"];
        finish[i] = r.body["choices"][0]["finish_reason"];
        return;
      }
      // The usage event, then [DONE], end a stream that ran to its end.
      std::map<int, std::string> reasons;
      SseChoices(r.raw, false, &reasons);
      if (reasons.count(0)) finish[i] = reasons[0];
      const size_t usage = r.raw.rfind("\"completion_tokens\":");
      if (usage != std::string::npos && r.raw.rfind("data: [DONE]") != std::string::npos)
        tokens[i] = std::stoi(r.raw.substr(usage + std::strlen("\"completion_tokens\":")));
    });
  }
  EXPECT_TRUE(WaitUntilInServer(s, kRequests)) << "the requests never all reached the server";
  const int exit_status = s.Terminate();
  for (auto& t : threads) t.join();
  EXPECT_EQ(exit_status, 0);
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(status[i], 200) << "request " << i;
    EXPECT_EQ(tokens[i], kTokens) << "request " << i << (i % 2 ? " (streaming)" : "");
    EXPECT_EQ(finish[i], "length") << "request " << i;
  }
}

// Between the first signal and the last answer the server refuses new work with 503 (and /health
// says stopping), and the streams queued behind the running one still run to their end.
TEST(ServerShutdownTest, NewRequestsWhileDrainingGet503AndQueuedStreamsFinish) {
  ServerProcess s;
  // 2 ms a step: four streams of 200 tokens, one at a time, take over 1.6 s to drain.
  s.Start({"--max-batch", "1"}, {"EF_DEBUG_STEP_DELAY_US=2000"});
  ASSERT_GT(s.port(), 0);
  constexpr int kStreams = 4;
  std::vector<std::string> raw(kStreams);
  std::vector<std::thread> streams;
  for (int i = 0; i < kStreams; ++i)
    streams.emplace_back([&, i] {
      json req = {{"model", kModel},
                  {"prompt", "def f" + std::to_string(i) + "("},
                  {"max_tokens", 200},
                  {"ignore_eos", true},
                  {"stream", true}};
      raw[i] = Post(s, "/v1/completions", req.dump()).raw;
    });
  EXPECT_TRUE(WaitUntilInServer(s, kStreams)) << "the streams never all reached the server";
  ASSERT_TRUE(s.Signal(SIGTERM));
  // Probe only once the server says it is stopping: a request that beats the signal's handling is
  // queued behind the four streams and answered after the drain, when the server is gone.
  EXPECT_TRUE(WaitUntilStopping(s)) << "/health never said stopping after SIGTERM";
  Reply refused = Post(s, "/v1/completions", json{{"model", kModel}, {"prompt", "x"}, {"max_tokens", 1}}.dump());
  ExpectJsonError(refused, 503, "a request while draining");
  EXPECT_EQ(refused.body["error"]["code"], "shutting_down");
  EXPECT_NE(Get(s, "/health").raw.find("stopping"), std::string::npos);
  EXPECT_EQ(s.WaitExit(std::chrono::seconds(60)), 0);
  for (auto& t : streams) t.join();
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_NE(raw[i].find("\"finish_reason\":\"length\""), std::string::npos) << "stream " << i << ": " << raw[i];
    EXPECT_NE(raw[i].find("data: [DONE]"), std::string::npos) << "stream " << i;
  }
}

// A second signal stops now: the requests in flight (running and queued) get 503 at the engine's
// next step instead of running to their end, and the server exits within seconds.
TEST(ServerShutdownTest, SecondSignalEndsInFlightRequestsWith503) {
  ServerProcess s;
  // 2 ms a step: three requests of 900 tokens, one at a time, would take over 5 s to drain.
  s.Start({"--max-batch", "1"}, {"EF_DEBUG_STEP_DELAY_US=2000"});
  ASSERT_GT(s.port(), 0);
  constexpr int kRequests = 3;
  std::vector<Reply> replies(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i)
    threads.emplace_back([&, i] {
      json req = {
          {"model", kModel}, {"prompt", "def g" + std::to_string(i) + "("}, {"max_tokens", 900}, {"ignore_eos", true}};
      replies[i] = Post(s, "/v1/completions", req.dump());
    });
  EXPECT_TRUE(WaitUntilInServer(s, kRequests)) << "the requests never all reached the server";
  ASSERT_TRUE(s.Signal(SIGTERM));
  // The second signal must come after the server took the first in, or the two merge into one.
  EXPECT_TRUE(WaitUntilStopping(s)) << "/health never said stopping after SIGTERM";
  const auto t0 = Clock::now();
  ASSERT_TRUE(s.Signal(SIGTERM));
  EXPECT_EQ(s.WaitExit(std::chrono::seconds(60)), 0);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (auto& t : threads) t.join();
  EXPECT_LT(seconds, 3.0) << "the second signal did not stop the requests in flight";
  for (int i = 0; i < kRequests; ++i) {
    ExpectJsonError(replies[i], 503, "request " + std::to_string(i));
    EXPECT_NE(replies[i].raw.find("the server is stopping"), std::string::npos) << replies[i].raw;
  }
}

// --- chat templates ---

TEST(ChatTemplateTest, PlainTemplate) {
  ChatTemplate t;
  auto s = t.Apply({{"system", "be brief"}, {"user", "hi"}}, true);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, "system: be brief\nuser: hi\nassistant:");
}

TEST(ChatTemplateTest, ChatMlTemplate) {
  const std::string src =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
      "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
  auto t = ChatTemplate::FromSource(src, "", "<|im_end|>");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto s = t->Apply({{"user", "hi"}}, true);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(*s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, MistralStyleTemplateWithSliceSetAndRaise) {
  const std::string src = R"({{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate user/assistant') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (system + '\n\n' if loop.first and system else '') + message['content'] | trim + ' [/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %})";
  auto t = ChatTemplate::FromSource(src, "<s>", "</s>");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto s = t->Apply({{"system", "sys"}, {"user", " a "}, {"assistant", "b"}, {"user", "c"}}, true);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(*s, "<s>[INST] sys\n\na [/INST] b</s>[INST] c [/INST]");
  auto bad = t->Apply({{"assistant", "x"}}, true);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("roles must alternate"), std::string::npos);
}

TEST(ChatTemplateTest, UnsupportedConstructsAreErrors) {
  EXPECT_FALSE(ChatTemplate::FromSource("{% macro f() %}x{% endmacro %}", "", "").ok());
  EXPECT_FALSE(ChatTemplate::FromSource("{% if x %}no end", "", "").ok());
  EXPECT_FALSE(ChatTemplate::FromSource("{{ 'unterminated }}", "", "").ok());
}

// Found by tests/fuzz/chat_template_fuzzer: literals past int64/double used to throw
// std::out_of_range out of the lexer and end the process.
TEST(ChatTemplateTest, NumberLiteralsOutOfRangeAreErrors) {
  auto big = ChatTemplate::FromSource("{{ 99999999999999999999 }}", "", "");
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("out of range"), std::string::npos);
  EXPECT_FALSE(ChatTemplate::FromSource("{{ 1" + std::string(400, '0') + ".5 }}", "", "").ok());
  auto ok = ChatTemplate::FromSource("{{ 9223372036854775807 }} {{ 2.5 }}", "", "");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  auto s = ok->Apply({{"user", "hi"}}, false);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(*s, "9223372036854775807 2.5");
}

}  // namespace
}  // namespace ef::launch
