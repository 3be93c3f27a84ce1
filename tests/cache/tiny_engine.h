// The CPU engine of models/tiny-code-moe, for the cache tests that read its experts.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "runtime/engine/engine.h"

namespace ef::cache::testing {

inline std::unique_ptr<runtime::Engine> TinyEngine() {
  runtime::EngineOptions o;
  o.backend = "cpu";
  auto e = runtime::Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

}  // namespace ef::cache::testing
