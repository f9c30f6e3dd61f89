#!/usr/bin/env bash
# On the GPU machine, from the repo root with a bundle present (scripts/bundle-gpu; $BUNDLE, default
# gpu-bundle/): GPU tests, kv_decode_bench, the SDPA baseline and the joined table. Logs go to
# ${OUT:-/tmp/kvgate-gpu}.
#   [BUNDLE=dir] [SKIP_TESTS=1] tools/bench/kv_decode_bench.sh [formats] [cases]
set -uo pipefail
out="${OUT:-/tmp/kvgate-gpu}"
bundle="${BUNDLE:-gpu-bundle}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  | tee "$out/nvidia_smi.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$out/nvidia_smi.txt"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  "$bundle/run" cuda_decode_attention_test --gtest_brief=1 > "$out/gpu_test.log" 2>&1
  echo "gpu tests exit $?"; grep -E "^\[ result \]|FAILED|PASSED|SKIPPED" "$out/gpu_test.log" | tail -n 12
fi
formats="${1:-fp16,bf16,fp8,int8,kivi4,kivi2,tq4,tq3.5,tq3,tq2.5}"
cases="${2:-B1_L32K,B1_L128K,B16_L32K,B64_L4K}"
"$bundle/run" kv_decode_bench --formats "$formats" --cases "$cases" > "$out/ours.csv" 2> "$out/bench.err"
echo "bench exit $?"; cat "$out/bench.err"
PYTHONUNBUFFERED=1 python3 tools/bench/kv_decode_bench_sdpa.py "$cases" > "$out/sdpa.csv" 2> "$out/sdpa.err"
echo "sdpa exit $?"; tail -3 "$out/sdpa.err"
python3 tools/bench/kv_decode_bench_report.py "$out/ours.csv" "$out/sdpa.csv" | tee "$out/table.md"
