#!/usr/bin/env node
// Deterministic tokenizer parity corpus: writes tests/parity/corpus.jsonl, one JSON string per
// line (>= 2,000 texts): code in several languages, prose in many scripts, emoji (ZWJ, flags,
// skin tones), whitespace runs, numbers, special-token strings in text, contractions, very long
// words, NFC/NFD forms, random code points and edge cases.
//
//   node tests/parity/make_corpus.js > tests/parity/corpus.jsonl
'use strict';

// mulberry32: small seeded PRNG so the corpus is identical on every run.
let seed = 0x6b766761;  // "kvga"
function rand() {
  seed |= 0; seed = (seed + 0x6D2B79F5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const int = (n) => Math.floor(rand() * n);
const pick = (a) => a[int(a.length)];
const range = (n, f) => Array.from({length: n}, (_, i) => f(i));

const words = {
  english: 'the quick brown fox jumps over lazy dog tokenizer gateway precision memory cache attention model inference request pool worker latency throughput Hello World Internationalization antidisestablishmentarianism'.split(' '),
  latin: 'été naïve façade coöperate Ångström smørrebrød Straße Grüße señor año élève Łódź Dvořák żółć Ærøskøbing crème brûlée déjà vu São Paulo İstanbul ğüşıöç'.split(' '),
  cyrillic: 'Привет мир токенизатор память внимание модель запрос Москва Київ Беларусь ёжик съешь щётка Українська Српски Български'.split(' '),
  greek: 'Γειά σου κόσμε ἀρχή λόγος Ἀθῆναι φιλοσοφία ψυχή ΩΜΕΓΑ άλφα ΐ ΰ'.split(' '),
  cjk: '你好 世界 分词器 注意力 模型 推理 日本語 東京 ひらがな カタカナ 漢字 こんにちは 中文 繁體字 龍 𠀋 𪚥'.split(' '),
  arabic: 'مرحبا بالعالم اللغة العربية نموذج ذاكرة القاهرة كِتَابٌ'.split(' '),
  hebrew: 'שלום עולם עברית מודל זיכרון יְרוּשָׁלַיִם'.split(' '),
  devanagari: 'नमस्ते दुनिया हिन्दी भाषा मॉडल स्मृति क्षत्रिय'.split(' '),
  thai: 'สวัสดี ชาวโลก ภาษาไทย แบบจำลอง หน่วยความจำ'.split(' '),
  korean: '안녕하세요 세계 한국어 토크나이저 모델 메모리 똠방각하'.split(' '),
  misc: 'ქართული Հայերեն ગુજરાતી தமிழ் ಕನ್ನಡ മലയാളം བོད་ ᠮᠣᠩᠭᠣᠯ ꦗꦮ ᏣᎳᎩ ⵜⴰⵎⴰⵣⵉⵖⵜ'.split(' '),
};
const emoji = ['😀', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇫🇷', '🇯🇵', '🇺🇸', '❤️', '🧑🏿‍💻', '👩‍❤️‍💋‍👨', '🤷‍♀️', '🐈‍⬛', '1️⃣', '©️', '🫠', '🦀', '🍣', '☕', '✨', '🏴󠁧󠁢󠁳󠁣󠁴󠁿'];
const specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>', '<|reserved_special_token_5|>', '<|im_start|>', '<|im_end|>', '<|endoftext|>', '<think>', '</think>', '<tool_call>', '</tool_call>', '<|fim_prefix|>', '<|vision_pad|>', '<|im_start', 'im_end|>', '<|begin_of_text|', '<s>', '</s>', '<unk>'];
const spaces = [' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', ' \n ', '\u00a0', '\u2003', '\u3000', '\u2028', '\u0085', '\u180e', '\u200b', '\u202f', '\f', '\v'];
const punct = ['.', ',', '!', '?', ';', ':', '...', '—', '–', '-', '(', ')', '[', ']', '{', '}', '"', "'", '«', '»', '„', '“', '”', '’', '¿', '¡', '。', '、', '！', '؟', '#', '@', '$', '%', '^', '&', '*', '~', '`', '|', '\\', '/', '<', '>', '=', '+', '_'];
const contractions = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D", "'Ll", "'lL", "’s", "'x", "''", "n't", "'ſ"];

function sentence(lang, n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    let w = pick(words[lang]);
    if (rand() < 0.1) w = w.toUpperCase();
    out.push(w);
    if (rand() < 0.15) out.push(pick(punct));
  }
  return out.join(pick([' ', ' ', ' ', '  ', '']));
}

const ident = () => pick(['x', 'foo', 'bar_baz', 'camelCase', 'snake_case_name', 'HTTPServer', 'i', 'kvCache', '_private', 'MAX_LEN', 'αβγ', 'переменная']) + (rand() < 0.3 ? int(100) : '');
const code = [
  () => `#include <vector>\n\nint ${ident()}(const std::vector<int>& v) {\n  int s = 0;\n  for (int x : v) s += x * ${int(1000)};\n  return s;  // sum\n}\n`,
  () => `def ${ident()}(a, b=${int(50)}):\n    """Docstring with 'quotes' and "double"."""\n    if a >= b:\n        return [x ** 2 for x in range(a)]\n    return {'k': a, "v": b}\n`,
  () => `const ${ident()} = async (req, res) => {\n\tconst { id } = req.params;\n\tawait db.query(\`SELECT * FROM t WHERE id = \${id}\`);\n\treturn res.status(${200 + int(300)}).json({ ok: true });\n};`,
  () => `fn ${ident()}<'a>(s: &'a str) -> Option<&'a str> {\n    s.split_whitespace().next() // it's fine\n}\n`,
  () => `func ${ident()}(ctx context.Context) error {\n\tif err := run(ctx); err != nil {\n\t\treturn fmt.Errorf("failed: %w", err)\n\t}\n\treturn nil\n}`,
  () => `SELECT u.name, COUNT(*) AS n\nFROM users u JOIN orders o ON o.user_id = u.id\nWHERE o.total > ${int(10000) / 100}\nGROUP BY u.name ORDER BY n DESC LIMIT ${int(100)};`,
  () => `<!DOCTYPE html>\n<html lang="en">\n  <body class="${ident()}">\n    <p>Caf&eacute; &amp; cr&egrave;me &lt;b&gt;</p>\n  </body>\n</html>`,
  () => JSON.stringify({name: ident(), values: range(int(8), () => int(100000)), nested: {ok: rand() < 0.5, s: 'a\tb\nc'}}, null, 1 + int(3)),
  () => `#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do\n  grep -c "pattern" "$f" || echo 'none' >&2\ndone\n`,
  () => `    \n\n\t\t    return ${ident()}->next;\n    }\n\n\n`,
  () => `| col1 | col2 |\n|------|------|\n| ${int(1e6)} | ${pick(words.latin)} |\n\n\`\`\`python\nprint("hi")\n\`\`\``,
];

const texts = [];
const add = (t) => texts.push(t);

// Edge cases.
['', ' ', '  ', '\n', '\t', '\r\n', 'a', 'A', '0', '00', '000', '0000', "'", "'s", "s'", '😀', 'é', 'e\u0301', '\u00a0', '\u200d', '\ufeff', 'I', 'Ġ', 'Ċ', '▁', '▁▁hello', '<', '<|', '|>', '<||>', '\u0000', '\u001f', '\u007f', '\u0085', '\ufffd', '\uffff', '\u{10ffff}', '\u{1f600}\u{1f600}', 'a\u0000b', "don't", "DON'T", "I'm", "we'LL", "they've", "she'd", "it's", "'tis", "y'all"].forEach(add);
for (const s of specials) add(s);

// Prose in every script, several lengths.
for (const lang of Object.keys(words)) {
  for (let i = 0; i < 90; i++) add(sentence(lang, 1 + int(i < 30 ? 5 : 60)));
}
// Mixed-script paragraphs.
for (let i = 0; i < 200; i++) {
  add(range(1 + int(6), () => sentence(pick(Object.keys(words)), 1 + int(15))).join(pick(spaces)));
}
// Code.
for (let i = 0; i < 330; i++) add(pick(code)());
// Emoji.
for (let i = 0; i < 120; i++) {
  add(range(1 + int(10), () => rand() < 0.5 ? pick(emoji) : pick(words.english)).join(rand() < 0.5 ? ' ' : ''));
}
// Whitespace runs.
for (let i = 0; i < 150; i++) {
  add(range(1 + int(8), () => (rand() < 0.5 ? pick(spaces).repeat(1 + int(20)) : pick(words.english))).join(''));
}
// Numbers.
for (let i = 0; i < 120; i++) {
  const n = [String(int(10 ** (1 + int(9)))), range(1 + int(40), () => int(10)).join(''), (rand() * 1e6).toFixed(int(6)),
    `${int(10000)},${String(int(1000)).padStart(3, '0')}`, `+1 (555) ${int(900) + 100}-${int(9000) + 1000}`, `v${int(10)}.${int(20)}.${int(100)}`,
    '١٢٣٤٥', '१२३', '１２３', '½ ⅓ ²³ Ⅻ', `${int(100)}%`, `0x${int(0xffffff).toString(16)}`, `${int(12)}:${int(60)} ${pick(['am', 'PM'])}`];
  add(range(1 + int(4), () => pick(n)).join(pick([' ', '', '\n', ', '])));
}
// Special-token strings embedded in text.
for (let i = 0; i < 160; i++) {
  add(range(1 + int(6), () => rand() < 0.4 ? pick(specials) : sentence(pick(['english', 'latin', 'cjk']), 1 + int(5))).join(pick(['', ' ', '\n', '  '])));
}
// Contractions.
for (let i = 0; i < 100; i++) {
  add(range(1 + int(8), () => pick(words.english) + pick(contractions)).join(pick([' ', '', '  '])));
}
// Very long words and repeated characters.
for (let i = 0; i < 60; i++) {
  const unit = pick(['a', 'ab', 'xyz', 'é', '字', 'ñ', '😀', '-', '=', '0', '1', ' ', 'abc def ', 'Ä', 'ß', 'иван']);
  const word = rand() < 0.5 ? unit.repeat(50 + int(2000)) : range(100 + int(1500), () => String.fromCharCode(97 + int(26))).join('');
  add(rand() < 0.5 ? word : `prefix ${word} suffix`);
}
// NFC vs NFD (and NFKC-sensitive characters).
for (let i = 0; i < 150; i++) {
  const s = sentence(pick(['latin', 'greek', 'korean', 'devanagari', 'arabic', 'hebrew', 'cyrillic']), 1 + int(10)) + (rand() < 0.3 ? ' ﬁ ﬀ Ａ ｶ ㈱ Å Ω' : '');
  add(pick([s.normalize('NFC'), s.normalize('NFD'), s.normalize('NFKD'), s.normalize('NFKC')]));
}
// Combining marks stacked or detached.
for (let i = 0; i < 40; i++) {
  add(range(1 + int(10), () => pick(['a', 'e', 'o', ' ', 'ᄀ', 'ᅡ', 'ᆨ']) + range(int(4), () => String.fromCharCode(0x300 + int(0x6f))).join('')).join(''));
}
// Random code points from assorted blocks.
const blocks = [[0x20, 0x7e], [0xa0, 0x24f], [0x370, 0x3ff], [0x400, 0x4ff], [0x590, 0x6ff], [0x900, 0x97f], [0xe00, 0xe7f],
  [0x1100, 0x11ff], [0x2000, 0x206f], [0x2190, 0x23ff], [0x3000, 0x30ff], [0x4e00, 0x9fff], [0xac00, 0xd7a3], [0xfb00, 0xfdff],
  [0xfe00, 0xfe0f], [0xff00, 0xffef], [0x1f300, 0x1faff], [0x20000, 0x2a6df], [0xe0000, 0xe007f], [0xe000, 0xe0ff]];
for (let i = 0; i < 200; i++) {
  let s = '';
  const n = 1 + int(60);
  for (let k = 0; k < n; k++) {
    const [lo, hi] = pick(blocks);
    s += String.fromCodePoint(lo + int(hi - lo + 1));
  }
  add(s);
}
// Longer mixed documents (chat-like).
for (let i = 0; i < 60; i++) {
  const turns = range(1 + int(5), () => `${pick(['<|im_start|>', '<|start_header_id|>'])}${pick(['user', 'assistant', 'system'])}${pick(['<|end_header_id|>', ''])}\n${sentence(pick(Object.keys(words)), 5 + int(80))}\n${pick(code)()}${pick(['<|im_end|>', '<|eot_id|>'])}`);
  add(turns.join('\n'));
}

if (texts.length < 2000) throw new Error(`corpus too small: ${texts.length}`);
process.stdout.write(texts.map((t) => JSON.stringify(t)).join('\n') + '\n');
