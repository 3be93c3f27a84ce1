// ModelConfig for the DeepSeek-V2/V3 and GPT-OSS families: what the fixtures' configs parse to,
// and errors that name the key for missing, mistyped or inconsistent fields.
#include "runtime/model/model_config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "runtime/model/rope_frequencies.h"

namespace ef::runtime {
namespace {

using json = nlohmann::json;

json Fixture(const std::string& family) {
  std::ifstream in(std::string(EF_TEST_DATA) + "/" + family + "/config.json");
  EXPECT_TRUE(in.good()) << family;
  return json::parse(in);
}

// The error message of parsing `j`, or "" when it parses.
std::string Error(const json& j) {
  auto c = ModelConfig::FromJson(j.dump(), "config.json");
  return c.ok() ? "" : c.status().message();
}

TEST(ModelConfigDeepseek, FixturesParse) {
  auto v3 = ModelConfig::FromJson(Fixture("deepseek_v3").dump(), "config.json");
  ASSERT_TRUE(v3.ok()) << v3.status().ToString();
  EXPECT_TRUE(v3->mla);
  EXPECT_EQ(v3->q_lora_rank, 32);
  EXPECT_EQ(v3->head_dim, 24);  // qk_nope + qk_rope, not the config's head_dim (the rope part)
  EXPECT_EQ(v3->kv_cache_key_width(), 40);
  EXPECT_EQ(v3->kv_cache_value_width(), 0);
  EXPECT_EQ(v3->router_scoring, RouterScoring::kSigmoid);
  EXPECT_EQ(v3->topk_method, TopkMethod::kNoAuxTc);
  EXPECT_EQ(v3->shared_expert_intermediate_size, 32);
  EXPECT_FALSE(v3->IsMoeLayer(0));  // first_k_dense_replace 1
  EXPECT_TRUE(v3->IsMoeLayer(1));
  EXPECT_TRUE(v3->host_routing());
  auto v2 = ModelConfig::FromJson(Fixture("deepseek_v2").dump(), "config.json");
  ASSERT_TRUE(v2.ok()) << v2.status().ToString();
  EXPECT_EQ(v2->q_lora_rank, 0);  // null: plain q_proj
  EXPECT_EQ(v2->shared_expert_intermediate_size, 64);
  EXPECT_EQ(v2->topk_method, TopkMethod::kGreedy);
}

TEST(ModelConfigDeepseek, MoeLayersAndDecoderLayersConvertBothWays) {
  // first_k_dense_replace 1: decoder layer 0 is dense, decoder layers 1 and 2 are MoE layers 0 and 1.
  auto c = ModelConfig::FromJson(Fixture("deepseek_v3").dump(), "config.json");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->MoeLayers(), (std::vector<int>{1, 2}));
  EXPECT_FALSE(c->MoeLayerOf(0).has_value());
  ASSERT_TRUE(c->MoeLayerOf(2).has_value());
  EXPECT_EQ(*c->MoeLayerOf(2), MoeLayer(1));
  for (int m = 0; m < c->num_moe_layers(); ++m) {
    EXPECT_EQ(c->DecoderLayer(MoeLayer(m)), c->MoeLayers()[m]);
    EXPECT_EQ(*c->MoeLayerOf(c->DecoderLayer(MoeLayer(m))), MoeLayer(m));
  }
  static_assert(!std::is_convertible_v<int, MoeLayer>, "a decoder index must not turn into a MoE index silently");
}

TEST(ModelConfigDeepseek, BadFieldsNameTheKey) {
  json j = Fixture("deepseek_v3");
  j["n_group"] = 3;  // 16 experts
  EXPECT_NE(Error(j).find("not divisible by \"n_group\""), std::string::npos) << Error(j);
  j = Fixture("deepseek_v3");
  j["topk_group"] = 5;
  EXPECT_NE(Error(j).find("\"topk_group\" (5) exceeds \"n_group\" (4)"), std::string::npos) << Error(j);
  j = Fixture("deepseek_v3");
  j.erase("kv_lora_rank");
  EXPECT_NE(Error(j).find("\"kv_lora_rank\" is missing"), std::string::npos) << Error(j);
  j = Fixture("deepseek_v3");
  j["qk_rope_head_dim"] = "eight";
  EXPECT_NE(Error(j).find("\"qk_rope_head_dim\" must be an integer"), std::string::npos) << Error(j);
  j = Fixture("deepseek_v2");
  j["topk_method"] = "random";
  EXPECT_NE(Error(j).find("\"topk_method\" \"random\""), std::string::npos) << Error(j);
  j = Fixture("deepseek_v2");
  j["n_routed_experts"] = 0;
  EXPECT_NE(Error(j).find("\"n_routed_experts\" = 0 is out of range"), std::string::npos) << Error(j);
  j = Fixture("deepseek_v3");
  j["num_experts_per_tok"] = 9;  // > 2 groups x 4 experts
  EXPECT_NE(Error(j).find("\"num_experts_per_tok\" (9) exceeds the experts of topk_group groups"), std::string::npos)
      << Error(j);
  j = Fixture("deepseek_v3");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 10000.0}};
  EXPECT_NE(Error(j).find("\"factor\" is missing"), std::string::npos) << Error(j);
  j = Fixture("deepseek_v3");
  j["eos_token_id"] = json::array({1, 99999});
  EXPECT_NE(Error(j).find("eos_token_id 99999 is not a token of the vocabulary of"), std::string::npos) << Error(j);
}

