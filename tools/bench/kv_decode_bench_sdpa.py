#!/usr/bin/env python3
"""FP16 baseline for kv_decode_bench: torch.nn.functional.scaled_dot_product_attention decode
(one query token) at the same shapes (32 query / 8 kv heads, head_dim 128), GQA through
enable_gqa=True (no repeat_interleave copy). Timing as kv_decode_bench: a CUDA graph of `iters`
calls cycling over disjoint K/V copies (rotations, so L2 does not serve repeats), median of 15
replays / iters. Also a device-to-device copy ceiling through torch. CSV on stdout:
  case,batch,context,sdpa_us,kv_bytes,gb_per_s,backend
"""
import statistics
import sys

import torch
import torch.nn.functional as F

CASES = [("B1_L32K", 1, 32768), ("B1_L128K", 1, 131072), ("B16_L32K", 16, 32768),
         ("B64_L4K", 64, 4096)]
HQ, HKV, D = 32, 8, 128


def time_graph(fn, iters):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(i)
    times = []
    for rep in range(17):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if rep >= 2:
            times.append(a.elapsed_time(b) * 1e3 / iters)
    return statistics.median(times)


def main():
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else [c[0] for c in CASES]
    torch.manual_seed(0)
    dev = "cuda"
    print("case,batch,context,sdpa_us,kv_bytes,gb_per_s,backend")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    b = torch.empty_like(a)
    t = time_graph(lambda i: b.copy_(a), 10)
    print(f"d2d_copy_torch,1,0,{t:.2f},{2 * n},{2 * n / (t * 1e3):.1f},copy_")
    del a, b
    for name, batch, ctx in CASES:
        if name not in wanted:
            continue
        kv_bytes = 2 * batch * HKV * ctx * D * 2
        rot = max(2, min(32, (512 << 20) // kv_bytes + 1))
        qs = [torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.float16) for _ in range(rot)]
        ks = [torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.float16) for _ in range(rot)]
        vs = [torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.float16) for _ in range(rot)]
        outs = [None] * rot

        def call(i):
            r = i % rot
            outs[r] = F.scaled_dot_product_attention(qs[r], ks[r], vs[r], enable_gqa=True)

        iters = rot * max(1, (40 + rot - 1) // rot)
        t = time_graph(call, iters)
        print(f"{name},{batch},{ctx},{t:.2f},{kv_bytes},{kv_bytes / (t * 1e3):.1f},enable_gqa",
              flush=True)
        del qs, ks, vs, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
