// BPE model: initial symbols, rank-ordered merges, per-word cache.
#include <algorithm>
#include <limits>
#include <queue>

#include "absl/hash/hash.h"
#include "common/src/tokenizer_internal.h"

namespace kvgate::tokenizer_internal {

BpeModel::BpeModel(BpeConfig config) : config_(std::move(config)) {
  byte_ids_.fill(-1);
  if (config_.byte_units) {
    for (int b = 0; b < 256; ++b) {
      auto it = config_.vocab.find(std::string(1, static_cast<char>(b)));
      if (it != config_.vocab.end()) byte_ids_[b] = it->second;
    }
  }
  // When a pair is listed twice, the first (lowest) rank wins, as in HF.
  merges_.reserve(config_.merges.size());
  for (size_t rank = 0; rank < config_.merges.size(); ++rank) {
    const BpeConfig::Merge& m = config_.merges[rank];
    merges_.try_emplace(PairKey(m.left, m.right),
                        MergeResult{static_cast<int32_t>(rank), m.merged});
  }
  config_.merges.clear();
  config_.merges.shrink_to_fit();
}

void BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const {
  if (config_.byte_units) {
    for (unsigned char b : word) {
      int32_t id = byte_ids_[b];
      if (id >= 0) {
        symbols->push_back(id);
      } else if (config_.unk_id) {
        if (!(config_.fuse_unk && !symbols->empty() && symbols->back() == *config_.unk_id)) {
          symbols->push_back(*config_.unk_id);
        }
      }
    }
    return;
  }
  // Per character, as HF's BPE::merge_word: the character's token, else its <0xNN> byte tokens
  // (byte_fallback), else unk (fused with a pending unk when fuse_unk).
  int32_t pending_unk = -1;
  size_t pos = 0;
  while (pos < word.size()) {
    size_t start = pos;
    pos += Utf8SequenceLength(static_cast<uint8_t>(word[pos]));
    pos = std::min(pos, word.size());
    std::string_view ch = word.substr(start, pos - start);
    auto it = config_.vocab.find(AsAbsl(ch));
    if (it != config_.vocab.end()) {
      if (pending_unk >= 0) symbols->push_back(pending_unk), pending_unk = -1;
      symbols->push_back(it->second);
      continue;
    }
    if (config_.byte_fallback) {
      bool all_bytes = true;
      for (unsigned char b : ch) all_bytes &= config_.byte_fallback_ids[b] >= 0;
      if (all_bytes) {
        for (unsigned char b : ch) symbols->push_back(config_.byte_fallback_ids[b]);
        continue;
      }
    }
    if (config_.unk_id) {
      if (pending_unk >= 0 && !config_.fuse_unk) symbols->push_back(pending_unk);
      pending_unk = *config_.unk_id;
    }
  }
  if (pending_unk >= 0) symbols->push_back(pending_unk);
}

void BpeModel::MergeShort(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& ids = *symbols;
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  // rank[i], new_id[i]: the merge of pair (ids[i], ids[i+1]).
  std::vector<int32_t> rank(ids.size(), kNone), new_id(ids.size(), -1);
  auto update = [&](size_t i) {
    const MergeResult* m = i + 1 < ids.size() ? FindMerge(ids[i], ids[i + 1]) : nullptr;
    rank[i] = m ? m->rank : kNone;
    new_id[i] = m ? m->new_id : -1;
  };
  for (size_t i = 0; i + 1 < ids.size(); ++i) update(i);
  while (ids.size() > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < ids.size(); ++i) {
      if (rank[i] < rank[best]) best = i;
    }
    if (rank[best] == kNone) break;
    ids[best] = new_id[best];
    ids.erase(ids.begin() + best + 1);
    rank.erase(rank.begin() + best + 1);
    new_id.erase(new_id.begin() + best + 1);
    update(best);
    if (best > 0) update(best - 1);
  }
}

void BpeModel::MergeLong(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& ids = *symbols;
  const int n = static_cast<int>(ids.size());
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
  struct Entry {
    int32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Entry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue;
  auto push = [&](int pos) {
    if (pos < 0 || next[pos] < 0) return;
    if (const MergeResult* m = FindMerge(ids[pos], ids[next[pos]])) {
      queue.push({m->rank, pos, m->new_id});
    }
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    Entry top = queue.top();
    queue.pop();
    if (!alive[top.pos] || next[top.pos] < 0) continue;
    int right = next[top.pos];
    const MergeResult* m = FindMerge(ids[top.pos], ids[right]);
    if (m == nullptr || m->new_id != top.new_id) continue;  // stale entry
    ids[top.pos] = top.new_id;
    alive[right] = false;
    next[top.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = top.pos;
    push(prev[top.pos]);
    push(top.pos);
  }
  size_t out = 0;
  for (int i = 0; i < n; ++i) {
    if (alive[i]) ids[out++] = ids[i];
  }
  ids.resize(out);
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (config_.ignore_merges) {
    auto it = config_.vocab.find(AsAbsl(word));
    if (it != config_.vocab.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  CacheShard* shard = nullptr;
  if (cacheable) {
    shard = &cache_[absl::HashOf(AsAbsl(word)) % kCacheShards];
    absl::MutexLock lock(&shard->mu);
    auto it = shard->words.find(AsAbsl(word));
    if (it != shard->words.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  InitialSymbols(word, &symbols);
  if (symbols.size() <= 128) {
    MergeShort(&symbols);
  } else {
    MergeLong(&symbols);
  }
  out->insert(out->end(), symbols.begin(), symbols.end());
  if (cacheable) {
    absl::MutexLock lock(&shard->mu);
    if (shard->words.size() >= kCacheShardCapacity) shard->words.clear();
    shard->words.emplace(std::string(word), std::move(symbols));
  }
}

}  // namespace kvgate::tokenizer_internal
