#!/usr/bin/python3
"""Writes kvgate's tiny bundled model: a deterministic, randomly initialized Llama-architecture
model in the exact Hugging Face folder format.

    /usr/bin/python3 tools/make_tiny_model.py models/tiny
    /usr/bin/python3 tools/make_tiny_model.py OUT --dtype f32 --shards 2      # same weights, f32
    /usr/bin/python3 tools/make_tiny_model.py OUT --variant qwen2             # tied, q/k/v biases

Folder contents: config.json, model.safetensors (or model-0000i-of-0000n.safetensors plus
model.safetensors.index.json), tokenizer.json (Llama-3-style byte-level BPE whose merges are learned
by a small deterministic BPE trainer from the text embedded below), tokenizer_config.json,
generation_config.json.

Runs under Debian's /usr/bin/python3 with python3-numpy and nothing else. The output is the same
bytes on every run (fixed seeds, numpy's frozen legacy RandomState stream, sorted JSON keys).
Weights are random with a sensible scale (unit-variance activations, attention scores with a
standard deviation near 1, logits with a spread of a few units) so that greedy output varies with
the prompt.
"""

import argparse
import collections
import json
import os
import re
import struct
import sys

import numpy as np

# ---- Architecture --------------------------------------------------------------------------------

NUM_BYTE_TOKENS = 256
NUM_MERGES = 254
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
VOCAB_SIZE = NUM_BYTE_TOKENS + NUM_MERGES + 2  # 512: bytes, merges, then the two special tokens
BOS_ID = VOCAB_SIZE - 2
EOS_ID = VOCAB_SIZE - 1

# head_dim 64: every KV format's CPU and CUDA kernels support it (TurboQuant needs a power of two
# >= 64, KIVI a multiple of its group size 32).
HIDDEN = 256
LAYERS = 3
HEADS = 4
HEAD_DIM = 64
INTERMEDIATE = 512
MAX_POSITIONS = 2048
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
# Llama-3 scaling with a small original context so that, at head_dim 64, the three frequency bands
# (kept, smoothed, divided by factor) all occur: wavelengths 6.3 .. 47120 vs 256 / 1024.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}

# Variants: the default Llama (GQA 4/2, untied, llama3 RoPE scaling) and two small extensions.
VARIANTS = {
    "llama": dict(model_type="llama", arch="LlamaForCausalLM", kv_heads=2, tied=False,
                  bias=False, qk_norm=False, rope_scaling=LLAMA3_ROPE_SCALING, seed=20261129),
    # Qwen2: q/k/v biases, tied embeddings, plain MHA, no RoPE scaling.
    "qwen2": dict(model_type="qwen2", arch="Qwen2ForCausalLM", kv_heads=4, tied=True,
                  bias=True, qk_norm=False, rope_scaling=None, seed=20261130),
    # Qwen3: per-head RMSNorm of q and k before RoPE, GQA 4/1, untied.
    "qwen3": dict(model_type="qwen3", arch="Qwen3ForCausalLM", kv_heads=1, tied=False,
                  bias=False, qk_norm=True, rope_scaling=None, seed=20261131),
}

# ---- Tokenizer training text (ASCII English and code) ------------------------------------------

