// Internal pieces of the tokenizer (not a public API): UTF-8 helpers, the byte-level alphabet,
// NFC normalization and the BPE model. common/src/tokenizer.cc assembles them into the pipeline
// Hugging Face `tokenizers` runs: added-token split -> normalizer -> pre-tokenizer -> BPE ->
// post-processor, and the decoder chain on the way back.
//
//   ASSIGN_OR_RETURN(auto bpe, BpeModel::Create(std::move(config)));
//   std::vector<int32_t> ids;
//   bpe->EncodeWord("hello", &ids);
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace kvgate::tokenizer_internal {

// Debian's Abseil 20220623 has its own absl::string_view (not std::string_view): convert for
// heterogeneous hash-map lookups and StrCat.
inline absl::string_view AsAbsl(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}

// ---- UTF-8
// ---------------------------------------------------------------------------------------

// True if `text` is well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF). On failure
// `*error_offset` is the byte offset of the first bad sequence.
bool IsValidUtf8(std::string_view text, size_t* error_offset = nullptr);

// Length in bytes of the UTF-8 sequence starting with `lead` (1 for an invalid lead byte).
inline int Utf8SequenceLength(uint8_t lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

// Replaces each maximal invalid subsequence by U+FFFD, exactly as Rust's String::from_utf8_lossy.
std::string Utf8Lossy(std::string_view bytes);

// Appends the UTF-8 encoding of code point `cp`.
void AppendUtf8(uint32_t cp, std::string* out);

// Decodes the code point at `text[*pos]` of valid UTF-8 and advances *pos.
uint32_t NextCodePoint(std::string_view text, size_t* pos);

// NFC normalization (ICU). `text` must be valid UTF-8. Returns false on an ICU failure.
bool NormalizeNfc(std::string_view text, std::string* out);
// True when `text` is certainly already NFC without looking it up (no code point >= U+0300).
inline bool TriviallyNfc(std::string_view text) {
  for (unsigned char c : text) {
    if (c >= 0xCC) return false;
  }
  return true;
}

// ---- Byte-level alphabet (GPT-2's bytes_to_unicode)
// ------------------------------------------------

// byte -> the code point that stands for it in byte-level vocabularies ("Ġ" for ' ').
const std::array<uint32_t, 256>& ByteToCodePoint();
// Maps a byte-level vocabulary string back to raw bytes; nullopt if a character is not in the
// alphabet.
std::optional<std::string> ByteLevelToBytes(std::string_view token);
// Maps raw bytes to the byte-level string.
std::string BytesToByteLevel(std::string_view bytes);

// ---- BPE model
// -----------------------------------------------------------------------------------

struct BpeConfig {
  // Token strings by id in the model's unit space: raw bytes when `byte_units` (byte-level BPE,
  // vocab converted from the byte-level alphabet), UTF-8 otherwise (SentencePiece style).
  // Ids not used by the model's vocab are absent from `vocab`.
  absl::flat_hash_map<std::string, int32_t> vocab;
  struct Merge {
    int32_t left, right, merged;
  };
  std::vector<Merge> merges;  // in rank order
  bool byte_units = false;
  bool ignore_merges = false;
  bool byte_fallback = false;
  bool fuse_unk = false;
  std::optional<int32_t> unk_id;
  std::array<int32_t, 256> byte_fallback_ids{};  // id of "<0xNN>", -1 if absent
};

// Byte-pair encoding of one pre-token: merges the lowest-ranked adjacent pair first (leftmost on
// ties) until no pair merges, as HF's BPE model. Thread-safe: the word cache is sharded and locked.
class BpeModel {
 public:
  explicit BpeModel(BpeConfig config);
  // Appends the ids of `word` (in the model's unit space) to `out`.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

 private:
  static constexpr int kCacheShards = 16;
  static constexpr size_t kCacheShardCapacity = 8192;
  static constexpr size_t kMaxCachedWordBytes = 96;

  struct MergeResult {
    int32_t rank;
    int32_t new_id;
  };
  struct CacheShard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> words ABSL_GUARDED_BY(mu);
  };

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  const MergeResult* FindMerge(int32_t left, int32_t right) const {
    auto it = merges_.find(PairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }
  // Initial symbols of a word: one per byte (byte-level) or per character with byte fallback.
  void InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const;
  void MergeShort(std::vector<int32_t>* symbols) const;  // O(n^2), fast for short words
  void MergeLong(std::vector<int32_t>* symbols) const;   // O(n log n) heap + linked list

  BpeConfig config_;
  std::array<int32_t, 256> byte_ids_{};  // byte-level: id of each single byte, -1 if absent
  absl::flat_hash_map<uint64_t, MergeResult> merges_;
  mutable std::array<CacheShard, kCacheShards> cache_;
};

}  // namespace kvgate::tokenizer_internal
