// UTF-8 helpers, NFC (ICU) and the byte-level alphabet for the tokenizer.
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <cstring>

#include "common/src/tokenizer_internal.h"

namespace kvgate::tokenizer_internal {
namespace {

// Length of the valid UTF-8 sequence at text[pos], or -k where k >= 1 is the length of the maximal
// invalid subpart to replace by one U+FFFD (Unicode "substitution of maximal subparts").
int ScanSequence(const unsigned char* p, size_t remaining) {
  unsigned char b = p[0];
  if (b < 0x80) return 1;
  int need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return -1;
  }
  for (int k = 1; k <= need; ++k) {
    if (static_cast<size_t>(k) >= remaining) return -k;
    unsigned char c = p[k];
    bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) return -k;
  }
  return need + 1;
}

}  // namespace

bool IsValidUtf8(std::string_view text, size_t* error_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  size_t n = text.size(), i = 0;
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t word;
      std::memcpy(&word, p + i, 8);
      if (word & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    int len = ScanSequence(p + i, n - i);
    if (len < 0) {
      if (error_offset) *error_offset = i;
      return false;
    }
    i += len;
  }
  return true;
}

std::string Utf8Lossy(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size(), i = 0;
  std::string out;
  out.reserve(n);
  while (i < n) {
    int len = ScanSequence(p + i, n - i);
    if (len > 0) {
      out.append(bytes.data() + i, len);
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      i += -len;
    }
  }
  return out;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

uint32_t NextCodePoint(std::string_view text, size_t* pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data()) + *pos;
  int len = Utf8SequenceLength(p[0]);
  if (*pos + len > text.size()) len = 1;
  uint32_t cp;
  switch (len) {
    case 1:
      cp = p[0];
      break;
    case 2:
      cp = ((p[0] & 0x1F) << 6) | (p[1] & 0x3F);
      break;
    case 3:
      cp = ((p[0] & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
      break;
    default:
      cp = ((p[0] & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
  }
  *pos += len;
  return cp;
}

bool NormalizeNfc(std::string_view text, std::string* out) {
  if (TriviallyNfc(text)) {
    out->assign(text);
    return true;
  }
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* nfc = unorm2_getNFCInstance(&err);
  if (U_FAILURE(err)) return false;
  std::u16string utf16(text.size() + 1, u'\0');
  int32_t utf16_len = 0;
  u_strFromUTF8(utf16.data(), static_cast<int32_t>(utf16.size()), &utf16_len, text.data(),
                static_cast<int32_t>(text.size()), &err);
  if (U_FAILURE(err)) return false;
  // Composition never lengthens a string by more than 3x in UTF-16 (the ICU bound for NFC).
  std::u16string normalized(static_cast<size_t>(utf16_len) * 3 + 16, u'\0');
  int32_t normalized_len = unorm2_normalize(nfc, utf16.data(), utf16_len, normalized.data(),
                                            static_cast<int32_t>(normalized.size()), &err);
  if (U_FAILURE(err)) return false;
  out->assign(static_cast<size_t>(normalized_len) * 3 + 4, '\0');
  int32_t out_len = 0;
  u_strToUTF8(out->data(), static_cast<int32_t>(out->size()), &out_len, normalized.data(),
              normalized_len, &err);
  if (U_FAILURE(err)) return false;
  out->resize(out_len);
  return true;
}

const std::array<uint32_t, 256>& ByteToCodePoint() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

std::optional<std::string> ByteLevelToBytes(std::string_view token) {
  static const absl::flat_hash_map<uint32_t, uint8_t> reverse = [] {
    absl::flat_hash_map<uint32_t, uint8_t> r;
    const auto& forward = ByteToCodePoint();
    for (int b = 0; b < 256; ++b) r[forward[b]] = static_cast<uint8_t>(b);
    return r;
  }();
  std::string bytes;
  bytes.reserve(token.size());
  size_t pos = 0;
  while (pos < token.size()) {
    uint32_t cp = NextCodePoint(token, &pos);
    auto it = reverse.find(cp);
    if (it == reverse.end()) return std::nullopt;
    bytes.push_back(static_cast<char>(it->second));
  }
  return bytes;
}

std::string BytesToByteLevel(std::string_view bytes) {
  const auto& forward = ByteToCodePoint();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) AppendUtf8(forward[b], &out);
  return out;
}

}  // namespace kvgate::tokenizer_internal
