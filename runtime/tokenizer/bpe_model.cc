#include "runtime/tokenizer/bpe_model.h"

#include <cstdio>
#include <queue>

#include "runtime/core/limits.h"
#include "runtime/tokenizer/unicode.h"

namespace ef::runtime {

using json = nlohmann::json;

StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const json& model) {
  if (!model.is_object()) return InvalidArgument("tokenizer model is not a JSON object");
  std::string type = "BPE";
  if (auto it = model.find("type"); it != model.end()) {
    if (!it->is_string()) return InvalidArgument("tokenizer model.type is not a string");
    type = it->get<std::string>();
  } else if (!model.contains("merges")) {
    return Unimplemented("tokenizer model has no type and no merges (only BPE models are supported)");
  }
  if (type != "BPE") return Unimplemented("tokenizer model type '" + type + "' is not supported (only BPE)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      return Unimplemented(std::string("tokenizer BPE option '") + key + "' is not supported");
    }
  }

  auto bpe = std::unique_ptr<BpeModel>(new BpeModel());
  auto vit = model.find("vocab");
  if (vit == model.end() || !vit->is_object())
    return InvalidArgument("tokenizer model.vocab is missing or not an object");
  int32_t max_id = -1;
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer())
      return InvalidArgument("tokenizer vocab entry '" + it.key() + "' is not an integer");
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id >= limits::kMaxVocab) {
      return InvalidArgument("tokenizer vocab id " + std::to_string(id) + " of '" + it.key() + "' is out of range");
    }
    bpe->vocab_.emplace(it.key(), static_cast<int32_t>(id));
    max_id = std::max(max_id, static_cast<int32_t>(id));
  }
  bpe->id_to_token_.resize(max_id + 1);
  bpe->has_token_.assign(max_id + 1, false);
  for (const auto& [token, id] : bpe->vocab_) {
    bpe->id_to_token_[id] = token;
    bpe->has_token_[id] = true;
  }

  auto mit = model.find("merges");
  if (mit == model.end() || mit->is_null()) {
    // A BPE without merges is valid (every word is split into its characters).
  } else if (!mit->is_array()) {
    return InvalidArgument("tokenizer model.merges is not an array");
  } else {
    bpe->merges_.reserve(mit->size());
    int32_t rank = 0;
    for (const json& m : *mit) {
      std::string a, b;
      if (m.is_string()) {  // "a b"
        const std::string& s = m.get_ref<const std::string&>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
          return InvalidArgument("tokenizer merge #" + std::to_string(rank) + " '" + s + "' is not of the form 'a b'");
        }
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {  // ["a", "b"]
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return InvalidArgument("tokenizer merge #" + std::to_string(rank) + " is neither 'a b' nor [a, b]");
      }
      auto ia = bpe->vocab_.find(a);
      auto ib = bpe->vocab_.find(b);
      auto ic = bpe->vocab_.find(a + b);
      if (ia == bpe->vocab_.end() || ib == bpe->vocab_.end() || ic == bpe->vocab_.end()) {
        return InvalidArgument("tokenizer merge #" + std::to_string(rank) + " ('" + a + "', '" + b +
                               "') uses a token missing from the vocab");
      }
      // The first occurrence of a pair keeps its (lower) rank, as in `tokenizers`.
      bpe->merges_.try_emplace(PairKey(ia->second, ib->second), Merge{rank, ic->second});
      ++rank;
    }
  }

  if (auto it = model.find("unk_token"); it != model.end() && !it->is_null()) {
    if (!it->is_string()) return InvalidArgument("tokenizer model.unk_token is not a string");
    auto u = bpe->vocab_.find(it->get<std::string>());
    if (u == bpe->vocab_.end()) {
      return InvalidArgument("tokenizer unk_token '" + it->get<std::string>() + "' is not in the vocab");
    }
    bpe->unk_id_ = u->second;
  }
  const auto get_bool = [&](const char* key) {
    auto it = model.find(key);
    return it != model.end() && it->is_boolean() && it->get<bool>();
  };
  bpe->fuse_unk_ = get_bool("fuse_unk");
  bpe->byte_fallback_ = get_bool("byte_fallback");
  bpe->ignore_merges_ = get_bool("ignore_merges");
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = bpe->vocab_.find(std::string_view(name));
    bpe->byte_ids_[b] = it == bpe->vocab_.end() ? -1 : it->second;
  }
  return bpe;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= size() || !has_token_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(word); it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out->size();
  MergeWord(word, out);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() < kMaxCacheEntries) cache_.try_emplace(std::string(word), out->begin() + first, out->end());
  }
}

void BpeModel::MergeWord(std::string_view word, std::vector<int32_t>* out) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  const auto add = [&](int32_t id) {
    const int32_t n = static_cast<int32_t>(sym.size());
    sym.push_back({id, n - 1, -1, true});
    if (n > 0) sym[n - 1].next = n;
  };
  bool last_was_unk = false;
  for (size_t pos = 0; pos < word.size();) {
    const size_t len = unicode::Utf8CharLen(word, pos);
    const std::string_view ch = word.substr(pos, len);
    pos += len;
    if (auto it = vocab_.find(ch); it != vocab_.end()) {
      add(it->second);
      last_was_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char b : ch) all = all && byte_ids_[b] >= 0;
      if (all) {
        for (unsigned char b : ch) add(byte_ids_[b]);
        last_was_unk = false;
        continue;
      }
    }
    if (unk_id_) {
      if (!(fuse_unk_ && last_was_unk)) add(*unk_id_);
      last_was_unk = true;
    }
    // No unk token: the character is dropped, as in `tokenizers`.
  }

  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Candidate> heap_storage;
  heap_storage.reserve(sym.size());
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue(std::greater<>{},
                                                                               std::move(heap_storage));
  const auto push_pair = [&](int32_t left) {
    const int32_t right = sym[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(sym[left].id, sym[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) push_pair(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = sym[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = sym[left.next];
    // Stale entry: one side was merged since this candidate was queued.
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int32_t i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) out->push_back(sym[i].id);
}

}  // namespace ef::runtime
