#!/usr/bin/env python3
"""Simulates KV quantization on the reference model in NumPy (float32), with kvgate eval's protocol.

For each held-out window of C tokens: the first C - 64 positions attend exactly (prefill), the last
64 attend to keys/values passed through a simulated quantizer (decode through the format), with
optional exact windows of the newest R tokens and of the first S tokens. Prints the perplexity
ratio and mean KL(fp16 || setting) over the 64 x windows predictions. Used to choose TurboQuant's
fp16 window (docs/QUALITY.md); the quantizers here are simulations (random signs from NumPy, not
kvgate's kTurboSignSeed), so figures agree with `kvgate eval` in trend, not to the digit.

  tools/kv_quant_sim.py CONTEXT WINDOWS SETTING...
  SETTING: comma-separated k=Q, v=Q (Q in none, tq4, tq3, tq35, tq4c, tq3c: c = key mean
  subtracted), R=N (exact newest N tokens), S=N (exact first N tokens), e.g.
  tools/kv_quant_sim.py 1024 24 k=tq4,v=tq4 k=tq4,v=tq4,R=128 k=tq4
"""
import json, math, os, sys

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_forward as rf
cfg, w = rf.load_model(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'models', 'reference'))
w = {k: v.astype(np.float32) for k, v in w.items()}
ids_all = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'models', 'reference', 'eval', 'heldout_ids.json')))['files']
L4 = np.array([0.1284,0.3881,0.6568,0.9424,1.2563,1.6181,2.0690,2.7326])
L4 = np.concatenate([-L4[::-1], L4])
L3 = np.array([0.2451,0.7560,1.3439,2.1520]); L3 = np.concatenate([-L3[::-1], L3])
d = cfg.get('head_dim') or cfg['hidden_size']//cfg['num_attention_heads']
rng = np.random.default_rng(1)
signs = rng.choice([-1.0, 1.0], size=d).astype(np.float32)
def hadamard(n):
    H = np.array([[1.0]])
    while H.shape[0] < n: H = np.block([[H, H], [H, -H]])
    return H / math.sqrt(n)
Pi = (hadamard(d) * signs[None, :]).astype(np.float32)   # Pi x = H (D x)
def tq(x, levels):  # x [..., d]
    nrm = np.linalg.norm(x, axis=-1, keepdims=True)
    u = x / np.maximum(nrm, 1e-30)
    y = u @ Pi.T
    c = levels / math.sqrt(d)
    b = (c[1:] + c[:-1]) / 2
    yh = c[np.searchsorted(b, y)]
    s = nrm / np.maximum(np.linalg.norm(yh, axis=-1, keepdims=True), 1e-30)
    return (yh @ Pi) * s
