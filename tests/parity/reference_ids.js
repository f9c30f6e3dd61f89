#!/usr/bin/env node
// Reference token ids from Hugging Face `tokenizers` (the @anush008/tokenizers native binding) for
// every text of a corpus. Writes one JSON object per corpus line:
//   {"ids": [...], "ids_no_special": [...], "decoded": "..."}
// where "decoded" is HF's decode(ids, skip_special_tokens=false).
//
//   node reference_ids.js TOKENIZER_JSON CORPUS_JSONL OUT_JSONL [--bos-template OUT_TOKENIZER_JSON]
//
// --bos-template: first rewrites the tokenizer's post_processor to
// Sequence[ByteLevel, TemplateProcessing("<|begin_of_text|> $A")] (what current Meta Llama 3
// releases ship), saves that tokenizer.json to OUT_TOKENIZER_JSON and uses it.
'use strict';
const fs = require('fs');
const path = require('path');
const {Tokenizer} = require(path.join(__dirname, 'node_modules/@anush008/tokenizers'));

async function main() {
  const [tokenizerPath, corpusPath, outPath, flag, variantPath] = process.argv.slice(2);
  if (!outPath) {
    console.error('usage: reference_ids.js TOKENIZER_JSON CORPUS_JSONL OUT_JSONL [--bos-template OUT]');
    process.exit(2);
  }
  let file = tokenizerPath;
  if (flag === '--bos-template') {
    const spec = JSON.parse(fs.readFileSync(tokenizerPath, 'utf8'));
    const bos = '<|begin_of_text|>';
    const bosId = spec.added_tokens.find((t) => t.content === bos).id;
    spec.post_processor = {
      type: 'Sequence',
      processors: [
        {type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true},
        {
          type: 'TemplateProcessing',
          single: [{SpecialToken: {id: bos, type_id: 0}}, {Sequence: {id: 'A', type_id: 0}}],
          pair: [{SpecialToken: {id: bos, type_id: 0}}, {Sequence: {id: 'A', type_id: 0}},
            {SpecialToken: {id: bos, type_id: 1}}, {Sequence: {id: 'B', type_id: 1}}],
          special_tokens: {[bos]: {id: bos, ids: [bosId], tokens: [bos]}},
        },
      ],
    };
    fs.writeFileSync(variantPath, JSON.stringify(spec));
    file = variantPath;
  }
  const tokenizer = Tokenizer.fromFile(file);
  const texts = fs.readFileSync(corpusPath, 'utf8').split('\n').filter((l) => l.length).map((l) => JSON.parse(l));
  const lines = [];
  for (const text of texts) {
    const withSpecial = await tokenizer.encode(text, null, {addSpecialTokens: true});
    const noSpecial = await tokenizer.encode(text, null, {addSpecialTokens: false});
    const ids = withSpecial.getIds();
    const decoded = await tokenizer.decode(ids, false);
    lines.push(JSON.stringify({ids, ids_no_special: noSpecial.getIds(), decoded}));
  }
  fs.writeFileSync(outPath, lines.join('\n') + '\n');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
