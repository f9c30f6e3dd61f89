#!/usr/bin/env python3
"""Joins kv_decode_bench.csv and kv_decode_bench_sdpa.csv into the Markdown table of
docs/BENCHMARKS.md: per case and format, time, bytes, bandwidth, % of the measured copy ceiling,
SDPA FP16 time and speedup = SDPA time / our time.
  kv_decode_bench_report.py ours.csv sdpa.csv
"""
import csv
import sys


def main():
    ours = list(csv.DictReader(open(sys.argv[1])))
    sdpa = {r["case"]: r for r in csv.DictReader(open(sys.argv[2]))}
    ceiling = next((float(r["gb_per_s"]) for r in ours if r["format"] == "d2d_copy"), None)
    print(f"copy ceiling (cudaMemcpy D2D, read+write): {ceiling} GB/s")
    if "d2d_copy_torch" in sdpa:
        print(f"copy ceiling (torch copy_, read+write): {sdpa['d2d_copy_torch']['gb_per_s']} GB/s")
    print("| case | format | us/call | MB read | GB/s | % copy BW | SDPA fp16 us | speedup | splits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [r for r in ours if r["format"] != "d2d_copy"]
    order = ["B1_L32K", "B1_L128K", "B16_L32K", "B64_L4K"]
    rows.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else 99)
    for r in rows:
        us = float(r["us_per_call"])
        gbs = float(r["gb_per_s"])
        s = sdpa.get(r["case"])
        s_us = float(s["sdpa_us"]) if s else float("nan")
        pct = 100 * gbs / ceiling if ceiling else float("nan")
        print(f"| {r['case']} | {r['format']} | {us:.1f} | {int(r['bytes_read']) / 1e6:.1f} | "
              f"{gbs:.0f} | {pct:.0f}% | {s_us:.1f} | {s_us / us:.2f}x | {r['splits']} |")


if __name__ == "__main__":
    main()
