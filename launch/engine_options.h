// Command-line flags shared by every command that loads a model.
#pragma once

#include <CLI/CLI.hpp>
#include <filesystem>
#include <string>

#include "launch/cli_checks.h"
#include "runtime/engine/engine.h"

namespace ef::launch {

inline constexpr const char* kDefaultModelDir = "models/tiny-code-moe";

// --model's default: models/tiny-code-moe in the working directory, or else beside the build
// folder the binary runs from (<checkout>/build/expertflow -> <checkout>/models/tiny-code-moe), so
// the shipped model is found from any directory.
inline std::string DefaultModelDir() {
  std::error_code ec;
  if (std::filesystem::is_directory(kDefaultModelDir, ec)) return kDefaultModelDir;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const std::filesystem::path beside = exe.parent_path().parent_path() / kDefaultModelDir;
    if (std::filesystem::is_directory(beside, ec)) return beside.string();
  }
  return kDefaultModelDir;
}

struct ModelFlags {
  std::string dir = DefaultModelDir();
  std::string backend = "auto";
  int device = 0;
  int max_seq_len = 0;
  std::string attention_precision = "auto";
  std::string kv_cache_dtype = "auto";
  int kv_block_size = 16;
  int64_t kv_cache_tokens = 0;
  std::string cuda_graphs = "on";

  void Register(CLI::App* app) {
    app->add_option("--model,-m", dir, "Hugging Face checkpoint directory (config.json, *.safetensors)")
        ->capture_default_str();
    app->add_option("--backend", backend, "compute backend: auto (cuda when a GPU is visible), cuda or cpu")
        ->check(CLI::IsMember({"auto", "cuda", "cpu"}))
        ->capture_default_str();
    app->add_option("--device", device, "GPU index for the cuda backend")->capture_default_str();
    app->add_option("--max-seq-len", max_seq_len, "KV-cache capacity per sequence (0: the model's maximum)")
        ->check(kNonNegative);
    app->add_option("--attention-precision", attention_precision,
                    "attention on the cuda backend: bf16 (tensor cores, fp32 accumulation: prefill, and decode over "
                    "a bf16 KV cache), fp32 (exact), or auto (bf16 when the model's weights are 16-bit) "
                    "(runtime.attention_precision)")
        ->check(CLI::IsMember({"auto", "bf16", "fp32"}))
        ->capture_default_str();
    app->add_option("--kv-cache-dtype", kv_cache_dtype,
                    "keys and values in the KV cache: fp32 (exact), bf16 (half the memory and decode reads; plain "
                    "attention only), or auto (bf16 wherever prefill attention resolves to bf16: the cuda backend, "
                    "plain attention, and --attention-precision bf16 or auto with 16-bit weights; fp32 otherwise) "
                    "(runtime.kv_cache_dtype)")
        ->check(CLI::IsMember({"auto", "fp32", "bf16"}))
        ->capture_default_str();
    app->add_option("--kv-block-size", kv_block_size,
                    "paged KV cache: tokens per block, a power of two up to 1024; every sequence takes blocks as it "
                    "grows from one shared pool. 0: each sequence reserves --max-seq-len rows (runtime.kv_block_size)")
        ->check([](const std::string& s) -> std::string {
          int b = -1;
          try {
            b = std::stoi(s);
          } catch (...) {
          }
          return b >= 0 && b <= 1024 && (b & (b - 1)) == 0 ? "" : "must be 0 or a power of two up to 1024";
        })
        ->capture_default_str();
    app->add_option("--kv-cache-tokens", kv_cache_tokens,
                    "paged KV cache capacity in tokens over all sequences, allocated at start-up (0: grows on "
                    "demand) (runtime.kv_cache_tokens)")
        ->check(CLI::Range(int64_t{0}, runtime::kMaxKvCacheTokens))
        ->capture_default_str();
    app->add_option("--cuda-graphs", cuda_graphs,
                    "decode steps on the paged cache with the routing on the GPU: recorded as a CUDA graph the second "
                    "time a shape comes, then replayed with one launch (same numbers); off: ops launched one by one "
                    "(runtime.cuda_graphs)")
        ->check(CLI::IsMember({"on", "off"}))
        ->capture_default_str();
  }
  runtime::EngineOptions ToEngineOptions() const {
    runtime::EngineOptions e;
    e.backend = backend;
    e.device = device;
    e.max_seq_len = max_seq_len;
    e.attention_precision = attention_precision;
    e.kv_cache_dtype = kv_cache_dtype;
    e.kv_block_size = kv_block_size;
    e.kv_cache_tokens = kv_cache_tokens;
    e.cuda_graphs = cuda_graphs == "on";
    return e;
  }
};

}  // namespace ef::launch
