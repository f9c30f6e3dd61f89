#!/usr/bin/env python3
"""Simulates KV quantizers on the reference model in NumPy (float32), with kvgate eval's protocol.

Perplexity / KL: for each held-out window of C tokens the first C - 64 positions are prefilled
with exact attention, the last 64 are decoded: each attends to the keys/values of every position
passed through a simulated quantizer, except an exact (fp16) window of the newest tokens and,
optionally, the first S tokens. Prints the perplexity ratio and the mean KL(exact || setting) over
the 64 x windows predictions, with 95% intervals over windows (the independent units).

Retrieval (--probes N): the probes of `kvgate eval` (workers/eval/quality_eval.cc MakeProbes,
replicated here with its SplitMix generator and seed, tokenized by `kvgate tokenize`): a header
assigning four random string constants, held-out code as filler up to length C, then
`NAME = "` for one of the constants; the prefix is prefilled exactly, the query and the value
tokens (teacher forced) are decoded through the quantizer. `retr` is the top-1 accuracy over the
value tokens, `dretr` its difference from exact attention on the same probes in points, with the
95% interval of that paired difference over probes (the delta method of quality_eval.cc), and
`vs_first` the same paired difference against the first setting on the command line.

Exact attention is the baseline (kvgate eval's is the fp16 cache: equal to ~1e-3 in KL terms).
Only the decode rows are recomputed per setting; the prefill's keys and values are shared. The
quantizers are simulations (NumPy rotations and signs, not kvgate's kTurboSignSeed), so figures
agree with `kvgate eval` in trend and size, not to the digit.

  tools/kv_quant_sim.py [--probes N] [--kvgate BIN] [--stats | --score-error] CONTEXT WINDOWS SETTING...

SETTING: comma-separated fields
  k=Q, v=Q   the key / value quantizer (default none):
             tqB        TurboQuant MSE at B = 2..6 bits: norm, random rotation of all d
                        channels, Lloyd-Max codes
             tq35       kvgate's tq3.5: the first d/2 ROTATED channels at 4 bits, the rest at 3
             oN         outlier split in the ORIGINAL basis (the TurboQuant paper's): per layer and
                        kv-head the N channels of largest mean |x| over the prefill at 4 bits, the
                        other d - N at 3 bits, each set with its own rotation and norm
             oN:A:B     the same with A bits on the outliers and B on the rest (2..6)
             any of them + 'c' (tq4c, o16c, ...): the per-channel mean over the prefill is
                        subtracted before quantizing and added back (kept in fp16)
             any of them + 'u' (tq4u, tq35cu, ...): the reconstruction divided by the
                        quantizer's mean inner-product shrinkage E<u, u^> (~ sqrt(1 - D)), so that
                        <q, k^> is unbiased (a constant factor: free in a kernel)
  R=N        exact window of the newest N tokens, flushed 16 at a time as kvgate's TurboQuant /
             KIVI cache does (after a flush the window holds N..N+15 tokens); default 128, R=0: none
  F=N        flush granularity of that window (default 16; F=1: a window that slides every token)
  S=N        the first N tokens (BOS / attention sinks) stay exact
e.g.
  tools/kv_quant_sim.py --probes 200 512 64 k=tq4,v=tq4 k=tq35,v=tq35 k=o16,v=tq35 k=tq35c,v=tq35

Bits per element of a key or value record at head_dim d (codes + fp16 norms): tqB: B + 16/d;
tq35: 3.5 + 16/d; oN:A:B: (N A + (d - N) B + 32) / d; centering adds d fp16 per (sequence, layer,
kv-head), not per token. --stats prints per layer and kv-head how concentrated |key| is;
--score-error how much of each key quantizer's logit error, at the probes' retrieving row, is a
shift common to all keys (harmless) and how much varies between keys.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..')
sys.path.insert(0, HERE)
import reference_forward as rf  # noqa: E402

MODEL_DIR = os.path.join(ROOT, 'models', 'reference')
cfg, w = rf.load_model(MODEL_DIR)
w = {k: v.astype(np.float32) for k, v in w.items()}
HEADS, KVH = cfg['num_attention_heads'], cfg['num_key_value_heads']
D = cfg.get('head_dim') or cfg['hidden_size'] // HEADS
EPS = cfg.get('rms_norm_eps', 1e-6)
LM_HEAD = w['lm_head.weight'] if 'lm_head.weight' in w else w['model.embed_tokens.weight']
SCORED = 64  # decode rows per perplexity window (kvgate eval's --score-tokens default)

# Lloyd-Max centroids of N(0, 1) (2-4 bits: kernels/cpu/kv_codec.cc; 5 and 6 bits: Lloyd's
# iteration on a 4e5-point grid of [-8, 8], MSE 0.00250 / 0.00064), scaled by 1/sqrt(m) for the
# rotated coordinates of an m-dimensional unit vector.
_HALF = {
    6: [0.0337, 0.0998, 0.1662, 0.2328, 0.2999, 0.3674, 0.4355, 0.5044, 0.5742, 0.6449, 0.7168,
        0.7900, 0.8647, 0.9412, 1.0195, 1.1001, 1.1832, 1.2692, 1.3584, 1.4515, 1.5490, 1.6517,
        1.7607, 1.8771, 2.0028, 2.1401, 2.2924, 2.4649, 2.6661, 2.9116, 3.2350, 3.7392],
    5: [0.0660, 0.1978, 0.3308, 0.4658, 0.6037, 0.7457, 0.8929, 1.0470, 1.2099, 1.3843, 1.5742,
        1.7852, 2.0268, 2.3159, 2.6894, 3.2592],
    4: [0.1284, 0.3881, 0.6568, 0.9424, 1.2563, 1.6181, 2.0690, 2.7326],
    3: [0.2451, 0.7560, 1.3439, 2.1520],
    2: [0.4528, 1.5104],
}
LEVELS = {b: np.concatenate([-np.array(c[::-1]), np.array(c)]) for b, c in _HALF.items()}

_rot_cache = {}


def rotation(m):
    """Orthonormal Pi [m, m]: H D / sqrt(m) (random signs D) for powers of two, else a random
    orthogonal matrix (a kernel would use a block Hadamard or a dense m x m product)."""
    if m not in _rot_cache:
        rng = np.random.default_rng(1000 + m)
        if m & (m - 1) == 0:
            h = np.array([[1.0]])
            while h.shape[0] < m:
                h = np.block([[h, h], [h, -h]])
            pi = h / math.sqrt(m) * rng.choice([-1.0, 1.0], size=m)[None, :]
        else:
            pi, _ = np.linalg.qr(rng.standard_normal((m, m)))
        _rot_cache[m] = pi.astype(np.float32)
    return _rot_cache[m]


_shrink_cache = {}


def shrink(m, bits):
    """E <u, u^> over random unit vectors u of the norm-corrected reconstruction u^ (= sqrt(1 - D)
    for MSE distortion D): the factor by which the quantizer shrinks inner products on average."""
    key = (m, tuple(bits))
    if key not in _shrink_cache:
        u = np.random.default_rng(7).standard_normal((4000, m)).astype(np.float32)
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        _shrink_cache[key] = float((u * turbo(u, bits)).sum(-1).mean())
    return _shrink_cache[key]


def turbo(x, bits, unbiased=False):
    """TurboQuant MSE with norm correction: x [n, m] -> reconstruction; bits[j] is the code width
    of ROTATED coordinate j (kvgate's split rates put the high widths first). unbiased: divided by
    shrink(), so that inner products with the reconstruction are unbiased on average."""
    m = x.shape[-1]
    pi = rotation(m)
    nrm = np.linalg.norm(x, axis=-1, keepdims=True)
    y = (x / np.maximum(nrm, 1e-30)) @ pi.T
    yh = np.empty_like(y)
    for b in sorted(set(bits)):
        cols = np.flatnonzero(np.asarray(bits) == b)
        c = (LEVELS[b] / math.sqrt(m)).astype(np.float32)
        yh[:, cols] = c[np.searchsorted((c[1:] + c[:-1]) / 2, y[:, cols])]
    s = nrm / np.maximum(np.linalg.norm(yh, axis=-1, keepdims=True), 1e-30)
    if unbiased:
        s = s / shrink(m, bits)
    return (yh @ pi) * s


QUANT_RE = re.compile(r'^(?:(tq35|tq[2-6])|o(\d+)(?::([2-6]):([2-6]))?)(c?)(u?)$')


def quantize(x, mode, prefill):
    """x [n, d] of one layer and kv-head through quantizer `mode`; statistics (outlier channels,
    mean) from the first `prefill` rows, as an encoder that sees the prompt would choose them."""
    if mode == 'none':
        return x
    mt = QUANT_RE.match(mode)
    if not mt:
        raise ValueError(f'unknown quantizer {mode!r}')
    base, outliers, hi, lo, centered, unbiased = mt.groups()
    mu = x[:prefill].mean(axis=0, keepdims=True) if centered else 0.0
    xc = x - mu
    if base:
        bits = [4] * (D // 2) + [3] * (D - D // 2) if base == 'tq35' else [int(base[2])] * D
        return turbo(xc, bits, unbiased) + mu
    n_out, hi, lo = int(outliers), int(hi or 4), int(lo or 3)
    order = np.argsort(-np.abs(xc[:prefill]).mean(axis=0), kind='stable')
    out_ch, rest = np.sort(order[:n_out]), np.sort(order[n_out:])
    xh = np.empty_like(x)
    xh[:, out_ch] = turbo(xc[:, out_ch], [hi] * n_out, unbiased)
    xh[:, rest] = turbo(xc[:, rest], [lo] * (D - n_out), unbiased)
    return xh + mu


def parse_setting(s):
    f = dict(kv.split('=', 1) for kv in s.split(','))
    unknown = set(f) - {'k', 'v', 'R', 'F', 'S'}
    if unknown:
        raise ValueError(f'setting {s!r}: unknown fields {sorted(unknown)}')
    for role in 'kv':
        if f.get(role, 'none') != 'none' and not QUANT_RE.match(f[role]):
            raise ValueError(f'setting {s!r}: unknown quantizer {f[role]!r}')
    return dict(k=f.get('k', 'none'), v=f.get('v', 'none'), R=int(f.get('R', 128)),
                F=int(f.get('F', 16)), S=int(f.get('S', 0)))


def rope(positions):
    inv = rf.inverse_frequencies(cfg, D)
    ang = np.outer(positions, inv)
    emb = np.concatenate([ang, ang], -1)
    return np.cos(emb)[:, None, :].astype(np.float32), np.sin(emb)[:, None, :].astype(np.float32)


def qkv(l, x, cos, sin):
    p = f'model.layers.{l}.'
    h = rf.rms_norm(x, w[p + 'input_layernorm.weight'], EPS)
    n = x.shape[0]
    q = (h @ w[p + 'self_attn.q_proj.weight'].T).reshape(n, HEADS, D)
    k = (h @ w[p + 'self_attn.k_proj.weight'].T).reshape(n, KVH, D)
    v = (h @ w[p + 'self_attn.v_proj.weight'].T).reshape(n, KVH, D)
    return q * cos + rf.rotate_half(q) * sin, k * cos + rf.rotate_half(k) * sin, v


def finish_layer(l, x, attn):
    p = f'model.layers.{l}.'
    x = x + attn.reshape(x.shape[0], HEADS * D) @ w[p + 'self_attn.o_proj.weight'].T
    h = rf.rms_norm(x, w[p + 'post_attention_layernorm.weight'], EPS)
    gt = h @ w[p + 'mlp.gate_proj.weight'].T
    up = h @ w[p + 'mlp.up_proj.weight'].T
    return x + (gt / (1 + np.exp(-gt)) * up) @ w[p + 'mlp.down_proj.weight'].T


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def exact_forward(ids, prefill):
    """Exact causal forward. Returns the decode rows' logits (positions prefill..n-1) and the
    per-layer exact keys/values of the prefill positions."""
    n = len(ids)
    cos, sin = rope(np.arange(n))
    x = w['model.embed_tokens.weight'][np.asarray(ids)]
    causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    g = HEADS // KVH
    cache = []
    for l in range(cfg['num_hidden_layers']):
        q, k, v = qkv(l, x, cos, sin)
        cache.append((k[:prefill].copy(), v[:prefill].copy()))
        qh = q.transpose(1, 0, 2).reshape(KVH, g * n, D)     # [kv-head, g * rows, d]
        pr = softmax((qh @ k.transpose(1, 2, 0)).reshape(KVH, g, n, n) / math.sqrt(D) + causal)
        out = pr.reshape(KVH, g * n, n) @ v.transpose(1, 0, 2)
        x = finish_layer(l, x, out.reshape(HEADS, n, D).transpose(1, 0, 2))
    x = rf.rms_norm(x[prefill:], w['model.norm.weight'], EPS)
    return x @ LM_HEAD.T, cache


def decode_forward(ids, prefill, cache, st):
    """The decode rows (positions prefill..n-1) through setting st: each row attends to every
    position's key/value through the quantizer except the exact window and sinks."""
    n = len(ids)
    m = n - prefill
    cos, sin = rope(np.arange(prefill, n))
    x = w['model.embed_tokens.weight'][np.asarray(ids[prefill:])]
    rows = np.arange(prefill, n)[:, None]
    cols = np.arange(n)[None, :]
    length = rows + 1                       # cache length when row `rows` attends
    if st['R'] > 0:
        encoded = np.maximum(0, (length - st['R']) // st['F'] * st['F'])
    else:
        encoded = length
    exact = (cols >= encoded) | (cols < st['S'])
    causal = np.where(cols <= rows, 0.0, -np.inf).astype(np.float32)
    g = HEADS // KVH
    for l in range(cfg['num_hidden_layers']):
        q, k, v = qkv(l, x, cos, sin)
        k_all = np.concatenate([cache[l][0], k])
        v_all = np.concatenate([cache[l][1], v])
        kq = np.stack([quantize(k_all[:, j], st['k'], prefill) for j in range(KVH)], 1)
        vq = np.stack([quantize(v_all[:, j], st['v'], prefill) for j in range(KVH)], 1)
        k_all, v_all, kq, vq = (a.transpose(1, 0, 2) for a in (k_all, v_all, kq, vq))
        qh = q.transpose(1, 0, 2).reshape(KVH, g * m, D)     # [kv-head, g * rows, d]
        s_exact = (qh @ k_all.transpose(0, 2, 1)).reshape(KVH, g, m, n)
        s_quant = (qh @ kq.transpose(0, 2, 1)).reshape(KVH, g, m, n)
        pr = softmax(np.where(exact, s_exact, s_quant) / math.sqrt(D) + causal)
        out = ((pr * exact).reshape(KVH, g * m, n) @ v_all
               + (pr * ~exact).reshape(KVH, g * m, n) @ vq)
        x = finish_layer(l, x, out.reshape(HEADS, m, D).transpose(1, 0, 2))
    x = rf.rms_norm(x, w['model.norm.weight'], EPS)
    return x @ LM_HEAD.T


def log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --- retrieval probes: workers/eval/quality_eval.cc MakeProbes, replicated -------------------
MASK = (1 << 64) - 1
SYLLABLES = ['ka', 'zu', 'mo', 'ri', 'te', 'lo', 'vi', 'na', 'pe', 'su',
             'do', 'fa', 'gu', 'hi', 'ja', 'we', 'xo', 'yu', 'be', 'co']


class SplitMix:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9e3779b97f4a7c15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & MASK
        z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n


def tokenize(kvgate, texts, special):
    cmd = [kvgate, 'tokenize', '--tokenizer', os.path.join(MODEL_DIR, 'tokenizer.json'), '--jsonl']
    if not special:
        cmd.append('--no-special')
    out = subprocess.run(cmd, input=''.join(json.dumps(t) + '\n' for t in texts),
                         capture_output=True, text=True, check=True).stdout
    ids = [json.loads(line) for line in out.splitlines() if line.strip()]
    if len(ids) != len(texts):
        raise RuntimeError(f'kvgate tokenize returned {len(ids)} lines for {len(texts)} texts')
    return ids


def make_probes(kvgate, files, context, count, seed=1):
    """[(prefix, query, value)] token ids, as MakeProbes(context) with options.seed = seed."""
    headers, queries, values = [], [], []
    for i in range(count):
        rng = SplitMix(seed * 1000003 + context * 7919 + i)
        names, vals = [], []
        header = '# Configuration constants.\n'
        for _ in range(4):
            names.append(''.join(SYLLABLES[rng.below(20)] for _ in range(2)).upper() + '_KEY')
            vals.append(''.join(SYLLABLES[rng.below(20)] for _ in range(4)))
            header += f'{names[-1]} = "{vals[-1]}"\n'
        headers.append(header + '\n\n')
        q = rng.below(4)
        queries.append(f'\n\n\n{names[q]} = "')
        values.append(vals[q])
    pre, qry, val = (tokenize(kvgate, headers, True), tokenize(kvgate, queries, False),
                     tokenize(kvgate, values, False))
    fillers = [f for f in files if len(f) >= context]
    if not fillers:
        raise ValueError(f'no evaluation file of {context} tokens for retrieval probes')
    probes = []
    for i in range(count):
        filler = fillers[i % len(fillers)]
        fill = context - (len(pre[i]) + len(qry[i]) + len(val[i])) + 1
        if fill < 0 or fill + 1 > len(filler):
            raise ValueError(f'context {context} too short for probes')
        probes.append((pre[i] + filler[1:1 + fill], qry[i], val[i]))
    return probes


def ci95(xs):
    xs = np.asarray(xs, np.float64)
    return 1.96 * xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) >= 2 else float('nan')


def key_stats(ids, prefill):
    """Per layer and kv-head: the largest channel mean |k| over the median channel's, and the
    fraction of sum_j mean|k_j|^2 in the top 8 / 16 channels (concentration of the keys), and the
    fraction of E||k||^2 that is the mean key's ||E k||^2 (what centering removes)."""
    _, cache = exact_forward(ids, prefill)
    print('layer head  max/median  top8_energy  top16_energy  mean_energy  top16 channels')
    for l, (k, _) in enumerate(cache):
        for j in range(KVH):
            a = np.abs(k[:, j]).mean(0)
            e = np.sort(a * a)[::-1]
            top = np.sort(np.argsort(-a)[:16])
            mean_e = (k[:, j].mean(0) ** 2).sum() / (k[:, j] ** 2).sum(1).mean()
            print(f'{l:5d} {j:4d} {a.max() / np.median(a):11.2f} {e[:8].sum() / e.sum():12.3f} '
                  f'{e[:16].sum() / e.sum():13.3f} {mean_e:12.3f}  {top.tolist()}')


def score_error(probes, modes):
    """How each key quantizer perturbs the retrieving row's attention logits: for the last query
    token of each probe, every layer and query head, the logit errors e_i = q (k^_i - k_i) / sqrt(d)
    over the prefill keys, split into their mean (a shift common to all keys, which softmax
    ignores) and their standard deviation over keys (what moves attention), and the deviation's
    RMS under the row's exact attention over the prefill (the error on the keys that the row
    attends to), all relative to the standard deviation of the exact logits, and the regression
    slope of e on the exact logits (-0.01: logits shrunk by 1%, which flattens attention over the
    quantized keys); averaged over probes, layers and heads."""
    acc = {m: np.zeros(4) for m in modes}
    cnt = 0
    g = HEADS // KVH
    for prefix, query, _ in probes:
        ids = prefix + query
        n, P = len(ids), len(prefix)
        cos, sin = rope(np.arange(n))
        x = w['model.embed_tokens.weight'][np.asarray(ids)]
        causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        for l in range(cfg['num_hidden_layers']):
            q, k, v = qkv(l, x, cos, sin)
            for j in range(KVH):
                qj = q[n - 1, j * g:(j + 1) * g]                       # [g, d]
                s = qj @ k[:P, j].T / math.sqrt(D)
                for mo in modes:
                    e = qj @ (quantize(k[:, j], mo, P)[:P] - k[:P, j]).T / math.sqrt(D)
                    sd = s.std(1)
                    # where the attention is: the RMS of (e_i - mean e) under the exact attention
                    # of the row over the prefill keys
                    pa = softmax(s)
                    top = np.sqrt((pa * (e - e.mean(1, keepdims=True)) ** 2).sum(1))
                    sc = s - s.mean(1, keepdims=True)
                    slope = (sc * e).sum(1) / (sc * sc).sum(1)     # e ~ slope * s: shrinkage
                    acc[mo] += [np.mean(np.abs(e.mean(1)) / sd), np.mean(e.std(1) / sd),
                                np.mean(top / sd), np.mean(slope)]
            cnt += 1
            qh = q.transpose(1, 0, 2).reshape(KVH, g * n, D)
            pr = softmax((qh @ k.transpose(1, 2, 0)).reshape(KVH, g, n, n) / math.sqrt(D) + causal)
            out = pr.reshape(KVH, g * n, n) @ v.transpose(1, 0, 2)
            x = finish_layer(l, x, out.reshape(HEADS, n, D).transpose(1, 0, 2))
    print(f'key quantizer  |mean logit error|  std of logit error  attention-weighted rms  slope   '
          f'(/ std of exact logits; {len(probes)} probes x layers x kv-heads)')
    for mo in modes:
        a = acc[mo] / (cnt * KVH)
        print(f'{mo:14s} {a[0]:18.4f} {a[1]:19.4f} {a[2]:23.4f} {a[3]:+.4f}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('context', type=int)
    ap.add_argument('windows', type=int, help='perplexity windows (0: none)')
    ap.add_argument('settings', nargs='*')
    ap.add_argument('--probes', type=int, default=0, help='retrieval probes (needs --kvgate)')
    ap.add_argument('--kvgate', default=os.environ.get('KVGATE_BIN',
                                                       os.path.join(ROOT, 'build', 'bin', 'kvgate')),
                    help='kvgate binary for `kvgate tokenize` (default $KVGATE_BIN)')
    ap.add_argument('--seed', type=int, default=1, help="probe seed (kvgate eval's --seed)")
    ap.add_argument('--stats', action='store_true', help='print key concentration and exit')
    ap.add_argument('--score-error', action='store_true',
                    help='with --probes: logit errors of the settings\' key quantizers, and exit')
    a = ap.parse_args()
    files = [f['ids'] for f in json.load(open(os.path.join(MODEL_DIR, 'eval', 'heldout_ids.json')))['files']]
    C = a.context
    if a.stats:
        key_stats(files[0][:C], C)
        return
    try:
        settings = {s: parse_setting(s) for s in a.settings}
    except ValueError as e:
        ap.error(str(e))
    if a.probes and not os.access(a.kvgate, os.X_OK):
        ap.error(f'--probes needs a kvgate binary for `kvgate tokenize`: {a.kvgate} is not one '
                 '(--kvgate or $KVGATE_BIN)')
    if a.score_error and not a.probes:
        ap.error('--score-error needs --probes N')
    if a.windows and (C <= SCORED or sum(len(f) >= C + 1 for f in files) < a.windows):
        ap.error(f'{a.windows} windows of {C} tokens: need C > {SCORED} and that many files of '
                 f'C + 1 tokens')
    if a.score_error:
        score_error(make_probes(a.kvgate, files, C, a.probes, a.seed),
                    list(dict.fromkeys(st['k'] for st in settings.values())))
        return

    wins = [f[:C + 1] for f in files if len(f) >= C + 1][:a.windows]
    ppl = {s: [] for s in settings}   # per window: mean (nll - nll_exact)
    kl = {s: [] for s in settings}    # per window: mean KL
    for f in wins:
        ids, tgt, P = f[:C], np.asarray(f[C - SCORED + 1:C + 1]), C - SCORED
        base_logits, cache = exact_forward(ids, P)
        base = log_softmax(base_logits)
        nll0 = -base[np.arange(SCORED), tgt]
        for s, st in settings.items():
            lp = log_softmax(decode_forward(ids, P, cache, st))
            ppl[s].append((-lp[np.arange(SCORED), tgt] - nll0).mean())
            kl[s].append((np.exp(base) * (base - lp)).sum(-1).mean())

    hits = {s: [] for s in settings}
    base_hits, lens = [], []

    first = next(iter(settings), None)

    def report(out):
        print(f'C={C} windows={len(wins)} probes={len(lens)}'
              + (f' exact_retr={sum(base_hits) / sum(lens):.4f}' if lens else ''), file=out)
        for s in settings:
            line = f'{s:32s}'
            if wins:
                r = math.exp(np.mean(ppl[s]))
                line += (f' ppl_ratio={r:.4f}+-{r * ci95(ppl[s]):.4f}'
                         f' kl={np.mean(kl[s]):.4f}+-{ci95(kl[s]):.4f}')
            if lens:
                h, b, n = np.array(hits[s]), np.array(base_hits), np.array(lens)
                delta = (h.sum() - b.sum()) / n.sum()
                resid = (h - b - delta * n) / n.mean()
                line += f' retr={h.sum() / n.sum():.4f} dretr={100 * delta:+.2f}+-{100 * ci95(resid):.2f}'
                if s != first:  # paired with the first setting on the same probes
                    f0 = np.array(hits[first])
                    dv = (h.sum() - f0.sum()) / n.sum()
                    rv = (h - f0 - dv * n) / n.mean()
                    line += f' vs_first={100 * dv:+.2f}+-{100 * ci95(rv):.2f}'
            print(line, file=out, flush=True)

    if a.probes:
        for prefix, query, value in make_probes(a.kvgate, files, C, a.probes, a.seed):
            ids = prefix + query + value[:-1]
            P = len(prefix)
            rows = np.arange(len(query) - 1, len(query) - 1 + len(value))
            base_logits, cache = exact_forward(ids, P)
            base_hits.append(int((base_logits[rows].argmax(-1) == value).sum()))
            lens.append(len(value))
            for s, st in settings.items():
                hits[s].append(int((decode_forward(ids, P, cache, st)[rows].argmax(-1) == value).sum()))
            if len(lens) % 50 == 0:  # partial results of a long run
                report(sys.stderr)

    report(sys.stdout)


if __name__ == '__main__':
    main()
