#include "runtime/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace ef::runtime {
namespace {

using json = nlohmann::json;

const std::string kTokDir = std::string(EF_TEST_DATA) + "/tokenizers";
const std::string kTinyModelDir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";

Tokenizer Load(const std::string& path) {
  auto tok = Tokenizer::FromFile(path);
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  return std::move(tok).value();
}

json LoadExpected() {
  std::ifstream in(kTokDir + "/expected.json");
  EXPECT_TRUE(in.good());
  return json::parse(in);
}

// Strings covering code, whitespace runs, tabs/newlines, Latin accents, CJK, emoji.
const std::vector<std::string>& RoundTripStrings() {
  static const std::vector<std::string> strings = {
      "",
      "a",
      " ",
      "   ",
      "\n",
      "Hello world",
      "  leading and trailing spaces  ",
      "def main(argv):\n\tif len(argv) > 1:\n\t\treturn 0\n    return 1\n",
      "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\r\n",
      "It's we'll they're I'M you've she'd 'quoted'",
      "naïve café — 東京 🚀 emoji and tabs\tand  spaces",
      "日本語のテキストと中文文本，以及한국어",
      "👩‍👩‍👧‍👦 family, 🇫🇷 flag, ½ ⅓ ² numbers ٣٤٥",
      "mixed123numbers456 and 7,890.12",
      "\t\t\n\n  \n x",
      "trailing newline\n\n",
      "<html><body class=\"x\">&amp;</body></html>",
      "a real replacement char \xEF\xBF\xBD, twice at the end \xEF\xBF\xBD\xEF\xBF\xBD",
  };
  return strings;
}

std::vector<int32_t> ToIds(const json& j) { return j.get<std::vector<int32_t>>(); }

void CheckExpected(const std::string& file, const std::string& key) {
  Tokenizer tok = Load(kTokDir + "/" + file);
  const json expected = LoadExpected();
  ASSERT_TRUE(expected.contains(key));
  ASSERT_FALSE(expected[key].empty());
  for (const json& e : expected[key]) {
    const std::string text = e["text"].get<std::string>();
    const std::vector<int32_t> want = ToIds(e["ids"]);
    EXPECT_EQ(tok.Encode(text), want) << "text: " << text;
    EXPECT_EQ(tok.Decode(want), e["decoded"].get<std::string>()) << "text: " << text;
  }
}

TEST(TokenizerTest, ByteLevelMatchesExpected) { CheckExpected("bytelevel_bpe.json", "bytelevel_bpe"); }

TEST(TokenizerTest, MetaspaceByteFallbackMatchesExpected) {
  CheckExpected("metaspace_bpe_bytefallback.json", "metaspace_bpe_bytefallback");
}

TEST(TokenizerTest, ByteLevelRoundTrip) {
  Tokenizer tok = Load(kTokDir + "/bytelevel_bpe.json");
  for (const std::string& s : RoundTripStrings()) EXPECT_EQ(tok.Decode(tok.Encode(s)), s) << s;
}

TEST(TokenizerTest, MetaspaceRoundTrip) {
  // The Strip decoder removes the space the normalizer prepends, so text that does not
  // start with a space round-trips; unknown characters come back through <0xNN> tokens.
  Tokenizer tok = Load(kTokDir + "/metaspace_bpe_bytefallback.json");
  for (const std::string& s : RoundTripStrings()) {
    if (!s.empty() && s[0] == ' ') continue;
    EXPECT_EQ(tok.Decode(tok.Encode(s)), s) << s;
  }
}

TEST(TokenizerTest, MetaspaceByteFallbackTokens) {
  Tokenizer tok = Load(kTokDir + "/metaspace_bpe_bytefallback.json");
  // "ß" is not in the vocab: it becomes its two UTF-8 bytes.
  const std::vector<int32_t> ids = tok.Encode("ß");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[0], *tok.TokenToId("\xE2\x96\x81"));
  EXPECT_EQ(ids[1], *tok.TokenToId("<0xC3>"));
  EXPECT_EQ(ids[2], *tok.TokenToId("<0x9F>"));
  EXPECT_EQ(tok.Decode(ids), "ß");
  // A lone continuation byte decodes as U+FFFD.
  const int32_t bad[] = {*tok.TokenToId("<0x9F>"), *tok.TokenToId("a")};
  EXPECT_EQ(tok.Decode(bad),
            "\xEF\xBF\xBD"
            "a");
}

