#!/usr/bin/env node
// Hugging Face tokenizers throughput (the @anush008/tokenizers native binding, tokenizers 0.22),
// one thread, same corpus and modes as tokenizer_bench: prints one JSON line per (tokenizer, mode).
// Run with UV_THREADPOOL_SIZE=1 RAYON_NUM_THREADS=1 (tools/bench/tokenizer_bench.sh does).
//
//   node tools/bench/tokenizer_bench_hf.js CORPUS_JSONL SECONDS NAME=TOKENIZER_JSON...
'use strict';
const fs = require('fs');
const path = require('path');
const {Tokenizer} = require(path.join(__dirname, '../../tests/parity/node_modules/@anush008/tokenizers'));

async function measure(tok, docs, seconds, singlePass) {
  let bytes = 0, tokens = 0;
  const start = process.hrtime.bigint();
  let elapsed = 0;
  do {
    for (const doc of docs) {
      const enc = await tok.encode(doc, null, {addSpecialTokens: false});  // non-batch API
      tokens += enc.getIds().length;
      bytes += Buffer.byteLength(doc, 'utf8');
    }
    elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  } while (!singlePass && elapsed < seconds);
  return {mb_per_s: bytes / elapsed / 1e6, tokens_per_s: tokens / elapsed};
}

async function main() {
  const [corpusPath, secondsArg, ...specs] = process.argv.slice(2);
  const seconds = Number(secondsArg);
  const texts = fs.readFileSync(corpusPath, 'utf8').split('\n').filter((l) => l.length).map((l) => JSON.parse(l));
  const joined = texts.join('\n');
  for (const spec of specs) {
    const [name, file] = spec.split('=');
    const rows = [];
    let tok = Tokenizer.fromFile(file);
    rows.push(['per-text cold', await measure(tok, texts, 0, true)]);
    rows.push(['per-text', await measure(tok, texts, seconds, false)]);
    tok = Tokenizer.fromFile(file);
    rows.push(['joined cold', await measure(tok, [joined], 0, true)]);
    rows.push(['joined', await measure(tok, [joined], seconds, false)]);
    for (const [mode, r] of rows) console.log(JSON.stringify({tokenizer: name, mode, ...r}));
  }
}
main().catch((e) => { console.error(e); process.exit(1); });
