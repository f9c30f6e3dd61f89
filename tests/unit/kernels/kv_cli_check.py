"""Outside check of `kvgate kv`: NumPy writes random .npy inputs, an independent NumPy
implementation computes the expected results, and the CLI's outputs must match.

usage: kv_cli_check.py KVGATE_BINARY
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

kvgate = sys.argv[1]
rng = np.random.default_rng(0)
tmp = tempfile.mkdtemp()
path = lambda name: os.path.join(tmp, name)


def run(*args, expect_ok=True):
    result = subprocess.run([kvgate, "kv", *args], capture_output=True, text=True)
    if expect_ok and result.returncode != 0:
        sys.exit(f"kvgate kv {' '.join(args)} failed: {result.stderr}")
    return result


def attention(q, k, v, scale):
    """float64 softmax attention; q [H, d], k/v [N, KVH, d]."""
    group = q.shape[0] // k.shape[1]
    out = np.zeros(q.shape)
    for h in range(q.shape[0]):
        s = k[:, h // group, :].astype(np.float64) @ q[h].astype(np.float64) * scale
        p = np.exp(s - s.max())
        out[h] = p @ v[:, h // group, :] / p.sum()
    return out


x = rng.standard_normal((100, 128)).astype(np.float32)
np.save(path("x.npy"), x)

# fp16 roundtrip equals NumPy's float16 rounding exactly.
run("roundtrip", "--format", "fp16", "--in", path("x.npy"), "--out", path("y.npy"))
y = np.load(path("y.npy"))
assert y.shape == x.shape and y.dtype == np.float32
assert np.array_equal(y, x.astype(np.float16).astype(np.float32)), "fp16 roundtrip"

# int8: symmetric per row, scale = fp16(amax / 127); NumPy re-implements it.
run("roundtrip", "--format", "int8", "--in", path("x.npy"), "--out", path("y.npy"))
y = np.load(path("y.npy"))
scale = (np.abs(x).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
expected = np.clip(np.round(x / scale), -127, 127) * scale
assert np.allclose(y, expected, atol=1e-6), f"int8 max diff {np.abs(y - expected).max()}"

# TurboQuant 4-bit: relative MSE near the paper's 0.0095 (debiased: D / (1 - D) ~ 0.0096).
run("roundtrip", "--format", "tq4", "--in", path("x.npy"), "--out", path("y.npy"))
y = np.load(path("y.npy"))
rel = (np.sum((x - y) ** 2, axis=1) / np.sum(x ** 2, axis=1)).mean()
assert 0.008 < rel < 0.011, f"tq4 relative MSE {rel}"
# Debiased norms: every reconstruction is longer than its input by one factor 1 / c (c ~ sqrt(1 -
# D) = 0.9955), so that the projection <x, y> / ||x||^2 averages 1 (unbiased inner products).
ratio = np.linalg.norm(y, axis=1) / np.linalg.norm(x, axis=1)
assert np.allclose(ratio, ratio.mean(), rtol=2e-3) and 1.002 < ratio.mean() < 1.008, ratio.mean()
proj = np.sum(x * y, axis=1) / np.sum(x ** 2, axis=1)
assert abs(proj.mean() - 1) < 1e-3, f"tq4 mean projection {proj.mean()}"
# debias=0, the plain norm correction: reconstruction norms equal input norms (fp16 precision),
# and the projection is short by ~c.
run("roundtrip", "--format", "tq:k=4,v=4,debias=0", "--in", path("x.npy"), "--out", path("y.npy"))
y = np.load(path("y.npy"))
assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=2e-3)
proj = np.sum(x * y, axis=1) / np.sum(x ** 2, axis=1)
assert 0.992 < proj.mean() < 0.998, f"tq4 debias=0 mean projection {proj.mean()}"

# Attention through fp16 vs float64 NumPy attention, GQA 8 q-heads over 2 kv-heads.
q = rng.standard_normal((8, 64)).astype(np.float32)
k = rng.standard_normal((77, 2, 64)).astype(np.float32)
v = rng.standard_normal((77, 2, 64)).astype(np.float32)
for name, arr in (("q", q), ("k", k), ("v", v)):
    np.save(path(name + ".npy"), arr)
run("attention", "--format", "fp16", "--q", path("q.npy"), "--k", path("k.npy"), "--v",
    path("v.npy"), "--out", path("o.npy"))
o = np.load(path("o.npy"))
ref = attention(q, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32),
                1 / 8)
assert o.shape == (8, 64) and np.abs(o - ref).max() < 1e-4, f"fp16 attention {np.abs(o - ref).max()}"

# kivi2 attention with [N, d] k/v: the error grows but stays bounded.
np.save(path("k2.npy"), k[:, 0, :])
np.save(path("v2.npy"), v[:, 0, :])
run("attention", "--format", "kivi2", "--q", path("q.npy"), "--k", path("k2.npy"), "--v",
    path("v2.npy"), "--out", path("o.npy"))
o = np.load(path("o.npy"))
ref = attention(q, k[:, :1, :], v[:, :1, :], 1 / 8)
assert np.abs(o - ref).max() < 0.05, f"kivi2 attention {np.abs(o - ref).max()}"  # 77 < R: fp16

# Malformed inputs: clear errors, no crash.
np.save(path("f64.npy"), x.astype(np.float64))
r = run("roundtrip", "--format", "fp16", "--in", path("f64.npy"), "--out", path("y.npy"),
        expect_ok=False)
assert r.returncode == 1 and "<f4" in r.stderr, r.stderr
with open(path("junk.npy"), "wb") as f:
    f.write(b"\x93NUMPY\x01\x00\xff\xff{'descr'")
r = run("roundtrip", "--format", "fp16", "--in", path("junk.npy"), "--out", path("y.npy"),
        expect_ok=False)
assert r.returncode == 1 and "truncated" in r.stderr, r.stderr
with open(path("short.npy"), "wb") as f:
    f.write(open(path("x.npy"), "rb").read()[:-4])
r = run("roundtrip", "--format", "fp16", "--in", path("short.npy"), "--out", path("y.npy"),
        expect_ok=False)
assert r.returncode == 1 and "data bytes" in r.stderr, r.stderr
r = run("roundtrip", "--format", "nope", "--in", path("x.npy"), "--out", path("y.npy"),
        expect_ok=False)
assert r.returncode == 1 and "kivi2" in r.stderr, r.stderr
print("kv CLI checks passed")