TRAINING_TEXT = r"""
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the
forest. A gateway routes each request to the pool that fits it best: long documents go to workers
that compress their key-value cache, while questions that need exact recall go to workers that keep
full precision. Every response says which pool served it and why.

In the beginning there was a prompt, and the model read it one token at a time. The cache grew with
every token, and the memory of the machine was not unlimited. So the engineers asked: what if we
store the keys and values with fewer bits? They measured the error, they measured the speed, and
they wrote down the numbers in a table so that nobody would have to guess.

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of
Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.

She said: "I'll be there at 10:30, don't wait for me." He replied that he'd already left, and
they're both still waiting. We've seen 1234 requests per second, then 5678, then 90 again.

def attention(query, keys, values, scale):
    scores = [scale * sum(q * k for q, k in zip(query, key)) for key in keys]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [sum(w * v[i] for w, v in zip(weights, values)) / total for i in range(len(values[0]))]

for (int i = 0; i < num_tokens; ++i) {
  const float* row = input + i * hidden_size;
  float sum = 0.0f;
  for (int j = 0; j < hidden_size; ++j) sum += row[j] * row[j];
  output[i] = 1.0f / std::sqrt(sum / hidden_size + eps);
}

class Request:
    def __init__(self, prompt, max_tokens=128, temperature=0.0):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature

    def __repr__(self):
        return f"Request(prompt={self.prompt!r}, max_tokens={self.max_tokens})"

if (status.ok()) {
  return response;
} else {
  return absl::InvalidArgumentError("the request is not valid");
}

The weather today is sunny with a few clouds in the afternoon. Tomorrow it will rain in the north
and the temperature will fall to twelve degrees. The river flows to the sea, the sea rises to the
sky, and the sky returns the water to the mountains as snow. Children play in the park after school
while their parents talk about work, the news, and the price of bread.
"""

# Llama-3's pre-tokenizer split pattern (used verbatim in tokenizer.json).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The same pattern for Python's `re`, which has no \p{..}: exact on ASCII text (asserted).
ASCII_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) +
          list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_bpe(text, num_merges):
    """Byte-level BPE: repeatedly merges the most frequent adjacent pair (ties: smallest pair)."""
    assert text.isascii()
    byte_map = bytes_to_unicode()
    words = collections.Counter(
        tuple(byte_map[b] for b in piece.encode("utf-8"))
        for piece in re.findall(ASCII_SPLIT_REGEX, text))
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_words = collections.Counter()
        for word, count in words.items():
            out = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    if len(merges) != num_merges:
        sys.exit(f"BPE training text too small: {len(merges)} merges of {num_merges}")
    return merges


def tokenizer_json():
    byte_map = bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    merges = train_bpe(TRAINING_TEXT, NUM_MERGES)
    for pair in merges:
        token = pair[0] + pair[1]
        assert token not in vocab, token
        vocab[token] = len(vocab)
    assert len(vocab) == BOS_ID

    def added(token_id, content):
        return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(BOS_ID, BOS_TOKEN), added(EOS_ID, EOS_TOKEN)],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                 "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS_ID],
                                                "tokens": [BOS_TOKEN]}}},
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [a + " " + b for a, b in merges],
        },
    }


# ---- Weights -------------------------------------------------------------------------------------