def tq35(x):
    nrm = np.linalg.norm(x, axis=-1, keepdims=True)
    u = x / np.maximum(nrm, 1e-30)
    y = u @ Pi.T
    yh = np.empty_like(y)
    for sl, lv in ((slice(0, d//2), L4), (slice(d//2, d), L3)):
        c = lv / math.sqrt(d); b = (c[1:] + c[:-1]) / 2
        yh[..., sl] = c[np.searchsorted(b, y[..., sl])]
    s = nrm / np.maximum(np.linalg.norm(yh, axis=-1, keepdims=True), 1e-30)
    return (yh @ Pi) * s
MODE = {}
def quant(x, role, P):
    m = MODE[role]
    if m == 'none': return x
    if m == 'tq4': return tq(x, L4)
    if m == 'tq3': return tq(x, L3)
    if m == 'tq35': return tq35(x)
    if m.startswith('tq4c'):   # centered by mean of the first P tokens (per kv head)
        mu = x[:P].mean(axis=0, keepdims=True)
        return tq(x - mu, L4) + mu
    if m.startswith('tq3c'):
        mu = x[:P].mean(axis=0, keepdims=True)
        return tq(x - mu, L3) + mu
    raise ValueError(m)
SINK=0
def forward(ids, P, R=0):
    n = len(ids); hidden = cfg['hidden_size']; heads = cfg['num_attention_heads']; kvh = cfg['num_key_value_heads']
    eps = cfg.get('rms_norm_eps', 1e-6)
    inv = rf.inverse_frequencies(cfg, d)
    ang = np.outer(np.arange(n), inv); emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb)[:, None, :].astype(np.float32), np.sin(emb)[:, None, :].astype(np.float32)
    x = w['model.embed_tokens.weight'][np.asarray(ids)]
    causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for l in range(cfg['num_hidden_layers']):
        p = f'model.layers.{l}.'
        h = rf.rms_norm(x, w[p+'input_layernorm.weight'], eps)
        q = (h @ w[p+'self_attn.q_proj.weight'].T).reshape(n, heads, d)
        k = (h @ w[p+'self_attn.k_proj.weight'].T).reshape(n, kvh, d)
        v = (h @ w[p+'self_attn.v_proj.weight'].T).reshape(n, kvh, d)
        q = q*cos + rf.rotate_half(q)*sin; k = k*cos + rf.rotate_half(k)*sin
        kq = np.stack([quant(k[:, j], 'k', P) for j in range(kvh)], 1)
        vq = np.stack([quant(v[:, j], 'v', P) for j in range(kvh)], 1)
        g = heads // kvh; out = np.empty((n, heads, d), np.float32)
        for hd in range(heads):
            j = hd // g
            s_ex = q[:P, hd] @ k[:P, j].T / math.sqrt(d) + causal[:P, :P]
            pr = np.exp(s_ex - s_ex.max(-1, keepdims=True)); pr /= pr.sum(-1, keepdims=True)
            out[:P, hd] = pr @ v[:P, j]
            # decode rows: all keys through the format, except the newest R in exact (fp16) form
            s = q[P:, hd] @ kq[:, j].T / math.sqrt(d) + causal[P:]
            if R > 0:
                s_exact = q[P:, hd] @ k[:, j].T / math.sqrt(d) + causal[P:]
                rows = np.arange(P, n)[:, None]; cols = np.arange(n)[None, :]
                win = (cols > rows - R) | (cols < SINK)
                s = np.where(win, s_exact, s)
            pr = np.exp(s - s.max(-1, keepdims=True)); pr /= pr.sum(-1, keepdims=True)
            if R > 0:
                vsel = np.where(win[..., None], v[None, :, j], vq[None, :, j])
                out[P:, hd] = np.einsum('rc,rcd->rd', pr, vsel)
            else:
                out[P:, hd] = pr @ vq[:, j]
        x = x + out.reshape(n, heads*d) @ w[p+'self_attn.o_proj.weight'].T
        h = rf.rms_norm(x, w[p+'post_attention_layernorm.weight'], eps)
        gt = h @ w[p+'mlp.gate_proj.weight'].T; up = h @ w[p+'mlp.up_proj.weight'].T
        x = x + (gt/(1+np.exp(-gt))*up) @ w[p+'mlp.down_proj.weight'].T
    x = rf.rms_norm(x, w['model.norm.weight'], eps)
    return x[P:] @ w['model.embed_tokens.weight' if 'lm_head.weight' not in w else 'lm_head.weight'].T
def logsm(z): z = z - z.max(-1, keepdims=True); return z - np.log(np.exp(z).sum(-1, keepdims=True))
C = int(sys.argv[1]); nwin = int(sys.argv[2]); settings = sys.argv[3:]
files = [f['ids'] for f in ids_all if len(f['ids']) >= C + 1][:nwin]
res = {s: [0, 0, 0, 0] for s in settings}
for f in files:
    ids = f[:C]; tgt = np.asarray(f[1:C+1]); P = C - 64
    MODE.update(k='none', v='none'); base = logsm(forward(ids, P).astype(np.float64))
    nll0 = -base[np.arange(64), tgt[P:]].sum()
    for s in settings:
        parts = dict(kv.split('=') for kv in s.split(','))
        MODE.update(k=parts.get('k','none'), v=parts.get('v','none'))
        SINK = int(parts.get('S', 0))
        lp = logsm(forward(ids, P, max(int(parts.get('R', 0)), 1 if SINK else 0)).astype(np.float64))
        nll = -lp[np.arange(64), tgt[P:]].sum()
        kl = (np.exp(base) * (base - lp)).sum(-1).sum()
        r = res[s]; r[0] += nll; r[1] += nll0; r[2] += kl; r[3] += 64
print(f'C={C} windows={len(files)}')
for s, (nll, nll0, kl, cnt) in res.items():
    print(f'{s:30s} ppl_ratio={math.exp((nll-nll0)/cnt):.4f} kl={kl/cnt:.4f}')