TEST(TokenizerTest, TinyCodeMoe) {
  auto loaded = Tokenizer::FromModelDir(kTinyModelDir);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const Tokenizer& tok = *loaded;
  EXPECT_EQ(tok.vocab_size(), 4096);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_TRUE(tok.IsSpecial(0));
  EXPECT_TRUE(tok.IsSpecial(2));
  EXPECT_FALSE(tok.IsSpecial(100));
  EXPECT_EQ(tok.ChatTemplate(), "");

  const std::vector<int32_t> ids = tok.Encode("def main(");
  ASSERT_FALSE(ids.empty());
  for (int32_t id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 4096);
  }
  EXPECT_EQ(tok.Decode(ids), "def main(");
  // A code tokenizer merges these frequent pieces; fewer tokens than bytes.
  EXPECT_LT(ids.size(), std::string("def main(").size());

  for (const std::string& s : RoundTripStrings()) {
    const std::vector<int32_t> enc = tok.Encode(s);
    for (int32_t id : enc) EXPECT_LT(id, 4096);
    EXPECT_EQ(tok.Decode(enc), s) << s;
  }
}

TEST(TokenizerTest, ByteLevelPieceSplitting) {
  // With a byte-level tokenizer each word of the GPT-2 regex is encoded on its own, so the
  // ids of a text are the concatenation of the ids of its regex pieces.
  auto loaded = Tokenizer::FromModelDir(kTinyModelDir);
  ASSERT_TRUE(loaded.ok());
  const Tokenizer& tok = *loaded;
  const auto concat = [&](std::initializer_list<std::string> parts) {
    std::vector<int32_t> all;
    for (const std::string& p : parts) {
      auto ids = tok.Encode(p);
      all.insert(all.end(), ids.begin(), ids.end());
    }
    return all;
  };
  EXPECT_EQ(tok.Encode("def main("), concat({"def", " main", "("}));
  EXPECT_EQ(tok.Encode("x   y"), concat({"x", "  ", " y"}));
  EXPECT_EQ(tok.Encode("a\n\nb"), concat({"a", "\n", "\n", "b"}));
  EXPECT_EQ(tok.Encode("it's 42"), concat({"it", "'s", " 42"}));
  EXPECT_EQ(tok.Encode("end  "), concat({"end", "  "}));
}

TEST(TokenizerTest, SpecialTokensInText) {
  Tokenizer bl = Load(kTokDir + "/bytelevel_bpe.json");
  EXPECT_EQ(bl.TokenToId("<|endoftext|>"), 0);
  EXPECT_EQ(bl.eos_id(), 0);
  EXPECT_EQ(bl.bos_id(), std::nullopt);
  std::vector<int32_t> want = bl.Encode("Hello");
  want.push_back(0);
  for (int32_t id : bl.Encode(" world")) want.push_back(id);
  const std::vector<int32_t> got = bl.Encode("Hello<|endoftext|> world");
  EXPECT_EQ(got, want);
  EXPECT_EQ(bl.Decode(got), "Hello<|endoftext|> world");
  EXPECT_EQ(bl.Decode(got, /*skip_special=*/true), "Hello world");
  EXPECT_EQ(bl.Encode("<|endoftext|><|endoftext|>"), (std::vector<int32_t>{0, 0}));
  // A partial special token is ordinary text.
  for (int32_t id : bl.Encode("<|endoftext|")) EXPECT_NE(id, 0);

  Tokenizer ms = Load(kTokDir + "/metaspace_bpe_bytefallback.json");
  EXPECT_EQ(ms.bos_id(), 1);
  EXPECT_EQ(ms.eos_id(), 2);
  const std::vector<int32_t> ids = ms.Encode("<s>Hello</s>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  // Each text segment is normalized on its own, so "Hello" gets its own leading "▁".
  std::vector<int32_t> hello = ms.Encode("Hello");
  EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end() - 1), hello);
  EXPECT_EQ(ms.Decode(ids, /*skip_special=*/true), "Hello");

  auto tiny = Tokenizer::FromModelDir(kTinyModelDir);
  ASSERT_TRUE(tiny.ok());
  const std::vector<int32_t> t = tiny->Encode("<|bos|>def f():<|eos|>");
  EXPECT_EQ(t.front(), 1);
  EXPECT_EQ(t.back(), 2);
  EXPECT_EQ(tiny->Decode(t), "<|bos|>def f():<|eos|>");
  EXPECT_EQ(tiny->Decode(t, true), "def f():");
}