def to_bf16_bits(x):
    """float32 array -> uint16 bf16 bit patterns, round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def make_weights(v):
    """Ordered list of (name, float32 array); every value is exactly representable in bf16."""
    rng = np.random.RandomState(v["seed"])
    kv_heads = v["kv_heads"]
    q_dim, kv_dim = HEADS * HEAD_DIM, kv_heads * HEAD_DIM

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n):
        return (1.0 + normal((n,), 0.1)).astype(np.float32)

    # Tied embeddings are the lm_head too: scaled like it so that logits spread over a few units.
    embed_std = 3.0 / np.sqrt(HIDDEN) if v["tied"] else 1.0
    w = [("model.embed_tokens.weight", normal((VOCAB_SIZE, HIDDEN), embed_std))]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        w.append((p + "input_layernorm.weight", norm_weight(HIDDEN)))
        # q and k elements of unit scale: attention scores q.k/sqrt(head_dim) with std ~1, so that
        # attention depends clearly on content and position without being one-hot.
        w.append((p + "self_attn.q_proj.weight", normal((q_dim, HIDDEN), 1.0 / np.sqrt(HIDDEN))))
        w.append((p + "self_attn.k_proj.weight", normal((kv_dim, HIDDEN), 1.0 / np.sqrt(HIDDEN))))
        w.append((p + "self_attn.v_proj.weight", normal((kv_dim, HIDDEN), 1.0 / np.sqrt(HIDDEN))))
        if v["bias"]:
            w.append((p + "self_attn.q_proj.bias", normal((q_dim,), 0.5)))
            w.append((p + "self_attn.k_proj.bias", normal((kv_dim,), 0.5)))
            w.append((p + "self_attn.v_proj.bias", normal((kv_dim,), 0.5)))
        if v["qk_norm"]:
            w.append((p + "self_attn.q_norm.weight", norm_weight(HEAD_DIM)))
            w.append((p + "self_attn.k_norm.weight", norm_weight(HEAD_DIM)))
        w.append((p + "self_attn.o_proj.weight", normal((HIDDEN, q_dim), 1.0 / np.sqrt(q_dim))))
        w.append((p + "post_attention_layernorm.weight", norm_weight(HIDDEN)))
        w.append((p + "mlp.gate_proj.weight",
                  normal((INTERMEDIATE, HIDDEN), 1.0 / np.sqrt(HIDDEN))))
        w.append((p + "mlp.up_proj.weight", normal((INTERMEDIATE, HIDDEN), 1.0 / np.sqrt(HIDDEN))))
        w.append((p + "mlp.down_proj.weight",
                  normal((HIDDEN, INTERMEDIATE), 1.0 / np.sqrt(INTERMEDIATE))))
    w.append(("model.norm.weight", norm_weight(HIDDEN)))
    if not v["tied"]:
        w.append(("lm_head.weight", normal((VOCAB_SIZE, HIDDEN), 3.0 / np.sqrt(HIDDEN))))
    # Round every value to bf16 so that the bf16 and f32 files hold the same model.
    return [(name, bf16_bits_to_f32(to_bf16_bits(a)).reshape(a.shape)) for name, a in w]


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, float32 array); dtype "BF16" or "F32". Data in the listed order."""
    header = {}
    blobs = []
    offset = 0
    for name, array in tensors:
        data = (to_bf16_bits(array) if dtype == "BF16" else array.astype("<f4")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data aligned to 8 bytes, as HF writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
    return offset


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, indent=2, ensure_ascii=False)
        f.write("\n")


def config_json(v, dtype):
    config = {
        "architectures": [v["arch"]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": v["model_type"],
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": v["kv_heads"],
        "rms_norm_eps": RMS_EPS,
        "rope_scaling": v["rope_scaling"],
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": v["tied"],
        "torch_dtype": "bfloat16" if dtype == "BF16" else "float32",
        "transformers_version": "4.46.0",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    if v["model_type"] == "llama":
        config.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    if v["model_type"] == "qwen3":
        config["attention_bias"] = False
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="llama")
    parser.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    args = parser.parse_args()
    v = VARIANTS[args.variant]
    dtype = "BF16" if args.dtype == "bf16" else "F32"
    os.makedirs(args.out_dir, exist_ok=True)
    for name in os.listdir(args.out_dir):  # stale shards from an earlier layout
        if name.startswith("model") and (name.endswith(".safetensors") or
                                         name.endswith(".index.json")):
            os.remove(os.path.join(args.out_dir, name))

    tensors = make_weights(v)
    if args.shards <= 1:
        write_safetensors(os.path.join(args.out_dir, "model.safetensors"), tensors, dtype)
    else:
        per_shard = -(-len(tensors) // args.shards)
        weight_map = {}
        total = 0
        for i in range(args.shards):
            part = tensors[i * per_shard:(i + 1) * per_shard]
            file_name = f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors"
            total += write_safetensors(os.path.join(args.out_dir, file_name), part, dtype)
            weight_map.update({name: file_name for name, _ in part})
        write_json(os.path.join(args.out_dir, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})

    write_json(os.path.join(args.out_dir, "config.json"), config_json(v, dtype))
    write_json(os.path.join(args.out_dir, "tokenizer.json"), tokenizer_json())
    write_json(os.path.join(args.out_dir, "tokenizer_config.json"), {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(BOS_ID): {"content": BOS_TOKEN, "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True},
            str(EOS_ID): {"content": EOS_TOKEN, "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True},
        },
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    write_json(os.path.join(args.out_dir, "generation_config.json"), {
        "bos_token_id": BOS_ID,
        "do_sample": False,
        "eos_token_id": EOS_ID,
        "transformers_version": "4.46.0",
    })


if __name__ == "__main__":
    main()
