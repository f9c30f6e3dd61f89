#!/usr/bin/python3
"""Independent NumPy float64 reference of the Hugging Face Llama forward (Qwen2 q/k/v biases and
Qwen3 QK-norm included), used to write the golden logits kvgate's C++ forward is tested against.

    # logits of fixed prompts for one model folder -> JSON
    /usr/bin/python3 tools/reference_forward.py MODEL_DIR OUT.json
    # regenerate every committed golden (runs make_tiny_model.py for each variant in a temp dir)
    /usr/bin/python3 tools/reference_forward.py --write-goldens tests/data/tiny_golden

It reads config.json and the safetensors files (single or sharded) with NumPy only and follows
transformers' modeling_llama / modeling_qwen2 / modeling_qwen3 in float64: RMSNorm, rotate-half
RoPE with Llama-3 ("llama3") or linear frequency scaling, grouped-query causal attention, SwiGLU
MLP, final norm, tied or untied lm_head. It shares no code with kvgate.

Golden JSON (sorted keys): {"model": variant, "safetensors_sha256": {file: hex},
"prompts": [[ids...], ...], "rows": [{"prompt": i, "position": p, "logits": [vocab floats]}, ...]};
a row is the logits predicting the token after position p of prompt i, given tokens 0..p.
"""

import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, size = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = np.frombuffer(blob[base + begin:base + end], dtype=np_dtype)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float64).reshape(info["shape"])
    return tensors


def load_model(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(read_safetensors(os.path.join(model_dir, name)))
    return config, weights


def inverse_frequencies(config, head_dim):
    inv_freq = 1.0 / (config.get("rope_theta", 10000.0) **
                      (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "default":
        sys.exit(f"unsupported rope_scaling {scaling}")
    return inv_freq


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(config, w, ids):
    """Returns logits [len(ids), vocab] for one sequence (float64)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    eps = config.get("rms_norm_eps", 1e-6)
    model_type = config.get("model_type", "llama")
    n = len(ids)

    inv_freq = inverse_frequencies(config, head_dim)
    angles = np.outer(np.arange(n, dtype=np.float64), inv_freq)  # [n, head_dim/2]
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]  # [n, 1, head_dim]

    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = h @ w[p + "self_attn.q_proj.weight"].T
        k = h @ w[p + "self_attn.k_proj.weight"].T
        v = h @ w[p + "self_attn.v_proj.weight"].T
        if p + "self_attn.q_proj.bias" in w:
            q = q + w[p + "self_attn.q_proj.bias"]
            k = k + w[p + "self_attn.k_proj.bias"]
            v = v + w[p + "self_attn.v_proj.bias"]
        q = q.reshape(n, heads, head_dim)
        k = k.reshape(n, kv_heads, head_dim)
        v = v.reshape(n, kv_heads, head_dim)
        if model_type == "qwen3":
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = heads // kv_heads
        out = np.empty((n, heads, head_dim))
        for head in range(heads):
            kv = head // group
            scores = q[:, head, :] @ k[:, kv, :].T / math.sqrt(head_dim) + causal
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            out[:, head, :] = probs @ v[:, kv, :]
        attn = out.reshape(n, heads * head_dim) @ w[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in w:
            attn = attn + w[p + "self_attn.o_proj.bias"]
        x = x + attn
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    lm_head = w.get("lm_head.weight")
    if lm_head is None or config.get("tie_word_embeddings", False):
        lm_head = w["model.embed_tokens.weight"]
    return x @ lm_head.T


def golden_prompts(vocab_size, bos_id):
    """Four fixed prompts of lengths 1, 9, 37, 100 (ids below the special tokens, BOS first)."""
    rng = np.random.RandomState(4242)
    prompts = [[bos_id]]
    for length in (9, 37, 100):
        prompts.append([bos_id] + [int(t) for t in rng.randint(0, vocab_size - 2, length - 1)])
    return prompts


def golden_positions(length):
    if length <= 9:
        return list(range(length))
    return sorted(set([0, 1, length // 2] + list(range(length - 4, length))))


def write_golden(model_dir, variant, out_path):
    config, weights = load_model(model_dir)
    prompts = golden_prompts(config["vocab_size"], config["bos_token_id"])
    rows = []
    for i, ids in enumerate(prompts):
        logits = forward(config, weights, ids)
        for position in golden_positions(len(ids)):
            rows.append({"prompt": i, "position": position,
                         "logits": [float("%.8g" % x) for x in logits[position]]})
    shas = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with open(os.path.join(model_dir, name), "rb") as f:
                shas[name] = hashlib.sha256(f.read()).hexdigest()
    with open(out_path, "w") as f:
        json.dump({"model": variant, "safetensors_sha256": shas, "prompts": prompts,
                   "rows": rows}, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("out_json", nargs="?")
    parser.add_argument("--write-goldens", metavar="DIR",
                        help="generate every tiny variant and write DIR/<variant>.json")
    args = parser.parse_args()
    if args.write_goldens:
        maker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_tiny_model.py")
        os.makedirs(args.write_goldens, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for variant in ("llama", "qwen2", "qwen3"):
                model_dir = os.path.join(tmp, variant)
                subprocess.run([sys.executable, maker, model_dir, "--variant", variant],
                               check=True)
                write_golden(model_dir, variant,
                             os.path.join(args.write_goldens, variant + ".json"))
        return
    if not args.model_dir or not args.out_json:
        parser.error("MODEL_DIR and OUT_JSON, or --write-goldens DIR")
    write_golden(args.model_dir, os.path.basename(os.path.normpath(args.model_dir)),
                 args.out_json)


if __name__ == "__main__":
    main()