void CheckStream(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  StreamDecoder stream(tok, skip_special);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = stream.Push(id);
    // Never half a UTF-8 character: every piece is valid UTF-8 on its own.
    for (size_t i = 0; i < piece.size();) {
      const unsigned char c = piece[i];
      const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
      ASSERT_LE(i + n, piece.size()) << "split character in streamed piece";
      i += n;
    }
    all += piece;
  }
  all += stream.Flush();
  EXPECT_EQ(all, tok.Decode(ids, skip_special));
}

TEST(TokenizerTest, StreamDecoderMatchesDecode) {
  const std::vector<std::string> files = {kTokDir + "/bytelevel_bpe.json", kTokDir + "/metaspace_bpe_bytefallback.json",
                                          kTinyModelDir + "/tokenizer.json"};
  for (const std::string& f : files) {
    Tokenizer tok = Load(f);
    for (const std::string& s : RoundTripStrings()) {
      SCOPED_TRACE(f + ": " + s);
      CheckStream(tok, tok.Encode(s), false);
      CheckStream(tok, tok.Encode(s), true);
    }
  }
}

TEST(TokenizerTest, StreamDecoderHoldsPartialCharacters) {
  Tokenizer tok = Load(kTokDir + "/metaspace_bpe_bytefallback.json");
  // "ß" = C3 9F via byte fallback: nothing comes out until the second byte.
  StreamDecoder stream(tok);
  EXPECT_EQ(stream.Push(*tok.TokenToId("a")), "a");
  EXPECT_EQ(stream.Push(*tok.TokenToId("<0xC3>")), "");
  EXPECT_EQ(stream.Push(*tok.TokenToId("<0x9F>")), "ß");
  // An incomplete character at the end comes out as U+FFFD on Flush.
  EXPECT_EQ(stream.Push(*tok.TokenToId("<0xE6>")), "");
  EXPECT_EQ(stream.Flush(), "\xEF\xBF\xBD");

  Tokenizer bl = Load(kTokDir + "/bytelevel_bpe.json");
  StreamDecoder s2(bl);
  std::string out;
  size_t empty_pushes = 0;
  for (int32_t id : bl.Encode("🚀")) {
    std::string p = s2.Push(id);
    empty_pushes += p.empty();
    out += p;
  }
  out += s2.Flush();
  EXPECT_EQ(out, "🚀");
  EXPECT_GT(empty_pushes, 0u);
}

TEST(TokenizerTest, EncodeIsFast) {
  auto loaded = Tokenizer::FromModelDir(kTinyModelDir);
  ASSERT_TRUE(loaded.ok());
  std::string text;
  while (text.size() < 20000) {
    text += "def compute_loss(logits, labels):\n    return -sum(l * log(p) for l, p in zip(labels, logits))\n";
  }
  Tokenizer ms = Load(kTokDir + "/metaspace_bpe_bytefallback.json");
  for (const Tokenizer* tok : {&*loaded, &ms}) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = tok->Encode(text);
    const double ms_elapsed =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(tok->Decode(ids), text);
    // Thousands of tokens in well under a second even in debug builds (milliseconds in release).
    EXPECT_LT(ms_elapsed, 1000.0) << ids.size() << " tokens";
  }
}

class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() /
            ("ef_tok_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
             std::to_string(reinterpret_cast<uintptr_t>(this)));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string Write(const std::string& name, const std::string& contents) const {
    const std::string p = (path_ / name).string();
    std::ofstream(p) << contents;
    return p;
  }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

std::string MinimalTokenizerJson(const json& model, const json& extra = json::object()) {
  json j = {{"version", "1.0"},      {"added_tokens", json::array()},
            {"normalizer", nullptr}, {"pre_tokenizer", nullptr},
            {"decoder", nullptr},    {"model", model}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  return j.dump();
}

json TinyBpe() {
  return {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}}, {"merges", json::array({"a b"})}};
}

