#include "runtime/engine/generator.h"

#include <algorithm>
#include <atomic>

namespace ef::runtime {
namespace {
std::atomic<int64_t> g_next_seq{1'000'000};
}

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kContext:
      return "context";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "?";
}

StatusOr<std::vector<GenerateResult>> Generate(Engine& engine, const std::vector<GenerateRequest>& requests,
                                               const TokenCallback& on_token) {
  const ModelConfig& c = engine.config();
  const size_t n = requests.size();
  std::vector<GenerateResult> results(n);
  std::vector<Sampler> samplers;
  std::vector<Penalties> penalties;
  std::vector<int64_t> seq_ids(n);
  std::vector<bool> done(n, false);
  for (size_t i = 0; i < n; ++i) {
    const GenerateRequest& r = requests[i];
    EF_RETURN_IF_ERROR(r.sampling.Validate());
    if (r.prompt.empty()) return InvalidArgument("request " + std::to_string(i) + " has an empty prompt");
    if (r.max_new_tokens < 0) return InvalidArgument("max_new_tokens must be >= 0");
    if (static_cast<int>(r.prompt.size()) >= engine.max_seq_len())
      return OutOfRange("prompt of " + std::to_string(r.prompt.size()) + " tokens does not fit the context of " +
                        std::to_string(engine.max_seq_len()) + " tokens");
    samplers.emplace_back(r.sampling);
    const std::vector<int32_t> none;
    penalties.emplace_back(r.sampling, r.prompt,
                           r.ignore_eos ? none : c.eos_token_ids);  // EOS barred before min_tokens
    seq_ids[i] = g_next_seq++;
    done[i] = r.max_new_tokens == 0;
  }
  struct Cleanup {
    Engine& e;
    std::vector<int64_t>& ids;
    ~Cleanup() {
      for (int64_t s : ids) e.RemoveSequence(s);
    }
  } cleanup{engine, seq_ids};
  for (size_t i = 0; i < n; ++i) EF_RETURN_IF_ERROR(engine.AddSequence(seq_ids[i]));

  auto is_eos = [&](int32_t t) {
    return std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), t) != c.eos_token_ids.end();
  };
  std::vector<int32_t> last(n);
  std::vector<SeqChunk> batch;
  std::vector<size_t> index;
  bool first = true;
  for (;;) {
    batch.clear();
    index.clear();
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      // The backend picks every token (arg max or SampleRow's draw): no logits to the host, unless
      // penalties change the row first.
      const bool token_only = !penalties[i].active();
      if (first) {
        batch.push_back(SeqChunk{seq_ids[i], requests[i].prompt, false, token_only});
      } else {
        batch.push_back(SeqChunk{seq_ids[i], {&last[i], 1}, false, token_only});
      }
      if (token_only) batch.back().sampling = samplers[i].Next();
      index.push_back(i);
    }
    if (batch.empty()) break;
    first = false;
    ForwardResult fr;
    EF_RETURN_IF_ERROR(engine.Forward(batch, &fr));
    for (size_t b = 0; b < batch.size(); ++b) {
      const size_t i = index[b];
      int32_t tok;
      if (batch[b].token_only) {
        tok = fr.tokens[fr.row_offset[b]];
      } else {
        const float* row = fr.logits.data() + static_cast<size_t>(fr.row_offset[b]) * c.vocab_size;
        std::vector<float> penalized(row, row + c.vocab_size);
        penalties[i].Apply(penalized.data(), c.vocab_size);
        tok = samplers[i].Sample(penalized);
      }
      penalties[i].Add(tok);
      results[i].tokens.push_back(tok);
      last[i] = tok;
      bool keep = on_token ? on_token(i, tok) : true;
      if (!keep) {
        done[i] = true;
        results[i].finish = FinishReason::kCancelled;
      } else if (!requests[i].ignore_eos && is_eos(tok)) {
        done[i] = true;
        results[i].finish = FinishReason::kStop;
      } else if (static_cast<int>(results[i].tokens.size()) >= requests[i].max_new_tokens) {
        done[i] = true;
        results[i].finish = FinishReason::kLength;
      } else if (engine.SequenceLength(seq_ids[i]) + 1 >= engine.max_seq_len()) {
        done[i] = true;
        results[i].finish = FinishReason::kContext;
      }
    }
  }
  return results;
}

}  // namespace ef::runtime
