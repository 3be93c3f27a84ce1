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

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
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

  // Starts the server with `extra` flags and waits (bounded) for its "listening on" line.
  void Start(std::vector<std::string> extra = {}) {
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
    ASSERT_EQ(posix_spawn(&pid_, EF_BINARY, &fa, nullptr, argv.data(), environ), 0);
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

  // SIGTERM, then the exit status (bounded wait; -1 if it had to be killed).
  int Terminate(std::chrono::seconds timeout = std::chrono::seconds(60)) {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
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

// Concatenated text of an SSE stream; checks the framing and the [DONE] end.
std::string SseText(const std::string& raw, bool chat, std::string* finish) {
  std::string text;
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
    if (j.is_discarded() || j["choices"].empty()) continue;
    const json& c = j["choices"][0];
    if (chat) {
      EXPECT_EQ(j["object"], "chat.completion.chunk");
      if (c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
    } else {
      EXPECT_EQ(j["object"], "text_completion");
      text += c["text"].get<std::string>();
    }
    if (!c["finish_reason"].is_null()) *finish = c["finish_reason"];
  }
  EXPECT_TRUE(done) << "no [DONE]";
  return text;
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

void ExpectJsonError(const Reply& r, int status, const std::string& what) {
  EXPECT_EQ(r.status, status) << what << ": " << r.raw;
  ASSERT_TRUE(r.body.is_object()) << what << ": " << r.raw;
  ASSERT_TRUE(r.body.contains("error")) << what << ": " << r.raw;
  EXPECT_TRUE(r.body["error"]["message"].is_string()) << what;
  EXPECT_TRUE(r.body["error"]["type"].is_string()) << what;
  EXPECT_TRUE(r.body["error"].contains("code")) << what;
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
};
ServerProcess* ServerTest::server_ = nullptr;

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
  };
  const std::string c = "/v1/completions", ch = "/v1/chat/completions";
  const std::vector<Case> cases = {
      {c, "{not json", 400},
      {c, "", 400},
      {c, "[1, 2]", 400},
      {c, R"({"model": "tiny-code-moe"})", 400},
      {c, R"({"prompt": "x"})", 400},
      {c, R"({"model": 7, "prompt": "x"})", 400},
      {c, R"({"model": "no-such-model", "prompt": "x"})", 404},
      {c, R"({"model": "tiny-code-moe", "prompt": 5})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": ""})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": [1, "a"]})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": [999999]})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": -1})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 100000000})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 1e300})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": 1024})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "max_tokens": "5"})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "temperature": "hot"})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "temperature": -1})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "top_p": 0})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "n": 2})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stop": 3})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stop": [""]})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": "x", "stream": "yes"})", 400},
      {c, R"({"model": "tiny-code-moe", "prompt": ["a", "b"]})", 400},
      {c, long_prompt, 400},
      {ch, R"({"model": "tiny-code-moe"})", 400},
      {ch, R"({"model": "tiny-code-moe", "messages": []})", 400},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"content": "x"}]})", 400},
      {ch, R"({"model": "tiny-code-moe", "messages": [{"role": "user", "content": 5}]})", 400},
      {ch, R"({"model": "tiny-code-moe", "messages": "hi"})", 400},
      {"/v1/nothing", "{}", 404},
  };
  for (const Case& k : cases)
    ExpectJsonError(Post(*server_, k.path, k.body), k.status, k.path + " " + k.body.substr(0, 80));
  EXPECT_EQ(Get(*server_, "/health").status, 200);
  Reply ok = Post(*server_, "/v1/completions", json{{"model", kModel}, {"prompt", "x = "}, {"max_tokens", 2}}.dump());
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

namespace fs = std::filesystem;

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
}

TEST(ServerAuthTest, ApiKeyIsRequiredOnV1) {
  ServerProcess s;
  s.Start({"--api-key", "sekrit"});
  ASSERT_GT(s.port(), 0);
  const std::string body = json{{"model", kModel}, {"prompt", "x"}, {"max_tokens", 2}}.dump();
  ExpectJsonError(Post(s, "/v1/completions", body), 401, "no key");
  ExpectJsonError(Post(s, "/v1/completions", body, {{"Authorization", "Bearer wrong"}}), 401, "wrong key");
  Reply ok = Post(s, "/v1/completions", body, {{"Authorization", "Bearer sekrit"}});
  EXPECT_EQ(ok.status, 200) << ok.raw;
  EXPECT_EQ(Get(s, "/health").status, 200);
  EXPECT_EQ(s.Terminate(), 0);
}

TEST(ServerShutdownTest, SigtermFinishesInFlightRequestsAndExitsZero) {
  ServerProcess s;
  s.Start({"--max-batch", "4"});
  ASSERT_GT(s.port(), 0);
  constexpr int kRequests = 8;
  constexpr int kTokens = 96;
  std::vector<int> status(kRequests, 0), tokens(kRequests, -1);
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      json req = {{"model", kModel},
                  {"prompt", "class A" + std::to_string(i) + ":"},
                  {"max_tokens", kTokens},
                  {"ignore_eos", true}};
      ++started;
      Reply r = Post(s, "/v1/completions", req.dump());
      status[i] = r.status;
      if (r.status == 200) tokens[i] = r.body["usage"]["completion_tokens"];
    });
  }
  // Wait (bounded) until all of them are in the server: running or queued.
  auto gauge = [](const std::string& text, const std::string& name) {
    const size_t at = text.find("\n" + name + " ");
    return at == std::string::npos ? -1 : std::stoi(text.substr(at + name.size() + 2));
  };
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  bool all_in = false;
  while (Clock::now() < deadline && !all_in) {
    Reply m = Get(s, "/metrics");
    all_in = gauge(m.raw, "expertflow_running_requests") + gauge(m.raw, "expertflow_queue_depth") == kRequests;
    if (!all_in) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(all_in) << "the requests never all reached the server";
  EXPECT_EQ(s.Terminate(), 0);
  for (auto& t : threads) t.join();
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(status[i], 200) << "request " << i;
    EXPECT_EQ(tokens[i], kTokens) << "request " << i;
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

}  // namespace
}  // namespace ef::launch