TEST(ModelConfigGptOss, FixtureParsesAndBadFieldsNameTheKey) {
  auto c = ModelConfig::FromJson(Fixture("gpt_oss").dump(), "config.json");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->sliding_window, 8);
  EXPECT_EQ(c->sliding_layers, (std::vector<bool>{true, false, true}));
  EXPECT_TRUE(c->attention_sinks && c->o_bias && c->qkv_bias && c->expert_bias && c->router_bias);
  EXPECT_EQ(c->rope.type, "yarn");
  EXPECT_FALSE(c->rope.truncate);
  json j = Fixture("gpt_oss");
  j["layer_types"][1] = "global";
  EXPECT_NE(Error(j).find("\"layer_types\"[1] = \"global\""), std::string::npos) << Error(j);
  j = Fixture("gpt_oss");
  j.erase("sliding_window");
  EXPECT_NE(Error(j).find("\"sliding_window\" is missing"), std::string::npos) << Error(j);
  j = Fixture("gpt_oss");
  j["rope_parameters"].erase("original_max_position_embeddings");
  EXPECT_NE(Error(j).find("\"original_max_position_embeddings\" is missing"), std::string::npos) << Error(j);
  j = Fixture("gpt_oss");
  j["rope_parameters"]["rope_type"] = "longrope";
  EXPECT_NE(Error(j).find("\"longrope\" is not supported"), std::string::npos) << Error(j);
}

TEST(RopeFrequencies, YarnAttentionFactorAndRampEnds) {
  auto c = ModelConfig::FromJson(Fixture("gpt_oss").dump(), "config.json");
  ASSERT_TRUE(c.ok());
  const RopeFrequencies r = RopeFrequencies::ForModel(*c);
  ASSERT_EQ(r.inv_freq.size(), 8u);
  EXPECT_NEAR(r.attention_factor, 0.1 * std::log(32.0) + 1.0, 1e-6);
  // The highest frequency extrapolates (unchanged); the lowest is interpolated (divided by factor).
  EXPECT_FLOAT_EQ(r.inv_freq[0], 1.0f);
  EXPECT_NEAR(r.inv_freq[7], 1.0 / std::pow(150000.0, 14.0 / 16) / 32, 1e-9);
}

}  // namespace
}  // namespace ef::runtime