TEST(TokenizerTest, MissingFileIsNotFound) {
  auto t = Tokenizer::FromModelDir("/nonexistent/model/dir");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("/nonexistent/model/dir/tokenizer.json"), std::string::npos)
      << t.status().ToString();
}

TEST(TokenizerTest, MalformedJsonIsInvalidArgument) {
  TempDir dir;
  auto t = Tokenizer::FromFile(dir.Write("bad.json", "{\"model\": {\"type\": \"BPE\", "));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("not valid JSON"), std::string::npos) << t.status().ToString();

  // Wrong types inside valid JSON are errors, not crashes.
  t = Tokenizer::FromFile(dir.Write("types.json", MinimalTokenizerJson({{"type", "BPE"}, {"vocab", {{"a", "x"}}}})));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  t = Tokenizer::FromFile(dir.Write(
      "merge.json", MinimalTokenizerJson({{"type", "BPE"}, {"vocab", {{"a", 0}}}, {"merges", json::array({"a z"})}})));
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("missing from the vocab"), std::string::npos) << t.status().ToString();
  t = Tokenizer::FromFile(dir.Write("array.json", "[1, 2]"));
  ASSERT_FALSE(t.ok());
  t = Tokenizer::FromFile(dir.Write("nomodel.json", "{}"));
  ASSERT_FALSE(t.ok());
}

TEST(TokenizerTest, UnsupportedComponentsAreUnimplemented) {
  TempDir dir;
  const auto expect_unimplemented = [&](const std::string& contents, const std::string& name) {
    auto t = Tokenizer::FromFile(dir.Write("t.json", contents));
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kUnimplemented) << t.status().ToString();
    EXPECT_NE(t.status().message().find(name), std::string::npos) << t.status().ToString();
  };
  expect_unimplemented(MinimalTokenizerJson({{"type", "WordPiece"}, {"vocab", {{"a", 0}}}}), "WordPiece");
  expect_unimplemented(MinimalTokenizerJson(TinyBpe(), {{"normalizer", {{"type", "BertNormalizer"}}}}),
                       "BertNormalizer");
  expect_unimplemented(MinimalTokenizerJson(TinyBpe(), {{"pre_tokenizer", {{"type", "Whitespace"}}}}), "Whitespace");
  expect_unimplemented(MinimalTokenizerJson(TinyBpe(), {{"decoder", {{"type", "WordPiece"}}}}), "WordPiece");
  expect_unimplemented(
      MinimalTokenizerJson(
          TinyBpe(),
          {{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "[a-z]+"}}}, {"behavior", "Isolated"}}}}),
      "[a-z]+");
}

TEST(TokenizerTest, MergesAsStringsOrPairs) {
  TempDir dir;
  json pairs = TinyBpe();
  pairs["merges"] = json::array({json::array({"a", "b"})});
  auto s = Tokenizer::FromFile(dir.Write("s.json", MinimalTokenizerJson(TinyBpe())));
  auto p = Tokenizer::FromFile(dir.Write("p.json", MinimalTokenizerJson(pairs)));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(s->Encode("abab"), (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(p->Encode("abab"), (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(s->Encode("aab"), (std::vector<int32_t>{0, 2}));
  // No decoder: tokens are joined with spaces (as `tokenizers` does).
  const int32_t ids[] = {2, 0};
  EXPECT_EQ(s->Decode(ids), "ab a");
  EXPECT_EQ(s->vocab_size(), 3);
  EXPECT_EQ(s->bos_id(), std::nullopt);
  EXPECT_EQ(s->eos_id(), std::nullopt);
}

TEST(TokenizerTest, MergeRanksDecideOrder) {
  // "abc" with merges [b c] (rank 0) before [a b] (rank 1) must give a + bc, not ab + c.
  TempDir dir;
  json m = {{"type", "BPE"},
            {"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"bc", 4}}},
            {"merges", json::array({"b c", "a b"})}};
  auto t = Tokenizer::FromFile(dir.Write("r.json", MinimalTokenizerJson(m)));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->Encode("abc"), (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(t->Encode("abab"), (std::vector<int32_t>{3, 3}));
}

}  // namespace
}  // namespace ef::runtime
